"""PyTorch eager vs ONNX Runtime per stage and end to end, at the tiny and small presets.

    python benchmarks/export_latency.py [--presets tiny,small] [--threads N] [--steps 4] [--repeats 5]
        [--size PX] [--providers CPUExecutionProvider] [--graph-optimization-level all] [--opset 23] --out DIR

Per preset: export condition_encoder, dit and vae_decoder (one resolution, batch 1; parity gate on) into
``DIR/onnx_<preset>`` (reused when its manifest matches), then time on the same inputs:

* ``condition``: prompt + negative prompt (one left-padded batch of 2) -> context/pooled/mask. PyTorch:
  ``model.encode_tokens``; ONNX Runtime: the numpy M-RoPE positions + the session (both include positions);
* ``dit_step``: one DiT call on the CFG batch (2, 16, h, w); PyTorch ``model.velocity`` vs the session;
* ``vae_decode``: (1, 16, h, w) -> pixels;
* ``end_to_end``: the whole pipeline (``DeepGenPipeline`` vs ``OnnxDeepGenPipeline``) for ``--steps`` steps.

``--profile`` adds ONNX Runtime's per-op-type kernel time of the DiT step; ``--opset 20``,
``--graph-optimization-level`` and ``--ort-spinning 0`` are the knobs the docs' investigation compares.

Each row: ``--warmup`` calls of each, then ``--repeats`` alternating PyTorch / ONNX Runtime calls (both see the
same machine load); medians, and the speed-up as the median of the per-pair ratios. Both backends run in the same
process with ``torch.set_num_threads(N)`` and ORT ``intra_op_num_threads = N``. Writes ``export_latency.json`` and
``export_latency.md`` into ``--out``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time
from pathlib import Path

import numpy as np
import torch
from deepgen_components.export.exporter import export_model
from deepgen_components.export.onnx_pipeline import OnnxDeepGenPipeline, session_options
from deepgen_components.export.specs import ExportRanges

from deepgen_components import DeepGenPipeline, build_preset

STAGES = ("condition_encoder", "dit", "vae_decoder")
PROMPT = "a red fox sitting in fresh snow under a pale winter sun, photograph"


def compare(torch_fn, ort_fn, warmup: int, repeats: int) -> tuple[dict, dict, float]:
    """Warm both up, then alternate PyTorch and ONNX Runtime calls so that both see the same machine load (the
    2-core machine is shared); returns each side's median / min ms and the median of the per-pair ratios."""
    for _ in range(warmup):
        torch_fn()
        ort_fn()
    times: dict[str, list[float]] = {"torch": [], "ort": []}
    for _ in range(repeats):
        for name, fn in (("torch", torch_fn), ("ort", ort_fn)):
            start = time.perf_counter()
            fn()
            times[name].append((time.perf_counter() - start) * 1e3)
    summary = {
        name: {"ms": statistics.median(t), "min_ms": min(t), "max_ms": max(t), "repeats": repeats}
        for name, t in times.items()
    }
    ratio = statistics.median(a / b for a, b in zip(times["torch"], times["ort"]))
    return summary["torch"], summary["ort"], ratio


def export_for(model, preset: str, size: int, out: Path, opset: int) -> Path:
    folder = out / f"onnx_{preset}_{size}_opset{opset}"
    manifest_file = folder / "manifest.json"
    if manifest_file.is_file():
        manifest = json.loads(manifest_file.read_text())
        if set(STAGES) <= set(manifest["stages"]) and manifest["ranges"]["max_size"] == size:
            return folder
    ranges = ExportRanges(min_size=size, max_size=size, max_batch=1, max_prompt_tokens=256, opt_prompt_tokens=64)
    start = time.perf_counter()
    export_model(model, folder, stages=STAGES, ranges=ranges, opset=opset, progress=True, source={"preset": preset})
    print(f"exported {preset} in {time.perf_counter() - start:.0f} s -> {folder}")
    return folder


