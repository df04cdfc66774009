"""Training data: text-to-image and editing samples from manifests, WebDataset shards or the shapes world.

Every source yields :class:`Sample` objects whose images are already resized by the official ``fix_pixels``
rule (sqrt(H*W) = target size, each side rounded up to a multiple of 32, aspect kept) and mapped to [-1, 1].

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
import json
import logging
import tarfile
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch

from deepgen_components.processing import fix_pixels_size, pil_to_pixels

__all__ = [
    "ManifestError",
    "ManifestSource",
    "Sample",
    "ShapesSource",
    "SkipCounter",
    "WebDatasetSource",
    "collate",
    "foreground_mask",
    "load_image",
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
    with path.open(encoding="utf-8") as handle:
        for number, line in enumerate(handle, start=1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as err:
                raise ManifestError(f"{path}:{number}: not valid JSON ({err.msg})") from err
            if not isinstance(row, dict):
                raise ManifestError(f"{path}:{number}: expected a JSON object, got {type(row).__name__}")
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


class ShapesSource:
    """The synthetic shapes world (``deepgen_components.shapes``) as an indexable source of a given task.

    ``foreground_weight`` w > 0 gives every sample a loss weight of 1 + w on the target's shape pixels, dilated
    by 4 px (one latent cell of a 4x-down VAE), 1 elsewhere: a shape covers ~5-10 % of an image, so under the
    plain mean the background dominates the flow-matching loss and colour / shape are learned last."""

    def __init__(self, task: str = "t2i", image_size: int = 64, seed: int = 0, length: int = 100_000,
                 foreground_weight: float = 0.0, edit_kinds=None):
        from deepgen_components.shapes import EDIT_KINDS, ShapesWorld

        if task not in ("t2i", "edit"):
            raise ValueError(f"task must be 't2i' or 'edit', got {task!r}")
        if foreground_weight < 0:
            raise ValueError(f"foreground_weight must be >= 0, got {foreground_weight}")
        self.task = task
        self.foreground_weight = float(foreground_weight)
        kinds = tuple(edit_kinds) if edit_kinds else EDIT_KINDS
        if not set(kinds) <= set(EDIT_KINDS):
            raise ValueError(f"edit_kinds must be a subset of {EDIT_KINDS}, got {list(kinds)}")
        self.world = ShapesWorld(image_size=image_size, seed=seed, edit_kinds=kinds)
        self.length = length
        self.skipped = SkipCounter()

    def __len__(self) -> int:
        return self.length

    def __getitem__(self, index: int) -> Sample:
        if self.task == "t2i":
            image, caption = self.world.t2i_sample(index)
            return self._weighted(Sample("t2i", caption, pil_to_pixels(image)))
        source, instruction, target = self.world.edit_sample(index)
        return self._weighted(Sample("edit", instruction, pil_to_pixels(target), [pil_to_pixels(source)]))

    def _weighted(self, sample: Sample) -> Sample:
        if self.foreground_weight > 0:
            sample.loss_weight = 1.0 + self.foreground_weight * foreground_mask(sample.target, dilate=4)
        return sample


def foreground_mask(pixels: torch.Tensor, dilate: int = 0) -> torch.Tensor:
    """1.0 where a shapes image differs from its top-left (background) colour, dilated by ``dilate`` pixels:
    (3, H, W) -> (1, H, W), or a batch (B, 3, H, W) -> (B, 1, H, W)."""
    import torch.nn.functional as F

    corner = pixels[..., :, :1, :1]
    mask = ((pixels - corner).abs().sum(-3, keepdim=True) > 0.1).float()
    if dilate > 0:
        mask = F.max_pool2d(mask, 2 * dilate + 1, stride=1, padding=dilate)
    return mask


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
