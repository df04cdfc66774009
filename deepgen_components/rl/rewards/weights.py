"""Per-category reward weights for the GDPO advantage (reference §4 "Per-category weights", §5 step 2).

Every reward is computed on every image; the weights only decide how the per-reward, group-normalised
advantages are summed for one image: ``A = Σ_k w[category(image), k] · A_k``. This module turns a
``{category: {reward_name: weight}}`` table plus the category of each image into the (N, R) weight matrix that
the advantage computation multiplies in.

The dataset ``sample_weight`` column of the official YAML (3.0 for text rendering, 1.0 for general) is a
dataset-sampling probability, not a reward weight, and does not belong here.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import torch

__all__ = ["OFFICIAL_CATEGORY_WEIGHTS", "CategoryWeights", "reward_weights"]

OFFICIAL_CATEGORY_WEIGHTS: dict[str, dict[str, float]] = {
    "text_rendering": {"judge": 0.2, "clip": 0.1, "ocr": 0.7},
    "general": {"judge": 0.7, "clip": 0.3, "ocr": 0.0},
}
"""The weights of ``deepgen_train.yaml``: text-rendering prompts lean on OCR, general prompts on the judge.
A plain dict (so configs can deep-copy and serialise it); treat it as read-only and copy it to edit."""


@dataclass(frozen=True)
class CategoryWeights:
    """A validated ``{category: {reward_name: weight}}`` table.

    Weights must be finite and non-negative. A reward missing from a category's dict has weight 0 for that
    category (the official table writes the zero explicitly: general → ocr 0.0).
    """

    categories: Mapping[str, Mapping[str, float]] = field(default_factory=lambda: OFFICIAL_CATEGORY_WEIGHTS)

    def __post_init__(self) -> None:
        if not isinstance(self.categories, Mapping) or not self.categories:
            raise ValueError(
                "CategoryWeights: categories must be a non-empty {category: {reward: weight}} dict"
            )
        frozen: dict[str, dict[str, float]] = {}
        for cat, weights in self.categories.items():
            if not isinstance(cat, str):
                raise TypeError(f"CategoryWeights: category names must be str, got {cat!r}")
            if not isinstance(weights, Mapping):
                raise TypeError(
                    f"CategoryWeights: categories[{cat!r}] must be a {{reward_name: weight}} dict, "
                    f"got {type(weights).__name__}"
                )
            clean: dict[str, float] = {}
            for reward, w in weights.items():
                try:
                    wf = float(w)
                except (TypeError, ValueError) as e:
                    raise TypeError(
                        f"CategoryWeights: categories[{cat!r}][{reward!r}] = {w!r} is not a number"
                    ) from e
                if not math.isfinite(wf) or wf < 0:
                    raise ValueError(
                        f"CategoryWeights: categories[{cat!r}][{reward!r}] = {w!r}; weights must be finite and >= 0"
                    )
                clean[str(reward)] = wf
            frozen[cat] = clean
        object.__setattr__(
            self, "categories", frozen
        )  # a private copy: later edits of the input do not leak in

    @classmethod
    def official(cls) -> CategoryWeights:
        """The weights of the official training YAML (:data:`OFFICIAL_CATEGORY_WEIGHTS`)."""
        return cls(OFFICIAL_CATEGORY_WEIGHTS)

    @property
    def category_names(self) -> list[str]:
        return list(self.categories)

    @property
    def reward_names(self) -> list[str]:
        """Every reward name that appears in at least one category, in first-seen order."""
        seen: dict[str, None] = {}
        for weights in self.categories.values():
            seen.update(dict.fromkeys(weights))
        return list(seen)

    def weight(self, category: str, reward_name: str) -> float:
        """The weight of ``reward_name`` for ``category`` (0.0 when the category does not list the reward)."""
        self._check_category(category)
        return self.categories[category].get(reward_name, 0.0)

    def matrix(self, prompt_categories: Sequence[str], reward_names: Sequence[str]) -> torch.Tensor:
        """The (N, R) float32 matrix ``W[n, k] = weight(prompt_categories[n], reward_names[k])``.

        Raises ``ValueError`` for a category that is not in the table (naming it and the known ones) and for a
        reward name that no category mentions (almost always a typo: it would silently get weight 0
        everywhere). A category may omit rewards, and the table may mention rewards that are not in
        ``reward_names`` (they are simply not computed, e.g. no judge offline); the remaining weights are
        used as they are, not renormalised.
        """
        if isinstance(prompt_categories, str):
            raise TypeError("prompt_categories: expected one category name per image, got a single str")
        if isinstance(reward_names, str):
            raise TypeError("reward_names: expected a list of reward names, got a single str")
        reward_names = list(reward_names)
        if len(set(reward_names)) != len(reward_names):
            raise ValueError(f"reward_names: duplicate names in {reward_names}")
        known_rewards = set(self.reward_names)
        missing = [r for r in reward_names if r not in known_rewards]
        if missing:
            raise ValueError(
                f"reward_names: {missing} appear in no category of the weight table "
                f"(known rewards: {sorted(known_rewards)}); give them an explicit weight, 0.0 if intended"
            )
        rows: dict[str, list[float]] = {}
        out = []
        for cat in prompt_categories:
            if cat not in rows:
                self._check_category(cat)
                rows[cat] = [self.categories[cat].get(r, 0.0) for r in reward_names]
            out.append(rows[cat])
        return torch.tensor(out, dtype=torch.float32).reshape(len(out), len(reward_names))

    def _check_category(self, category: str) -> None:
        if category not in self.categories:
            raise ValueError(
                f"unknown prompt category {category!r}; known categories: {sorted(self.categories)}"
            )


def reward_weights(
    categories: Mapping[str, Mapping[str, float]] | CategoryWeights,
    prompt_categories: Sequence[str],
    reward_names: Sequence[str],
) -> torch.Tensor:
    """The (N, R) per-image weight matrix for the advantage computation.

    ``reward_weights(OFFICIAL_CATEGORY_WEIGHTS, ["general", "text_rendering"], ["judge", "clip", "ocr"])``
    gives ``[[0.7, 0.3, 0.0], [0.2, 0.1, 0.7]]``. See :meth:`CategoryWeights.matrix` for the checks.
    """
    table = categories if isinstance(categories, CategoryWeights) else CategoryWeights(categories)
    return table.matrix(prompt_categories, reward_names)