def bench_preset(preset: str, args, out: Path) -> dict:
    torch.manual_seed(0)
    model = build_preset(preset).eval()
    size = args.size or model.config.image_size
    folder = export_for(model, preset, size, out, args.opset)
    pipe = DeepGenPipeline(model)
    pipe.set_progress_bar_config(disable=True)
    onnx_pipe = OnnxDeepGenPipeline(
        folder, providers=args.providers.split(","), intra_op_num_threads=args.threads,
        graph_optimization_level=args.graph_optimization_level, allow_spinning=bool(args.ort_spinning),
    )
    onnx_pipe.set_progress_bar_config(disable=True)
    sessions = {stage: onnx_pipe.session(stage) for stage in STAGES}
    rows: dict[str, dict] = {}

    def row(name: str, torch_fn, ort_fn, shape: str) -> None:
        with torch.no_grad():
            eager, ort_result, ratio = compare(torch_fn, ort_fn, args.warmup, args.repeats)
        rows[name] = {"shape": shape, "torch_ms": eager["ms"], "ort_ms": ort_result["ms"], "speedup": ratio,
                      "torch": eager, "ort": ort_result}
        print(f"  {preset:<6} {name:<11} {shape:<34} torch {eager['ms']:9.1f} ms   ort {ort_result['ms']:9.1f} ms   "
              f"x{ratio:.2f}")

    # condition: prompt + "" negative in one left-padded batch
    batch = model.prepare_prompts([PROMPT, ""])
    tokens = onnx_pipe.processor([PROMPT, ""])
    assert np.array_equal(tokens.input_ids, batch.input_ids.numpy())
    features = np.zeros((*tokens.input_ids.shape, model.encoder.hidden_size), dtype=np.float32)

    def ort_condition():
        positions = onnx_pipe.processor.positions(tokens.input_ids, tokens.attention_mask, [])
        return sessions["condition_encoder"].run(None, {
            "input_ids": tokens.input_ids, "attention_mask": tokens.attention_mask, "position_ids": positions,
            "image_features": features,
        })

    row("condition", lambda: model.encode_tokens(batch), ort_condition, f"B=2, L={tokens.input_ids.shape[1]}")

    # one DiT step on the CFG batch
    with torch.no_grad():
        condition, _ = model.encode_tokens(batch)
    latent = size // model.vae_scale_factor
    latents = torch.randn(2, model.latent_channels, latent, latent)
    timestep = torch.full((2,), 500.0)
    feeds = {"hidden_states": latents.numpy(), "encoder_hidden_states": condition.context.numpy(),
             "pooled": condition.pooled.numpy(), "timestep": timestep.numpy()}
    if model.bridge.config.mask_padding:
        feeds["context_mask"] = condition.mask.numpy()
    row("dit_step", lambda: model.velocity(latents, timestep, condition), lambda: sessions["dit"].run(None, feeds),
        f"(2, 16, {latent}, {latent}) + ctx {tuple(condition.context.shape[1:])}")

    # VAE decode
    one = latents[:1]
    row("vae_decode", lambda: model.decode_latents(one), lambda: sessions["vae_decoder"].run(None, {"latents": one.numpy()}),
        f"(1, 16, {latent}, {latent}) -> {size}x{size}")

    # end to end, same initial noise
    start_noise = torch.randn(1, model.latent_channels, latent, latent)
    kwargs = dict(num_inference_steps=args.steps, guidance_scale=4.0, height=size, width=size)
    row("end_to_end", lambda: pipe(PROMPT, latents=start_noise, output_type="np", **kwargs),
        lambda: onnx_pipe(PROMPT, latents=start_noise.numpy(), output_type="np", **kwargs),
        f"{size}x{size}, {args.steps} steps, CFG")
    profile = dit_profile(folder / "dit.onnx", feeds, args) if args.profile else None
    manifest = json.loads((folder / "manifest.json").read_text())
    return {
        "dit_profile": profile,
        "size": size,
        "rows": rows,
        "onnx": {stage: {"opset": manifest["stages"][stage]["opset"],
                         "parity_max_relative": manifest["stages"][stage]["parity"].get("max_relative"),
                         "op_types": manifest["stages"][stage]["precision"]["op_types"]} for stage in STAGES},
        "export_folder": str(folder),
    }


