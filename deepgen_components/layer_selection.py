"""Which VLM hidden states the Stacked Channel Bridge stacks.

Hidden-state indexing follows Hugging Face's ``output_hidden_states`` for a decoder with ``num_layers``
layers: index 0 is the input embeddings, index k (1 <= k < num_layers) is the output of decoder layer k
(counted from 1, before the final norm) and index ``num_layers`` is the final-norm output.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

__all__ = ["LayerSelection"]


@dataclass(frozen=True)
class LayerSelection:
    """An ordered set of hidden-state indices, validated against the decoder depth.

    The order is the stacking order along channels (DeepGen 1.0 stacks deepest first).
    """

    indices: tuple[int, ...]
    num_layers: int

    def __post_init__(self) -> None:
        bad_types = [i for i in self.indices if isinstance(i, bool) or int(i) != i]
        if bad_types:
            raise ValueError(f"indices must be whole numbers, got {bad_types}")
        indices = tuple(int(i) for i in self.indices)
        object.__setattr__(self, "indices", indices)
        if not isinstance(self.num_layers, int) or self.num_layers < 1:
            raise ValueError(f"num_layers must be a positive int, got {self.num_layers!r}")
        if not indices:
            raise ValueError("indices must name at least one hidden state")
        bad = [i for i in indices if not 0 <= i <= self.num_layers]
        if bad:
            raise ValueError(
                f"indices {bad} are out of range: a {self.num_layers}-layer decoder has hidden states "
                f"0..{self.num_layers} (0 = embeddings, {self.num_layers} = final-norm output)"
            )
        duplicates = sorted({i for i in indices if indices.count(i) > 1})
        if duplicates:
            raise ValueError(f"indices must be distinct, got duplicates {duplicates} in {indices}")

    # -- constructors -------------------------------------------------------------------------
    @classmethod
    def official(cls, num_layers: int) -> LayerSelection:
        """DeepGen 1.0's rule: ``range(num_layers - 1, 0, -6)`` (stride 6 from the second-to-last,
        deepest first). For 36 layers: (35, 29, 23, 17, 11, 5)."""
        if num_layers < 2:
            raise ValueError(f"num_layers must be >= 2 for the official selection, got {num_layers}")
        return cls(tuple(range(num_layers - 1, 0, -6)), num_layers)

    @classmethod
    def uniform(cls, num_layers: int, k: int) -> LayerSelection:
        """``k`` decoder-layer outputs spread evenly from layer ``num_layers - 1`` downwards, deepest first.

        Never selects the embeddings (0) or the final-norm output (``num_layers``), like the official rule.
        """
        if num_layers < 2:
            raise ValueError(f"num_layers must be >= 2, got {num_layers}")
        if not 1 <= k <= num_layers - 1:
            raise ValueError(f"k must be in 1..{num_layers - 1} for a {num_layers}-layer decoder, got {k}")
        top = num_layers - 1
        return cls(tuple(top - (i * top) // k for i in range(k)), num_layers)

    @classmethod
    def explicit(cls, indices: Iterable[int], num_layers: int) -> LayerSelection:
        """Exactly these hidden-state indices, in this order."""
        return cls(tuple(indices), num_layers)

    # -- use ------------------------------------------------------------------------------------
    def __len__(self) -> int:
        return len(self.indices)

    def __iter__(self):
        return iter(self.indices)

    @property
    def deepest(self) -> int:
        return max(self.indices)

    def check_model(self, num_layers: int) -> None:
        """Raise if this selection was made for a different decoder depth."""
        if num_layers != self.num_layers:
            raise ValueError(
                f"layers was built for a {self.num_layers}-layer decoder but the model has {num_layers} layers; "
                f"build it with LayerSelection.official({num_layers}) or LayerSelection.uniform({num_layers}, k)"
            )

    def to_dict(self) -> dict:
        return {"indices": list(self.indices), "num_layers": self.num_layers}

    @classmethod
    def from_dict(cls, data: dict) -> LayerSelection:
        return cls(tuple(data["indices"]), int(data["num_layers"]))
