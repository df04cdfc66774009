"""``trainer.ema``: an exponential moving average of the trainable weights, in fp32, beside the run.

After optimizer step ``s`` (1-based): up to ``start`` the average is a copy of the weights; after that, every
``every``-th step, ``ema = decay * ema + (1 - decay) * weight``. Only the trainable parameters are averaged (the
frozen ones never change), each in an fp32 shadow whatever the weight's dtype.

Distributed: under DDP every rank holds the same weights, so every rank keeps the same average (no communication).
Under FSDP2 a shadow is a DTensor with its parameter's placements, so each rank averages its own shard; saving
gathers the full average (a collective) and loading shards it again, as ``training.state`` does for the weights.

Checkpoints: the average of step ``s`` is ``checkpoints/ema_step_XXXXXXXX.safetensors``, written atomically *before*
the ``step_XXXXXXXX/`` folder it belongs to is published (``training.run.write_checkpoint``), so a published
checkpoint always has its average; files of pruned checkpoints are removed.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import torch
from deepgen_components.training.config import EMAConfig
from torch import nn

__all__ = ["EMA", "ema_path", "prune_ema_files", "swapped", "write_state"]


def _dtensor_type():
    try:
        from torch.distributed.tensor import DTensor

        return DTensor
    except ImportError:  # pragma: no cover - every torch we support has it
        return ()


def ema_path(checkpoints: Path, step: int) -> Path:
    """The average saved with checkpoint ``step_XXXXXXXX`` of the folder ``checkpoints``."""
    return Path(checkpoints) / f"ema_step_{step:08d}.safetensors"


def prune_ema_files(checkpoints: Path) -> None:
    """Remove averages whose checkpoint folder is gone (pruned by ``keep_last``, or never published)."""
    for path in Path(checkpoints).glob("ema_step_*.safetensors"):
        if not (path.parent / path.name.removeprefix("ema_").removesuffix(".safetensors")).is_dir():
            path.unlink(missing_ok=True)


class EMA:
    """The fp32 average of ``model``'s trainable parameters (by parameter name, as the checkpoints name them)."""

    def __init__(self, model: nn.Module, config: EMAConfig) -> None:
        self.config = config
        self.params = {name: p for name, p in model.named_parameters() if p.requires_grad}
        if not self.params:
            raise ValueError("trainer.ema: the model has no trainable parameters to average")
        with torch.no_grad():
            self.shadow = {name: p.detach().float().clone() for name, p in self.params.items()}

    @torch.no_grad()
    def update(self, step: int) -> None:
        """Fold in the weights after optimizer step ``step`` (1-based)."""
        if step <= self.config.start:
            for name, p in self.params.items():
                self.shadow[name].copy_(p.detach())
        elif (step - self.config.start) % self.config.every == 0:
            weight = 1.0 - self.config.decay
            for name, p in self.params.items():
                self.shadow[name].lerp_(p.detach().float(), weight)

    def state_dict(self) -> dict[str, torch.Tensor]:
        """The full average by parameter name, on the CPU (under FSDP gathered from every rank: a collective)."""
        dtensor = _dtensor_type()
        return {name: (s.full_tensor() if dtensor and isinstance(s, dtensor) else s).detach().cpu()
                for name, s in self.shadow.items()}

    @torch.no_grad()
    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        """Put a saved average back (each rank its own shard under FSDP); names must match the trainable ones."""
        missing, unknown = sorted(set(self.shadow) - set(state)), sorted(set(state) - set(self.shadow))
        if missing or unknown:
            raise ValueError(f"trainer.ema: the saved average does not match the trainable parameters (missing "
                             f"{missing[:5]}, unknown {unknown[:5]}); was the run's stage or lora changed?")
        dtensor = _dtensor_type()
        for name, shadow in self.shadow.items():
            value = state[name].float()
            if dtensor and isinstance(shadow, dtensor):
                from torch.distributed.tensor import distribute_tensor

                value = distribute_tensor(value.to(shadow.device), shadow.device_mesh, shadow.placements)
            shadow.copy_(value)

    def applied(self):
        """A block inside which the trainable parameters hold the average (see :func:`swapped`)."""
        return swapped(self.params, self.shadow)


@contextmanager
def swapped(params: dict[str, nn.Parameter], weights: dict[str, torch.Tensor]) -> Iterator[None]:
    """Inside the block ``params[name]`` holds ``weights[name]`` (cast to its dtype) for every name of ``weights``;
    afterwards the parameters get their own values back, bit for bit."""
    saved = {name: params[name].detach().clone() for name in weights}
    with torch.no_grad():
        for name, value in weights.items():
            params[name].copy_(value)
    try:
        yield
    finally:
        with torch.no_grad():
            for name, value in saved.items():
                params[name].copy_(value)


def write_state(state: dict[str, torch.Tensor], path: Path) -> None:
    """``state`` as safetensors at ``path``: written to a temporary file, synced, renamed into place."""
    from safetensors.torch import save_file

    path = Path(path)
    tmp = path.with_name(f".tmp_{path.name}_{os.getpid()}")
    save_file({k: v.contiguous() for k, v in state.items()}, str(tmp))
    with tmp.open("rb") as handle:
        os.fsync(handle.fileno())
    os.replace(tmp, path)
