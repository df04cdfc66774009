"""A small rule-based reward: mean-colour closeness (a toy signal for smoke tests)."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

from .base import ImageBatch, check_batch

__all__ = ["MeanColorReward"]


class MeanColorReward:
    """1 - ||mean RGB - target|| / (255 sqrt 3): how close an image's mean colour is to ``target`` (0..255).

    A deliberately simple, prompt-independent reward: a policy that learns it visibly shifts its colours, which
    makes it a cheap end-to-end check of an RL loop.
    """

    name = "color"

    def __init__(self, target: Sequence[float] = (220, 40, 40)) -> None:
        if len(target) != 3:
            raise ValueError(f"target must be an RGB triple, got {target!r}")
        self.target = np.asarray(target, dtype=np.float64)

    def score(self, images: ImageBatch, prompts: Sequence[str]) -> torch.Tensor:
        pil, _ = check_batch(images, prompts)
        means = np.stack([np.asarray(im.convert("RGB"), dtype=np.float64).reshape(-1, 3).mean(0) for im in pil])
        distance = np.linalg.norm(means - self.target, axis=1) / (255.0 * np.sqrt(3.0))
        return torch.tensor(1.0 - distance, dtype=torch.float32)
