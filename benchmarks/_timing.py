"""Timing helpers for the benchmarks: warm-up, per-repeat CUDA events (or perf_counter on CPU), median.

Also in-process peak measurements, so that "% of peak" refers to the card the numbers come from: the dense matmul
peak (a large square matmul) and the memory bandwidth (a large device-to-device copy, read + write bytes).
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable

import torch


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def measure(
    fn: Callable[[], object],
    device: torch.device,
    *,
    warmup_ms: float = 25.0,
    rep_ms: float = 100.0,
    min_reps: int = 5,
    max_reps: int = 1000,
) -> dict:
    """Time ``fn``: a few calls to estimate its cost, ``warmup_ms`` of warm-up, then ``rep_ms`` worth of repeats
    (clamped to ``[min_reps, max_reps]``), each timed on its own. Returns milliseconds (median, min, p20, p80)."""
    device = torch.device(device)
    fn()  # first call: compilation / autotuning / lazy init
    _sync(device)
    t0 = time.perf_counter()
    for _ in range(3):
        fn()
    _sync(device)
    est_ms = max((time.perf_counter() - t0) * 1e3 / 3, 1e-3)
    for _ in range(max(1, int(warmup_ms / est_ms))):
        fn()
    reps = int(min(max(rep_ms / est_ms, min_reps), max_reps))
    times = []
    if device.type == "cuda":
        starts = [torch.cuda.Event(enable_timing=True) for _ in range(reps)]
        ends = [torch.cuda.Event(enable_timing=True) for _ in range(reps)]
        _sync(device)
        for s, e in zip(starts, ends):
            s.record()
            fn()
            e.record()
        _sync(device)
        times = [s.elapsed_time(e) for s, e in zip(starts, ends)]
    else:
        for _ in range(reps):
            t = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t) * 1e3)
    times.sort()
    q = lambda f: times[min(len(times) - 1, int(f * len(times)))]
    return {
        "ms": statistics.median(times),
        "min_ms": times[0],
        "p20_ms": q(0.2),
        "p80_ms": q(0.8),
        "reps": reps,
    }


def matmul_peak_tflops(device: torch.device, dtype: torch.dtype, n: int = 8192) -> float:
    """Achieved dense matmul TFLOP/s of an n×n×n product (the practical peak of this card / CPU)."""
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    r = measure(lambda: a @ b, device, warmup_ms=50, rep_ms=200)
    return 2 * n**3 / (r["ms"] * 1e-3) / 1e12


def copy_bandwidth_gbs(device: torch.device, nbytes: int = 1 << 30) -> float:
    """Achieved memory bandwidth (GB/s, 1e9) of a large tensor copy, counting read + write bytes."""
    src = torch.empty(nbytes // 4, device=device, dtype=torch.float32).fill_(1.0)
    dst = torch.empty_like(src)
    r = measure(lambda: dst.copy_(src), device, warmup_ms=50, rep_ms=200)
    return 2 * nbytes / (r["ms"] * 1e-3) / 1e9


def measure_graph(fn: Callable[[], object], device: torch.device, eager_ms: float, **kwargs) -> dict | None:
    """Time ``fn`` replayed from a CUDA graph: the GPU time without Python / launch overhead.

    ``fn`` is warmed up on a side stream, then ``n`` calls (10 for calls under 0.5 ms, else 1) are captured into one
    graph; returns :func:`measure` of a replay with the times divided by ``n``. ``None`` on CPU.
    """
    device = torch.device(device)
    if device.type != "cuda":
        return None
    n = 10 if eager_ms < 0.5 else 1
    side = torch.cuda.Stream(device)
    side.wait_stream(torch.cuda.current_stream(device))
    with torch.cuda.stream(side):
        for _ in range(3):
            fn()
    torch.cuda.current_stream(device).wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for _ in range(n):
            fn()
    r = measure(graph.replay, device, **kwargs)
    for key in ("ms", "min_ms", "p20_ms", "p80_ms"):
        r[key] /= n
    r["calls_per_graph"] = n
    return r
