"""The latency benchmark suite (``deepgen bench``: ``deepgen_components.cli.bench`` and ``bench_report``), on the CPU."""

from __future__ import annotations

import json

import pytest
import torch

from deepgen_components.cli.bench import BenchConfig, run_suite, time_fn
from deepgen_components.cli.bench_report import fit_scaling, write_outputs


def test_time_fn_reports_median_and_spread_in_milliseconds(monkeypatch):
    """A clock that each call advances by a known amount (seconds, like ``time.perf_counter``): 2 warm-up calls
    are not timed; the 5 timed calls take 5, 1, 3, 2, 4 ms, so the median is 3 ms and p90 - p10 = 5 - 1 = 4 ms."""
    from types import SimpleNamespace

    from deepgen_components.cli import bench

    clock = [100.0]
    durations = iter([0.050, 0.070, 0.005, 0.001, 0.003, 0.002, 0.004])  # the first two are the warm-up calls
    monkeypatch.setattr(bench, "time", SimpleNamespace(perf_counter=lambda: clock[0]))
    calls = []

    def fn():
        calls.append(1)
        clock[0] += next(durations)

    median, spread = time_fn(fn, torch.device("cpu"), warmup=2, repeats=5)
    assert len(calls) == 7
    assert median == pytest.approx(3.0) and spread == pytest.approx(4.0)


def test_scaling_fit_recovers_a_known_quadratic():
    from deepgen_components.cli.bench import Row

    rows = [Row("x", "eager", "dit_step", 0, 1, True, None, 1.0 + 0.01 * t + 1e-5 * t * t, tokens=t) for t in (16, 64, 256, 1024)]
    fit = fit_scaling(rows)
    assert fit["a_ms"] == pytest.approx(1.0, abs=1e-6)
    assert fit["b_ms_per_token"] == pytest.approx(0.01, rel=1e-6)
    assert fit["c_ms_per_token2"] == pytest.approx(1e-5, rel=1e-6)
    assert fit["r2"] == pytest.approx(1.0)


def test_bench_suite_runs_on_cpu_and_writes_json_markdown_and_plots(tmp_path):
    cfg = BenchConfig(preset="tiny", device="cpu", dtype="float32", modes=("eager", "kernels"), resolution=64,
                      batch=1, steps=2, repeats=2, warmup=1, resolutions=(64, 128), batches=(1, 2), threads=1)
    result = run_suite(cfg, progress=False)
    stages = {(r.mode, r.stage) for r in result.rows}
    assert {("eager", "condition"), ("eager", "dit_step"), ("kernels", "dit_step"), ("eager", "vae_decode"),
            ("eager", "end_to_end"), ("kernels", "end_to_end")} <= stages
    step = next(r for r in result.rows if r.mode == "eager" and r.stage == "dit_step")
    assert step.flops and step.flops > 0 and step.ratio_vs_eager == pytest.approx(1.0)
    try:  # the environment record must say what an `import tensorrt` here actually does
        import tensorrt

        expected_trt = {"import": True, "version": tensorrt.__version__, "error": None}
    except ImportError as err:
        expected_trt = {"import": False, "version": None, "error": f"{type(err).__name__}: {err}"}
    trt = result.environment["tensorrt"]
    assert {k: trt[k] for k in expected_trt} == expected_trt
    paths = write_outputs(result, tmp_path)
    data = json.loads((tmp_path / "bench.json").read_text())
    assert len(data["rows"]) == len(result.rows)
    assert "| preset | mode |" in (tmp_path / "bench.md").read_text()
    assert any(p.suffix == ".png" for p in paths)


@pytest.mark.parametrize("memory_mode", ["none", "model"])
def test_bench_memory_mode_reports_each_stage_and_records_the_mode(tmp_path, memory_mode):
    """``--memory-mode``: one pipeline call, a row per stage (condition, denoise, decode) with its time; on the CPU
    the peak memory is not measured (None) and the rows say so, without failing; bench.json records the mode."""
    cfg = BenchConfig(preset="tiny", device="cpu", dtype="float32", modes=("eager",), steps=2, repeats=1, warmup=0,
                      threads=1, memory_mode=memory_mode)
    result = run_suite(cfg, progress=False)
    memory = [r for r in result.rows if r.stage.startswith("memory_")]
    assert [r.stage for r in memory] == ["memory_condition", "memory_denoise", "memory_decode"]
    assert all(r.ms > 0 and r.peak_memory_gib is None and "not measured on cpu" in r.note for r in memory)
    if memory_mode != "none":
        assert result.rows == memory  # the stage rows run the model outside the offload hooks: only these
    write_outputs(result, tmp_path)
    assert json.loads((tmp_path / "bench.json").read_text())["config"]["memory_mode"] == memory_mode


def test_bench_rejects_an_unknown_memory_mode():
    with pytest.raises(ValueError, match="memory_mode: 'disk' is not one of none, model, sequential"):
        run_suite(BenchConfig(preset="tiny", device="cpu", memory_mode="disk"), progress=False)
