"""The shapes world's evaluator as a stage-3 reward (``deepgen_components.shapes`` registers it as ``shapes``)."""

from __future__ import annotations

from collections.abc import Sequence

import torch

from deepgen_components.rl.rewards.base import ImageBatch, check_batch
from deepgen_components.shapes.evaluator import ShapesEval

__all__ = ["ShapesReward"]


class ShapesReward:
    """The shapes-world evaluator as a reward: ``ShapesEval.reward(image, caption)`` per image (in [0, 1])."""

    name = "shapes"

    def __init__(self) -> None:
        self.evaluator = ShapesEval()

    def score(self, images: ImageBatch, prompts: Sequence[str]) -> torch.Tensor:
        pil, texts = check_batch(images, prompts)
        return torch.tensor([float(self.evaluator.reward(im, p)) for im, p in zip(pil, texts)], dtype=torch.float32)
