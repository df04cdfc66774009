"""The ``rl`` recipe (stage 3, MR-GRPO): ``train_rl`` and ``deepgen train`` on the tiny preset, on a CPU.

* a 30-step run of ``training/configs/rl_tiny.yaml`` in which the (brightness) reward clearly rises;
* ``deepgen train ... --max-steps 2`` as a subprocess: metrics.jsonl with per-reward means and the KL;
* resume = an uninterrupted run, bit for bit (metrics, weights, optimizer state), in both update modes;
* update modes: exactly one AdamW step per rollout, or one per trained timestep (+ one for the SFT gradient);
* init from a stage-2 checkpoint with its LoRA; the saved pipeline loads and generates;
* RNG seeded by (seed, step, rank), prompt files with per-file weights, the DeepGen 1.0 config;
* (slow) two gloo ranks under torchrun: the stepped gradient is the mean of the ranks' own (not their sum),
  every rank ends with the same weights.

The per-image OCR fix is tested in ``tests/test_rewards.py``; the algorithmic pieces in ``tests/test_grpo.py``.
"""

from __future__ import annotations

import json
import math
import os
import random
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch
from deepgen_components.training.checkpoint import latest_checkpoint, load_checkpoint
from deepgen_components.training.config import load_config
from deepgen_components.training.metrics import read_metrics
from deepgen_components.training.prompts import PromptPool
from deepgen_components.training.rl import rollout_seed, train_rl
from safetensors.torch import load_file

import deepgen_components.shapes  # noqa: F401  (registers the shapes world's kinds: its prompt source, reward)
from deepgen_components.rl.rewards import OFFICIAL_CATEGORY_WEIGHTS

ROOT = Path(__file__).resolve().parents[1]
RL_TINY = ROOT / "training" / "configs" / "rl_tiny.yaml"
RL_DEEPGEN1 = ROOT / "training" / "configs" / "rl_deepgen1.yaml"
QUIET = ["trainer.tensorboard=false"]
# A faster variant for the bookkeeping tests: 2 prompts x group 4, 4 denoising steps (K = int(4 * 0.6) = 2).
SMALL = QUIET + ["rl.group_size=4", "rl.num_steps=4", "trainer.save_pipeline=false"]


pytestmark = pytest.mark.usefixtures("one_thread")


def _config(*overrides, path=RL_TINY):
    return load_config(str(path), list(overrides))


def _without_time(records):
    return [{k: v for k, v in r.items() if k != "seconds"} for r in records]


def test_tiny_run_reward_rises_and_pipeline_loads(tmp_path):
    """rl_tiny.yaml as shipped: 30 steps, 16 images per step; the brightness reward rises well above the noise."""
    out = tmp_path / "run"
    result = train_rl(_config(*QUIET), out=out)
    records = read_metrics(out)
    assert result.steps == 30 and len(records) == 30
    rewards = np.array([r["reward/brightness"] for r in records])
    assert rewards == pytest.approx([r["reward"] for r in records])  # one reward, weight 1
    first, last = rewards[:10].mean(), rewards[-10:].mean()
    noise = np.diff(rewards).std()
    # measured: first third 0.5430, last third 0.5646 (+0.0215), step-to-step std 0.0016
    assert last - first > 0.01, (first, last)
    assert last - first > 5 * noise, (first, last, noise)
    assert rewards[-1] > rewards[0] + 0.015
    for r in records:  # per_rollout: every update is on-policy, fp32 -> ratio exactly 1, nothing clipped
        assert r["ratio_mean"] == 1.0 and r["clip_fraction"] == 0.0 and r["optimizer_updates"] == 1
        assert r["kl"] >= 0 and np.isfinite(r["loss"]) and r["sft_loss"] > 0
        assert len(r["timesteps"]) == 4 and 7 not in r["timesteps"]
    assert records[0]["kl"] == 0.0 and records[-1]["kl"] > 0  # the policy leaves the frozen reference
    assert records[0]["lr"] < 1e-6 and records[-1]["lr"] == pytest.approx(1e-2)
    # The checkpoint and the saved pipeline hold the trained DiT; the pipeline loads and generates.
    ckpt = load_checkpoint(latest_checkpoint(out / "checkpoints"))
    assert ckpt["step"] == 30 and all(k.startswith("dit.") for k in ckpt["trainable"])
    from deepgen_components.pipeline import DeepGenPipeline

    pipe = DeepGenPipeline.from_pretrained(out / "pipeline")
    dit = dict(pipe.model.named_parameters())
    for name, value in ckpt["trainable"].items():
        assert torch.equal(dit[name], value), name
    image = pipe("a bright white square", num_inference_steps=2, guidance_scale=1.0, height=64, width=64,
                 generator=torch.Generator().manual_seed(0), progress=False).images[0]
    assert image.size == (64, 64)


