"""Training data: text-to-image and editing samples from manifests, WebDataset shards or a registered source.

A source is indexable (``len(source)``, ``source[i]`` -> a :class:`Sample`, or None for a sample that cannot be
read) and has a ``task`` ("t2i", "edit" or "mixed"). Its images are already resized by the official
``fix_pixels`` rule (sqrt(H*W) = target size, each side rounded up to a multiple of 32, aspect kept) and mapped to
[-1, 1]. The config names a source by its ``kind``: ``manifest`` and ``webdataset`` are built in, other kinds are
registered with :func:`register_source` (the shapes world registers ``shapes`` when ``deepgen_components.shapes``
is imported).

Manifest (JSONL, one object per line, or Parquet with the same columns), paths relative to the manifest:

    {"task": "t2i",  "image": "img/0001.png", "caption": "a red cat"}
    {"task": "edit", "source": "img/0002.png" | ["a.png", "b.png"], "instruction": "make it blue",
     "target": "img/0003.png"}

WebDataset shards (``.tar``): files grouped by key (the name before the first dot). Text-to-image: ``KEY.png``
(or .jpg/.jpeg/.webp) + ``KEY.txt`` (caption). Editing: ``KEY.src.png`` (or ``KEY.src0.png``, ``KEY.src1.png``,
... for several references) + ``KEY.tgt.png`` + ``KEY.txt`` (instruction).

A ``webdataset`` source from the config streams its shards (:class:`~deepgen_components.training.streaming.
StreamingWebDataset`: sequential reading, shards split across ranks and DataLoader workers, exact resume); with
``options: {streaming: false}`` it is the map-style :class:`WebDatasetSource` below, which indexes every member of
every shard and reopens a shard per sample: fine for a few thousand samples, not for pre-training.

A corrupt or missing image never crashes an epoch: the sample is skipped, counted, and a warning is logged. So is an
image the official filter drops (``training.samples.ImageFilter``: shorter side <= 80 px, aspect outside [0.1, 10]);
the built-in kinds apply it from the config (``options``: ``min_side``, ``min_aspect``, ``max_aspect``), the
classes when given ``filters=``.
"""

from __future__ import annotations

import tarfile
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
from deepgen_components.training.config import SourceConfig, TrainConfig
from deepgen_components.training.registry import Registry, check_options
from deepgen_components.training.samples import (
    FILTER_OPTIONS,
    FilteredImage,
    ImageFilter,
    Sample,
    SkipCounter,
    decode_group,
    find_shards,
    group_task,
    load_image,
    split_key,
)
from deepgen_components.training.streaming import StreamingWebDataset

from deepgen_components.jsonl import read_objects

__all__ = [
    "ImageFilter",
    "ManifestError",
    "ManifestSource",
    "Sample",
    "SkipCounter",
    "SourceFactory",
    "StreamingWebDataset",
    "WebDatasetSource",
    "available_sources",
    "build_source",
    "build_sources",
    "collate",
    "load_image",
    "next_batch",
    "register_source",
]


class ManifestError(ValueError):
    """A manifest line that cannot be used; the message names the file and the line."""


def _read_manifest(path: Path) -> list[dict]:
    if not path.is_file():
        raise FileNotFoundError(f"manifest not found: {path}")
    if path.suffix == ".parquet":
        try:
            import pyarrow.parquet as pq
        except ImportError as err:  # pragma: no cover - pyarrow is in the test extra
            raise ImportError(f"{path}: reading Parquet manifests needs pyarrow") from err
        return pq.read_table(path).to_pylist()
    rows = []
    for number, _, row in read_objects(path, error=ManifestError):
        row["_line"] = number
        rows.append(row)
    return rows


