"""The trainer's EMA (``trainer.ema``), its log sinks (``trainer.log_to``: metrics.jsonl, TensorBoard) and the
in-training evaluation (``trainer.eval_every`` + ``trainer.eval``), on the tiny stage-1 config.

* The average follows its definition (copy until ``start``, then ``decay`` every ``every`` steps, in fp32) and
  swapping it in leaves the weights bit for bit as they were.
* A run with EMA and evaluation logs exactly the losses of a run without (the evaluation restores every RNG and
  module mode), and one restarted from an older checkpoint ends with the same average, bit for bit.
* The evaluation writes the grid PNG, an ``"type": "eval"`` record with the registered ``shapes`` evaluator's
  numbers, and (when tensorboard is installed) the scalars and the images; the final pipelines hold the raw
  weights and the average.
"""

import shutil
import warnings
from pathlib import Path

import deepgen_components.training as training_package
import pytest
import torch
from deepgen_components.training.checkpoint import latest_checkpoint, load_checkpoint
from deepgen_components.training.config import EMAConfig, load_config
from deepgen_components.training.distributed import DistInfo
from deepgen_components.training.ema import EMA, ema_path
from deepgen_components.training.evaluate_during import TrainingEvaluation
from deepgen_components.training.metrics import MetricsLogger, read_metrics, tensorboard_available
from deepgen_components.training.run import open_logs
from deepgen_components.training.trainer import train
from PIL import Image
from safetensors.torch import load_file

import deepgen_components.shapes  # noqa: F401  (registers the shapes kinds, benchmark and evaluator)
from deepgen_components.pipeline import DeepGenPipeline

torch.set_num_threads(1)

CONFIGS = Path(training_package.__file__).parent / "configs"
QUIET = ["trainer.log_to=[jsonl]", "trainer.save_pipeline=false", "data.batch_size=2"]
EMA_ON = ["trainer.ema={decay: 0.5, every: 1, start: 0}"]
EVAL_ON = ["trainer.eval_every=3", "trainer.eval.prompts=[a red circle, a blue square]", "trainer.eval.steps=2"]


def config(*overrides: str):
    return load_config(CONFIGS / "align_tiny.yaml", [*QUIET, *overrides])


# -- the average --------------------------------------------------------------------------------------------------


def test_the_average_is_a_copy_until_start_then_decays_every_n_steps_in_fp32():
    model = torch.nn.Linear(3, 2).to(torch.bfloat16)
    model.bias.requires_grad_(False)  # frozen: not averaged
    ema = EMA(model, EMAConfig(decay=0.75, every=2, start=1))
    assert set(ema.shadow) == {"weight"} and ema.shadow["weight"].dtype == torch.float32
    expected = model.weight.detach().float().clone()
    for step in range(1, 6):
        with torch.no_grad():
            model.weight.add_(1.0)
        ema.update(step)
        weight = model.weight.detach().float()
        if step <= 1:
            expected = weight.clone()
        elif (step - 1) % 2 == 0:  # steps 3 and 5
            expected = 0.75 * expected + 0.25 * weight
        torch.testing.assert_close(ema.shadow["weight"], expected, rtol=1e-6, atol=1e-6)


def test_swapping_the_average_in_restores_the_weights_bit_for_bit():
    model = torch.nn.Linear(4, 4)
    ema = EMA(model, EMAConfig(decay=0.9))
    before = model.weight.detach().clone()
    with torch.no_grad():
        model.weight.mul_(3.0).add_(0.1)
    trained = model.weight.detach().clone()
    ema.update(1)
    with ema.applied():
        torch.testing.assert_close(model.weight.detach(), 0.9 * before + 0.1 * trained)
    assert torch.equal(model.weight.detach(), trained)


def test_an_average_of_another_layout_is_refused_by_name():
    ema = EMA(torch.nn.Linear(2, 2), EMAConfig())
    with pytest.raises(ValueError, match=r"trainer.ema: .*missing \['weight'\]"):
        ema.load_state_dict({"bias": torch.zeros(2), "other": torch.zeros(1)})


# -- a run with EMA and evaluation ----------------------------------------------------------------------------------


