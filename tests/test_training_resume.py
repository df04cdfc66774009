"""Exact resume: a run killed with SIGKILL after a checkpoint and started again with the same command ends with
the same metrics.jsonl losses as an uninterrupted run, float for float. Everything that shapes a step comes back
from the checkpoint: weights, AdamW moments, LR schedule, sampler position and RNG states; per-sample noise,
timesteps and caption dropout are seeded by their position in the run.
"""

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import deepgen_components.training as training_package
import pytest
import torch
from deepgen_components.training.checkpoint import latest_checkpoint, load_checkpoint
from deepgen_components.training.config import load_config
from deepgen_components.training.metrics import MetricsLogger, read_metrics
from deepgen_components.training.trainer import train

import deepgen_components.shapes  # noqa: F401  (registers the shapes world's kinds: `kind: shapes` sources)

torch.set_num_threads(1)

CONFIGS = Path(training_package.__file__).parent / "configs"
STEPS = 24


def command(config: str, out: Path, *overrides: str) -> list[str]:
    return [sys.executable, "-m", "deepgen_components.cli", "train", "--config", str(CONFIGS / config),
            "--max-steps", str(STEPS), "--out", str(out), "trainer.checkpoint_every=4", "trainer.tensorboard=false",
            "trainer.save_pipeline=false", *overrides]


def environment() -> dict:
    return {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}


def checkpoint_step(out: Path) -> int:
    pointer = out / "checkpoints" / "latest"
    try:
        return int(pointer.read_text().strip().removeprefix("step_"))
    except (OSError, ValueError):
        return 0


@pytest.mark.slow
def test_a_run_killed_after_a_checkpoint_resumes_to_the_same_losses(tmp_path):
    # Stage 2: the most state to restore (DiT + LoRA + bridge moments) and LoRA dropout, whose masks come from
    # the global RNG, so this also proves the RNG round trip.
    config = "sft_tiny.yaml"
    reference_out, out = tmp_path / "reference", tmp_path / "run"
    reference = subprocess.Popen(command(config, reference_out), env=environment(),
                                 stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    victim = subprocess.Popen(command(config, out), env=environment(),
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 240
        while checkpoint_step(out) < 4 and victim.poll() is None and time.monotonic() < deadline:
            time.sleep(0.02)
        victim.send_signal(signal.SIGKILL)
        victim.wait(30)
    finally:
        if victim.poll() is None:
            victim.kill()
    # it really died mid-training: killed by the signal, after a checkpoint, before the last step
    assert victim.returncode == -signal.SIGKILL
    killed_at = checkpoint_step(out)
    logged = read_metrics(out)
    assert 4 <= killed_at < STEPS and len(logged) < STEPS
    assert not (out / "checkpoints" / f"step_{STEPS:08d}").exists()

    resumed = subprocess.run(command(config, out), env=environment(), capture_output=True, text=True, timeout=300)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert f"resuming from {out / 'checkpoints'}" in resumed.stderr
    assert reference.wait(300) == 0, reference.stderr.read()[-3000:]

    expected, got = read_metrics(reference_out), read_metrics(out)
    assert [row["step"] for row in got] == list(range(1, STEPS + 1))
    assert [row["loss"] for row in got] == [row["loss"] for row in expected]  # exactly the same floats
    assert [row["grad_norm"] for row in got] == [row["grad_norm"] for row in expected]
    assert [row["lr"] for row in got] == [row["lr"] for row in expected]
    final, final_expected = (load_checkpoint(latest_checkpoint(o / "checkpoints"))["trainable"]
                             for o in (out, reference_out))
    assert all(final[name].equal(value) for name, value in final_expected.items())


def test_a_run_restarted_from_an_older_checkpoint_repeats_its_steps_exactly(tmp_path):
    # The crash in-process: keep only the step-4 checkpoint of a finished 12-step run and start it again.
    # Stage 1 with gradient accumulation over a whole 1 edit : 3 t2i cycle, as the official recipe.
    overrides = ["optim.grad_accum=4", "data.batch_size=2", "trainer.checkpoint_every=4", "trainer.keep_last=3",
                 "trainer.tensorboard=false", "trainer.save_pipeline=false"]
    cfg = load_config(CONFIGS / "align_tiny.yaml", overrides)
    train(cfg, out=tmp_path, max_steps=12)
    expected = read_metrics(tmp_path)
    final_expected = load_checkpoint(tmp_path / "checkpoints" / "step_00000012")["trainable"]
    for step in (8, 12):
        shutil.rmtree(tmp_path / "checkpoints" / f"step_{step:08d}")
    (tmp_path / "checkpoints" / "latest").write_text("step_00000004")

    train(cfg, out=tmp_path, max_steps=12)
    got = read_metrics(tmp_path)
    assert [row["task"] for row in got] == ["mixed"] * 12
    assert [(row["step"], row["loss"], row["grad_norm"]) for row in got] == [
        (row["step"], row["loss"], row["grad_norm"]) for row in expected]
    final = load_checkpoint(tmp_path / "checkpoints" / "step_00000012")["trainable"]
    assert all(final[name].equal(value) for name, value in final_expected.items())


def test_a_finished_run_started_again_does_nothing(tmp_path):
    cfg = load_config(CONFIGS / "align_tiny.yaml", ["trainer.tensorboard=false", "trainer.save_pipeline=false"])
    train(cfg, out=tmp_path, max_steps=2)
    before = (tmp_path / "metrics.jsonl").read_text()
    result = train(cfg, out=tmp_path, max_steps=2)
    assert result.pipeline is None and (tmp_path / "metrics.jsonl").read_text() == before


def test_on_resume_metrics_after_the_checkpoint_and_a_torn_last_line_are_dropped(tmp_path):
    # a run killed while appending leaves a partial last line; resuming from step 3 must not trip over it
    lines = [json.dumps({"step": s, "loss": 1.0 / s}) for s in range(1, 6)]
    (tmp_path / "metrics.jsonl").write_text("\n".join(lines) + '\n{"step": 6, "lo')
    logger = MetricsLogger(tmp_path, resume_step=3, tensorboard=False, progress=False)
    logger.log({"step": 4, "loss": 0.5})
    logger.close()
    assert [(row["step"], row["loss"]) for row in read_metrics(tmp_path)] == [(1, 1.0), (2, 0.5), (3, 1 / 3), (4, 0.5)]


def test_only_the_main_process_writes_metrics(tmp_path):
    logger = MetricsLogger(tmp_path, enabled=False)
    logger.log({"step": 1, "loss": 1.0})
    assert not (tmp_path / "metrics.jsonl").exists()
