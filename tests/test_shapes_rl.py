"""Stage 3 with headroom on the shapes world: the two-shape task, its three rewards, and a real short run that learns.

The task (docs/shapes.md, "Stage 3 with headroom"): captions of two shapes, which stage 2 leaves mostly unsolved.
Its judge must be right on ground truth, its rewards must have the scales the config says, and a short real
stage-3 run from the shipped preset (``deepgen shapes --rl-from deepgen-shapes --quick``) must raise the rewards on
its own training prompts, measured on fixed noise before and after (not the rollouts' own, noisier, curve).
"""

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from deepgen_components.cli import main
from deepgen_components.cli.shapes import QUICK_RL_PAIRS, run_shapes
from deepgen_components.rl.rewards import build_reward
from deepgen_components.shapes import ShapesEval, ShapesWorld, caption, parse_caption
from deepgen_components.shapes.data import rl_prompts
from deepgen_components.shapes.evaluation import eval_set, pair_metrics

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("heldout", [True, False])
def test_the_two_shape_task_is_judged_right_on_ground_truth(heldout):
    """96 distinct two-shape scenes (held-out, as evaluated; training, as rewarded), rendered exactly: every rate
    >= 99 %, composition 1 and a placement error of about the jitter."""
    world, judge = ShapesWorld(64), ShapesEval()
    scenes = world.pair_scenes(96, seed=7, heldout=heldout)
    assert len({caption(s) for s in scenes}) == 96
    assert all(world.is_heldout(s) == heldout for s in scenes)
    images = [world.render(s) for s in scenes]
    metrics = pair_metrics(judge, images, [caption(s) for s in scenes])
    for key in ("layout", "count", "position", "shape", "color", "background", "all"):
        assert metrics[key] >= 0.99, (key, metrics)
    assert metrics["composition"] >= 0.99 and metrics["placement_px"] < 1.0, metrics


def test_the_judge_tells_a_wrong_layout_from_a_right_one():
    """One shape where two belong, or the two swapped, fails ``layout``; the rewards order them below the truth."""
    world, judge = ShapesWorld(64), ShapesEval()
    scene = world.pair_scenes(1, seed=3)[0]
    text = caption(scene)
    right = world.render(scene)
    alone = world.render(scene.__class__(scene.shape, scene.color, scene.position, scene.background))
    swapped = world.render(parse_caption(caption(scene.__class__(
        scene.shape, scene.color, scene.second.position, scene.background,
        second=scene.second.__class__(scene.second.shape, scene.second.color, scene.position)))))
    assert judge.score_t2i(right, text)["layout"]
    assert not judge.score_t2i(alone, text)["layout"] and not judge.score_t2i(alone, text)["count"]
    assert judge.composition(right, text) == 1.0
    assert judge.composition(alone, text) == 0.25  # one of two right, count wrong: halved
    assert judge.placement_error(alone, text) == pytest.approx(64 / 6, abs=1.0)  # half of the missing third
    assert judge.composition(swapped, text) < 1.0


def test_the_three_rewards_have_three_scales():
    """``shapes`` (partial credit in [0, 1]), ``shapes_composition`` ({0, .25, .5, 1}) and ``shapes_placement``
    (minus pixels): what GDPO normalises per reward and a raw sum would not."""
    world = ShapesWorld(64)
    scenes = world.pair_scenes(4, seed=1)
    texts = [caption(s) for s in scenes]
    wrong = [world.render(s.__class__(s.shape, s.color, s.position, s.background)) for s in scenes]
    right = [world.render(s) for s in scenes]
    scores = {name: build_reward({"name": name}).score(right + wrong, texts + texts)
              for name in ("shapes", "shapes_composition", "shapes_placement")}
    assert all(s.dtype == torch.float32 and s.shape == (8,) for s in scores.values())
    assert torch.all(scores["shapes_composition"][:4] == 1) and torch.all(scores["shapes_composition"][4:] == 0.25)
    assert torch.all(scores["shapes_placement"][:4] > -1) and torch.all(scores["shapes_placement"][4:] < -9)
    assert torch.all(scores["shapes"][:4] > scores["shapes"][4:])


