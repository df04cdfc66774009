"""The model a stage trains: built from its spec, the stage's trainable parts, the VLM's LoRA, and the weights a
run starts from (shared by every stage)."""

from __future__ import annotations

import logging
import re
from pathlib import Path

import torch
from deepgen_components.training.config import LoraConfigSpec, ModelSpec
from torch import nn

from deepgen_components.lora import lora_module_names
from deepgen_components.model import DeepGenModel

__all__ = [
    "apply_lora",
    "build_model",
    "configure_stage",
    "load_init_weights",
    "unread_decoder_layers",
]

logger = logging.getLogger(__name__)


def build_model(spec: ModelSpec, *, device: torch.device | str | None = None) -> DeepGenModel:
    """A DeepGen model from a :class:`ModelSpec` (embedded preset, pipeline folder, or official weights)."""
    from deepgen_components.builders import PRESETS, deepgen_1_0, deepgen_small, deepgen_tiny
    from deepgen_components.pipeline import DeepGenPipeline

    if spec.pipeline:
        model = DeepGenPipeline.from_pretrained(spec.pipeline).model
    elif spec.vlm or spec.weights or spec.transformer:
        model = deepgen_1_0(spec.vlm, spec.weights, vae_path=spec.vae, transformer_path=spec.transformer,
                            scheduler_path=spec.scheduler, mask_padding=spec.mask_padding, tokens=spec.tokens or "all")
    elif spec.preset == "tiny":
        model = deepgen_tiny(
            spec.seed,
            mask_padding=True if spec.mask_padding is None else spec.mask_padding,
            tokens=spec.tokens or "all",
            zero_heads=True,
        )
    elif spec.preset == "small":
        model = deepgen_small(spec.seed)
    elif spec.preset == "deepgen-1.0":
        torch.manual_seed(spec.seed)
        model = deepgen_1_0(device=device, mask_padding=spec.mask_padding, tokens=spec.tokens or "all")
    elif spec.preset in PRESETS:
        model = PRESETS[spec.preset]()
    else:
        raise ValueError(f"model.preset: unknown preset {spec.preset!r}; presets: {', '.join(sorted(PRESETS))}")
    model.config.condition_dropout = spec.condition_dropout
    if spec.image_size is not None:
        model.config.image_size = spec.image_size
    if device is not None:
        model = model.to(device)
    return model


def _lm_target_regex(model: DeepGenModel, targets: list[str]) -> str:
    names = "|".join(sorted(set(targets)))
    scope = r".*language_model\." if model.encoder.kind == "qwen_vl" else r".*"
    return rf"{scope}(.*\.)?({names})$"


def unread_decoder_layers(model: DeepGenModel) -> list[int]:
    """Indices of the VLM decoder layers that cannot reach the loss: those after the deepest hidden state the
    bridge stacks. ``hidden_states[i]`` (0 < i < N) is the output of decoder layer i - 1 and ``hidden_states[N]``
    the final-norm output of layer N - 1, so with deepest selected index k < N, layers k .. N - 1 are run but
    never read. DeepGen 1.0 selects (35, 29, ..., 5) of 36: layer 35; the tiny preset (3, 2, 1) of 4: layer 3."""
    deepest = max(model.encoder.layers.indices)
    return list(range(deepest, model.encoder.num_layers)) if deepest < model.encoder.num_layers else []


def apply_lora(model: DeepGenModel, spec: LoraConfigSpec) -> list[str]:
    """Inject a peft LoRA into the VLM's language model (official: r 64, alpha 128, dropout 0.05, Gaussian
    init, on the LM linears). Returns the names of the wrapped modules.

    Deliberate difference from the official code, which wraps every matching linear of the LM: the decoder
    layers after the deepest stacked hidden state (:func:`unread_decoder_layers`, official layer 35) get no
    LoRA. Their output never reaches the bridge, so their LoRA never receives a gradient and, with lora_B
    initialised to zero, never changes the function: dead weight in the official model (3.3M parameters at
    r 64). Leaving it out trains exactly the same model, and it lets DDP run with
    ``find_unused_parameters=False`` (a DDP-wrapped module whose parameters get no gradient fails at step 2).
    A LoRA checkpoint of the official layout loads through ``model.init_from`` (those zero adapters are
    dropped, see :func:`load_init_weights`)."""
    from peft import LoraConfig, inject_adapter_in_model

    vlm = model.encoder.vlm
    pattern = re.compile(_lm_target_regex(model, spec.targets))
    unread = {id(m) for i in unread_decoder_layers(model) for m in model.encoder.decoder.layers[i].modules()}
    targets = [name for name, module in vlm.named_modules() if pattern.fullmatch(name) and id(module) not in unread]
    if not targets:
        raise ValueError(f"lora.targets {spec.targets} matched no module of the VLM's language model")
    config = LoraConfig(
        r=spec.r,
        lora_alpha=spec.alpha,
        lora_dropout=spec.dropout,
        init_lora_weights=spec.init if spec.init != "default" else True,
        target_modules=targets,  # full module names: peft matches a name or a dotted suffix of one
    )
    inject_adapter_in_model(config, vlm)
    wrapped = lora_module_names(vlm)
    if sorted(wrapped) != sorted(targets):  # pragma: no cover - a peft change in name matching
        raise RuntimeError(f"peft wrapped {len(wrapped)} modules, expected {len(targets)}")
    return wrapped