def test_ema_and_evaluation_change_no_loss_and_resume_to_the_same_average(tmp_path):
    plain, run = tmp_path / "plain", tmp_path / "run"
    train(config(), out=plain, max_steps=6)
    cfg = config(*EMA_ON, *EVAL_ON, "trainer.checkpoint_every=3", "trainer.keep_last=3")
    train(cfg, out=run, max_steps=6)
    expected = read_metrics(plain)
    assert [(r["step"], r["loss"], r["grad_norm"]) for r in read_metrics(run)] == [
        (r["step"], r["loss"], r["grad_norm"]) for r in expected]  # the evaluation disturbs nothing
    assert [r["step"] for r in read_metrics(run, kind="eval")] == [3, 6]
    checkpoints = run / "checkpoints"
    average = load_file(str(ema_path(checkpoints, 6)))
    weights = load_checkpoint(checkpoints / "step_00000006")["trainable"]
    assert set(average) == set(weights) and all(v.dtype == torch.float32 for v in average.values())
    assert any(not torch.equal(average[name], weights[name]) for name in weights)  # it lags the weights

    # Crash after step 3: drop the later checkpoint and its average, run the same command again.
    shutil.rmtree(checkpoints / "step_00000006")
    ema_path(checkpoints, 6).unlink()
    (checkpoints / "latest").write_text("step_00000003")
    train(cfg, out=run, max_steps=6)
    assert [r["loss"] for r in read_metrics(run)] == [r["loss"] for r in expected]
    resumed = load_file(str(ema_path(checkpoints, 6)))
    assert all(torch.equal(resumed[name], value) for name, value in average.items())
    assert [r["step"] for r in read_metrics(run, kind="eval")] == [3, 6]  # the step-6 line was dropped, rewritten


def test_evaluation_writes_grids_scores_and_tensorboard_and_the_pipelines_hold_raw_and_average(tmp_path):
    sinks = "[jsonl, tensorboard]" if tensorboard_available() else "[jsonl]"
    cfg = load_config(CONFIGS / "align_tiny.yaml", [
        "data.batch_size=2", f"trainer.log_to={sinks}", *EMA_ON, "trainer.eval_every=2", "trainer.eval.benchmark=shapes",
        "trainer.eval.limit=3", "trainer.eval.steps=2", "trainer.eval.evaluators=[shapes]"])
    result = train(cfg, out=tmp_path, max_steps=3)
    evals = read_metrics(tmp_path, kind="eval")
    assert [r["step"] for r in evals] == [2, 3]  # every 2 steps and after the last
    assert all(r["weights"] == "ema" and 0.0 <= r["shapes"] <= 1.0 and "shapes/reward" in r for r in evals)
    assert [r["step"] for r in read_metrics(tmp_path)] == [1, 2, 3]  # train records only by default
    for step in (2, 3):
        with Image.open(tmp_path / "eval" / f"step_{step:08d}.png") as grid:
            assert grid.width == 3 * 128  # one tile per prompt, in a row
    # pipeline/ holds the raw weights, pipeline_ema/ the average (trainer.ema.save_pipeline: both, the default)
    weights = load_checkpoint(latest_checkpoint(tmp_path / "checkpoints"))["trainable"]
    average = load_file(str(ema_path(tmp_path / "checkpoints", 3)))
    name = "bridge.projector.weight" if "bridge.projector.weight" in weights else sorted(weights)[0]
    for folder, expected in (("pipeline", weights), ("pipeline_ema", average)):
        model = DeepGenPipeline.from_pretrained(tmp_path / folder).model
        assert torch.equal(dict(model.named_parameters())[name].detach(), expected[name].to(torch.float32)), folder
    assert result.pipeline == tmp_path / "pipeline"
    if not tensorboard_available():
        return
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(tmp_path / "tensorboard"), size_guidance={"images": 0, "scalars": 0}).Reload()
    assert [e.step for e in events.Scalars("loss")] == [1, 2, 3]
    assert [e.step for e in events.Scalars("eval/shapes")] == [2, 3]
    images = events.Images("eval/samples")  # add_images: one tiled image per evaluation
    assert [e.step for e in images] == [2, 3] and all(e.width > 0 and e.height > 0 for e in images)


# -- configuration -----------------------------------------------------------------------------------------------


def test_features_are_off_by_default():
    trainer = config().trainer
    assert trainer.ema is None and trainer.eval_every == 0


@pytest.mark.parametrize(("override", "message"), [
    ("trainer.log_to=[jsonl, wandb]", r"trainer.log_to: unknown \['wandb'\]; accepted: jsonl, tensorboard"),
    ("trainer.log_to=[tensorboard]", "trainer.log_to: metrics.jsonl is always written"),
    ("trainer.ema.decay=1.0", r"trainer.ema.decay must be in \[0, 1\)"),
    ("trainer.ema.save_pipeline=best", "trainer.ema.save_pipeline must be one of both, ema, raw"),
    ("trainer.eval.steps=0", "trainer.eval.steps must be >= 1"),
    ("trainer.eval_every=-1", "trainer.eval_every must be >= 0"),
])
def test_bad_settings_name_their_key(override, message):
    with pytest.raises(ValueError, match=message):
        config(override)