def test_cli_run_writes_per_reward_metrics(tmp_path):
    out = tmp_path / "cli"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(
        [sys.executable, "-m", "deepgen_components.cli", "train", "--config", str(RL_TINY), "--max-steps", "2",
         "--out", str(out), "trainer.tensorboard=false"],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "finished 2 steps" in proc.stdout
    records = read_metrics(out)
    assert [r["step"] for r in records] == [1, 2]
    for r in records:
        for key in ("loss", "reward", "reward/brightness", "kl", "policy_loss", "ratio_mean", "clip_fraction",
                    "sft_loss", "advantage_abs_mean", "optimizer_updates", "grad_norm", "lr", "seconds"):
            assert key in r, key
        assert r["optimizer_updates"] == 1
    assert (out / "checkpoints" / "step_00000002" / "state.json").is_file()
    assert (out / "pipeline" / "model_index.json").is_file()
    assert load_config(str(out / "config.yaml"), []).rl.rewards == {"brightness": {"name": "color",
                                                                                   "target": [255, 255, 255]}}


@pytest.mark.parametrize("mode", ["per_rollout", "per_timestep"])
def test_resume_equals_an_uninterrupted_run(tmp_path, mode):
    cfg = _config(*SMALL, f"rl.update_mode={mode}", "trainer.max_steps=4", "trainer.checkpoint_every=2")
    train_rl(cfg, out=tmp_path / "straight")
    train_rl(cfg, out=tmp_path / "resumed", max_steps=2)  # "killed" after the step-2 checkpoint
    assert len(read_metrics(tmp_path / "resumed")) == 2
    train_rl(cfg, out=tmp_path / "resumed")
    straight, resumed = read_metrics(tmp_path / "straight"), read_metrics(tmp_path / "resumed")
    assert _without_time(straight) == _without_time(resumed)  # rewards, losses, KL, ratios: bit for bit
    a = tmp_path / "straight" / "checkpoints" / "step_00000004"
    b = tmp_path / "resumed" / "checkpoints" / "step_00000004"
    for name in ("trainable.safetensors", "optimizer.safetensors"):
        ta, tb = load_file(str(a / name)), load_file(str(b / name))
        assert ta.keys() == tb.keys() and all(torch.equal(ta[k], tb[k]) for k in ta), name
    assert straight[-1]["reward"] != straight[0]["reward"]


def test_update_modes_count_optimizer_steps(tmp_path, monkeypatch):
    calls = []
    original = torch.optim.AdamW.step

    def counting_step(self, *args, **kwargs):
        calls.append(1)
        return original(self, *args, **kwargs)

    monkeypatch.setattr(torch.optim.AdamW, "step", counting_step)

    def run(name, *overrides):
        calls.clear()
        train_rl(_config(*SMALL, "trainer.max_steps=2", *overrides), out=tmp_path / name)
        return read_metrics(tmp_path / name), len(calls)

    records, n = run("rollout", "rl.update_mode=per_rollout")
    assert [r["optimizer_updates"] for r in records] == [1, 1] and n == 2
    assert all(r["ratio_mean"] == 1.0 and r["clip_fraction"] == 0.0 for r in records)
    # per_timestep: K = int(4 * 0.6) = 2 steps, then the official extra step for the SFT gradient.
    records, n = run("timestep", "rl.update_mode=per_timestep")
    assert [r["optimizer_updates"] for r in records] == [3, 3] and n == 6
    # after the first update the later timesteps are off-policy: ratios move and the 1e-4 clip engages
    assert records[1]["ratio_mean"] != 1.0 and records[1]["clip_fraction"] > 0
    records, n = run("timestep_nosft", "rl.update_mode=per_timestep", "rl.sft_lambda=0")
    assert [r["optimizer_updates"] for r in records] == [2, 2] and n == 4
    assert all(r["sft_loss"] is None for r in records)
    with pytest.raises(ValueError, match="update_mode"):
        train_rl(_config(*SMALL, "rl.update_mode=sometimes"), out=tmp_path / "bad")


@pytest.mark.parametrize("variant", [
    ["rl.guidance_scale=3.0"],  # CFG in rollouts -> the same guided velocity in the update and the reference
    ["rl.sampler=flow_grpo", "rl.noise_level=0.7"],
    ["trainer.activation_checkpointing=true"],
])
def test_first_step_is_on_policy_in_every_variant(tmp_path, variant):
    train_rl(_config(*SMALL, "trainer.max_steps=1", *variant), out=tmp_path / "run")
    (record,) = read_metrics(tmp_path / "run")
    assert record["ratio_mean"] == 1.0 and record["clip_fraction"] == 0.0 and record["kl"] == 0.0


def test_init_from_a_stage2_checkpoint_with_lora(tmp_path):
    """RL starts from stage 2: the LoRA, think tokens and SCB load and stay frozen; only the DiT changes."""
    from deepgen_components.training.trainer import train

    from deepgen_components.pipeline import DeepGenPipeline

    sft_cfg = load_config(str(ROOT / "training/configs/sft_tiny.yaml"), QUIET + ["trainer.max_steps=1"])
    train(sft_cfg, out=tmp_path / "sft")
    lora = ["lora.r=8", "lora.alpha=16", "lora.dropout=0.05", "lora.init=gaussian",
            "lora.targets=[q_proj, k_proj, v_proj, o_proj, gate_proj, up_proj, down_proj]"]
    base = [f"model.init_from={tmp_path / 'sft' / 'checkpoints'}", "trainer.max_steps=1",
            "trainer.save_pipeline=true"] + QUIET + ["rl.group_size=4", "rl.num_steps=4"]
    train_rl(_config(*base, *lora), out=tmp_path / "rl")
    sft_pipe = DeepGenPipeline.from_pretrained(tmp_path / "sft" / "pipeline").model.state_dict()
    rl_pipe = DeepGenPipeline.from_pretrained(tmp_path / "rl" / "pipeline").model.state_dict()
    assert sft_pipe.keys() == rl_pipe.keys()
    changed = {k for k in sft_pipe if not torch.equal(sft_pipe[k], rl_pipe[k])}
    assert changed and all(k.startswith("dit.") for k in changed)  # the merged LoRA VLM, SCB, tokens: identical
    assert read_metrics(tmp_path / "rl")[0]["kl"] == 0.0  # the reference is the stage-2 DiT
    with pytest.raises(ValueError, match="LoRA"):
        train_rl(_config(*base), out=tmp_path / "rl_without_lora")


def test_rng_is_seeded_by_seed_step_and_rank(tmp_path):
    seeds = {rollout_seed(s, step, rank) for s in (0, 1) for step in range(50) for rank in range(8)}
    assert len(seeds) == 2 * 50 * 8  # every (seed, step, rank) has its own rollout noise
    assert rollout_seed(0, 3, 1) == rollout_seed(0, 3, 1)
    a = torch.Generator().manual_seed(rollout_seed(0, 3, 0))
    b = torch.Generator().manual_seed(rollout_seed(0, 3, 1))
    assert not torch.equal(torch.randn(16, generator=a), torch.randn(16, generator=b))
    cfg = _config(*SMALL)
    cfg.rl.prompts = [{"text": f"prompt {i}"} for i in range(40)]
    pool = PromptPool(cfg.rl, 64)
    draws = {(step, rank): [d["text"] for d in pool.draw(4, 0, step, rank)] for step in range(3) for rank in range(2)}
    assert draws[(0, 0)] == [d["text"] for d in pool.draw(4, 0, 0, 0)]
    assert len({tuple(v) for v in draws.values()}) == len(draws)
    # Runs with different seeds roll out different noise: the first-step rewards differ.
    train_rl(_config(*SMALL, "trainer.max_steps=1", "trainer.seed=1"), out=tmp_path / "seed1")
    train_rl(_config(*SMALL, "trainer.max_steps=1", "trainer.seed=2"), out=tmp_path / "seed2")
    assert read_metrics(tmp_path / "seed1")[0]["reward"] != read_metrics(tmp_path / "seed2")[0]["reward"]


def test_prompt_files_and_weights(tmp_path):
    (tmp_path / "text.txt").write_text('a sign that says "OPEN"\n\na mug with "HELLO"\n')
    (tmp_path / "general.jsonl").write_text("\n".join(json.dumps({"prompt": f"a photo of thing {i}"}) for i in range(4))
                                            + "\n" + json.dumps({"text": "a poster", "category": "text_rendering"}))
    cfg = _config(*SMALL)
    cfg.rl.prompts = []
    cfg.rl.prompt_files = [
        {"path": str(tmp_path / "text.txt"), "category": "text_rendering", "weight": 3.0},
        {"path": str(tmp_path / "general.jsonl"), "category": "general", "weight": 1.0},
    ]
    pool = PromptPool(cfg.rl, 64)
    assert len(pool.items) == 7
    assert {d["text"]: d["category"] for d in pool.items}["a poster"] == "text_rendering"  # a line's own category
    draws = [d for step in range(500) for d in pool.draw(8, 0, step, 0)]
    # P(text.txt) = 2 * 3 / (2 * 3 + 5 * 1) = 6 / 11 (official sample_proportional: N_d * w_d)
    share = sum(d["text"] in ('a sign that says "OPEN"', 'a mug with "HELLO"') for d in draws) / len(draws)
    assert share == pytest.approx(6 / 11, abs=0.03)
    cfg.rl.prompt_files = [{"path": str(tmp_path / "missing.txt")}]
    with pytest.raises(FileNotFoundError, match="missing.txt"):
        PromptPool(cfg.rl, 64)


def test_edit_prompts_roll_out_on_their_image(tmp_path):
    """A prompt with an image is an edit: its rows get the image's clean latents as DiT references (a text prompt's
    rows none) and the VLM reads the image; rollout and update see the same function (first ratio exactly 1, KL 0)
    and the rewards score ``reward_prompt``."""
    from deepgen_components.training.rl import _edit_images, _reference_rows
    from PIL import Image

    from deepgen_components import deepgen_tiny

    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 256, (64, 64, 3), dtype=np.uint8)).save(tmp_path / "source.png")
    (tmp_path / "edits.jsonl").write_text(
        json.dumps({"prompt": "make it white", "image": "source.png", "reward_prompt": "a white image"}) + "\n"
        + json.dumps({"prompt": "a bright white square"}) + "\n"
    )
    cfg = _config(*SMALL)
    cfg.rl.prompts = []
    cfg.rl.prompt_files = [{"path": str(tmp_path / "edits.jsonl")}]
    pool = PromptPool(cfg.rl, 64)
    edit, text = pool.items
    assert edit["image"] == tmp_path / "source.png" and edit["reward_prompt"] == "a white image"
    assert "image" not in text and "reward_prompt" not in text
    images = _edit_images([edit, text])
    assert images[0].size == (64, 64) and images[1] is None and _edit_images([text, text]) is None
    model = deepgen_tiny(seed=0)
    rows = _reference_rows(model, images, 3, torch.Generator().manual_seed(0))
    assert len(rows) == 6 and all(len(r) == 1 for r in rows[:3]) and all(r == [] for r in rows[3:])
    (pixels,), _ = model.reference_pixels(images)
    assert torch.equal(rows[0][0], model.encode_images([pixels], torch.Generator().manual_seed(0))[0])
    assert rows[0][0].shape == (16, 8, 8) and rows[2][0] is rows[0][0]  # encoded once per prompt
    # Seed 1 draws one text and one edit prompt in its first step: the DiT batch mixes rows with and without a
    # reference (padded joint attention).
    assert sorted("image" in d for d in pool.draw(2, 1, 0, 0)) == [False, True]
    train_rl(_config(*SMALL, "trainer.max_steps=1", "trainer.seed=1", "rl.prompts_per_step=2",
                     f"rl.prompt_files=[{{path: {tmp_path / 'edits.jsonl'}}}]", "rl.prompts=[]"), out=tmp_path / "run")
    (record,) = read_metrics(tmp_path / "run")
    assert record["ratio_mean"] == 1.0 and record["clip_fraction"] == 0.0 and record["kl"] == 0.0
    assert math.isfinite(record["loss"])
    (tmp_path / "missing.jsonl").write_text(json.dumps({"prompt": "x", "image": "nowhere.png"}) + "\n")
    with pytest.raises(FileNotFoundError, match="nowhere.png"):
        train_rl(_config(*SMALL, "trainer.max_steps=1", f"rl.prompt_files=[{{path: {tmp_path / 'missing.jsonl'}}}]",
                         "rl.prompts=[]"), out=tmp_path / "missing")


