"""Streaming WebDataset reading for data at pre-training scale (tens of millions of samples): nothing is indexed,
every shard is read once per epoch, front to back, by exactly one reader of the run.

Readers. Rank r's DataLoader worker w is reader g = r * W + w of G = world_size * W (W = max(1, data.num_workers)).
In epoch e the readers split that epoch's shard order (a permutation seeded by (run seed, source name, e) with
``shuffle``, else the sorted order): reader g reads the shards at positions g, g + G, g + 2G, ... So in every epoch the
readers read disjoint shards whose union is the dataset; a source needs at least G shards. A shard is read with
``tarfile`` in stream mode (``r|*``): consecutive members with the same key (``training.samples.split_key``) are one
sample. ``shuffle_buffer: k`` (default 0, off: shards are usually written shuffled) emits each block of k consecutive
samples of a shard in a permutation seeded by (seed, source, epoch, shard, block): deterministic, and bounded to k
samples' bytes.

Micro-batches. torch's DataLoader batches each worker's samples (``data.batch_size`` from one worker) and hands the
batches out round robin (worker 0, 1, ..., W-1, 0, ...); every sample carries its worker, its key and the stream
position after it, and the samples skipped just before it (unreadable, or dropped by the official filter), which the
main process counts in the source's ``skipped`` when it consumes the batch.

Resume. A stream's state is, per worker, (epoch, shard slot, samples read in that shard) after the last sample the
trainer CONSUMED (not what the workers prefetched), and which worker's batch comes next (``training.batches``).
Restoring jumps to that shard slot, passes over the shard's first samples without reading their data, and rotates
the workers so that the next batch comes from the right one: the run continues at the exact sample, provided
world_size, data.num_workers, data.batch_size and the shards are the same (``BatchStream.load_state_dict`` refuses
other sizes with an error naming them).

What differs from a map-style source: no len() and no index; shuffling is the shard order per epoch plus the optional
block shuffle, not a global permutation; a skipped sample is replaced by the reader's next one, so micro-batches stay
full; and which samples form micro-batch k depends on world_size and num_workers. The per-sample seeds still come
from the sampler's stream positions (``training.sampler``, ``trainer.sample_seed``).
"""

from __future__ import annotations

import tarfile
import zlib
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from itertools import islice
from pathlib import Path

import torch
from deepgen_components.training.samples import (
    FilteredImage,
    ImageFilter,
    Sample,
    SkipCounter,
    decode_group,
    find_shards,
    group_task,
    split_key,
)
from torch.utils.data import IterableDataset, get_worker_info

__all__ = ["StreamItem", "StreamingWebDataset", "read_groups"]

Position = tuple[int, int, int]  # (epoch, shard slot of the reader in that epoch, samples read in that shard)


@dataclass
class StreamItem:
    """One sample as a reader yields it: the ``next_position`` of its reader after it, and the (reason, detail) of
    the samples the reader skipped just before it."""

    sample: Sample
    key: str
    worker: int
    next_position: Position
    skips: list[tuple[str, str]]


def read_groups(shard: str | Path, skip: int = 0) -> Iterator[tuple[str, dict[str, bytes]]]:
    """The samples (key, suffix -> bytes) of one shard in order, read sequentially; the first ``skip`` samples are
    passed over without reading their data."""
    index, key, files = -1, None, {}
    with tarfile.open(shard, "r|*") as tar:
        for member in tar:
            if not member.isfile():
                continue
            name, suffix = split_key(member.name)
            if name != key:
                if key is not None and index >= skip:
                    yield key, files
                index, key, files = index + 1, name, {}
            if index >= skip:
                files[suffix] = tar.extractfile(member).read()
    if key is not None and index >= skip:
        yield key, files


def _seed(seed: int, *parts: object) -> int:
    return (seed * 1_000_003 + zlib.crc32("/".join(map(str, parts)).encode())) % (2**63)