class ManifestSource:
    """Samples listed in a JSONL or Parquet manifest (see the module docstring for the format)."""

    def __init__(self, path: str | Path, image_size: int = 512, task: str | None = None, root: str | Path | None = None,
                 filters: ImageFilter | None = None):
        self.path = Path(path)
        self.root = Path(root) if root is not None else self.path.parent
        self.image_size = image_size
        self.filters = filters
        self.skipped = SkipCounter()
        rows = _read_manifest(self.path)
        self.rows = []
        for i, row in enumerate(rows):
            where = f"{self.path}:{row.get('_line', i + 1)}"
            kind = row.get("task", task)
            if kind not in ("t2i", "edit"):
                raise ManifestError(f"{where}: 'task' must be 't2i' or 'edit', got {kind!r}")
            if task is not None and kind != task:
                raise ManifestError(f"{where}: task {kind!r} in a source declared as {task!r}")
            required = ("image", "caption") if kind == "t2i" else ("source", "instruction", "target")
            missing = [k for k in required if not row.get(k)]
            if missing:
                raise ManifestError(f"{where}: missing {', '.join(repr(k) for k in missing)} for a {kind} sample")
            row["task"] = kind
            self.rows.append(row)
        if not self.rows:
            raise ManifestError(f"{self.path}: the manifest has no samples")
        self.task = self.rows[0]["task"] if len({r["task"] for r in self.rows}) == 1 else "mixed"

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, index: int) -> Sample | None:
        row = self.rows[index]
        where = f"{self.path}:{row.get('_line', index + 1)}"
        load = lambda name: load_image(self.root / name, self.image_size, self.filters)  # noqa: E731
        try:
            if row["task"] == "t2i":
                return Sample("t2i", str(row["caption"]), load(row["image"]))
            sources = row["source"] if isinstance(row["source"], list) else [row["source"]]
            refs = [load(s) for s in sources]
            return Sample("edit", str(row["instruction"]), load(row["target"]), refs)
        except FilteredImage as err:
            self.skipped.skip(err.reason, f"{where}: {err}")
        except (OSError, ValueError, SyntaxError) as err:
            self.skipped.skip(type(err).__name__, f"{where}: {err}")
        return None


class WebDatasetSource:
    """Map-style samples from WebDataset-style ``.tar`` shards (see the module docstring): every member is indexed
    when the source is built and a shard is reopened per sample, so keep it for small data; the config's
    ``webdataset`` kind streams (``training.streaming``) unless ``options.streaming`` is false."""

    def __init__(self, shards: str | Path | Sequence[str | Path], image_size: int = 512, task: str | None = None,
                 filters: ImageFilter | None = None):
        self.shards = find_shards(shards)
        self.image_size = image_size
        self.filters = filters
        self.skipped = SkipCounter()
        self.index: list[tuple[Path, str, dict[str, tarfile.TarInfo]]] = []
        for shard in self.shards:
            groups: dict[str, dict[str, tarfile.TarInfo]] = {}
            with tarfile.open(shard) as tar:
                for member in tar.getmembers():
                    if member.isfile():
                        key, suffix = split_key(member.name)
                        groups.setdefault(key, {})[suffix] = member
            for key, members in sorted(groups.items()):
                if task is None or group_task(members) == task:
                    self.index.append((shard, key, members))
        if not self.index:
            raise ValueError(f"no {task or ''} samples found in shards {[str(s) for s in self.shards]}")
        self.task = task or ("edit" if all(group_task(m) == "edit" for _, _, m in self.index) else "t2i")

    def __len__(self) -> int:
        return len(self.index)

    def __getitem__(self, index: int) -> Sample | None:
        shard, key, members = self.index[index]
        try:
            with tarfile.open(shard) as tar:
                return decode_group(key, members, lambda suffix: tar.extractfile(members[suffix]).read(),
                                    self.image_size, self.filters)
        except FilteredImage as err:
            self.skipped.skip(err.reason, f"{shard}:{key}: {err}")
        except (OSError, ValueError, SyntaxError, KeyError) as err:
            self.skipped.skip(type(err).__name__, f"{shard}:{key}: {err}")
        return None


def next_batch(plans, sources: dict) -> tuple[dict, object]:
    """The next micro-batch (collated) and its plan from the sampler's ``plans``, skipping a micro-batch whose
    samples are all unreadable (corrupt images are counted by their source, never fatal)."""
    for _ in range(1000):
        plan = next(plans)
        source = sources[plan.source]
        samples = [s for s in (source[i] for i in plan.indices) if s is not None]
        if samples:
            return collate(samples), plan
    raise RuntimeError("1000 micro-batches in a row had no readable sample; check the data sources")


