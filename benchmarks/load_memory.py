"""Peak RAM and time while loading a model, as a ratio to the bytes of the weights it loads.

    python benchmarks/load_memory.py --out out/load_memory            # small preset, the numbers in the docs
    python benchmarks/load_memory.py --quick --out out/load_memory    # tiny preset, seconds (the test runs it)

First the inputs are written once under ``<out>/inputs``: a saved pipeline folder of the preset's random model
(``DeepGenPipeline.save_pretrained``) and its official export (``official.to_official_state_dict``): layout (a), one
``deepgen.safetensors`` beside the VLM, VAE and tokenizer folders, and layout (b), the diffusers-format release
folder. Everything is written in float32. Then each case (loading path x dtype) runs in a fresh Python process:
it imports the libraries, resets the process's peak resident set (``/proc/self/clear_refs``), loads, and reports
the increase of the peak (``VmHWM``) over the resident set before loading, the wall time, and the bytes of the
loaded model's parameters and buffers. ``ratio`` = peak increase / loaded bytes (1.0 would be the weights alone).
The table is printed and written to ``<out>/load_memory.json``. CPU only, Linux only. See docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

PATHS = ("folder", "official-file", "official-release")
DTYPES = ("float32", "bfloat16")


def _status_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"/proc/self/status has no {field}")


def _modules(loaded):
    """The torch modules of what a loader returned (a model, or a pipeline holding one or several)."""
    import torch

    if isinstance(loaded, torch.nn.Module):
        return [loaded]
    if isinstance(getattr(loaded, "model", None), torch.nn.Module):
        return [loaded.model]
    return [m for m in getattr(loaded, "components", {}).values() if isinstance(m, torch.nn.Module)]


def _loaded_bytes(modules) -> tuple[int, list[str]]:
    """Bytes of the distinct storages of all parameters and buffers, and the floating dtypes found."""
    seen, total, dtypes = set(), 0, set()
    for module in modules:
        for t in (*module.parameters(), *module.buffers()):
            storage = t.untyped_storage()
            if storage.data_ptr() not in seen:
                seen.add(storage.data_ptr())
                total += storage.nbytes()
            if t.is_floating_point():
                dtypes.add(str(t.dtype).removeprefix("torch."))
    return total, sorted(dtypes)


def _loader(path: str, dtype, inputs: Path):
    """The function that loads case ``path`` in ``dtype`` (imports done here, before the measurement)."""
    from deepgen_components import DeepGenPipeline, deepgen_from_official

    official = inputs / "official"
    if path == "folder":
        import inspect

        params = inspect.signature(DeepGenPipeline.from_pretrained).parameters
        key = "dtype" if "dtype" in params and "torch_dtype" not in params else "torch_dtype"
        return lambda: DeepGenPipeline.from_pretrained(str(inputs / "folder"), **{key: dtype})
    if path == "official-file":
        return lambda: deepgen_from_official(
            official / "qwen2_5_vl", official / "deepgen.safetensors", vae_path=official / "vae",
            tokenizer_path=official / "tokenizer", transformer_config=official / "release" / "transformer",
            dtype=dtype,
        )
    if path == "official-release":
        return lambda: deepgen_from_official(official / "qwen2_5_vl", official / "release", dtype=dtype)
    raise ValueError(f"path: unknown loading path {path!r}; one of {', '.join(PATHS)}")


def run_case(path: str, dtype_name: str, inputs: Path) -> dict:
    """Measure one case in this process (meant to be a fresh one)."""
    import gc

    import torch
    from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel  # noqa: F401
    from transformers import AutoTokenizer, Qwen2_5_VLForConditionalGeneration  # noqa: F401

    load = _loader(path, getattr(torch, dtype_name), inputs)
    gc.collect()
    reset = True
    try:
        Path("/proc/self/clear_refs").write_text("5")  # resets VmHWM to the current resident set
    except OSError:
        reset = False
    before = _status_kib("VmRSS") * 1024
    start = time.perf_counter()
    loaded = load()
    seconds = time.perf_counter() - start
    peak = _status_kib("VmHWM") * 1024
    weights, dtypes = _loaded_bytes(_modules(loaded))
    increase = peak - before  # without the reset (old kernels) an upper bound: the peak may predate loading
    return {
        "path": path,
        "dtype": dtype_name,
        "loaded_bytes": weights,
        "weight_dtypes": dtypes,
        "rss_before_bytes": before,
        "peak_rss_bytes": peak,
        "peak_increase_bytes": increase,
        "ratio": round(increase / weights, 3),
        "seconds": round(seconds, 2),
        "peak_reset": reset,
    }


def _tiny_official():
    """The tiny preset with the official layer rule (one of its 4 VLM layers) and a 64-wide connector (the
    official head size), so that its official export imports without extra arguments."""
    from deepgen_components import (
        BridgeConfig,
        ConnectorConfig,
        DeepGenModel,
        LayerSelection,
        StackedChannelBridge,
        deepgen_tiny,
    )

    tiny = deepgen_tiny()
    layers = LayerSelection.official(tiny.vlm.config.text_config.num_hidden_layers)
    bridge = StackedChannelBridge(BridgeConfig(
        num_stacked_layers=len(layers), vlm_hidden_size=64, context_dim=64, pooled_dim=32,
        connector=ConnectorConfig(hidden_size=64, num_layers=2, num_heads=1, intermediate_size=128),
    ))
    return DeepGenModel(tiny.vlm, tiny.think_tokens, layers, bridge, tiny.dit, tiny.vae, tiny.scheduler,
                        tiny.tokenizer, tiny.config).eval()


def write_inputs(preset: str, inputs: Path) -> dict:
    """The saved pipeline folder and the official export (both layouts) of the preset's random model, float32."""
    import torch

    from deepgen_components import DeepGenPipeline, build_preset
    from deepgen_components.official import save_official_files

    done = inputs / "inputs.json"
    if done.is_file() and json.loads(done.read_text()).get("preset") == preset:
        return json.loads(done.read_text())
    model = build_preset(preset).to(torch.float32).eval() if preset != "tiny" else _tiny_official()
    DeepGenPipeline(model).save_pretrained(str(inputs / "folder"))
    save_official_files(model, inputs / "official")
    info = {
        "preset": preset,
        "fp32_weight_bytes": sum(t.numel() * t.element_size() for t in (*model.parameters(), *model.buffers())),
    }
    done.write_text(json.dumps(info, indent=2) + "\n")
    return info


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(
        prog="load_memory",
        description="Peak RSS increase and time while loading (saved pipeline folder, official weights in both "
        "layouts) x (float32, bfloat16), each in a fresh process, as a ratio to the loaded weight bytes.",
    )
    parser.add_argument("--out", default="out/load_memory", help="folder for the inputs and load_memory.json")
    parser.add_argument("--preset", default="small", choices=("tiny", "small"), help="model size (default small)")
    parser.add_argument("--quick", action="store_true", help="the tiny preset: seconds, checks the benchmark runs")
    parser.add_argument("--paths", default=",".join(PATHS), help=f"comma-separated subset of {','.join(PATHS)}")
    parser.add_argument("--dtypes", default=",".join(DTYPES), help=f"comma-separated subset of {','.join(DTYPES)}")
    parser.add_argument("--child", nargs=3, metavar=("PATH", "DTYPE", "INPUTS"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        print(json.dumps(run_case(args.child[0], args.child[1], Path(args.child[2]))))
        return 0
    if not Path("/proc/self/status").is_file():
        parser.error("needs Linux (/proc/self/status)")
    paths, dtypes = args.paths.split(","), args.dtypes.split(",")
    for name, values, known in (("--paths", paths, PATHS), ("--dtypes", dtypes, DTYPES)):
        if unknown := [v for v in values if v not in known]:
            parser.error(f"{name}: unknown {', '.join(unknown)}; choose from {', '.join(known)}")
    preset = "tiny" if args.quick else args.preset
    out = Path(args.out)
    inputs = out / "inputs"
    info = write_inputs(preset, inputs)
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    rows = []
    for path in paths:
        for dtype in dtypes:
            proc = subprocess.run(
                [sys.executable, __file__, "--child", path, dtype, str(inputs)],
                capture_output=True, text=True, env=env,
            )
            if proc.returncode != 0:
                sys.stderr.write(proc.stderr)
                raise SystemExit(f"load_memory: case {path} / {dtype} failed (exit {proc.returncode})")
            rows.append(json.loads(proc.stdout.strip().splitlines()[-1]))
    result = {"preset": preset, "fp32_weight_bytes": info["fp32_weight_bytes"], "python": sys.version.split()[0],
              "cases": rows}
    out.mkdir(parents=True, exist_ok=True)
    (out / "load_memory.json").write_text(json.dumps(result, indent=2) + "\n")
    print(f"preset {preset}: loaded weights {info['fp32_weight_bytes'] / 2**20:.0f} MiB in float32")
    print(f"{'path':<18} {'dtype':<9} {'loaded MiB':>10} {'peak +MiB':>10} {'ratio':>6} {'seconds':>8}")
    for r in rows:
        print(f"{r['path']:<18} {r['dtype']:<9} {r['loaded_bytes'] / 2**20:>10.1f} "
              f"{r['peak_increase_bytes'] / 2**20:>10.1f} {r['ratio']:>6.2f} {r['seconds']:>8.2f}")
    print(f"wrote {out / 'load_memory.json'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
