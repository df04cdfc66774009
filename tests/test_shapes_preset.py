"""The shipped ``deepgen-shapes`` preset: a DeepGen trained from scratch on the shapes world by ``deepgen shapes``
(docs/shapes.md). It must load offline in seconds, fit the package budget, follow held-out prompts at the
issue's text-to-image targets. (``deepgen demo``, which uses it by default, runs as the README shows it in
tests/test_documented_commands.py, checked with ShapesEval; the world generator's determinism is tested in
tests/test_shapes.py.)

The quality checks redo the run's own final evaluation with 20 Euler steps at the preset's own CFG scales (4 for
text-to-image, 1 = no CFG for edits) — the evaluation setting of docs/shapes.md: the held-out T2I prompts for the
colour / shape / position targets, the run's 54 held-out edit tasks for edit success >= 70 %, and every number
equal to the one the run recorded in training_report.json.
"""

import json
import time

import pytest
import torch

from deepgen_components.builders import PRESETS, SHAPES_PRESET_DIR, build_preset
from deepgen_components.cli import main
from deepgen_components.pipeline import DeepGenPipeline
from deepgen_components.shapes.evaluation import eval_set, evaluate_pipeline

TARGETS = {"color": 0.90, "shape": 0.80, "position": 0.80}
EDIT_TARGET = 0.70
ATTRIBUTES = ("color", "shape", "position", "background")


@pytest.fixture(scope="module")
def pipe():
    torch.set_num_threads(max(1, min(2, torch.get_num_threads())))
    return DeepGenPipeline(build_preset("deepgen-shapes"))


def test_the_preset_ships_inside_the_package_within_20_mb():
    files = [p for p in SHAPES_PRESET_DIR.rglob("*") if p.is_file()]
    assert (SHAPES_PRESET_DIR / "model_index.json").is_file()
    assert any(p.suffix == ".safetensors" for p in files)
    assert sum(p.stat().st_size for p in files) <= 20 * 1024 * 1024


def test_the_preset_loads_offline_in_seconds():
    start = time.perf_counter()
    model = build_preset("deepgen-shapes")
    assert time.perf_counter() - start < 10
    assert "deepgen-shapes" in PRESETS
    assert model.config.image_size == 64 and not model.training


def test_the_preset_builds_on_the_meta_device_for_deepgen_info(capsys):
    model = build_preset("deepgen-shapes", device="meta")
    assert all(p.device.type == "meta" for p in model.parameters())
    assert main(["info", "--preset", "deepgen-shapes", "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    counts = info["parameters"]
    assert info["preset"] == "deepgen-shapes" and info["built_on"] == "meta"
    assert counts["total"] == sum(p.numel() for p in build_preset("deepgen-shapes").parameters())


@pytest.fixture(scope="module")
def run_evaluation(pipe):
    """The run's own final evaluation, redone: 108 T2I prompts (54 held-out compositions, 54 seen) and the 54
    held-out edits, 20 steps, at the preset's default scales (CFG 4 to generate, none to edit)."""
    assert pipe.model.config.edit_guidance_scale == 1.0 and pipe.model.config.guidance_scale == 4.0
    return evaluate_pipeline(pipe, eval_set(), steps=20, guidance=pipe.model.config.guidance_scale,
                             edit_guidance=pipe.model.config.edit_guidance_scale)


def test_the_shipped_model_meets_the_text_to_image_targets_on_held_out_prompts(run_evaluation):
    scores = run_evaluation
    assert scores.n_t2i == 108 and scores.n_heldout == 54
    for attribute, target in TARGETS.items():
        assert scores.heldout[attribute] >= target, (attribute, scores.heldout)


def test_the_shipped_model_meets_the_edit_target_on_held_out_edits(run_evaluation):
    """The 54 held-out edit tasks of the run's evaluation, at the preset's default edit scale (no CFG)."""
    assert run_evaluation.n_edits == 54
    assert run_evaluation.edit_success >= EDIT_TARGET, run_evaluation.edit_by_kind


def test_the_evaluation_reproduces_the_numbers_shipped_in_the_training_report(run_evaluation):
    """The library's code paths (the pipeline, the denoising runner, the evaluator) give the shipped model the same
    evaluation the training run recorded: every attribute and edit-kind rate exactly (they count images), the
    mean rewards to 1e-6 (a float sum)."""
    final = json.loads((SHAPES_PRESET_DIR / "training_report.json").read_text())["results"]["after stage 3 (rl)"]
    got = run_evaluation.to_dict()
    for key in ("t2i", "heldout", "seen", "edit_success", "edit_by_kind", "n_t2i", "n_heldout", "n_edits"):
        assert got[key] == final[key], key
    for key in ("reward", "edit_reward"):
        assert got[key] == pytest.approx(final[key], abs=1e-6), key


def _combined_reward(scores: dict) -> float:
    """The mean reward over every evaluated image: the T2I prompts and the edits (stage 3 trains on both)."""
    n_t2i, n_edits = scores["n_t2i"], scores["n_edits"]
    return (scores["reward"] * n_t2i + scores["edit_reward"] * n_edits) / (n_t2i + n_edits)


def test_the_training_report_ships_beside_the_weights_and_meets_every_target():
    report = json.loads((SHAPES_PRESET_DIR / "training_report.json").read_text())
    sft, final = report["results"]["after stage 2 (sft)"], report["results"]["after stage 3 (rl)"]
    for attribute, target in TARGETS.items():  # the run's own 108-prompt evaluation
        assert final["t2i"][attribute] >= target, (attribute, final["t2i"])
    assert final["edit_success"] >= EDIT_TARGET and final["n_edits"] == 54
    # Stage 3 raises its reward over stage 2 without lowering any attribute by more than 2 points.
    assert _combined_reward(final) > _combined_reward(sft)
    for attribute in ATTRIBUTES:
        assert final["t2i"][attribute] >= sft["t2i"][attribute] - 0.02, attribute
