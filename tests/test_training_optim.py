"""What trains per stage, the optimizer and the LR schedule (reference §7): stage 1 trains the think tokens and
the SCB bridge, stage 2 adds the whole DiT and a LoRA on the VLM's language model; AdamW (0.9, 0.95) with
weight decay only on parameters with >= 2 dims; linear warm-up from 1e-5 * lr over ceil(1% of the steps), then
cosine to 0 (or constant).
"""

import math

import pytest
import torch
from deepgen_components.training.config import LoraConfigSpec, ModelSpec, OptimConfig
from deepgen_components.training.optim import build_optimizer, build_schedule
from deepgen_components.training.stage_model import build_model, configure_stage

from deepgen_components.lora import lora_module_names

torch.set_num_threads(1)

LORA = LoraConfigSpec(r=4, alpha=8.0, dropout=0.0)


def lrs(cfg: OptimConfig, max_steps: int) -> list[float]:
    """The learning rate of every optimizer step 0 .. max_steps - 1 (what the trainer logs)."""
    optimizer = torch.optim.AdamW([torch.nn.Parameter(torch.zeros(2, 2))], lr=cfg.lr)
    schedule = build_schedule(optimizer, cfg, max_steps)
    out = []
    for _ in range(max_steps):
        out.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        schedule.step()
    return out


@pytest.fixture(scope="module")
def tiny():
    return build_model(ModelSpec(preset="tiny", seed=0))


# -- LR schedule -----------------------------------------------------------------------------------------------


def test_warmup_starts_at_start_factor_times_lr_and_reaches_lr_after_one_percent_of_steps():
    cfg = OptimConfig(lr=1e-4)
    schedule = lrs(cfg, 250)  # warm-up = ceil(2.5) = 3 steps
    assert schedule[0] == pytest.approx(1e-5 * 1e-4)
    assert schedule[1] == pytest.approx(1e-4 * (1e-5 + (1 - 1e-5) / 3))
    assert schedule[2] == pytest.approx(1e-4 * (1e-5 + (1 - 1e-5) * 2 / 3))
    assert schedule[3] == pytest.approx(1e-4)  # cosine starts at the peak


def test_after_warmup_the_lr_follows_a_cosine_to_zero():
    cfg = OptimConfig(lr=2e-4, warmup_ratio=0.01)
    max_steps, warmup = 1000, 10
    schedule = lrs(cfg, max_steps)
    for step in (10, 100, 505, 900, 999):
        expected = 2e-4 * 0.5 * (1 + math.cos(math.pi * (step - warmup) / (max_steps - warmup)))
        assert schedule[step] == pytest.approx(expected, rel=1e-9, abs=1e-15)
    assert schedule[505] == pytest.approx(1e-4)  # halfway through the cosine
    assert all(a >= b for a, b in zip(schedule[warmup:], schedule[warmup + 1:]))  # never increases
    assert schedule[-1] < 1e-9


@pytest.mark.parametrize(("max_steps", "warmup"), [(50, 1), (101, 2), (50_000, 500), (133_334, 1334)])
def test_warmup_is_one_percent_of_the_steps_rounded_up(max_steps, warmup):
    factor = build_schedule(torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0), OptimConfig(), max_steps)
    lambdas = factor.lr_lambdas[0]
    assert lambdas(warmup - 1) < 1.0 and lambdas(warmup) == 1.0


def test_constant_schedule_with_fixed_warmup_steps():
    schedule = lrs(OptimConfig(lr=1e-3, schedule="constant", warmup_steps=4, warmup_start_factor=0.0), 20)
    assert schedule[:5] == pytest.approx([0.0, 2.5e-4, 5e-4, 7.5e-4, 1e-3])
    assert schedule[5:] == pytest.approx([1e-3] * 15)


def test_no_warmup_when_the_ratio_is_zero():
    assert lrs(OptimConfig(lr=1.0, warmup_ratio=0.0, schedule="constant"), 3) == [1.0, 1.0, 1.0]


def test_an_unknown_schedule_is_rejected():
    with pytest.raises(ValueError, match="optim.schedule must be 'cosine' or 'constant'"):
        optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
        build_schedule(optimizer, OptimConfig(schedule="linear"), 10)


# -- optimizer -------------------------------------------------------------------------------------------------


