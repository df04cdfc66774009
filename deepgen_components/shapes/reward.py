"""The shapes world's evaluator as stage-3 rewards of three scales (``deepgen_components.shapes`` registers them as
``shapes``, ``shapes_composition`` and ``shapes_placement``), so that MR-GRPO's per-reward group normalisation (GDPO)
has rewards of different scales to combine (docs/shapes.md, "Stage 3 with headroom")."""

from __future__ import annotations

from collections.abc import Sequence

import torch

from deepgen_components.rl.rewards.base import ImageBatch, check_batch
from deepgen_components.shapes.evaluator import ShapesEval

__all__ = ["ShapesCompositionReward", "ShapesPlacementReward", "ShapesReward"]


class ShapesReward:
    """The shapes-world evaluator as a reward: ``ShapesEval.reward(image, caption)`` per image (in [0, 1])."""

    name = "shapes"

    def __init__(self) -> None:
        self.evaluator = ShapesEval()

    def score(self, images: ImageBatch, prompts: Sequence[str]) -> torch.Tensor:
        pil, texts = check_batch(images, prompts)
        return torch.tensor([float(self.evaluator.reward(im, p)) for im, p in zip(pil, texts)], dtype=torch.float32)


class ShapesCompositionReward(ShapesReward):
    """Compositional correctness, discrete in [0, 1]: ``ShapesEval.composition`` (the share of the caption's shapes
    with colour, kind and third right, halved when the count is wrong)."""

    name = "shapes_composition"

    def score(self, images: ImageBatch, prompts: Sequence[str]) -> torch.Tensor:
        pil, texts = check_batch(images, prompts)
        return torch.tensor([self.evaluator.composition(im, p) for im, p in zip(pil, texts)], dtype=torch.float32)


class ShapesPlacementReward(ShapesReward):
    """Placement, continuous, in pixels: minus ``ShapesEval.placement_error`` (about 0 at best, -21 at 64 px when
    nothing is drawn), a scale that summing raw rewards would let dominate the [0, 1] ones."""

    name = "shapes_placement"

    def score(self, images: ImageBatch, prompts: Sequence[str]) -> torch.Tensor:
        pil, texts = check_batch(images, prompts)
        return torch.tensor([-self.evaluator.placement_error(im, p) for im, p in zip(pil, texts)],
                            dtype=torch.float32)
