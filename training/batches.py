"""The micro-batches a stage-1/2 run trains on: the sampler's task-homogeneous cycle over map-style sources (read
by index in the training process) and streaming sources (read by ``data.num_workers`` DataLoader workers each,
``training.streaming``), with one state for exact resume.

``BatchStream`` is an iterator of (collated micro-batch, ``MicroBatchPlan``). Its state is the sampler's (the
micro-batch counter) plus, for each streaming source, every rank's consumed stream position: ranks read different
samples, so before a checkpoint every rank calls ``gather_state(info)`` (a collective) and the main process's
``state_dict()`` holds them all; ``load_state_dict`` takes the rank's own. Without a streaming source the state is
exactly ``TaskBatchSampler.state_dict()``.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import replace

from deepgen_components.training.config import TrainConfig
from deepgen_components.training.data import build_sources, collate
from deepgen_components.training.distributed import DistInfo, gather_to_main
from deepgen_components.training.sampler import MicroBatchPlan, TaskBatchSampler
from deepgen_components.training.streaming import StreamItem
from torch.utils.data import DataLoader, IterableDataset

__all__ = ["BatchStream"]


class BatchStream:
    """Micro-batches of ``sources`` in the cycle of ``repeats`` (``TaskBatchSampler``); a source that is a torch
    ``IterableDataset`` with ``assign`` / ``resume_at`` (``StreamingWebDataset``) is streamed through a DataLoader
    with ``num_workers`` workers, started at its first micro-batch."""

    def __init__(self, sources: Mapping[str, object], repeats: Mapping[str, int], batch_size: int, *, seed: int = 0,
                 rank: int = 0, world_size: int = 1, num_workers: int = 0, shuffle: bool = True) -> None:
        if not isinstance(num_workers, int) or num_workers < 0:
            raise ValueError(f"data.num_workers must be an int >= 0, got {num_workers!r}")
        self.sources = dict(sources)
        self.streaming = [name for name, s in self.sources.items() if isinstance(s, IterableDataset)]
        lengths = {name: None if name in self.streaming else len(s) for name, s in self.sources.items()}
        self.sampler = TaskBatchSampler(lengths, repeats, batch_size, seed=seed, rank=rank, world_size=world_size,
                                        shuffle=shuffle)
        self.rank, self.world_size, self.num_workers, self.batch_size = rank, world_size, num_workers, batch_size
        for name in self.streaming:
            self.sources[name].assign(rank=rank, world_size=world_size, num_workers=num_workers, seed=seed)
        self._streams = {name: {"next_worker": 0, "positions": {}} for name in self.streaming}
        self._iterators: dict[str, object] = {}
        self._gathered: tuple[int, list] | None = None

    @classmethod
    def from_config(cls, cfg: TrainConfig, *, rank: int = 0, world_size: int = 1,
                    batch_size: int | None = None) -> BatchStream:
        """The run's stream from ``cfg.data`` (sources, batch size, num_workers) and ``trainer.seed``."""
        return cls(build_sources(cfg), {s.name: s.repeat for s in cfg.data.sources},
                   cfg.data.batch_size if batch_size is None else batch_size, seed=cfg.trainer.seed, rank=rank,
                   world_size=world_size, num_workers=cfg.data.num_workers)

    # -- reading -------------------------------------------------------------------------------------------
    def __iter__(self) -> BatchStream:
        return self

    def __next__(self) -> tuple[dict, MicroBatchPlan]:
        """The next micro-batch and its plan; a map-style micro-batch whose samples are all unreadable is passed
        over (its samples are counted by their source), a streaming one never is (its readers skip samples)."""
        for _ in range(1000):
            plan = self.sampler.plan(self.sampler.position)
            self.sampler.position += 1
            if plan.source in self._streams:
                items = next(self._loader(plan.source))
                self._consume(plan.source, items)
                return collate([item.sample for item in items]), replace(plan, keys=tuple(i.key for i in items))
            source = self.sources[plan.source]
            samples = [s for s in (source[i] for i in plan.indices) if s is not None]
            if samples:
                return collate(samples), plan
        raise RuntimeError("1000 micro-batches in a row had no readable sample; check the data sources")

    def _loader(self, name: str):
        if name not in self._iterators:
            source, stream = self.sources[name], self._streams[name]
            source.resume_at(stream["positions"], stream["next_worker"])
            loader = DataLoader(source, batch_size=self.batch_size, num_workers=self.num_workers, collate_fn=list)
            self._iterators[name] = iter(loader)
        return self._iterators[name]

    def _consume(self, name: str, items: list[StreamItem]) -> None:
        """Record what the trainer now holds: the reader's position after the batch, its skipped samples."""
        stream = self._streams[name]
        worker = items[0].worker
        if worker != stream["next_worker"] or any(item.worker != worker for item in items):
            raise RuntimeError(f"data.sources[{name}]: expected a batch of worker {stream['next_worker']}, got "
                               f"workers {sorted({item.worker for item in items})} (exact resume needs in-order "
                               "batches)")
        for item in items:
            for reason, detail in item.skips:
                self.sources[name].skipped.skip(reason, detail)
        stream["positions"][worker] = items[-1].next_position
        stream["next_worker"] = (worker + 1) % max(1, self.num_workers)

    def close(self) -> None:
        """Stop the DataLoader workers (a later batch starts them again where the stream stands)."""
        self._iterators.clear()

    # -- state ---------------------------------------------------------------------------------------------
    def local_state(self) -> dict:
        """This rank's stream positions (JSON-ready)."""
        return {name: {"next_worker": s["next_worker"],
                       "positions": {str(w): list(p) for w, p in sorted(s["positions"].items())}}
                for name, s in self._streams.items()}

    def gather_state(self, info: DistInfo) -> None:
        """Every rank's stream positions to the main process (a collective: every rank calls it, before the main
        process's ``state_dict()``)."""
        if self.streaming:
            self._gathered = (self.sampler.position, gather_to_main(self.local_state(), info))

    def state_dict(self) -> dict:
        state = self.sampler.state_dict()
        if not self.streaming:
            return state
        ranks = [self.local_state()]
        if self.world_size > 1:
            if self._gathered is None or self._gathered[0] != self.sampler.position or self._gathered[1] is None:
                raise RuntimeError("BatchStream.state_dict: with several ranks, call gather_state(info) on every "
                                   "rank first, after the last micro-batch (only the main process's is complete)")
            ranks = self._gathered[1]
        state["streams"] = {"world_size": self.world_size, "num_workers": self.num_workers,
                            "batch_size": self.batch_size, "ranks": ranks}
        return state

    def load_state_dict(self, state: Mapping) -> None:
        if self._iterators:
            raise RuntimeError("BatchStream.load_state_dict: load the state before the first micro-batch")
        self.sampler.load_state_dict(state)
        if not self.streaming:
            return
        streams = state.get("streams")
        if streams is None:
            read = [n for n in self.streaming if self.sampler.batches_before(self.sampler.position, n) > 0]
            if read:
                raise ValueError(f"the checkpoint's data state has no stream positions for the streaming source(s) "
                                 f"{read} (saved with options.streaming: false, or by an older version): resume with "
                                 f"streaming: false, or start a fresh run folder")
            return
        saved = {key: streams[key] for key in ("world_size", "num_workers", "batch_size")}
        now = {"world_size": self.world_size, "num_workers": self.num_workers, "batch_size": self.batch_size}
        if saved != now:
            raise ValueError(
                "cannot resume the streaming sources exactly: the checkpoint was saved with "
                + ", ".join(f"{k}={v}" for k, v in saved.items()) + "; this run has "
                + ", ".join(f"{k}={v}" for k, v in now.items())
                + " (a stream position belongs to its rank and DataLoader worker): resume with the same world size, "
                  "data.num_workers and data.batch_size, or start a fresh run folder")
        mine = streams["ranks"][self.rank]
        for name in self.streaming:
            saved_stream = mine.get(name, {"next_worker": 0, "positions": {}})
            self._streams[name] = {"next_worker": int(saved_stream["next_worker"]),
                                   "positions": {int(w): tuple(p) for w, p in saved_stream["positions"].items()}}