def test_weight_decay_applies_only_to_parameters_with_two_or_more_dims(tiny):
    configure_stage(tiny, "align")
    params = [(n, p) for n, p in tiny.named_parameters() if p.requires_grad]
    optimizer = build_optimizer(params, OptimConfig(weight_decay=0.05))
    decay, no_decay = optimizer.param_groups
    assert decay["weight_decay"] == 0.05 and no_decay["weight_decay"] == 0.0
    assert all(p.ndim >= 2 for p in decay["params"]) and all(p.ndim < 2 for p in no_decay["params"])
    assert len(decay["params"]) + len(no_decay["params"]) == len(params)
    assert any(p is tiny.think_tokens.weight for p in decay["params"])  # official: meta_queries are decayed
    assert any(p is tiny.bridge.projector.bias for p in no_decay["params"])
    assert optimizer.defaults["betas"] == (0.9, 0.95)


def test_an_optimizer_needs_trainable_parameters():
    with pytest.raises(ValueError, match="no trainable parameters"):
        build_optimizer([], OptimConfig())


# -- what trains per stage ------------------------------------------------------------------------------------------


def trainable(model) -> set[str]:
    return {n for n, p in model.named_parameters() if p.requires_grad}


def test_stage1_trains_think_tokens_and_the_bridge_only(tiny):
    names = configure_stage(tiny, "align")
    assert set(names) == trainable(tiny)
    expected = {f"encoder.think_tokens.{n}" for n, _ in tiny.think_tokens.named_parameters()}
    expected |= {f"bridge.{n}" for n, _ in tiny.bridge.named_parameters()}
    assert set(names) == expected


def test_stage2_adds_the_dit_and_a_lora_on_the_language_model():
    model = build_model(ModelSpec(preset="tiny", seed=0))
    names = set(configure_stage(model, "sft", LORA))
    dit = {f"dit.{n}" for n, _ in model.dit.named_parameters()}
    assert dit <= names
    assert "encoder.think_tokens.weight" in names and {n for n in names if n.startswith("bridge.")}
    vlm_trainable = {n for n in names if n.startswith("encoder.vlm.")}
    assert vlm_trainable and all("lora_" in n and "language_model" in n for n in vlm_trainable)
    wrapped = lora_module_names(model.encoder.vlm)
    assert wrapped and not [m for m in wrapped if "visual" in m]  # the ViT runs under no_grad: no LoRA there
    assert {m.rsplit(".", 1)[-1] for m in wrapped} == set(LORA.targets)
    assert not any(p.requires_grad for n, p in model.vae.named_parameters())
    assert names - dit - vlm_trainable == {n for n in names if n.startswith(("bridge.", "encoder.think_tokens."))}


def test_configuring_stage2_twice_does_not_stack_loras():
    model = build_model(ModelSpec(preset="tiny", seed=0))
    configure_stage(model, "sft", LORA)
    first = lora_module_names(model.encoder.vlm)
    configure_stage(model, "sft", LORA)
    assert lora_module_names(model.encoder.vlm) == first


def test_stage3_trains_the_dit_only(tiny):
    assert set(configure_stage(tiny, "rl")) == {f"dit.{n}" for n, _ in tiny.dit.named_parameters()}


def test_an_unknown_stage_or_unmatched_lora_targets_are_rejected():
    model = build_model(ModelSpec(preset="tiny", seed=0))
    with pytest.raises(ValueError, match="stage must be 'align', 'sft' or 'rl'"):
        configure_stage(model, "pretrain")
    with pytest.raises(ValueError, match="no_such_proj"):  # peft names the target it could not find
        configure_stage(model, "sft", LoraConfigSpec(targets=["no_such_proj"]))


def test_build_model_applies_the_spec(tiny):
    model = build_model(ModelSpec(preset="tiny", seed=0, condition_dropout=0.25, image_size=96))
    assert model.config.condition_dropout == 0.25 and model.config.image_size == 96
    assert torch.equal(model.bridge.context_head.weight, torch.zeros_like(model.bridge.context_head.weight))
    assert torch.equal(model.dit.transformer.pos_embed.proj.weight, tiny.dit.transformer.pos_embed.proj.weight)
    with pytest.raises(ValueError, match="unknown preset 'huge'"):
        build_model(ModelSpec(preset="huge"))