class StreamingWebDataset(IterableDataset):
    """A ``webdataset`` source read as a stream (see the module docstring); ``task`` ``t2i`` or ``edit`` (groups
    of the other task are passed over). ``assign`` places it in the run (rank, world size, workers, seed) and
    checks that every reader gets a shard; the trainer's ``BatchStream`` does."""

    def __init__(self, shards: str | Path | Sequence[str | Path], image_size: int = 512, task: str = "t2i",
                 filters: ImageFilter | None = None, *, name: str = "webdataset", shuffle: bool = True,
                 shuffle_buffer: int = 0):
        if task not in ("t2i", "edit"):
            raise ValueError(f"data.sources[{name}].task: a streaming webdataset source needs t2i or edit, got {task!r}")
        if not isinstance(shuffle, bool):
            raise ValueError(f"data.sources[{name}].options.shuffle: expected true or false, got {shuffle!r}")
        if not isinstance(shuffle_buffer, int) or isinstance(shuffle_buffer, bool) or shuffle_buffer < 0:
            raise ValueError(f"data.sources[{name}].options.shuffle_buffer: expected an int >= 0, got {shuffle_buffer!r}")
        self.shards = find_shards(shards)
        self.image_size = image_size
        self.task = task
        self.filters = filters
        self.name = name
        self.shuffle = shuffle
        self.shuffle_buffer = shuffle_buffer
        self.skipped = SkipCounter()  # counted by the main process, from the consumed items' skips
        self.start: dict[int, Position] = {}  # worker -> where it starts reading (a resumed position)
        self.next_worker = 0  # the worker whose batch comes first (DataLoader worker 0 plays it)
        self.assign()

    def assign(self, rank: int = 0, world_size: int = 1, num_workers: int = 0, seed: int = 0) -> None:
        """Place the source in the run: reader g = rank * W + worker of world_size * W (W = max(1, num_workers))."""
        workers = max(1, num_workers)
        readers = world_size * workers
        if len(self.shards) < readers:
            raise ValueError(
                f"data.sources[{self.name}]: {len(self.shards)} shard(s) for {readers} readers (world_size "
                f"{world_size} x data.num_workers {workers}); every reader needs at least one shard: write more "
                f"shards or lower data.num_workers")
        self.rank, self.world_size, self.workers, self.readers, self.seed = rank, world_size, workers, readers, seed

    def shard_order(self, epoch: int) -> list[int]:
        """Indices into ``shards`` in the order of ``epoch``."""
        if not self.shuffle:
            return list(range(len(self.shards)))
        generator = torch.Generator().manual_seed(_seed(self.seed, self.name, epoch))
        return torch.randperm(len(self.shards), generator=generator).tolist()

    def reader_shards(self, worker: int, epoch: int) -> list[int]:
        """The shards (indices) that ``worker`` of this rank reads in ``epoch``, in order."""
        return self.shard_order(epoch)[self.rank * self.workers + worker::self.readers]

    def _shard_samples(self, shard: int, epoch: int, start: int) -> Iterator[tuple[int, str, dict[str, bytes]]]:
        """(samples read in the shard after this one, key, files) from sample ``start`` on, block-shuffled."""
        block_size = max(1, self.shuffle_buffer)
        block_start = start // block_size * block_size
        groups = read_groups(self.shards[shard], skip=block_start)
        emitted = block_start
        while block := list(islice(groups, block_size)):
            order = range(len(block))
            if block_size > 1:
                generator = torch.Generator().manual_seed(_seed(self.seed, self.name, epoch, shard, emitted))
                order = torch.randperm(len(block), generator=generator).tolist()
            for j in order:
                emitted += 1
                if emitted > start:
                    yield emitted, *block[j]

    def read(self, worker: int, start: Position = (0, 0, 0)) -> Iterator[StreamItem]:
        """The endless stream of ``worker`` of this rank from ``start`` (epochs follow each other)."""
        epoch, first_slot, first_sample = start
        skips: list[tuple[str, str]] = []
        while True:
            shards = self.reader_shards(worker, epoch)
            whole_epoch, yielded = first_slot == 0 and first_sample == 0, 0
            for slot in range(first_slot, len(shards)):
                shard = self.shards[shards[slot]]
                try:
                    for count, key, files in self._shard_samples(shards[slot], epoch, first_sample):
                        if group_task(files) != self.task:
                            continue  # a shard may mix tasks: each source keeps its own
                        try:
                            sample = decode_group(key, files, files.__getitem__, self.image_size, self.filters)
                        except FilteredImage as err:
                            skips.append((err.reason, f"{shard}:{key}: {err}"))
                            continue
                        except (OSError, ValueError, SyntaxError) as err:
                            skips.append((type(err).__name__, f"{shard}:{key}: {err}"))
                            continue
                        yield StreamItem(sample, key, worker, (epoch, slot, count), skips)
                        skips, yielded = [], yielded + 1
                except (tarfile.TarError, OSError) as err:  # a truncated or unreadable shard: the rest is skipped
                    skips.append((type(err).__name__, f"{shard}: {err}"))
                first_sample = 0
            if whole_epoch and not yielded:
                raise RuntimeError(
                    f"data.sources[{self.name}]: reader {self.rank * self.workers + worker} read a whole epoch "
                    f"({len(shards)} shard(s)) without one usable {self.task} sample; last skips: {skips[-3:]}")
            epoch, first_slot = epoch + 1, 0

    def __iter__(self) -> Iterator[StreamItem]:
        info = get_worker_info()
        loader_workers = info.num_workers if info is not None else 1
        if loader_workers != self.workers:
            raise RuntimeError(f"data.sources[{self.name}]: assigned {self.workers} worker(s), the DataLoader runs "
                               f"{loader_workers}")
        worker = ((info.id if info is not None else 0) + self.next_worker) % self.workers
        return self.read(worker, tuple(self.start.get(worker, (0, 0, 0))))

    def resume_at(self, positions: Mapping[int, Position], next_worker: int) -> None:
        """Start each worker at its saved position, the first batch from ``next_worker`` (before the loader starts)."""
        self.start = {int(w): tuple(int(v) for v in p) for w, p in positions.items()}
        self.next_worker = next_worker
