"""Latency benchmarks: per stage (condition encode, one DiT step, VAE decode) and end to end, per mode.

``deepgen bench`` and ``benchmarks/latency.py`` call :func:`run_suite`. Timing follows the usual GPU rules:
warm-up first, CUDA events around the region, the median of repeats; compilation time is reported separately;
every speed-up is a ratio against eager measured in the same process. Random weights are fine (latency does not
depend on weight values); the ``deepgen-1.0`` preset is materialised directly on the device in the benchmark
dtype (no CPU copy). The PyTorch modes time the denoising runner's own step (``DenoiseRunner.prepare`` / ``step``,
``denoising.kernels_context``, ``denoising.capture_cuda_graph``); the exported modes time the staged pipeline's
stage calls (``StagedPipeline.condition_feeds`` / ``prepare_feeds`` / ``run_stage``). The environment record, the
scaling fit, the table and the output files are :mod:`deepgen_components.cli.bench_report`.
"""

from __future__ import annotations

import contextlib
import logging
import statistics
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from deepgen_components.cli.bench_report import (
    environment,
    fit_scaling,
    markdown_table,
    tensorrt_status,
    write_outputs,
)
from deepgen_components.denoising import MODES as TORCH_MODES
from deepgen_components.denoising import DenoiseRunner, capture_cuda_graph, flow_match_sigmas, kernels_context

__all__ = ["MEMORY_MODES", "MODES", "BenchConfig", "Row", "add_commands", "measure_matmul_peak", "run_suite", "time_fn"]

logger = logging.getLogger(__name__)

EXPORTED_MODES = ("onnxruntime", "tensorrt")  # the model exported to ONNX, run outside PyTorch
MODES = TORCH_MODES + EXPORTED_MODES
MEMORY_MODES = ("none", "model", "sequential")  # --memory-mode: diffusers' offload methods (docs/pipeline.md)


@dataclass
class BenchConfig:
    preset: str = "tiny"
    device: str = "cpu"
    dtype: str = "float32"
    modes: tuple[str, ...] = ("eager", "compile")
    resolution: int = 64
    batch: int = 1
    steps: int = 20
    guidance_scale: float = 4.0
    prompt_tokens: int = 32
    repeats: int = 10
    warmup: int = 3
    resolutions: tuple[int, ...] = ()
    batches: tuple[int, ...] = ()
    sweep_mode: str = "eager"
    e2e: bool = True
    seed: int = 0
    threads: int | None = None
    export_dir: str | None = None  # where the exported modes keep their ONNX files (default: a temporary folder)
    memory_mode: str = "none"  # none | model | sequential: diffusers' enable_model/sequential_cpu_offload


@dataclass
class Row:
    preset: str
    mode: str
    stage: str
    resolution: int
    batch: int
    cfg: bool
    steps: int | None
    ms: float
    ms_spread: float = 0.0
    peak_memory_gib: float | None = None
    flops: float | None = None
    tflops: float | None = None
    ratio_vs_eager: float | None = None
    compile_s: float | None = None
    tokens: int | None = None
    note: str = ""


@dataclass
class SuiteResult:
    config: BenchConfig
    environment: dict
    rows: list[Row] = field(default_factory=list)
    fits: dict = field(default_factory=dict)

    def to_json(self) -> dict:
        return {"config": asdict(self.config), "environment": self.environment, "rows": [asdict(r) for r in self.rows],
                "fits": self.fits}


# -- timing ---------------------------------------------------------------------------------------------------


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_fn(fn, device: torch.device, *, warmup: int = 3, repeats: int = 10) -> tuple[float, float]:
    """(median ms, (p90 - p10) ms) of ``fn()``: CUDA events on a GPU, perf_counter on a CPU."""
    for _ in range(warmup):
        fn()
    _sync(device)
    times = []
    for _ in range(repeats):
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end))
        else:
            t0 = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t0) * 1000)
    times.sort()
    lo = times[max(0, int(0.1 * len(times)))]
    hi = times[min(len(times) - 1, int(0.9 * len(times)))]
    return statistics.median(times), hi - lo


