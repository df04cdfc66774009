"""What a training run keeps in memory: frozen weights in the compute dtype, and the plan ``--dry-run`` prints.

* :func:`resolve_frozen_dtype` — ``model.frozen_dtype``: ``auto`` keeps frozen weights in the compute dtype (bf16
  when the run autocasts to bf16, i.e. ``trainer.precision: bf16``, or ``auto`` on CUDA; fp32 otherwise), or an
  explicit ``bf16`` / ``fp16`` / ``fp32``. Trainable parameters always stay fp32 (master weights for AdamW).
* :func:`cast_frozen` — casts every frozen floating-point *parameter* (the VLM base, the VAE, a frozen DiT, ...) to
  that dtype in place; buffers (rotary tables, position tables) keep their dtype.
* :func:`plan_memory` — the persistent bytes per GPU predicted from the parameters: frozen weights in their dtype,
  trainable weights + gradients (fp32, 4 B each), the two AdamW moments (8 B), an EMA shadow (4 B, when
  ``trainer.ema`` is on); with FSDP everything but the ignored VAE divided by the world size. Activations are not
  included.
* :func:`measure_state` — the same categories measured on a live run (unique tensor storages of the parameters,
  their ``.grad`` and the optimizer state, and the EMA shadow), which ``train`` writes to ``memory.json`` after its
  first optimizer step; the tests compare the two.
"""

from __future__ import annotations

import torch
from torch import nn

__all__ = ["FROZEN_DTYPES", "cast_frozen", "measure_state", "plan_memory", "resolve_frozen_dtype"]

FROZEN_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
GIB = 1024**3


def resolve_frozen_dtype(frozen_dtype: str, precision: str, device_type: str) -> torch.dtype:
    """The dtype frozen weights are kept in (see the module docstring)."""
    if frozen_dtype == "auto":
        bf16 = precision == "bf16" or (precision == "auto" and device_type == "cuda")
        return torch.bfloat16 if bf16 else torch.float32
    if frozen_dtype not in FROZEN_DTYPES:
        raise ValueError(f"model.frozen_dtype must be auto, {', '.join(FROZEN_DTYPES)}; got {frozen_dtype!r}")
    return FROZEN_DTYPES[frozen_dtype]


def cast_frozen(model: nn.Module, dtype: torch.dtype) -> int:
    """Cast every frozen floating-point parameter of ``model`` to ``dtype`` in place; returns the bytes freed."""
    freed = 0
    seen = set()
    for param in model.parameters():
        if param.requires_grad or not param.is_floating_point() or param.dtype == dtype or id(param) in seen:
            continue
        seen.add(id(param))
        before = param.numel() * param.element_size()
        param.data = param.data.to(dtype)
        freed += before - param.numel() * param.element_size()
    return freed


def plan_memory(model: nn.Module, *, frozen_dtype: torch.dtype, world: int = 1, ema: bool = False,
                unsharded: nn.Module | None = None) -> dict:
    """Predicted persistent GiB per GPU (see the module docstring) for ``model`` after ``configure_stage``.

    ``world`` > 1 means FSDP over that many ranks: every parameter is sharded except those of ``unsharded`` (the
    module FSDP ignores: the trainer's VAE)."""
    params = list({id(p): p for p in model.parameters()}.values())
    kept = {id(p) for p in unsharded.parameters()} if unsharded is not None else set()
    world = max(1, world)
    trainable = sum(p.numel() for p in params if p.requires_grad)

    def frozen_bytes(p) -> float:
        size = p.numel() * (frozen_dtype.itemsize if p.is_floating_point() else p.element_size())
        return size if id(p) in kept else size / world

    plan = {
        "frozen_weights_gib": sum(frozen_bytes(p) for p in params if not p.requires_grad) / GIB,
        "trainable_weights_gib": trainable * 4 / GIB / world,
        "gradients_gib": trainable * 4 / GIB / world,
        "adam_states_gib": trainable * 8 / GIB / world,
    }
    if ema:
        plan["ema_gib"] = trainable * 4 / GIB / world
    plan["total_without_activations_gib"] = sum(plan.values())
    return plan


def _storage_bytes(tensors, seen: set) -> int:
    total = 0
    for tensor in tensors:
        if tensor is None or not isinstance(tensor, torch.Tensor) or tensor.device.type == "meta":
            continue
        if hasattr(tensor, "to_local"):  # a DTensor (FSDP2): this rank's shard
            tensor = tensor.to_local()
        storage = tensor.untyped_storage()
        key = (tensor.device.type, storage.data_ptr())
        if key in seen or storage.nbytes() == 0:
            continue
        seen.add(key)
        total += storage.nbytes()
    return total


def measure_state(model: nn.Module, optimizer: torch.optim.Optimizer | None = None, ema=None) -> dict:
    """Measured persistent GiB of a live run: the same keys as :func:`plan_memory` (on this process)."""
    seen: set = set()
    params = list({id(p): p for p in model.parameters()}.values())
    measured = {
        "frozen_weights_gib": _storage_bytes([p for p in params if not p.requires_grad], seen) / GIB,
        "trainable_weights_gib": _storage_bytes([p for p in params if p.requires_grad], seen) / GIB,
        "gradients_gib": _storage_bytes([p.grad for p in params if p.requires_grad], seen) / GIB,
        "adam_states_gib": 0.0,
    }
    if optimizer is not None:
        tensors = [t for state in optimizer.state.values() for t in state.values() if isinstance(t, torch.Tensor)]
        measured["adam_states_gib"] = _storage_bytes(tensors, seen) / GIB
    if ema is not None:
        # the shadow tensors this process holds (under FSDP its shards; state_dict() would gather: a collective)
        measured["ema_gib"] = _storage_bytes(list(ema.shadow.values()), seen) / GIB
    measured["total_without_activations_gib"] = sum(measured.values())
    return measured