def test_the_prompt_source_draws_distinct_training_pairs_with_their_weight():
    items = rl_prompts({"count": 2, "edits": 1, "pairs": 5, "pair_weight": 3.0, "pair_category": "pairs"}, 64)
    pairs = [item for item in items if item["category"] == "pairs"]
    assert len(items) == 8 and len(pairs) == 5 and len({p["text"] for p in pairs}) == 5
    world = ShapesWorld(64)
    for item in pairs:
        scene = parse_caption(item["text"])
        assert scene.second is not None and not world.is_heldout(scene) and item["weight"] == 3.0
    with pytest.raises(ValueError, match="count, pairs and edits"):
        rl_prompts({"count": 0, "pairs": -1}, 64)
    with pytest.raises(ValueError, match="at most 1218 distinct"):
        world.pair_scenes(5000)


def test_the_evaluation_counts_distinct_held_out_captions():
    """The 54 held-out one-shape prompts are the 27 held-out compositions twice; the two-shape ones are distinct."""
    evals = eval_set(edits=0, pairs=96)
    assert len(evals.heldout_prompts) == 54 and len(set(evals.heldout_prompts)) == 27
    assert len(set(evals.pair_prompts)) == 96


def _training_rewards(pipe, prompts: list[str], seeds: int = 6) -> float:
    """Mean of composition, and of placement (scaled by the image side), on fixed noise without CFG: the rollouts'
    sampler, deterministic here."""
    judge = ShapesEval()
    pipe.set_progress_bar_config(disable=True)
    texts = [p for p in prompts for _ in range(seeds)]
    images = pipe(texts, num_inference_steps=10, guidance_scale=1.0, generator=torch.Generator().manual_seed(0),
                  height=64, width=64).images
    composition = sum(judge.composition(i, t) for i, t in zip(images, texts)) / len(texts)
    placement = sum(judge.placement_error(i, t) for i, t in zip(images, texts)) / len(texts) / 64
    return composition - placement


def test_a_quick_stage3_run_raises_its_rewards_on_its_own_training_prompts(tmp_path):
    """`deepgen shapes --rl-from deepgen-shapes --quick`: a real, short MR-GRPO run (its own prompts, GDPO over the
    three rewards, KL and SFT terms on) from the shipped preset; the rewards on those prompts, on fixed noise,
    rise (measured on 2 cores: composition minus placement/side 0.090 -> 0.164)."""
    from deepgen_components.pipeline import DeepGenPipeline

    torch.set_num_threads(max(1, min(2, torch.get_num_threads())))
    out = tmp_path / "rl"
    assert main(["shapes", "--out", str(out), "--rl-from", "deepgen-shapes", "--quick"]) == 0
    report = json.loads((out / "report.json").read_text())
    assert list(report["results"]) == ["before stage 3 (start)", "after stage 3 (rl)"]
    assert report["results"]["after stage 3 (rl)"]["n_pairs"] == 3
    rows = [json.loads(line) for line in (out / "rl" / "metrics.jsonl").read_text().splitlines()]
    assert {"reward/shapes", "reward/composition", "reward/placement"} <= set(rows[0])
    assert all(math.isfinite(r["loss"]) and r["kl"] >= 0 for r in rows)
    prompts = [caption(s) for s in ShapesWorld(64).pair_scenes(QUICK_RL_PAIRS, heldout=False)]
    before = _training_rewards(DeepGenPipeline.from_pretrained(out / "start"), prompts)
    after = _training_rewards(DeepGenPipeline.from_pretrained(out / "rl" / "pipeline"), prompts)
    assert after > before + 0.02, (before, after)
    assert (out / "images" / "rl_rewards.png").is_file() and (out / "images" / "pairs_heldout_cfg1.png").is_file()
    # benchmarks/rl_gain.py turns such runs into docs/results/rl_gain.json (here one run, read as seed and ablation).
    record = tmp_path / "rl_gain.json"
    done = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "rl_gain.py"), "--runs", str(out), "--ablation",
                           str(out), "--out", str(record), "--plot", str(tmp_path / "r.png"), "--grid",
                           str(tmp_path / "g.png")], capture_output=True, text=True, check=True)
    gain = json.loads(record.read_text())
    pairs = report["results"]
    assert gain["before"] == [100 * pairs["before stage 3 (start)"]["pairs"]["1.0"]["layout"]]
    assert gain["after"] == [100 * pairs["after stage 3 (rl)"]["pairs"]["1.0"]["layout"]]
    assert gain["gdpo_ablation"]["after"] == gain["after"] and "layout" in done.stdout
    assert (tmp_path / "r.png").is_file() and (tmp_path / "g.png").is_file()


def test_rl_from_refuses_a_folder_without_a_pipeline(tmp_path):
    with pytest.raises(FileNotFoundError, match="model_index.json"):
        run_shapes(tmp_path / "run", rl_from=tmp_path)
