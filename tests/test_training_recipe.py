"""Stages 1 (align) and 2 (sft) end to end on the tiny preset and the shapes world (reference §6-7): the loss
goes down in 50 steps, exactly the stage's parameters train (VLM and DiT frozen in stage 1; VLM base and VAE
frozen in stage 2), gradients reach the think tokens through the frozen VLM, stage 2 starts from a stage-1
checkpoint, and the finished run is a DeepGenPipeline that generates.

The two 50-step runs are module fixtures shared by the tests that inspect them.
"""

import copy
import logging
import statistics
from dataclasses import dataclass
from pathlib import Path

import deepgen_components.training as training_package
import pytest
import torch
from deepgen_components.training.checkpoint import latest_checkpoint, load_checkpoint
from deepgen_components.training.config import TrainConfig, load_config
from deepgen_components.training.data import collate
from deepgen_components.training.metrics import read_metrics
from deepgen_components.training.stage_model import build_model, configure_stage
from deepgen_components.training.trainer import train
from PIL import Image

from deepgen_components.lora import merge_lora
from deepgen_components.pipeline import DeepGenPipeline
from deepgen_components.shapes.data import ShapesSource  # also registers the `shapes` kinds

torch.set_num_threads(1)

CONFIGS = Path(training_package.__file__).parent / "configs"


@dataclass
class Run:
    cfg: TrainConfig
    out: Path

    @property
    def losses(self) -> list[float]:
        return [row["loss"] for row in read_metrics(self.out)]

    @property
    def final(self) -> dict:
        return load_checkpoint(latest_checkpoint(self.out / "checkpoints"))


def tiny_config(name: str, *overrides: str) -> TrainConfig:
    return load_config(CONFIGS / f"{name}.yaml", ["trainer.tensorboard=false", *overrides])


def model_at(cfg: TrainConfig, weights: dict | None = None):
    """A fresh model as the trainer builds it, with ``weights`` (trainable tensors by name) loaded."""
    model = build_model(cfg.model)
    configure_stage(model, cfg.stage, cfg.lora)
    if weights is not None:
        missing, unexpected = model.load_state_dict(weights, strict=False)
        assert not unexpected
    return model.eval()


def parameters(module) -> dict[str, torch.Tensor]:
    return {name: p.detach() for name, p in module.named_parameters()}


@pytest.fixture(scope="module")
def align_run(tmp_path_factory) -> Run:
    cfg = tiny_config("align_tiny")
    out = tmp_path_factory.mktemp("align")
    train(cfg, out=out)
    return Run(cfg, out)


@pytest.fixture(scope="module")
def sft_run(tmp_path_factory, align_run) -> Run:
    # as the official recipe: stage 2 starts from the stage-1 checkpoint
    cfg = tiny_config("sft_tiny", f"model.init_from={align_run.out / 'checkpoints'}")
    out = tmp_path_factory.mktemp("sft")
    train(cfg, out=out)
    return Run(cfg, out)


# -- a fixed evaluation loss ------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def heldout() -> list[dict]:
    """Held-out t2i and edit batches from another shapes world (seed 123), not seen in training."""
    return [collate([ShapesSource(task, 64, seed=123)[i] for i in range(8)]) for task in ("t2i", "edit")]


@torch.no_grad()
def eval_loss(model, batches: list[dict]) -> float:
    """Flow-matching loss with everything random fixed: VAE means, one noise draw, timesteps spread evenly
    over [0, 1), no caption dropout. Far less noisy than the logged loss (random sigma, VAE sample)."""
    losses = []
    for batch in batches:
        n = len(batch["prompts"])
        latents = model.encode_images(batch["pixels"], mode="mean")
        fixed = {
            "prompts": batch["prompts"],
            "latents": latents,
            "noise": torch.randn(latents.shape, generator=torch.Generator().manual_seed(0)),
            "u": (torch.arange(n) + 0.5) / n,
        }
        if "reference_pixels" in batch:
            fixed["reference_pixels"] = batch["reference_pixels"]
            fixed["reference_latents"] = [model.encode_images(list(r), mode="mean") for r in batch["reference_pixels"]]
        losses.append(model.flow_matching_loss(fixed, condition_dropout=0.0).loss.item())
    return sum(losses) / len(losses)


# -- the loss goes down ----------------------------------------------------------------------------------------------


def test_stage1_loss_decreases_over_50_steps(align_run, heldout):
    losses = align_run.losses
    assert len(losses) == 50
    assert statistics.mean(losses[-10:]) < statistics.mean(losses[:10])
    before = eval_loss(model_at(align_run.cfg), heldout)
    after = eval_loss(model_at(align_run.cfg, align_run.final["trainable"]), heldout)
    assert after < 0.95 * before, (before, after)  # measured: 1.63 -> 1.47