def dit_profile(path: Path, feeds: dict, args, runs: int = 2) -> dict:
    """ONNX Runtime's own per-node timings of the DiT step, summed by op type (share of the kernel time)."""
    import onnxruntime

    options = session_options(args.threads, args.graph_optimization_level, bool(args.ort_spinning))
    options.enable_profiling = True
    options.profile_file_prefix = str(path.parent / "dit_profile")
    session = onnxruntime.InferenceSession(str(path), options, providers=args.providers.split(","))
    for _ in range(runs):
        session.run(None, feeds)
    trace = Path(session.end_profiling())
    by_op: dict[str, float] = {}
    for event in json.loads(trace.read_text()):
        if event.get("cat") == "Node" and event["name"].endswith("_kernel_time"):
            op = event["args"]["op_name"]
            by_op[op] = by_op.get(op, 0.0) + event["dur"] / 1e3 / runs
    trace.unlink()
    total = sum(by_op.values())
    shares = {op: {"ms": ms, "share": ms / total} for op, ms in sorted(by_op.items(), key=lambda kv: -kv[1])}
    print("  DiT step kernel time by op type: " + ", ".join(
        f"{op} {v['share']:.0%}" for op, v in list(shares.items())[:6]))
    return shares


def markdown(results: dict) -> str:
    meta = results["meta"]
    lines = [
        f"Machine: {meta['machine']}; {meta['cpu_count']} CPUs; torch {meta['torch']} threads = ORT intra-op threads = "
        f"{meta['threads']}; onnxruntime {meta['onnxruntime']} ({meta['providers']}, graph optimisation "
        f"{meta['graph_optimization_level']}, opset {meta['opset']}); {meta['repeats']} alternating PyTorch / ORT calls "
        f"after {meta['warmup']} warm-up calls each, medians; load average {meta['load_average'][0]:.1f} before, "
        f"{meta['load_average_after'][0]:.1f} after.",
        "",
        "| preset | stage | shape | PyTorch eager (ms) | ONNX Runtime (ms) | speed-up (median of pairs) |",
        "|---|---|---|---:|---:|---:|",
    ]
    for preset, result in results["presets"].items():
        for name, row in result["rows"].items():
            lines.append(f"| {preset} | {name} | {row['shape']} | {row['torch_ms']:.1f} | {row['ort_ms']:.1f} | "
                         f"{row['speedup']:.2f}x |")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--presets", default="tiny,small")
    parser.add_argument("--threads", type=int, default=os.cpu_count())
    parser.add_argument("--steps", type=int, default=4, help="denoising steps of the end-to-end row")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--size", type=int, default=None, help="image side (default: each preset's image_size)")
    parser.add_argument("--providers", default="CPUExecutionProvider")
    parser.add_argument("--graph-optimization-level", default="all", choices=["disable", "basic", "extended", "all"])
    parser.add_argument("--opset", type=int, default=23)
    parser.add_argument("--ort-spinning", type=int, default=1, choices=[0, 1], help="ORT intra-op threads spin-wait")
    parser.add_argument("--profile", action="store_true", help="also profile the ORT DiT step by op type")
    parser.add_argument("--out", required=True)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    import onnxruntime

    results = {
        "meta": {
            "machine": platform.processor() or platform.machine(), "platform": platform.platform(),
            "cpu_count": os.cpu_count(), "threads": args.threads, "torch": torch.__version__,
            "onnxruntime": onnxruntime.__version__, "providers": args.providers, "opset": args.opset,
            "graph_optimization_level": args.graph_optimization_level, "warmup": args.warmup,
            "repeats": args.repeats, "steps": args.steps, "load_average": os.getloadavg(),
            "env": {k: os.environ.get(k) for k in ("OMP_NUM_THREADS", "OMP_WAIT_POLICY")},
            "command": "python benchmarks/export_latency.py " + " ".join(
                f"--{k.replace('_', '-')} {v}" for k, v in vars(args).items() if v is not None),
        },
        "presets": {},
    }
    for preset in args.presets.split(","):
        results["presets"][preset] = bench_preset(preset, args, out)
    results["meta"]["load_average_after"] = os.getloadavg()
    (out / "export_latency.json").write_text(json.dumps(results, indent=2) + "\n")
    (out / "export_latency.md").write_text(markdown(results))
    print(markdown(results))


if __name__ == "__main__":
    main()