def test_the_shapes_prompt_source_draws_edit_tasks_scored_against_their_target():
    from deepgen_components.shapes import ShapesWorld, apply_instruction, caption, parse_caption

    cfg = _config(*SMALL)
    cfg.rl.prompts = []
    cfg.rl.prompt_source = {"kind": "shapes", "seed": 0, "count": 4, "edits": 6, "edit_category": "editing"}
    pool = PromptPool(cfg.rl, 64)
    texts, edits = pool.items[:4], pool.items[4:]
    assert len(edits) == 6 and all("image" not in d for d in texts)
    world = ShapesWorld(64, seed=0)
    for i, item in enumerate(edits):
        source, instruction, target = world.edit_triplet(i)
        assert item["text"] == instruction and item["category"] == "editing"
        assert np.array_equal(np.asarray(item["image"]), np.asarray(world.render(source)))
        assert item["reward_prompt"] == caption(target) != caption(source)
        assert parse_caption(item["reward_prompt"]).key() == apply_instruction(source, instruction).key()
        assert not world.is_heldout(target)
    cfg.rl.prompt_source = {"kind": "shapes", "count": 4, "edit": 6}
    with pytest.raises(ValueError, match="unknown keys.*edit"):
        PromptPool(cfg.rl, 64)
    cfg.rl.prompt_source = {"kind": "shapes", "count": 0, "edits": 0}
    with pytest.raises(ValueError, match="count, pairs and edits"):
        PromptPool(cfg.rl, 64)
    cfg.rl.prompt_source = {"kind": "shape", "count": 4}
    with pytest.raises(ValueError, match=r"rl.prompt_source.kind: unknown prompt source kind 'shape'; known: .*shapes"
                                         r".*deepgen_components.shapes is imported"):
        PromptPool(cfg.rl, 64)