def test_stage2_loss_decreases_over_50_steps(sft_run, align_run, heldout):
    losses = sft_run.losses
    assert len(losses) == 50
    assert statistics.mean(losses[-10:]) < statistics.mean(losses[:10])
    before = eval_loss(model_at(sft_run.cfg, align_run.final["trainable"]), heldout)
    after = eval_loss(model_at(sft_run.cfg, sft_run.final["trainable"]), heldout)
    assert after < 0.95 * before, (before, after)  # measured: 1.47 -> 1.29


def test_metrics_hold_one_line_per_step_in_the_task_cycle(align_run):
    rows = read_metrics(align_run.out)
    assert [row["step"] for row in rows] == list(range(1, 51))
    assert [row["task"] for row in rows[:8]] == ["edit", "t2i", "t2i", "t2i"] * 2
    assert rows[0]["lr"] == pytest.approx(1e-3 * 1e-5)  # warm-up starts at 1e-5 * lr
    assert rows[1]["lr"] == pytest.approx(1e-3)  # ceil(1% of 50) = 1 warm-up step
    for row in rows:
        assert {"loss", "lr", "grad_norm", "samples_per_s"} <= row.keys()
        assert row["grad_norm"] >= 0 and row["samples_per_s"] > 0


# -- what trains ----------------------------------------------------------------------------------------------------


def test_stage1_changes_only_think_tokens_and_bridge(align_run):
    fresh = model_at(align_run.cfg)
    trained = align_run.final["trainable"]
    assert trained.keys() == {n for n, p in fresh.named_parameters() if p.requires_grad}
    assert all(n.startswith(("encoder.think_tokens.", "bridge.")) for n in trained)
    before = parameters(fresh)
    unchanged = [n for n, value in trained.items() if torch.equal(value, before[n])]
    assert unchanged == []

    saved = DeepGenPipeline.from_pretrained(align_run.out / "pipeline").model
    for part in ("vlm", "dit", "vae"):
        frozen, after = parameters(getattr(fresh, part)), parameters(getattr(saved, part))
        assert frozen.keys() == after.keys()
        changed = [n for n in frozen if not torch.equal(frozen[n], after[n])]
        assert changed == [], f"{part}: {changed[:3]}"
    assert torch.equal(saved.think_tokens.weight, trained["encoder.think_tokens.weight"])


def test_stage2_changes_lora_dit_and_bridge_but_not_vlm_base_or_vae(sft_run, align_run):
    start = model_at(sft_run.cfg, align_run.final["trainable"])
    trained = sft_run.final["trainable"]
    assert trained.keys() == {n for n, p in start.named_parameters() if p.requires_grad}
    lora = [n for n in trained if "lora_" in n]
    dit = [n for n in trained if n.startswith("dit.")]
    assert lora and dit and len(dit) == len(list(start.dit.parameters()))
    before = parameters(start)
    unchanged = {n for n, value in trained.items() if torch.equal(value, before[n])}
    # Everything moves except what never gets a gradient, as in the official model: (1) the LoRA of the VLM
    # decoder layers whose output no stacked hidden state contains (the bridge's deepest state is
    # hidden_states[N - 1]; official [35, ..., 5] of 36 likewise never reads layer 35); (2) in the last DiT
    # block (context_pre_only) the context queries' bias and RMSNorm, whose attention outputs are discarded
    # (zero gradient; the 2-D add_q_proj.weight still moves by weight decay).
    unread = range(max(start.layers.indices), start.encoder.config.text_config.num_hidden_layers)
    last = len(start.dit.transformer.transformer_blocks) - 1
    expected = {n for n in lora if any(f"language_model.layers.{i}." in n for i in unread)}
    expected |= {f"dit.transformer.transformer_blocks.{last}.attn.{name}"
                 for name in ("add_q_proj.bias", "norm_added_q.weight")}
    assert unchanged == expected
    assert len(expected & set(lora)) < len(lora)

    # The pipeline holds the VLM with the LoRA merged in: it must equal the untouched base weights merged with
    # the trained LoRA, bit for bit (any change to a base weight would show).
    expected_vlm = copy.deepcopy(model_at(sft_run.cfg, trained).encoder.vlm)
    assert merge_lora(expected_vlm) == len(lora) // 2
    saved = DeepGenPipeline.from_pretrained(sft_run.out / "pipeline").model
    expected, after = parameters(expected_vlm), parameters(saved.encoder.vlm)
    assert expected.keys() == after.keys()
    assert [n for n in expected if not torch.equal(expected[n], after[n])] == []
    fresh_vae, saved_vae = parameters(start.vae), parameters(saved.vae)
    assert all(torch.equal(fresh_vae[n], saved_vae[n]) for n in fresh_vae)
    assert all(torch.equal(p, trained[f"dit.{n}"]) for n, p in saved.dit.named_parameters())