def measure_matmul_peak(device: torch.device, dtype: torch.dtype = torch.bfloat16, n: int = 8192) -> float | None:
    """Achieved TFLOP/s of one large matmul on this device (random data), the ceiling the DiT is compared to."""
    if device.type != "cuda":
        return None
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    ms, _ = time_fn(lambda: a @ b, device, warmup=3, repeats=10)
    return 2 * n**3 / (ms / 1000) / 1e12


def _peak_memory(device: torch.device) -> float | None:
    return torch.cuda.max_memory_allocated(device) / 1024**3 if device.type == "cuda" else None


def _reset_peak(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)


def _flops(fn) -> float | None:
    try:
        from torch.utils.flop_counter import FlopCounterMode
    except ImportError:  # pragma: no cover
        return None
    counter = FlopCounterMode(display=False)
    with counter:
        fn()
    return float(counter.get_total_flops())


# -- the suite ----------------------------------------------------------------------------------------------------


def _dtype(name: str) -> torch.dtype:
    table = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
    if name not in table:
        raise ValueError(f"dtype must be one of {sorted(table)}, got {name!r}")
    return table[name]


@contextlib.contextmanager
def _default_dtype(dtype: torch.dtype):
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        yield
    finally:
        torch.set_default_dtype(previous)


def build_model(preset: str, device: torch.device, dtype: torch.dtype, seed: int = 0):
    """The preset with random weights, created directly on ``device`` in ``dtype``."""
    from deepgen_components.builders import build_preset

    torch.manual_seed(seed)
    with _default_dtype(dtype):
        model = build_preset(preset, device=device)
    return model.to(device=device, dtype=dtype).eval()


def _prompt(tokens: int) -> str:
    words = ["a", "red", "circle", "on", "the", "left", "of", "a", "blue", "square", "under", "sky"]
    return " ".join(words[i % len(words)] for i in range(max(1, tokens)))