def test_a_registered_prompt_source_fills_the_pool():
    """``register_prompt_source``: ``rl.prompt_source: {kind: KIND, ...}`` gets the factory's prompts, the factory
    the mapping's other keys and the image size."""
    from deepgen_components.training.prompts import available_prompt_sources, register_prompt_source

    assert "shapes" in available_prompt_sources()
    register_prompt_source("echo_for_test", lambda options, size: [{"text": f"{options['word']} {size}"}])
    cfg = _config(*SMALL)
    cfg.rl.prompts = []
    cfg.rl.prompt_source = {"kind": "echo_for_test", "word": "hello"}
    assert PromptPool(cfg.rl, 32).items == [{"text": "hello 32", "category": "general", "weight": 1.0}]


def test_deepgen1_config_is_the_official_recipe():
    cfg = _config(path=RL_DEEPGEN1)
    rl, optim = cfg.rl, cfg.optim
    assert cfg.stage == "rl" and cfg.data.image_size == 512 and cfg.model.init_from
    assert (rl.group_size, rl.prompts_per_step, rl.num_steps) == (8, 4, 50)
    assert (rl.guidance_scale, rl.eta, rl.sampler, rl.logprob) == (1.0, 1.0, "cps", "mean_squared")
    assert (rl.timestep_fraction, rl.include_last_step, rl.clip_range, rl.adv_clip, rl.adv_eps) == (0.6, False, 1e-4, 5.0, 1e-4)
    assert (rl.kl_beta, rl.sft_lambda, rl.sft_batch_size, rl.advantages) == (5e-7, 1e-4, 32, "gdpo")
    # the official cadence: one AdamW step per trained timestep + one for the SFT gradient (31 per rollout)
    assert rl.same_noise_in_group and rl.update_mode == "per_timestep"
    assert (optim.lr, optim.warmup_steps, optim.schedule, tuple(optim.betas), optim.weight_decay, optim.grad_clip) == (
        2e-6, 20, "constant", (0.9, 0.999), 0.0, 1.0)
    assert set(rl.rewards) == {"judge", "clip", "ocr"}
    assert {k: v["name"] for k, v in rl.rewards.items()} == {"judge": "judge", "clip": "clip", "ocr": "ocr"}
    assert rl.categories == OFFICIAL_CATEGORY_WEIGHTS
    weights = {Path(f["path"]).stem: (f["category"], f["weight"]) for f in rl.prompt_files}
    assert weights["unigenbench_train_data_ocr"] == ("text_rendering", 3.0)
    assert weights["unigenbench_train_data_general"] == ("general", 1.0)
    assert cfg.lora is not None and (cfg.lora.r, cfg.lora.alpha) == (64, 128)  # loads the stage-2 LoRA
    assert cfg.trainer.activation_checkpointing and cfg.trainer.checkpoint_every == 50
    # the LR schedule: linear warm-up over 20 steps, then constant 2e-6
    from deepgen_components.training.optim import build_schedule

    opt = torch.optim.AdamW([torch.nn.Parameter(torch.zeros(1))], lr=optim.lr)
    schedule = build_schedule(opt, optim, cfg.trainer.max_steps)
    lrs = []
    for _ in range(25):
        lrs.append(opt.param_groups[0]["lr"])
        opt.step()
        schedule.step()
    assert lrs[0] < 1e-10 and lrs[10] == pytest.approx(1e-6, rel=1e-3) and lrs[20:] == [pytest.approx(2e-6)] * 5
    # a meta-device dry run: only the DiT (2.24B) trains
    from deepgen_components.training.trainer import dry_run

    report = dry_run(cfg)
    assert report["trainable"] == report["parameters"]["dit"]["total"] > 2e9


