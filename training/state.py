"""Trainable and optimizer state, whole or sharded by FSDP2: what a checkpoint holds and how it goes back in.

Checkpoints hold the trainable weights by model parameter name and the optimizer state (under FSDP the full state,
keyed by parameter name, gathered on the main process), so a run resumes with any layout of the same model.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from deepgen_components.model import DeepGenModel

__all__ = ["full_state", "load_optimizer", "load_trainable", "optimizer_state", "unsharded_model"]


def full_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """Trainable weights by model parameter name (gathered from FSDP shards when sharded: a collective)."""
    try:
        from torch.distributed.tensor import DTensor
    except ImportError:  # pragma: no cover
        DTensor = ()
    state = {}
    for name, param in model.named_parameters():
        if param.requires_grad:
            value = param.detach()
            if DTensor and isinstance(value, DTensor):
                value = value.full_tensor()
            state[name] = value
    return state


def load_trainable(model: nn.Module, weights: dict[str, torch.Tensor]) -> None:
    """Copy checkpointed weights (by parameter name) into ``model``, each rank its own shard under FSDP."""
    params = dict(model.named_parameters())
    with torch.no_grad():
        for name, value in weights.items():
            if name not in params:
                raise ValueError(f"checkpoint: parameter {name} does not exist in this model")
            target = params[name]
            try:
                from torch.distributed.tensor import DTensor, distribute_tensor

                if isinstance(target, DTensor):
                    value = distribute_tensor(value.to(target.device), target.device_mesh, target.placements)
            except ImportError:  # pragma: no cover
                pass
            target.copy_(value)


def optimizer_state(module: nn.Module, optimizer: torch.optim.Optimizer, sharded: bool) -> dict:
    """The optimizer state to save; under FSDP the full state keyed by parameter name (a collective over the
    FSDP-wrapped ``module``)."""
    if not sharded:
        return optimizer.state_dict()
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict

    options = StateDictOptions(full_state_dict=True, cpu_offload=True)  # the full state, on rank 0 only
    return get_optimizer_state_dict(module, optimizer, options=options)


def load_optimizer(module: nn.Module, optimizer: torch.optim.Optimizer, state: dict, sharded: bool) -> None:
    """Put a saved optimizer state back (under FSDP: the full state, sharded into the FSDP-wrapped ``module``)."""
    if not sharded:
        optimizer.load_state_dict(state)
        return
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

    # strict=False: a parameter that never had a gradient (e.g. the LoRA of a VLM layer the bridge does not read)
    # has no AdamW state, as with optimizer.load_state_dict.
    set_optimizer_state_dict(module, optimizer, state, options=StateDictOptions(full_state_dict=True, strict=False))


def unsharded_model(sharded: nn.Module, info, build: Callable[[], DeepGenModel]) -> DeepGenModel | None:
    """FSDP: gather the full weights of ``sharded`` (a DeepGenModel or an objective holding it as ``model``; a
    collective) into ``build()``, a fresh unsharded model of the same layout, on the main process."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    state = get_model_state_dict(sharded, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    if not info.is_main:
        return None
    model = build()
    model.load_state_dict({name.removeprefix("model."): value for name, value in state.items()})
    return model
