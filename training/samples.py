"""What every data source shares: the ``Sample``, the skip counter, the official image filter, image loading, and
the WebDataset sample layout (files grouped by key) that the map-style and the streaming tar readers both decode.

The filter is the official DeepGen data pipeline's (issue #27): an image whose shorter side is <= 80 px, or whose
aspect ratio (width / height) is outside [0.1, 10], is dropped. It is checked on the image header, before any pixel
is decoded, for every image of a sample (an edit's references and target alike), and a dropped sample is counted
by reason (``too_small``, ``aspect_ratio``). A 150:1 panorama would otherwise reach the DiT as a 1 x 150 patch grid.
"""

from __future__ import annotations

import io
import logging
from collections import Counter
from collections.abc import Callable, Collection, Mapping
from dataclasses import dataclass, field
from pathlib import Path

import torch

from deepgen_components.processing import fix_pixels_size, pil_to_pixels

__all__ = [
    "IMAGE_SUFFIXES",
    "FilteredImage",
    "ImageFilter",
    "Sample",
    "SkipCounter",
    "decode_group",
    "find_shards",
    "group_task",
    "load_image",
    "split_key",
]

# One logger name for every skip warning, wherever the sample was read (map-style, streaming, a DataLoader worker).
logger = logging.getLogger("deepgen_components.training.data")

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp")


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


class FilteredImage(ValueError):
    """An image the :class:`ImageFilter` drops; ``reason`` is the skip counter's key."""

    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(detail)
        self.reason = reason


FILTER_OPTIONS = ("min_side", "min_aspect", "max_aspect")


@dataclass(frozen=True)
class ImageFilter:
    """Keep an image when its shorter side is > ``min_side`` px and width / height is in [min_aspect, max_aspect]
    (the official DeepGen data filter: 80 px, [0.1, 10]; ``min_side=0`` keeps every size)."""

    min_side: int = 80
    min_aspect: float = 0.1
    max_aspect: float = 10.0

    def __post_init__(self) -> None:
        if self.min_side < 0:
            raise ValueError(f"min_side must be >= 0, got {self.min_side}")
        if not 0 < self.min_aspect <= 1 <= self.max_aspect:
            raise ValueError(f"need 0 < min_aspect <= 1 <= max_aspect, got {self.min_aspect}, {self.max_aspect}")

    @classmethod
    def from_options(cls, options: Mapping, image_size: int, argument: str) -> ImageFilter:
        """The filter of a source's ``options`` (``min_side``, ``min_aspect``, ``max_aspect``). Unset, ``min_side``
        is the official 80 px at ``data.image_size`` >= 512 (DeepGen's) and scales with smaller training sizes
        (80 * size / 512: 10 px at 64), so a tiny run keeps its images; the aspect range is always [0.1, 10]."""
        try:
            return cls(
                min_side=int(options.get("min_side", min(80, 80 * image_size // 512))),
                min_aspect=float(options.get("min_aspect", 0.1)),
                max_aspect=float(options.get("max_aspect", 10.0)),
            )
        except (TypeError, ValueError) as err:
            raise ValueError(f"{argument}: {err}") from err

    def check(self, width: int, height: int) -> None:
        """Raise :class:`FilteredImage` if a ``width`` x ``height`` image is dropped."""
        if min(width, height) <= self.min_side:
            raise FilteredImage("too_small", f"{width}x{height}: shorter side <= {self.min_side} px")
        aspect = width / height
        if not self.min_aspect <= aspect <= self.max_aspect:
            raise FilteredImage("aspect_ratio", f"{width}x{height}: aspect {aspect:.3g} outside "
                                                f"[{self.min_aspect}, {self.max_aspect}]")


def load_image(source, image_size: int, filters: ImageFilter | None = None) -> torch.Tensor:
    """Open an image (path or bytes), check ``filters`` on its header, convert to RGB, resize by ``fix_pixels``
    -> (3, H, W) in [-1, 1]."""
    from PIL import Image

    handle = io.BytesIO(source) if isinstance(source, (bytes, bytearray)) else source
    with Image.open(handle) as image:
        if filters is not None:
            filters.check(image.width, image.height)  # header only: a dropped image is never decoded
        image.load()
        size = fix_pixels_size(image.height, image.width, image_size)
        return pil_to_pixels(image, size)


# -- the WebDataset sample layout ------------------------------------------------------------------------------
def find_shards(path: str | Path | Collection[str | Path]) -> list[Path]:
    """The ``.tar`` shards of ``path`` (a shard, a folder of them, sorted, or a list of shards); each must exist."""
    if isinstance(path, (str, Path)):
        folder = Path(path)
        shards = sorted(folder.glob("*.tar")) if folder.is_dir() else [folder]
    else:
        shards = [Path(s) for s in path]
    if not shards:
        raise FileNotFoundError(f"no .tar shards found in {path}")
    for shard in shards:
        if not shard.is_file():
            raise FileNotFoundError(f"shard not found: {shard}")
    return shards


def split_key(member_name: str) -> tuple[str, str]:
    """WebDataset key and suffix of a tar member: the path up to the first dot of the file name (folders
    included), and the rest lower-cased (``a/0001.src0.PNG`` -> ``("a/0001", "src0.png")``)."""
    folder, _, name = member_name.rpartition("/")
    stem, _, rest = name.partition(".")
    return (f"{folder}/{stem}" if folder else stem), rest.lower()


def group_task(suffixes: Collection[str]) -> str:
    """``edit`` when a group has ``src*`` / ``tgt*`` files, else ``t2i``."""
    return "edit" if any(r.startswith(("src", "tgt")) for r in suffixes) else "t2i"


def decode_group(key: str, suffixes: Collection[str], read: Callable[[str], bytes], image_size: int,
                 filters: ImageFilter | None = None) -> Sample:
    """The :class:`Sample` of one WebDataset group (``read(suffix)`` -> that file's bytes). Text-to-image:
    ``KEY.png`` (or another image suffix) + ``KEY.txt``; editing: ``KEY.src.png`` or ``KEY.src0.png``,
    ``KEY.src1.png``, ... + ``KEY.tgt.png`` + ``KEY.txt``. Raises ValueError (or an image error) when unusable."""
    if "txt" not in suffixes:
        raise ValueError(f"{key}: no .txt")
    text = read("txt").decode("utf-8").strip()
    if group_task(suffixes) == "t2i":
        image = next((s[1:] for s in IMAGE_SUFFIXES if s[1:] in suffixes), None)
        if image is None:
            raise ValueError(f"{key}: no image file")
        return Sample("t2i", text, load_image(read(image), image_size, filters))
    sources = sorted(r for r in suffixes if r.startswith("src") and r.endswith(IMAGE_SUFFIXES))
    target = next((r for r in suffixes if r.startswith("tgt") and r.endswith(IMAGE_SUFFIXES)), None)
    if not sources or target is None:
        raise ValueError(f"{key}: an edit sample needs src*.<image> and tgt.<image>")
    refs = [load_image(read(s), image_size, filters) for s in sources]
    return Sample("edit", text, load_image(read(target), image_size, filters), refs)