def collate(samples: Sequence[Sample]) -> dict:
    """Micro-batch dict for ``DeepGenModel.flow_matching_loss`` (one task per micro-batch)."""
    if not samples:
        raise ValueError("collate: empty micro-batch (every sample was skipped)")
    tasks = {s.task for s in samples}
    if len(tasks) != 1:
        raise ValueError(f"collate: a micro-batch must hold one task, got {sorted(tasks)}")
    sizes = {tuple(s.target.shape) for s in samples}
    pixels = torch.stack([s.target for s in samples]) if len(sizes) == 1 else [s.target for s in samples]
    batch = {"task": tasks.pop(), "prompts": [s.text for s in samples], "pixels": pixels}
    if batch["task"] == "edit":
        batch["reference_pixels"] = [s.references for s in samples]
    if len(sizes) == 1 and all(s.loss_weight is not None for s in samples):
        batch["loss_weight"] = torch.stack([s.loss_weight for s in samples])
    return batch


# -- the source registry ----------------------------------------------------------------------------------------
SourceFactory = Callable[[SourceConfig, int], Any]  # (the config entry, data.image_size) -> a source
_SOURCES: Registry[SourceFactory] = Registry("source kind")


def register_source(kind: str, factory: SourceFactory, *, overwrite: bool = False) -> SourceFactory:
    """Make ``kind: KIND`` usable in ``data.sources``: ``factory(entry, image_size)`` builds the source from its
    config entry (:class:`SourceConfig`; its own settings in ``entry.options``)."""
    return _SOURCES.register(kind, factory, overwrite=overwrite)


def available_sources() -> list[str]:
    """The registered source kinds, sorted."""
    return _SOURCES.kinds()


def build_source(spec: SourceConfig, image_size: int):
    """The source of one ``data.sources`` entry."""
    return _SOURCES.lookup(spec.kind, f"data.sources[{spec.name}].kind")(spec, image_size)


def build_sources(cfg: TrainConfig) -> dict:
    """name -> indexable source, from the data config."""
    sources = {}
    for src in cfg.data.sources:
        if src.name in sources:
            raise ValueError(f"data.sources: duplicate source name {src.name!r}")
        sources[src.name] = build_source(src, cfg.data.image_size)
    if not sources:
        raise ValueError("data.sources: at least one source is needed")
    return sources


def _manifest(spec: SourceConfig, image_size: int) -> ManifestSource:
    argument = f"data.sources[{spec.name}]"
    check_options(f"{argument}.options", spec.options, FILTER_OPTIONS)
    if not spec.path:
        raise ValueError(f"{argument}: a manifest source needs 'path'")
    filters = ImageFilter.from_options(spec.options, image_size, f"{argument}.options")
    return ManifestSource(spec.path, image_size, task=spec.task, filters=filters)


_STREAM_OPTIONS = ("streaming", "shuffle", "shuffle_buffer")


def _webdataset(spec: SourceConfig, image_size: int) -> StreamingWebDataset | WebDatasetSource:
    """``kind: webdataset``: streamed (``options``: ``shuffle`` = shard order per epoch, default true;
    ``shuffle_buffer`` = samples shuffled in blocks of that many, default 0 = off) unless ``streaming: false``."""
    argument = f"data.sources[{spec.name}]"
    options = dict(spec.options)
    check_options(f"{argument}.options", options, FILTER_OPTIONS + _STREAM_OPTIONS)
    if not spec.path:
        raise ValueError(f"{argument}: a webdataset source needs 'path'")
    filters = ImageFilter.from_options(options, image_size, f"{argument}.options")
    streaming = options.get("streaming", True)
    if not isinstance(streaming, bool):
        raise ValueError(f"{argument}.options.streaming: expected true or false, got {streaming!r}")
    if not streaming:
        return WebDatasetSource(spec.path, image_size, task=spec.task, filters=filters)
    return StreamingWebDataset(spec.path, image_size, task=spec.task, filters=filters, name=spec.name,
                               shuffle=options.get("shuffle", True), shuffle_buffer=options.get("shuffle_buffer", 0))


register_source("manifest", _manifest)
register_source("webdataset", _webdataset)
