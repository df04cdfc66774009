"""The shipped ``deepgen-shapes`` preset: a DeepGen trained from scratch on the shapes world by ``deepgen shapes``
(docs/shapes.md). It must load offline in seconds, fit the package budget, follow held-out prompts at the
issue's text-to-image targets. (``deepgen demo``, which uses it by default, runs as the README shows it in
tests/test_documented_commands.py, checked with ShapesEval; the world generator's determinism is tested in
tests/test_shapes.py.)

The quality checks sample fixed sets with 20 Euler steps at the preset's own CFG scales (4 for text-to-image, 1
= no CFG for edits) — the evaluation setting of docs/shapes.md: the 27 held-out T2I compositions (each once) for
the colour / shape / position targets, and the run's 54 held-out edit tasks for edit success >= 70 %.
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


def test_the_shipped_model_meets_the_text_to_image_targets_on_held_out_prompts(pipe):
    scores = evaluate_pipeline(pipe, eval_set(heldout=27, seen=0, edits=0), steps=20, guidance=4.0)
    assert scores.n_t2i == 27 and scores.n_heldout == 27
    for attribute, target in TARGETS.items():
        assert scores.t2i[attribute] >= target, (attribute, scores.t2i)


def test_the_shipped_model_meets_the_edit_target_on_held_out_edits(pipe):
    """The 54 held-out edit tasks of the run's evaluation, at the preset's default edit scale (no CFG)."""
    assert pipe.model.config.edit_guidance_scale == 1.0 and pipe.model.config.guidance_scale == 4.0
    scores = evaluate_pipeline(pipe, eval_set(heldout=0, seen=0, edits=54), steps=20, guidance=4.0,
                               edit_guidance=pipe.model.config.edit_guidance_scale)
    assert scores.n_edits == 54
    assert scores.edit_success >= EDIT_TARGET, scores.edit_by_kind


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