@pytest.mark.slow
def test_two_ranks_average_gradients(tmp_path):
    """torchrun, 2 gloo ranks: gradients are averaged (the DiT is not DDP-wrapped), GDPO normalises over both
    ranks, every rank ends with identical weights, and those differ from a single-process run.

    Averaged, not summed: AdamW is nearly invariant to the gradient's scale, so the weights alone would not
    show a sum. Each rank records its own gradient before the reduction and the gradient AdamW steps with
    (``all_reduce_gradients`` is wrapped to observe, not replaced); the latter must be the mean of the former, and
    the logged pre-clip ``grad_norm`` its norm (clipping at 1.0 is inactive at these norms)."""
    worker = tmp_path / "worker.py"
    worker.write_text(textwrap.dedent(f"""
        import hashlib, json, os, sys, torch
        from pathlib import Path
        torch.set_num_threads(1)
        import deepgen_components.shapes  # registers the `shapes` data source of the SFT batch
        from deepgen_components.training.config import load_config
        from deepgen_components.training.rl import train_rl

        import deepgen_components.training.rl as rl_module

        hashes, original, local, stepped, order = [], torch.optim.AdamW.step, [], [], []
        sync = rl_module.all_reduce_gradients
        flat = lambda params: torch.cat([p.grad.reshape(-1) for p in params if p.grad is not None]).clone()

        def observed_sync(params, info):  # records this rank's own gradient, then reduces as the recipe does
            order[:] = params
            local.append(flat(params))
            sync(params, info)

        rl_module.all_reduce_gradients = observed_sync

        def step(self, *args, **kwargs):  # observe (not replace) torch's optimizer: a hash of the weights
            stepped.append(flat(order))  # the gradient this step uses, in the same order
            result = original(self, *args, **kwargs)
            digest = hashlib.sha256()
            for group in self.param_groups:
                for p in group["params"]:
                    digest.update(p.detach().cpu().numpy().tobytes())
            hashes.append(digest.hexdigest())
            return result

        torch.optim.AdamW.step = step
        cfg = load_config({str(RL_TINY)!r}, {SMALL + ["trainer.max_steps=2"]!r})
        out = Path(sys.argv[1])
        train_rl(cfg, out=out)
        rank = os.environ.get('RANK', '0')
        (out / f"hashes_{{rank}}.json").write_text(json.dumps(hashes))
        torch.save({{"local": local, "stepped": stepped}}, out / f"grads_{{rank}}.pt")
    """))
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(29500 + random.randrange(400)),
         str(worker), str(tmp_path / "two")], env=env, capture_output=True, text=True, timeout=600, cwd=tmp_path,
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    single = subprocess.run([sys.executable, str(worker), str(tmp_path / "one")], env=env, capture_output=True,
                            text=True, timeout=600, cwd=tmp_path)
    assert single.returncode == 0, single.stderr[-4000:]
    two = load_checkpoint(latest_checkpoint(tmp_path / "two" / "checkpoints"))["trainable"]
    one = load_checkpoint(latest_checkpoint(tmp_path / "one" / "checkpoints"))["trainable"]
    assert any(not torch.equal(two[k], one[k]) for k in two)
    ranks = [json.loads((tmp_path / "two" / f"hashes_{r}.json").read_text()) for r in (0, 1)]
    assert len(ranks[0]) == 2 and ranks[0] == ranks[1]  # identical weights on both ranks after every step
    assert ranks[0] != json.loads((tmp_path / "one" / "hashes_0.json").read_text())
    records = read_metrics(tmp_path / "two")
    assert len(records) == 2 and all(r["optimizer_updates"] == 1 for r in records)
    grads = [torch.load(tmp_path / "two" / f"grads_{r}.pt") for r in (0, 1)]
    for step in range(2):
        own = [g["local"][step] for g in grads]
        assert not torch.allclose(own[0], own[1])  # each rank has its own rollouts, so its own gradient
        mean = (own[0] + own[1]) / 2
        for g in grads:  # a sum would be twice this
            torch.testing.assert_close(g["stepped"][step], mean, rtol=1e-5, atol=1e-9)
        assert records[step]["grad_norm"] == pytest.approx(float(mean.norm()), rel=1e-4)
        assert float(mean.norm()) < 1.0  # so the clip left the averaged gradient as it was
