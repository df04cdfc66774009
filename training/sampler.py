"""Task-homogeneous multi-source batch sampler: deterministic, distributed-aware, resumable at any position.

Every micro-batch comes from ONE source (so it holds one task). Sources follow a fixed cycle built from
their repeat counts, in the order given: official stage 1 is ``{"edit": 1, "t2i": 3}`` -> edit, t2i, t2i,
t2i, edit, ...; stage 2 is 1 : 2.

Global-batch semantics: micro-batch k of the run is one contiguous chunk of ``batch_size * world_size``
positions of its source's stream, and rank r takes the r-th slice. So the samples a step sees do not depend
on the number of processes, and a single process with ``world_size * batch_size`` reproduces a DDP run.
A source's stream is an endless sequence of epochs, each a fresh permutation seeded by (seed, source, epoch).
The whole state is the micro-batch counter: ``state_dict()`` / ``load_state_dict()`` resume exactly.

A streaming source (length ``None``, ``training.streaming``) is only scheduled here: its plans name it and carry the
stream offset of the rank's first sample (for the per-sample seeds) but no indices; its own readers pick the
samples and ``training.batches.BatchStream`` records their keys in the plan and their position for resume.
"""

from __future__ import annotations

import zlib
from collections.abc import Iterator, Mapping
from dataclasses import dataclass

import torch

__all__ = ["MicroBatchPlan", "TaskBatchSampler"]


@dataclass(frozen=True)
class MicroBatchPlan:
    """Which samples micro-batch ``position`` takes on this rank."""

    position: int
    source: str
    indices: tuple[int, ...]
    global_offset: int  # position of this rank's first sample in the source stream (for per-sample seeding)
    keys: tuple[str, ...] = ()  # a streaming source's sample keys (filled in by BatchStream)


class TaskBatchSampler:
    def __init__(
        self,
        lengths: Mapping[str, int | None],
        repeats: Mapping[str, int],
        batch_size: int,
        *,
        seed: int = 0,
        rank: int = 0,
        world_size: int = 1,
        shuffle: bool = True,
    ) -> None:
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        if not 0 <= rank < world_size:
            raise ValueError(f"rank must be in 0..{world_size - 1}, got {rank}")
        if set(lengths) != set(repeats):
            raise ValueError(f"repeats {sorted(repeats)} must name exactly the sources {sorted(lengths)}")
        for name, n in lengths.items():
            if n is not None and n < 1:
                raise ValueError(f"source {name!r} is empty")
        for name, r in repeats.items():
            if not isinstance(r, int) or r < 0:
                raise ValueError(f"repeat of source {name!r} must be an int >= 0, got {r!r}")
        self.lengths = dict(lengths)
        self.repeats = dict(repeats)
        self.pattern = [name for name in lengths for _ in range(repeats[name])]
        if not self.pattern:
            raise ValueError("repeats: at least one source needs a repeat >= 1")
        self.batch_size = batch_size
        self.seed = seed
        self.rank = rank
        self.world_size = world_size
        self.shuffle = shuffle
        self.position = 0
        self._permutations: dict[tuple[str, int], torch.Tensor] = {}

    # -- state -------------------------------------------------------------------------------------------
    def state_dict(self) -> dict:
        return {"position": self.position, "seed": self.seed, "pattern": list(self.pattern)}

    def load_state_dict(self, state: Mapping) -> None:
        if state.get("pattern", self.pattern) != self.pattern or state.get("seed", self.seed) != self.seed:
            raise ValueError("sampler state was saved for another source cycle or seed; cannot resume exactly")
        self.position = int(state["position"])

    # -- planning ------------------------------------------------------------------------------------------
    def source_at(self, position: int) -> str:
        return self.pattern[position % len(self.pattern)]

    def batches_before(self, position: int, source: str) -> int:
        """How many micro-batches of ``source`` the cycle holds before ``position``."""
        cycles, rest = divmod(position, len(self.pattern))
        return cycles * self.repeats[source] + self.pattern[:rest].count(source)

    def _permutation(self, source: str, epoch: int) -> torch.Tensor:
        key = (source, epoch)
        if key not in self._permutations:
            length = self.lengths[source]
            if self.shuffle:
                gen = torch.Generator().manual_seed(
                    (self.seed * 1_000_003 + zlib.crc32(source.encode()) * 97 + epoch) % (2**63)
                )
                perm = torch.randperm(length, generator=gen)
            else:
                perm = torch.arange(length)
            if len(self._permutations) > 8:  # keep memory bounded: only recent epochs are needed
                self._permutations.pop(next(iter(self._permutations)))
            self._permutations[key] = perm
        return self._permutations[key]

    def stream_index(self, source: str, stream_position: int) -> int:
        length = self.lengths[source]
        if length is None:
            raise ValueError(f"source {source!r} is streamed: its readers pick its samples, not the sampler")
        epoch, offset = divmod(stream_position, length)
        return int(self._permutation(source, epoch)[offset])

    def plan(self, position: int) -> MicroBatchPlan:
        source = self.source_at(position)
        global_batch = self.batch_size * self.world_size
        start = self.batches_before(position, source) * global_batch + self.rank * self.batch_size
        indices = ()
        if self.lengths[source] is not None:
            indices = tuple(self.stream_index(source, start + j) for j in range(self.batch_size))
        return MicroBatchPlan(position, source, indices, start)

    def __iter__(self) -> Iterator[MicroBatchPlan]:
        while True:
            plan = self.plan(self.position)
            self.position += 1
            yield plan
