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

A corrupt or missing image never crashes an epoch: the sample is skipped, counted, and a warning is logged.
"""

from __future__ import annotations

import io
import logging
import tarfile
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from deepgen_components.training.config import SourceConfig, TrainConfig
from deepgen_components.training.registry import Registry, check_options

from deepgen_components.jsonl import read_objects
from deepgen_components.processing import fix_pixels_size, pil_to_pixels

__all__ = [
    "ManifestError",
    "ManifestSource",
    "Sample",
    "SkipCounter",
    "SourceFactory",
    "WebDatasetSource",
    "available_sources",
    "build_source",
    "build_sources",
    "collate",
    "load_image",
    "next_batch",
    "register_source",
]

logger = logging.getLogger(__name__)

_IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp")


class ManifestError(ValueError):
    """A manifest line that cannot be used; the message names the file and the line."""


@dataclass
class Sample:
    """One training sample: ``target`` (3, H, W) in [-1, 1], the text, for editing the references, and
    optionally a per-pixel loss weight (1, H, W) (the trainer averages it onto the latent grid)."""

    task: str  # "t2i" or "edit"
    text: str
    target: torch.Tensor
    references: list[torch.Tensor] = field(default_factory=list)
    loss_weight: torch.Tensor | None = None


class SkipCounter:
    """Counts skipped samples per reason and warns (once per reason, then every 100th)."""

    def __init__(self) -> None:
        self.counts: Counter[str] = Counter()

    def skip(self, reason: str, detail: str) -> None:
        self.counts[reason] += 1
        n = self.counts[reason]
        if n == 1 or n % 100 == 0:
            logger.warning("skipped sample (%s, %d so far): %s", reason, n, detail)

    @property
    def total(self) -> int:
        return sum(self.counts.values())


def load_image(source, image_size: int) -> torch.Tensor:
    """Open an image (path or bytes), convert to RGB, resize by ``fix_pixels`` -> (3, H, W) in [-1, 1]."""
    from PIL import Image

    handle = io.BytesIO(source) if isinstance(source, (bytes, bytearray)) else source
    with Image.open(handle) as image:
        image.load()
        size = fix_pixels_size(image.height, image.width, image_size)
        return pil_to_pixels(image, size)


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

    def __init__(self, path: str | Path, image_size: int = 512, task: str | None = None, root: str | Path | None = None):
        self.path = Path(path)
        self.root = Path(root) if root is not None else self.path.parent
        self.image_size = image_size
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
        try:
            if row["task"] == "t2i":
                return Sample("t2i", str(row["caption"]), load_image(self.root / row["image"], self.image_size))
            sources = row["source"] if isinstance(row["source"], list) else [row["source"]]
            refs = [load_image(self.root / s, self.image_size) for s in sources]
            return Sample("edit", str(row["instruction"]), load_image(self.root / row["target"], self.image_size), refs)
        except (OSError, ValueError, SyntaxError) as err:
            self.skipped.skip(type(err).__name__, f"{self.path}:{row.get('_line', index + 1)}: {err}")
            return None


class WebDatasetSource:
    """Samples from WebDataset-style ``.tar`` shards (read with the standard library; see module docstring)."""

    def __init__(self, shards: str | Path | Sequence[str | Path], image_size: int = 512, task: str | None = None):
        if isinstance(shards, (str, Path)):
            shard_path = Path(shards)
            shards = sorted(shard_path.glob("*.tar")) if shard_path.is_dir() else [shard_path]
        self.shards = [Path(s) for s in shards]
        if not self.shards:
            raise FileNotFoundError(f"no .tar shards found in {shards}")
        self.image_size = image_size
        self.skipped = SkipCounter()
        self.index: list[tuple[Path, str, dict[str, tarfile.TarInfo]]] = []
        for shard in self.shards:
            if not shard.is_file():
                raise FileNotFoundError(f"shard not found: {shard}")
            groups: dict[str, dict[str, tarfile.TarInfo]] = {}
            with tarfile.open(shard) as tar:
                for member in tar.getmembers():
                    if not member.isfile():
                        continue
                    # WebDataset key: the path up to the first dot of the file name (folders included).
                    folder, _, name = member.name.rpartition("/")
                    stem, _, rest = name.partition(".")
                    key = f"{folder}/{stem}" if folder else stem
                    groups.setdefault(key, {})[rest.lower()] = member
            for key, members in sorted(groups.items()):
                kind = "edit" if any(r.startswith(("src", "tgt")) for r in members) else "t2i"
                if task is not None and kind != task:
                    continue
                self.index.append((shard, key, members))
        if not self.index:
            raise ValueError(f"no {task or ''} samples found in shards {[str(s) for s in self.shards]}")
        self.task = task or ("edit" if all(self._kind(m) == "edit" for _, _, m in self.index) else "t2i")

    @staticmethod
    def _kind(members: dict) -> str:
        return "edit" if any(r.startswith(("src", "tgt")) for r in members) else "t2i"

    def __len__(self) -> int:
        return len(self.index)

    def __getitem__(self, index: int) -> Sample | None:
        shard, key, members = self.index[index]
        try:
            with tarfile.open(shard) as tar:
                read = lambda m: tar.extractfile(m).read()
                text_member = members.get("txt")
                if text_member is None:
                    raise ValueError(f"{key}: no .txt")
                text = read(text_member).decode("utf-8").strip()
                if self._kind(members) == "t2i":
                    image = next((members[s[1:]] for s in _IMAGE_SUFFIXES if s[1:] in members), None)
                    if image is None:
                        raise ValueError(f"{key}: no image file")
                    return Sample("t2i", text, load_image(read(image), self.image_size))
                sources = sorted(r for r in members if r.startswith("src") and r.endswith(_IMAGE_SUFFIXES))
                target = next((r for r in members if r.startswith("tgt") and r.endswith(_IMAGE_SUFFIXES)), None)
                if not sources or target is None:
                    raise ValueError(f"{key}: an edit sample needs src*.<image> and tgt.<image>")
                refs = [load_image(read(members[s]), self.image_size) for s in sources]
                return Sample("edit", text, load_image(read(members[target]), self.image_size), refs)
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


def _file_source(source_class, label: str) -> SourceFactory:
    """The factory of a built-in source read from ``path`` (no options)."""

    def factory(spec: SourceConfig, image_size: int):
        check_options(f"data.sources[{spec.name}].options", spec.options, ())
        if not spec.path:
            raise ValueError(f"data.sources[{spec.name}]: a {label} source needs 'path'")
        return source_class(spec.path, image_size, task=spec.task)

    return factory


register_source("manifest", _file_source(ManifestSource, "manifest"))
register_source("webdataset", _file_source(WebDatasetSource, "webdataset"))
