"""The optimizer and the LR schedule of every stage: AdamW (official grouping) and warm-up + cosine / constant."""

from __future__ import annotations

import math

import torch
from deepgen_components.training.config import OptimConfig
from torch import nn

__all__ = ["build_optimizer", "build_schedule"]


def build_optimizer(params: list[tuple[str, nn.Parameter]], cfg: OptimConfig) -> torch.optim.AdamW:
    """AdamW; weight decay only on parameters with >= 2 dims (official: biases and norms get none)."""
    decay = [p for _, p in params if p.ndim >= 2]
    no_decay = [p for _, p in params if p.ndim < 2]
    groups = [g for g in ({"params": decay, "weight_decay": cfg.weight_decay},
                          {"params": no_decay, "weight_decay": 0.0}) if g["params"]]
    if not groups:
        raise ValueError("no trainable parameters: check the stage and the model")
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=tuple(cfg.betas), eps=cfg.eps)


def build_schedule(optimizer: torch.optim.Optimizer, cfg: OptimConfig, max_steps: int) -> torch.optim.lr_scheduler.LambdaLR:
    """Linear warm-up from ``warmup_start_factor * lr`` over ``warmup_ratio`` of the steps, then cosine to 0
    (official stages 1-2) or constant."""
    if cfg.warmup_steps is not None:
        warmup = cfg.warmup_steps
    else:
        warmup = max(1, math.ceil(cfg.warmup_ratio * max_steps)) if cfg.warmup_ratio > 0 else 0
    if cfg.schedule not in ("cosine", "constant"):
        raise ValueError(f"optim.schedule must be 'cosine' or 'constant', got {cfg.schedule!r}")

    def factor(step: int) -> float:
        if step < warmup:
            return cfg.warmup_start_factor + (1.0 - cfg.warmup_start_factor) * step / warmup
        if cfg.schedule == "constant":
            return 1.0
        progress = min(1.0, (step - warmup) / max(1, max_steps - warmup))
        return 0.5 * (1.0 + math.cos(math.pi * progress))

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)