@pytest.mark.parametrize(("overrides", "message"), [
    (["trainer.eval_every=1"], "trainer.eval: give exactly one of prompts, prompt_file, benchmark"),
    (["trainer.eval_every=1", "trainer.eval.prompts=[a]", "trainer.eval.evaluators=[nope]"],
     "trainer.eval.evaluators: unknown evaluator 'nope'"),
])
def test_an_evaluation_without_prompts_or_with_an_unknown_evaluator_fails_before_training(tmp_path, overrides, message):
    with pytest.raises(ValueError, match=message):
        train(config(*overrides), out=tmp_path, max_steps=1)
    assert not (tmp_path / "metrics.jsonl").exists()


def test_the_deprecated_tensorboard_flag_still_switches_tensorboard_off():
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        cfg = load_config(CONFIGS / "align_tiny.yaml", ["trainer.tensorboard=false"])
    assert cfg.trainer.log_to == ["jsonl"]
    assert any(issubclass(w.category, DeprecationWarning) and "trainer.log_to" in str(w.message) for w in caught)


@pytest.mark.skipif(tensorboard_available(), reason="tensorboard is installed")
def test_asking_for_tensorboard_without_the_package_is_a_clear_error(tmp_path):
    with pytest.raises(ImportError, match="trainer.log_to: tensorboard needs the tensorboard package"):
        MetricsLogger(tmp_path, log_to=["jsonl", "tensorboard"], progress=False)


def test_evaluation_is_refused_by_name_when_the_model_is_sharded(tmp_path):
    cfg = config("trainer.eval_every=1", "trainer.eval.prompts=[a]")
    with pytest.raises(ValueError, match="trainer.eval_every: not available with trainer.distributed: fsdp"):
        TrainingEvaluation(cfg, tmp_path, DistInfo(), sharded=True)


def test_a_loop_that_does_not_run_ema_refuses_it_instead_of_ignoring_it(tmp_path):
    cfg = load_config(CONFIGS / "rl_tiny.yaml", [*EMA_ON])
    with pytest.raises(ValueError, match="trainer.ema: stage 'rl' does not run it yet"):
        open_logs(tmp_path, cfg, DistInfo(), start_step=0, total_steps=1)  # a caller that declares no EMA support


def test_stage_3_keeps_an_average_and_saves_both_pipelines(tmp_path):
    from deepgen_components.training.rl import train_rl

    cfg = load_config(CONFIGS / "rl_tiny.yaml", [*EMA_ON, "trainer.log_to=[jsonl]", "rl.num_steps=2",
                                                "rl.prompts_per_step=1", "rl.group_size=2"])
    result = train_rl(cfg, out=tmp_path, max_steps=2)
    assert ema_path(tmp_path / "checkpoints", 2).is_file()
    raw = DeepGenPipeline.from_pretrained(result.pipeline).model.dit.state_dict()
    average = DeepGenPipeline.from_pretrained(tmp_path / "pipeline_ema").model.dit.state_dict()
    shadow = load_file(str(ema_path(tmp_path / "checkpoints", 2)))
    assert any(not torch.equal(raw[k], average[k]) for k in raw)  # decay 0.5 over 2 updates: not the raw weights
    assert len(shadow) > 0


# -- two processes ------------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_ddp_and_fsdp2_keep_the_same_average_and_ddp_evaluates_on_the_main_process(tmp_path):
    """torchrun, 2 gloo ranks: DDP (every rank its whole average; the main process renders while the other waits)
    and FSDP2 (each rank the average of its shards, gathered to save) end with the same average to float
    tolerance."""
    import os
    import subprocess
    import sys

    def launch(mode: str, *overrides: str) -> subprocess.CompletedProcess:
        command = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "-m",
                   "deepgen_components.cli", "train", "--config", str(CONFIGS / "align_tiny.yaml"), "--max-steps", "2",
                   "--out", str(tmp_path / mode), f"trainer.distributed={mode}", "trainer.checkpoint_every=2",
                   *QUIET, *EMA_ON, *overrides]
        env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
        return subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)

    ddp = launch("ddp", "trainer.eval_every=2", "trainer.eval.prompts=[a red circle]", "trainer.eval.steps=2")
    assert ddp.returncode == 0, ddp.stderr[-3000:]
    fsdp = launch("fsdp")
    assert fsdp.returncode == 0, fsdp.stderr[-3000:]
    def saved_average(out):  # DDP: ema_step_N.safetensors; FSDP2: inside the sharded (DCP) checkpoint
        checkpoint = load_checkpoint(out / "checkpoints" / "step_00000002")
        return checkpoint["ema"] if checkpoint.get("ema") is not None else load_file(str(ema_path(out / "checkpoints", 2)))

    averages = [saved_average(tmp_path / mode) for mode in ("ddp", "fsdp")]
    assert set(averages[0]) == set(averages[1])
    for name, value in averages[0].items():
        torch.testing.assert_close(averages[1][name], value, rtol=1e-5, atol=1e-6)
    assert [r["step"] for r in read_metrics(tmp_path / "ddp", kind="eval")] == [2]
    assert (tmp_path / "ddp" / "eval" / "step_00000002.png").is_file()