def configure_stage(model: DeepGenModel, stage: str, lora: LoraConfigSpec | None = None) -> list[str]:
    """Freeze everything, then unfreeze what the stage trains; returns the trainable parameter names.

    align (stage 1): think tokens + bridge (projector, connector, heads); VLM and DiT frozen — gradients still
    flow *through* the frozen VLM to the think tokens. sft (stage 2): + the whole DiT + a LoRA on the VLM's
    language model. rl (stage 3): the DiT only.
    """
    model.requires_grad_(False)
    if stage == "align":
        model.think_tokens.requires_grad_(True)
        model.bridge.requires_grad_(True)
    elif stage == "sft":
        model.think_tokens.requires_grad_(True)
        model.bridge.requires_grad_(True)
        model.dit.requires_grad_(True)
        if lora is not None:
            if not lora_module_names(model.encoder.vlm):
                apply_lora(model, lora)
            for name, param in model.encoder.vlm.named_parameters():
                param.requires_grad_("lora_" in name)
    elif stage == "rl":
        model.dit.requires_grad_(True)
    else:
        raise ValueError(f"stage must be 'align', 'sft' or 'rl', got {stage!r}")
    return [name for name, p in model.named_parameters() if p.requires_grad]


def load_init_weights(model: nn.Module, init_from: str | Path) -> int:
    """Start a run from another run's weights (``model.init_from``): a checkpoint folder, or a run's checkpoints
    folder (its newest complete checkpoint). Loaded non-strictly (a stage-1 checkpoint holds only the SCB);
    tensors that do not fit the model are an error. Returns how many tensors were loaded."""
    from deepgen_components.training.checkpoint import latest_checkpoint, load_checkpoint

    source = Path(init_from)
    checkpoint = source if (source / "state.json").exists() else latest_checkpoint(source)
    if checkpoint is None:
        raise FileNotFoundError(f"model.init_from: no complete checkpoint in {init_from}")
    weights = load_checkpoint(checkpoint)["trainable"]
    if isinstance(model, DeepGenModel):  # a checkpoint from before the unread layers lost their LoRA
        weights = _drop_unread_lora(model, weights)
    _, unexpected = model.load_state_dict(weights, strict=False)
    if unexpected:
        hint = " (a stage-2 checkpoint with a LoRA needs the same lora: section)" if any(
            "lora_" in k for k in unexpected) else ""
        raise ValueError(f"model.init_from: {len(unexpected)} tensors do not fit the model{hint}, e.g. {unexpected[:5]}")
    logger.info("initialised %d tensors from %s", len(weights), checkpoint)
    return len(weights)


def _drop_unread_lora(model: DeepGenModel, weights: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Without the LoRA tensors of decoder layers no stacked hidden state reads (official layout, or ours before
    :func:`apply_lora` left them out) when this model has none there: they cannot change the bridge's input."""
    unread = {id(model.encoder.decoder.layers[i]) for i in unread_decoder_layers(model)}
    prefixes = tuple(f"{name}." for name, m in model.named_modules() if id(m) in unread)
    present = {name for name, _ in model.named_parameters()}
    dropped = [k for k in weights if "lora_" in k and k.startswith(prefixes) and k not in present] if prefixes else []
    if dropped:
        logger.info("model.init_from: ignoring %d LoRA tensors of VLM layers the bridge never reads", len(dropped))
    dropped = set(dropped)
    return {k: v for k, v in weights.items() if k not in dropped}
