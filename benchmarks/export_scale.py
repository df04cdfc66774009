"""Export the DiT stage at DeepGen 1.0's real size on a CPU: time and peak RAM of each phase.

    python benchmarks/export_scale.py --out out/export_scale                  # 2.24B-parameter DiT, fp32 (~10 min)
    python benchmarks/export_scale.py --preset tiny --out out/export_scale    # seconds (the test runs it)

The model is ``deepgen_1_0(device="meta")`` (no memory) with only its DiT (SD3.5-Medium MMDiT, 2.24B parameters)
materialised with random weights in ``--dtype`` on the CPU; the VLM, bridge and VAE stay on the meta device, since the
``dit`` stage does not use them. ``export_model(stages=["dit"])`` then runs as ``deepgen export`` does: the dynamo
exporter at opset 23 with external data, ``onnx.checker`` by path (the graph is over 2 GB), one ONNX Runtime CPU run
of the traced example and the parity gate against PyTorch at one other small shape (fp32: relative error <= 1e-4).
The ranges are small (128-256 px, batch 1, prompts up to 64 tokens) so the PyTorch and ONNX Runtime runs take
seconds; the graph is the same for any range.

Reported per phase: wall seconds and the process's peak resident set (``VmHWM``, Linux) after it, plus the weight
bytes and the sizes of the written files. Printed and written to ``<out>/export_scale.json``; docs/export.md quotes
the numbers.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path


def _peak_gib() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 2**20
    raise RuntimeError("/proc/self/status has no VmHWM (Linux only)")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", required=True, help="output folder (the ONNX files go to <out>/onnx)")
    parser.add_argument("--preset", choices=("deepgen-1.0", "tiny"), default="deepgen-1.0",
                        help="deepgen-1.0: the real-size DiT (default); tiny: a seconds-long check of this script")
    parser.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32",
                        help="DiT weights' dtype (bfloat16 graphs do not run on ONNX Runtime's CPU provider: no parity)")
    parser.add_argument("--keep", action="store_true", help="keep the ONNX files (default: deleted after the run)")
    args = parser.parse_args(argv)

    import shutil

    import torch
    from deepgen_components.export.exporter import export_model
    from deepgen_components.export.specs import ExportRanges

    from deepgen_components.builders import deepgen_1_0, deepgen_tiny, materialize_random

    out = Path(args.out)
    onnx_dir = out / "onnx"
    shutil.rmtree(onnx_dir, ignore_errors=True)
    out.mkdir(parents=True, exist_ok=True)
    dtype = getattr(torch, args.dtype)
    phases = {}
    start = time.perf_counter()
    if args.preset == "tiny":
        model = deepgen_tiny(seed=0).to(dtype)
    else:
        torch.manual_seed(0)
        model = deepgen_1_0(device="meta", dtype=dtype)
        materialize_random(model.dit, dtype=dtype, device="cpu")
    model.eval()
    parameters = sum(p.numel() for p in model.dit.parameters())
    weight_bytes = sum(p.numel() * p.element_size() for p in model.dit.parameters())
    phases["build_dit"] = {"seconds": round(time.perf_counter() - start, 1), "peak_rss_gib": round(_peak_gib(), 2)}
    print(f"DiT: {parameters / 1e9:.3f}B parameters, {weight_bytes / 2**30:.2f} GiB of {args.dtype} weights", flush=True)

    start = time.perf_counter()
    ranges = ExportRanges(min_size=128, max_size=256, max_batch=1, max_prompt_tokens=64)
    manifest = export_model(model, onnx_dir, stages=["dit"], ranges=ranges, parity=True, parity_points=1,
                            progress=True, source={"preset": args.preset, "benchmark": "export_scale"})
    entry = manifest["stages"]["dit"]
    phases["export_check_parity"] = {"seconds": round(time.perf_counter() - start, 1),
                                     "peak_rss_gib": round(_peak_gib(), 2)}
    files = {f.name: f.stat().st_size for f in onnx_dir.iterdir() if f.is_file()}
    result = {
        "preset": args.preset,
        "dtype": args.dtype,
        "dit_parameters": parameters,
        "dit_weight_gib": round(weight_bytes / 2**30, 3),
        "phases": phases,
        "export_seconds_in_manifest": entry["export_seconds"],
        "opset": entry["opset"],
        "fallback": entry["fallback"],
        "runnable_on_cpu_ep": entry["runnable_on_cpu_ep"],
        "parity": {k: v for k, v in entry["parity"].items() if k != "shapes"},
        "parity_shapes": [r["inputs"] for r in entry["parity"].get("shapes", [])],
        "files_bytes": files,
        "peak_rss_over_weights": round(_peak_gib() * 2**30 / weight_bytes, 2),
        "versions": manifest["versions"],
        "threads": torch.get_num_threads(),
    }
    (out / "export_scale.json").write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps({k: result[k] for k in ("dit_parameters", "phases", "parity", "peak_rss_over_weights")}, indent=2))
    if not args.keep:
        shutil.rmtree(onnx_dir, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
