"""What ``deepgen bench`` reports besides the timings: the machine it ran on, the fit of DiT step time against image
tokens, the Markdown table and the files (``bench.json``, ``bench.md``, plots). The suite itself is
:mod:`deepgen_components.cli.bench`.
"""

from __future__ import annotations

import json
import logging
import platform
from pathlib import Path

import torch

__all__ = ["environment", "fit_scaling", "markdown_table", "tensorrt_status", "write_outputs"]

logger = logging.getLogger(__name__)


def environment(device: torch.device) -> dict:
    """Versions, threads, the device (GPU name, SMs, memory) and which exported runtimes can run here."""
    import importlib.util
    import os

    env = {
        "torch": torch.__version__,
        "python": platform.python_version(),
        "machine": platform.machine(),
        "cpu_count": os.cpu_count(),
        "threads": torch.get_num_threads(),
        "device": str(device),
    }
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        env.update(gpu=props.name, sm_count=props.multi_processor_count, memory_gib=props.total_memory / 1024**3,
                   cuda=torch.version.cuda)
    try:
        import triton

        env["triton"] = triton.__version__
    except ImportError:
        env["triton"] = None
    env["tensorrt"] = tensorrt_status()
    env["onnxruntime"] = None
    if importlib.util.find_spec("onnxruntime") is not None:
        import onnxruntime

        env["onnxruntime"] = onnxruntime.__version__
        env["onnxruntime_providers"] = onnxruntime.get_available_providers()
    return env


def tensorrt_status() -> dict:
    """Whether ``import tensorrt`` works and whether the TensorRT libraries are present on this machine."""
    import ctypes.util

    status = {"import": False, "version": None, "error": None}
    try:
        import tensorrt

        status.update({"import": True, "version": tensorrt.__version__})
    except Exception as err:  # noqa: BLE001 - any failure means "not available"
        status["error"] = f"{type(err).__name__}: {err}"
    status["libraries"] = {name: ctypes.util.find_library(name) for name in ("nvinfer", "nvonnxparser", "nvinfer_plugin")}
    return status


# -- results ------------------------------------------------------------------------------------------------------


def fit_scaling(rows: list) -> dict:
    """Least-squares fit of DiT step time against image tokens x batch over ``bench.Row`` s:
    ms = a + b*T + c*T^2 (T = tokens*batch)."""
    points = [(r.tokens * r.batch, r.ms) for r in rows if r.tokens]
    points = sorted(set(points))
    if len(points) < 3:
        return {}
    import numpy as np

    t = np.array([p[0] for p in points], dtype=np.float64)
    y = np.array([p[1] for p in points], dtype=np.float64)
    design = np.stack([np.ones_like(t), t, t**2], axis=1)
    coef, *_ = np.linalg.lstsq(design, y, rcond=None)
    pred = design @ coef
    ss_res = float(((y - pred) ** 2).sum())
    ss_tot = float(((y - y.mean()) ** 2).sum()) or 1.0
    return {"model": "ms = a + b*T + c*T^2, T = image tokens x batch", "a_ms": coef[0], "b_ms_per_token": coef[1],
            "c_ms_per_token2": coef[2], "r2": 1 - ss_res / ss_tot, "points": points}


def markdown_table(result) -> str:
    """The rows of a suite result (``bench.SuiteResult``) as a Markdown table."""
    lines = [
        "| preset | mode | stage | res | batch | CFG | ms (median) | spread | peak GiB | TFLOP/s | vs eager | compile s | note |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    fmt = lambda v, p=2: "" if v is None else (f"{v:.{p}f}" if isinstance(v, float) else str(v))
    for r in result.rows:
        lines.append(
            f"| {r.preset} | {r.mode} | {r.stage}{'' if r.steps is None else f' ({r.steps} steps)'} | {r.resolution} | "
            f"{r.batch} | {'on' if r.cfg else 'off'} | {fmt(r.ms)} | {fmt(r.ms_spread)} | {fmt(r.peak_memory_gib)} | "
            f"{'' if r.tflops is None else f'{r.tflops:.3g}'} | {fmt(r.ratio_vs_eager)} | {fmt(r.compile_s, 1)} | {r.note} |"
        )
    return "\n".join(lines) + "\n"


def write_outputs(result, out: str | Path) -> list[Path]:
    """``bench.json`` (config, environment, rows, fits), ``bench.md`` (the table) and, with matplotlib, the plots
    of a suite result in the folder ``out``; returns the paths written."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    paths = [out / "bench.json", out / "bench.md"]
    paths[0].write_text(json.dumps(result.to_json(), indent=1, default=float))
    paths[1].write_text(markdown_table(result))
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        logger.warning("matplotlib is not installed: no plots")
        return paths
    steps = [r for r in result.rows if r.stage == "dit_step" and r.resolution == result.config.resolution
             and r.batch == result.config.batch]
    if steps:
        fig, ax = plt.subplots(figsize=(6, 3.5))
        ax.bar([r.mode for r in steps], [r.ms for r in steps])
        ax.set_ylabel("ms per DiT step (CFG batch)")
        ax.set_title(f"{result.config.preset} {result.config.resolution}px, batch {result.config.batch}")
        fig.tight_layout()
        fig.savefig(out / "latency_by_mode.png", dpi=120)
        paths.append(out / "latency_by_mode.png")
        plt.close(fig)
    sweep = [r for r in result.rows if r.stage == "dit_step" and r.mode == result.config.sweep_mode]
    for key, label, name in (("resolution", "resolution (px)", "latency_vs_resolution.png"),
                             ("batch", "batch", "latency_vs_batch.png")):
        fixed = "batch" if key == "resolution" else "resolution"
        points = sorted({(getattr(r, key), r.ms) for r in sweep if getattr(r, fixed) == getattr(result.config, fixed)})
        if len(points) >= 2:
            fig, ax = plt.subplots(figsize=(5, 3.5))
            ax.plot([p[0] for p in points], [p[1] for p in points], "o-")
            ax.set_xlabel(label)
            ax.set_ylabel("ms per DiT step")
            ax.set_title(f"{result.config.preset}, {result.config.sweep_mode}")
            fig.tight_layout()
            fig.savefig(out / name, dpi=120)
            paths.append(out / name)
            plt.close(fig)
    return paths
