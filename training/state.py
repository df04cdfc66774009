"""Trainable and optimizer state, whole or sharded by FSDP2: what a checkpoint holds and how it goes back in.

Checkpoints hold the trainable weights by model parameter name and the optimizer state. Unsharded runs save them
whole (the optimizer's own ``state_dict``). FSDP2 runs never gather them: :func:`save_sharded` writes each rank's
shards of the weights, the AdamW state (keyed by parameter name) and the EMA average with
``torch.distributed.checkpoint`` (DCP), and :func:`load_sharded` reads each rank's shards back (DCP reshards, so
the world size may change). Read whole (``training.checkpoint.read_sharded``) the same folder gives the full
tensors, e.g. for ``deepgen convert`` or ``model.init_from``.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from pathlib import Path

import torch
from torch import nn

from deepgen_components.model import DeepGenModel

__all__ = [
    "full_state",
    "load_optimizer",
    "load_sharded",
    "load_trainable",
    "optimizer_state",
    "save_sharded",
    "unsharded_model",
]


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
    """Put a saved optimizer state back: the optimizer's own ``state_dict`` (keyed by index), or the full state
    keyed by parameter name (an FSDP checkpoint, gathered or read whole), sharded into an FSDP-wrapped ``module``."""
    by_name = any(isinstance(key, str) for key in state["state"])
    if not sharded and not by_name:
        optimizer.load_state_dict(state)
        return
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

    # strict=False: a parameter that never had a gradient (e.g. the LoRA of a VLM layer the bridge does not read)
    # has no AdamW state, as with optimizer.load_state_dict. Unsharded, the full state is the module's own.
    options = StateDictOptions(full_state_dict=sharded, strict=False)
    set_optimizer_state_dict(module, optimizer, state, options=options)


def _trainable_weights(model: nn.Module) -> dict[str, torch.Tensor]:
    """The trainable entries of ``model``'s state dict by parameter name; under FSDP each rank's DTensor shards
    (views of the parameters: no copy, no collective)."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    names = {name for name, p in model.named_parameters() if p.requires_grad}
    state = get_model_state_dict(model, options=StateDictOptions(ignore_frozen_params=True))
    return {name: value for name, value in state.items() if name in names}


def save_sharded(folder: str | Path, *, module: nn.Module, model: nn.Module, optimizer: torch.optim.Optimizer,
                 average: Mapping[str, torch.Tensor] | None = None) -> None:
    """Every rank writes its shards of ``model``'s trainable weights, the optimizer state of the FSDP-wrapped
    ``module`` (keyed by parameter name) and ``average`` (the EMA shadows) into the DCP ``folder`` (a collective;
    nothing is gathered: rank 0 writes only its own shards and the replicated scalars)."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict

    state = {"model": _trainable_weights(model), "optim": get_optimizer_state_dict(module, optimizer)}
    if average is not None:
        state["ema"] = dict(average)
    dcp.save(state, checkpoint_id=str(folder))


def load_sharded(folder: str | Path, *, module: nn.Module, model: nn.Module, optimizer: torch.optim.Optimizer,
                 average: Mapping[str, torch.Tensor] | None = None) -> bool:
    """Read this rank's shards of a :func:`save_sharded` folder into the weights, the optimizer and ``average``
    (in place; a collective). Returns whether the folder held an average (False: ``average`` is left as is)."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import (
        StateDictOptions,
        get_optimizer_state_dict,
        set_model_state_dict,
        set_optimizer_state_dict,
    )

    reader = dcp.FileSystemReader(str(folder))
    saved = reader.read_metadata().state_dict_metadata
    weights = _trainable_weights(model)
    missing = [f"model.{name}" for name in weights if f"model.{name}" not in saved]
    if missing:
        raise ValueError(f"checkpoint {folder}: {len(missing)} trainable tensors were not saved, e.g. {missing[:3]} "
                         "(was the run's stage or lora changed?)")
    # The template of the optimizer state (DCP loads into it in place): initialised by DSD with a zero-lr step on a
    # fresh optimizer; only the parameters the checkpoint has state for (one that never had a gradient has none,
    # and must get none back, as with optimizer.load_state_dict).
    optim = get_optimizer_state_dict(module, optimizer)
    optim["state"] = {name: value for name, value in optim["state"].items()
                      if any(f"optim.state.{name}.{key}" in saved for key in value)}
    state = {"model": weights, "optim": optim}
    has_average = average is not None and any(key.startswith("ema.") for key in saved)
    if has_average:
        state["ema"] = dict(average)
    dcp.load(state, storage_reader=reader)
    set_model_state_dict(model, state["model"], options=StateDictOptions(strict=False))
    set_optimizer_state_dict(module, optimizer, state["optim"], options=StateDictOptions(strict=False))
    return has_average


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