def test_stage1_gradients_reach_the_think_tokens_through_the_frozen_vlm(align_run, heldout):
    batch = {"prompts": heldout[0]["prompts"][:2], "pixels": heldout[0]["pixels"][:2]}
    fresh = model_at(align_run.cfg)
    assert min(fresh.layers.indices) >= 1  # the bridge reads decoder outputs, never the raw embeddings
    fresh.flow_matching_loss(batch, torch.Generator().manual_seed(0), condition_dropout=0.0).loss.backward()
    # zero-initialised heads (official): at the start nothing upstream of them gets a gradient
    assert fresh.bridge.context_head.weight.grad.abs().sum() > 0
    assert fresh.think_tokens.weight.grad.abs().sum() == 0

    trained = model_at(align_run.cfg, align_run.final["trainable"])
    trained.flow_matching_loss(batch, torch.Generator().manual_seed(0), condition_dropout=0.0).loss.backward()
    grad = trained.think_tokens.weight.grad
    assert torch.isfinite(grad).all() and grad.abs().sum() > 0
    assert all(p.grad is None for p in trained.encoder.vlm.parameters())
    assert all(p.grad is None for p in trained.dit.parameters())


# -- stage 2 from stage 1, the pipeline -----------------------------------------------------------------------


def test_stage2_starts_from_a_stage1_checkpoint_via_init_from(align_run, tmp_path):
    # lr 0: nothing moves, so the weights stage 2 trains from are visible in its checkpoint
    cfg = tiny_config("sft_tiny", f"model.init_from={align_run.out / 'checkpoints'}", "optim.lr=0",
                      "trainer.save_pipeline=false")
    train(cfg, out=tmp_path, max_steps=1)
    stage1 = align_run.final["trainable"]
    stage2 = load_checkpoint(tmp_path / "checkpoints" / "step_00000001")["trainable"]
    assert stage1.keys() < stage2.keys()
    assert all(torch.equal(stage2[n], value) for n, value in stage1.items())
    fresh_dit = parameters(model_at(cfg).dit)
    assert all(torch.equal(stage2[f"dit.{n}"], value) for n, value in fresh_dit.items())


def test_init_from_a_folder_without_checkpoints_is_an_error(tmp_path):
    cfg = tiny_config("sft_tiny", f"model.init_from={tmp_path}")
    with pytest.raises(FileNotFoundError, match="model.init_from: no complete checkpoint"):
        train(cfg, out=tmp_path / "run", max_steps=1)


def test_the_finished_stage2_run_loads_into_deepgen_pipeline_and_generates(sft_run):
    pipe = DeepGenPipeline.from_pretrained(sft_run.out / "pipeline")
    generator = torch.Generator().manual_seed(0)
    image = pipe("a red circle", num_inference_steps=2, generator=generator, progress=False).images[0]
    assert isinstance(image, Image.Image) and image.size == (64, 64)
    source = ShapesSource("t2i", 64)[0].target
    edited = pipe("make the circle green", image=source, num_inference_steps=2, generator=generator, progress=False)
    assert edited.images[0].size == (64, 64)


# -- data problems never stop a run -----------------------------------------------------------------------------------


def test_unreadable_images_are_skipped_during_training(tmp_path, caplog):
    images = tmp_path / "img"
    images.mkdir()
    rows = []
    for i in range(6):
        if i % 3 == 0:
            Image.new("RGB", (64, 64), (40 * i, 0, 0)).save(images / f"{i}.png")
        elif i % 3 == 1:
            (images / f"{i}.png").write_bytes(b"corrupt")
        rows.append(f'{{"task": "t2i", "image": "img/{i}.png", "caption": "shape {i}"}}')  # i % 3 == 2: missing
    (tmp_path / "m.jsonl").write_text("\n".join(rows) + "\n")
    source = f"{{name: m, kind: manifest, task: t2i, path: {tmp_path / 'm.jsonl'}}}"
    cfg = tiny_config("align_tiny", f"data.sources=[{source}]", "data.batch_size=2", "trainer.save_pipeline=false")
    with caplog.at_level(logging.WARNING, logger="deepgen_components.training.data"):
        train(cfg, out=tmp_path / "run", max_steps=6)
    assert [row["step"] for row in read_metrics(tmp_path / "run")] == [1, 2, 3, 4, 5, 6]
    messages = [r.getMessage() for r in caplog.records]
    assert any("skipped sample" in m and "FileNotFoundError" in m for m in messages)
    assert any("skipped sample" in m and "UnidentifiedImageError" in m for m in messages)