def run_suite(cfg: BenchConfig, progress: bool = True) -> SuiteResult:
    from deepgen_components.pipeline import DeepGenPipeline

    device = torch.device(cfg.device)
    dtype = _dtype(cfg.dtype)
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    for mode in cfg.modes:
        if mode not in MODES:
            raise ValueError(f"modes: {mode!r} is not one of {', '.join(MODES)}")
    torch_modes = tuple(m for m in cfg.modes if m in TORCH_MODES)
    exported_modes = tuple(m for m in cfg.modes if m in EXPORTED_MODES)
    result = SuiteResult(cfg, environment(device))
    peak = measure_matmul_peak(device, dtype) if dtype != torch.float32 else measure_matmul_peak(device, torch.float32)
    result.environment["matmul_peak_tflops"] = peak
    if cfg.memory_mode not in MEMORY_MODES:
        raise ValueError(f"memory_mode: {cfg.memory_mode!r} is not one of {', '.join(MEMORY_MODES)}")
    offload = cfg.memory_mode != "none" and device.type != "cpu"
    t0 = time.perf_counter()
    model = build_model(cfg.preset, torch.device("cpu") if offload else device, dtype, cfg.seed)
    _sync(device)
    result.environment["build_seconds"] = time.perf_counter() - t0
    pipe = DeepGenPipeline(model)
    pipe.set_progress_bar_config(disable=True)
    prompts = [_prompt(cfg.prompt_tokens)] * cfg.batch
    do_cfg = cfg.guidance_scale != 1.0

    def add(row: Row) -> None:
        result.rows.append(row)
        if progress:
            extra = f" x{row.ratio_vs_eager:.2f}" if row.ratio_vs_eager else ""
            print(f"  {row.mode:<15} {row.stage:<12} {row.resolution:>5}px b{row.batch} {row.ms:10.2f} ms{extra}", flush=True)

    memory_rows(cfg, pipe, prompts, device, offload, add)
    if cfg.memory_mode != "none":  # the stage rows below run the model's parts directly, outside the offload hooks
        return result
    with torch.no_grad():
        # Condition encode (VLM + think tokens + bridge), prompt and negative in one batch.
        texts = prompts + [""] * cfg.batch if do_cfg else prompts
        _reset_peak(device)
        ms, spread = time_fn(lambda: model.encode_condition(texts), device, warmup=cfg.warmup, repeats=cfg.repeats)
        add(Row(cfg.preset, "eager", "condition", cfg.resolution, cfg.batch, do_cfg, None, ms, spread, _peak_memory(device)))
        condition = model.encode_condition(texts)
        if do_cfg:
            order = torch.cat([torch.arange(cfg.batch, 2 * cfg.batch), torch.arange(cfg.batch)])
            condition = condition.select(order)

        def dit_rows(resolution: int, batch: int, modes) -> None:
            cond = condition if batch == cfg.batch else _repeat_rows(condition, batch, cfg.batch, do_cfg)
            scale = model.vae_scale_factor
            latents = torch.randn(batch, model.latent_channels, resolution // scale, resolution // scale, device=device)
            timesteps, sigmas = flow_match_sigmas(model.scheduler, max(cfg.steps, 2), device=device)
            tokens = (resolution // scale // model.dit.patch_size) ** 2
            reference = DenoiseRunner(model, "eager")
            reference_args = _step_args(reference, cond, timesteps, sigmas, cfg.guidance_scale, do_cfg, latents)
            flops = _flops(lambda: reference.step(latents, *reference_args))  # FLOPs of one step, counted by torch
            eager_ms = None
            for mode in modes:
                runner = DenoiseRunner(model, mode)
                args = _step_args(runner, cond, timesteps, sigmas, cfg.guidance_scale, do_cfg, latents)
                fn, compile_s = _step_callable(runner, latents, args, device)
                _reset_peak(device)
                ms, spread = time_fn(fn, device, warmup=cfg.warmup, repeats=cfg.repeats)
                if mode == "eager":
                    eager_ms = ms
                add(Row(cfg.preset, mode, "dit_step", resolution, batch, do_cfg, None, ms, spread, _peak_memory(device),
                        flops, (flops / (ms / 1000) / 1e12) if flops else None, (eager_ms / ms) if eager_ms else None,
                        compile_s, tokens))

        dit_rows(cfg.resolution, cfg.batch, torch_modes)

        # VAE decode.
        scale = model.vae_scale_factor
        z = torch.randn(cfg.batch, model.latent_channels, cfg.resolution // scale, cfg.resolution // scale, device=device)
        _reset_peak(device)
        ms, spread = time_fn(lambda: model.decode_latents(z), device, warmup=cfg.warmup, repeats=max(3, cfg.repeats // 2))
        add(Row(cfg.preset, "eager", "vae_decode", cfg.resolution, cfg.batch, do_cfg, None, ms, spread, _peak_memory(device)))

        # End to end, per mode.
        if cfg.e2e:
            eager_ms = None
            for mode in torch_modes:
                pipe.optimize(mode)
                call = lambda: pipe(prompts, height=cfg.resolution, width=cfg.resolution, num_inference_steps=cfg.steps,
                                    guidance_scale=cfg.guidance_scale, generator=torch.Generator().manual_seed(0),
                                    output_type="pil")
                started = time.perf_counter()
                call()  # first call: compilation happens here
                _sync(device)
                first = time.perf_counter() - started
                _reset_peak(device)
                ms, spread = time_fn(call, device, warmup=1, repeats=max(3, cfg.repeats // 3))
                if mode == "eager":
                    eager_ms = ms
                add(Row(cfg.preset, mode, "end_to_end", cfg.resolution, cfg.batch, do_cfg, cfg.steps, ms, spread,
                        _peak_memory(device), ratio_vs_eager=(eager_ms / ms) if eager_ms else None,
                        compile_s=max(0.0, first - ms / 1000)))
            pipe.optimize("eager")

        if exported_modes:
            _exported_rows(cfg, model, exported_modes, result, add, do_cfg, device)

        # Sweeps: how one DiT step grows with image tokens and batch.
        for resolution in cfg.resolutions:
            if resolution != cfg.resolution:
                dit_rows(resolution, cfg.batch, (cfg.sweep_mode,))
        for batch in cfg.batches:
            if batch != cfg.batch:
                dit_rows(cfg.resolution, batch, (cfg.sweep_mode,))
    result.fits = fit_scaling([r for r in result.rows if r.stage == "dit_step" and r.mode == cfg.sweep_mode])
    return result


def memory_rows(cfg: BenchConfig, pipe, prompts, device: torch.device, offload: bool, add) -> None:
    """One pipeline call in ``cfg.memory_mode``: per stage (condition: VLM + think tokens + bridge; denoise: the DiT;
    decode: the VAE) its seconds and, on CUDA, ``torch.cuda.max_memory_allocated`` within the stage (reset at each
    boundary: the bridge's forward ends the condition, the VAE decoder's starts the decode). On a CPU nothing is
    offloaded (there is no accelerator to leave) and nothing measured; the rows say so."""
    if offload:
        getattr(pipe, f"enable_{cfg.memory_mode}_cpu_offload")(device=device)
    peaks, handles = [], []

    def boundary(*_):
        peaks.append(_peak_memory(device))
        _reset_peak(device)

    handles.append(pipe.bridge.register_forward_hook(boundary))
    handles.append(pipe.vae.decoder.register_forward_pre_hook(boundary))
    _sync(device)
    _reset_peak(device)
    out = pipe(prompts, height=cfg.resolution, width=cfg.resolution, num_inference_steps=cfg.steps,
               guidance_scale=cfg.guidance_scale, generator=torch.Generator().manual_seed(0), output_type="pil")
    _sync(device)
    boundary()
    for handle in handles:
        handle.remove()
    note = (f"memory mode {cfg.memory_mode}" if device.type == "cuda" else
            f"memory mode {cfg.memory_mode}: not measured on {device.type} (no offload from the CPU to itself; "
            "peak memory is torch.cuda.max_memory_allocated)")
    for stage, peak in zip(("condition", "denoise", "decode"), peaks):
        add(Row(cfg.preset, pipe.mode, f"memory_{stage}", cfg.resolution, cfg.batch, cfg.guidance_scale != 1.0,
                cfg.steps if stage == "denoise" else None, out.timings[stage] * 1000, 0.0, peak, note=note))


def export_ranges(cfg: BenchConfig, model, do_cfg: bool):
    """The export ranges the exported modes need: the benchmark's resolution and batch, and the chat text's token
    count of its prompt (with the tokenizer actually used; a few spare tokens)."""
    from deepgen_components.export.specs import ExportRanges

    texts = [_prompt(cfg.prompt_tokens)] * cfg.batch + ([""] * cfg.batch if do_cfg else [])
    length = int(model.prepare_prompts(texts).input_ids.shape[1])
    return ExportRanges(min_size=cfg.resolution, max_size=cfg.resolution, max_batch=cfg.batch,
                        max_prompt_tokens=length + 8, opt_batch=cfg.batch, opt_prompt_tokens=length)


def _exported_rows(cfg: BenchConfig, model, modes, result: SuiteResult, add, do_cfg: bool, device) -> None:
    """ONNX Runtime / TensorRT rows: the model exported (condition encoder, DiT, VAE decoder) at the benchmark's
    resolution and batch, then the same stages and end to end as the PyTorch rows, each with its ratio against the
    eager row of this run. A backend that cannot run here gets one row with ``note`` saying why (``ms`` NaN)."""
    import tempfile

    import numpy as np

    eager = {(r.stage, r.resolution, r.batch): r.ms for r in result.rows if r.mode == "eager"}
    folder_holder = None
    if cfg.export_dir:
        folder = Path(cfg.export_dir)
    else:
        folder_holder = tempfile.TemporaryDirectory(prefix="deepgen-bench-")
        folder = Path(folder_holder.name)
    folder = folder / f"{cfg.preset}_{cfg.resolution}px_b{cfg.batch}_{cfg.dtype}"

    def unavailable(mode: str, why: str) -> None:
        add(Row(cfg.preset, mode, "all", cfg.resolution, cfg.batch, do_cfg, None, float("nan"), note=f"not available: {why}"))

    try:
        providers = {}  # mode -> ONNX Runtime provider, or "tensorrt"
        for mode in modes:
            if mode == "onnxruntime":
                try:
                    import onnxruntime as ort
                except ImportError:
                    unavailable(mode, "onnxruntime is not installed")
                    continue
                cuda = device.type == "cuda" and "CUDAExecutionProvider" in ort.get_available_providers()
                if device.type == "cuda" and not cuda:
                    unavailable(mode, "this onnxruntime has no CUDAExecutionProvider (pip install onnxruntime-gpu)")
                    continue
                if cfg.dtype == "bfloat16" and not cuda:
                    unavailable(mode, "bfloat16 graphs do not run on the CPU execution provider")
                    continue
                providers[mode] = "CUDAExecutionProvider" if cuda else "CPUExecutionProvider"
            else:
                status = tensorrt_status()
                if not status.get("import"):
                    unavailable(mode, f"import tensorrt failed ({status.get('error') or 'not installed'})")
                    continue
                if device.type != "cuda":
                    unavailable(mode, "TensorRT needs a CUDA device")
                    continue
                providers[mode] = "tensorrt"
        if not providers:
            return
        manifest = folder / "manifest.json"
        if not manifest.is_file():
            from deepgen_components.export.exporter import export_model
            ranges = export_ranges(cfg, model, do_cfg)
            started = time.perf_counter()
            export_model(model, folder, stages=("condition_encoder", "dit", "vae_decoder"), ranges=ranges,
                         progress=False, source={"preset": cfg.preset, "benchmark": True})
            result.environment["export_seconds"] = time.perf_counter() - started
        prompts = [_prompt(cfg.prompt_tokens)] * cfg.batch
        for mode, provider in providers.items():
            if mode == "onnxruntime":
                from deepgen_components.export.onnx_pipeline import OnnxDeepGenPipeline

                staged = OnnxDeepGenPipeline(folder, providers=[provider], intra_op_num_threads=cfg.threads)
                note = provider
            else:
                from deepgen_components.export.tensorrt import build_engines
                from deepgen_components.export.tensorrt_runtime import TensorRTDeepGenPipeline

                started = time.perf_counter()
                build_engines(folder, progress=False)  # ahead of time: the pipeline never builds inside a call
                result.environment["engine_build_seconds"] = time.perf_counter() - started
                staged = TensorRTDeepGenPipeline(folder)
                note = "TensorRT engines built from the ONNX files"
            staged.set_progress_bar_config(disable=True)
            latent = cfg.resolution // model.vae_scale_factor
            generator = np.random.default_rng(cfg.seed)
            start_noise = generator.standard_normal((cfg.batch, model.latent_channels, latent, latent)).astype(np.float32)
            kwargs = dict(height=cfg.resolution, width=cfg.resolution, guidance_scale=cfg.guidance_scale,
                          latents=start_noise, output_type="np")
            # Per stage, through the staged pipeline's own stage calls.
            texts = prompts + [""] * cfg.batch if do_cfg else prompts
            stage_feeds = _stage_feeds(staged, texts, start_noise, do_cfg)
            for stage, (name, feeds) in stage_feeds.items():
                ms, spread = time_fn(lambda n=name, f=feeds, sp=staged: sp.run_stage(n, f), device, warmup=cfg.warmup,
                                     repeats=cfg.repeats)
                ref = eager.get((stage, cfg.resolution, cfg.batch))
                add(Row(cfg.preset, mode, stage, cfg.resolution, cfg.batch, do_cfg, None, ms, spread,
                        ratio_vs_eager=(ref / ms) if ref else None, note=note))
            if cfg.e2e:
                call = lambda sp=staged, kw=kwargs: sp(prompts, num_inference_steps=cfg.steps, **kw)  # noqa: E731
                started = time.perf_counter()
                call()
                _sync(device)
                first = time.perf_counter() - started
                ms, spread = time_fn(call, device, warmup=1, repeats=max(3, cfg.repeats // 3))
                ref = eager.get(("end_to_end", cfg.resolution, cfg.batch))
                add(Row(cfg.preset, mode, "end_to_end", cfg.resolution, cfg.batch, do_cfg, cfg.steps, ms, spread,
                        ratio_vs_eager=(ref / ms) if ref else None, compile_s=max(0.0, first - ms / 1000), note=note))
    finally:
        if folder_holder is not None:
            folder_holder.cleanup()


def _stage_feeds(staged, texts, start_noise, do_cfg: bool) -> dict:
    """{row stage: (export stage, feeds)} for the condition encoder, one DiT step (the CFG batch) and the VAE
    decoder, made with the staged pipeline's own preprocessing and dtypes, so the feeds are what its loop runs."""
    import numpy as np

    condition_feeds = staged.condition_feeds(staged.processor(texts))
    condition = staged.run_stage("condition_encoder", condition_feeds)
    noise = np.concatenate([start_noise, start_noise]) if do_cfg else start_noise
    dit_feeds = staged.prepare_feeds("dit", {
        "hidden_states": noise, "encoder_hidden_states": condition["context"], "pooled": condition["pooled"],
        "timestep": np.full((noise.shape[0],), 500.0, dtype=np.float32),
    })
    if staged.config["mask_padding"]:
        dit_feeds["context_mask"] = condition["mask"]
    decoder_feeds = staged.prepare_feeds("vae_decoder", {"latents": start_noise})
    return {
        "condition": ("condition_encoder", condition_feeds),
        "dit_step": ("dit", dit_feeds),
        "vae_decode": ("vae_decoder", decoder_feeds),
    }


def _repeat_rows(condition, batch: int, base: int, do_cfg: bool):
    """The condition for another batch size: rows cycled within each CFG half."""
    halves = 2 if do_cfg else 1
    return condition.select(torch.cat([h * base + torch.arange(batch) % base for h in range(halves)]))


def _step_args(runner, condition, timesteps, sigmas, guidance_scale, do_cfg, latents):
    """The arguments of ``runner.step`` after the latents, for the first step (the runner's own precomputation)."""
    from deepgen_components.denoising import position_table

    prepared = runner.prepare(condition, None, timesteps)
    dt = (sigmas[1] - sigmas[0]).float()
    table = position_table(runner.model.dit.transformer.pos_embed, *latents.shape[-2:])
    return (prepared.temb[0], dt, prepared.encoder_hidden, prepared.reference_tokens, prepared.context_mask,
            guidance_scale, do_cfg, table)


def _step_callable(runner, latents, args, device):
    """The timed per-step callable of a mode, and its compile time (first call minus a steady call)."""
    if runner.mode == "eager":
        return (lambda: runner.step(latents, *args)), None
    if runner.mode == "kernels":
        def fn():
            with kernels_context(True):
                return runner.step(latents, *args)
        return fn, None
    compiled = torch.compile(runner.step, fullgraph=True, dynamic=False)
    started = time.perf_counter()
    compiled(latents, *args)
    _sync(device)
    compile_s = time.perf_counter() - started
    if runner.mode == "compile" or device.type != "cuda":
        return (lambda: compiled(latents, *args)), compile_s
    graph, _ = capture_cuda_graph(compiled, latents.clone(), *args, warmup=2)
    return graph.replay, compile_s


def _parse_ints(text: str, flag: str = "--resolutions") -> tuple[int, ...]:
    try:
        return tuple(int(v) for v in text.split(",") if v.strip()) if text else ()
    except ValueError:
        raise ValueError(f"{flag} {text}: expected a comma list of integers, e.g. 256,512") from None


def _check_args(args) -> None:
    """Every flag of ``deepgen bench`` before the (minutes-long) suite starts, each error naming its flag."""
    from deepgen_components.builders import PRESETS
    from deepgen_components.cli.args import check_device, check_output_path

    if args.preset not in PRESETS:
        raise ValueError(f"--preset: unknown preset {args.preset!r}; presets: {', '.join(sorted(PRESETS))}")
    check_device(args.device)
    if args.dtype not in ("float32", "bfloat16", "float16"):
        raise ValueError(f"--dtype: must be float32, bfloat16 or float16, got {args.dtype!r}")
    for flag, modes in (("--modes", args.modes.split(",")), ("--sweep-mode", [args.sweep_mode])):
        unknown = [m.strip() for m in modes if m.strip() not in MODES]
        if unknown:
            raise ValueError(f"{flag}: unknown mode(s) {', '.join(unknown)}; modes: {', '.join(MODES)}")
    for flag, sizes in (("--resolution", [args.resolution]), ("--resolutions", _parse_ints(args.resolutions))):
        bad = [r for r in sizes if r < 32 or r % 32]
        if bad:
            raise ValueError(f"{flag}: sizes must be positive multiples of 32, got {', '.join(map(str, bad))}")
    if any(b < 1 for b in _parse_ints(args.batches, "--batches")):
        raise ValueError(f"--batches {args.batches}: every batch must be >= 1")
    if args.out:
        check_output_path(args.out, folder=True)
    if args.export_dir:
        check_output_path(args.export_dir, folder=True, flag="--export-dir")


def cmd_bench(args) -> int:
    _check_args(args)
    cfg = BenchConfig(
        preset=args.preset, device=args.device, dtype=args.dtype, modes=tuple(m.strip() for m in args.modes.split(",")),
        resolution=args.resolution, batch=args.batch, steps=args.steps, guidance_scale=args.guidance,
        prompt_tokens=args.prompt_tokens, repeats=args.repeats, warmup=args.warmup,
        resolutions=_parse_ints(args.resolutions), batches=_parse_ints(args.batches, "--batches"), sweep_mode=args.sweep_mode,
        e2e=not args.no_e2e, threads=args.threads, export_dir=args.export_dir, memory_mode=args.memory_mode,
    )
    result = run_suite(cfg)
    print(markdown_table(result))
    if result.fits:
        fit = result.fits
        print(f"fit: {fit['model']}: a={fit['a_ms']:.3f} ms, b={fit['b_ms_per_token']:.3g} ms/token, "
              f"c={fit['c_ms_per_token2']:.3g} ms/token^2, R^2={fit['r2']:.4f}")
    if args.out:
        for path in write_outputs(result, args.out):
            print(f"wrote {path}")
    return 0


def add_commands(sub) -> None:
    from deepgen_components.cli.args import image_side, int_at_least, non_negative_float, positive_int

    p = sub.add_parser("bench", help="latency per stage and end to end, per mode (eager / kernels / compile / graphs)")
    p.add_argument("--preset", default="tiny", help="tiny | small | deepgen-1.0 (random weights)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtype", default="bfloat16" if torch.cuda.is_available() else "float32")
    p.add_argument("--modes", default="eager,compile", help=f"comma list of {', '.join(MODES)} (the last two run "
                   "the model exported to ONNX; a backend missing here gets a 'not available' row)")
    p.add_argument("--export-dir", default=None, help="keep the exported modes' ONNX files here (default: a temp dir)")
    p.add_argument("--resolution", type=image_side, default=64, help="image side in px, multiple of 32")
    p.add_argument("--batch", type=positive_int, default=1)
    p.add_argument("--steps", type=positive_int, default=20, help="denoising steps for the end-to-end rows")
    p.add_argument("--guidance", type=non_negative_float, default=4.0, help="CFG scale >= 0; 1 = CFG off")
    p.add_argument("--prompt-tokens", type=positive_int, default=32)
    p.add_argument("--repeats", type=positive_int, default=10)
    p.add_argument("--warmup", type=int_at_least(0), default=3)
    p.add_argument("--resolutions", default="", help="comma list for the resolution sweep of one DiT step")
    p.add_argument("--batches", default="", help="comma list for the batch sweep of one DiT step")
    p.add_argument("--sweep-mode", default="eager")
    p.add_argument("--no-e2e", action="store_true", help="skip the end-to-end rows")
    p.add_argument("--threads", type=positive_int, default=None, help="torch CPU threads")
    p.add_argument("--out", default=None, help="folder for bench.json, bench.md and plots")
    p.add_argument("--memory-mode", choices=MEMORY_MODES, default="none", help="run the pipeline under diffusers' "
                   "enable_model_cpu_offload (model) or enable_sequential_cpu_offload (sequential): per-stage peak "
                   "CUDA memory only, no other rows")
    p.set_defaults(func=cmd_bench)

