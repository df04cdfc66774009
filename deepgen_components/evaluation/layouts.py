"""Output layouts that each benchmark's official scorer reads unchanged, written atomically, with resume detection.

A run folder ``OUT`` holds the benchmark's layout under ``OUT/images/`` (hand that folder to the official scorer:
nothing else is in it) and our own files beside it (``run.json``, ``seeds.jsonl``, ``summary.*``). Every prompt's
output is first written under ``OUT/.partial/`` and then renamed into place in one step, so ``images/`` only ever
holds finished prompts: a prompt is finished exactly when its output exists, which is what a rerun checks.

* ``geneval``: ``images/<NNNNN>/metadata.jsonl`` (the prompt's line of ``evaluation_metadata.jsonl``, verbatim)
  and ``images/<NNNNN>/samples/<KKKK>.png``; the prompt folder is renamed into place whole.
* ``dpg``: ``images/<id>.png``, the 4 samples of R x R px as one 2 x 2 grid (top-left, top-right, bottom-left,
  bottom-right), the layout ``compute_dpg_bench.py --resolution R --pic-num 4`` crops back into its samples.
* ``plain``: ``images/<id>.png`` (one sample) or ``images/<id>_<k>.png``, and ``images/prompts.jsonl`` (written
  when the run is merged) with each prompt, its category, seeds and files.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

from PIL import Image

from deepgen_components.evaluation.prompts import PromptRecord

__all__ = ["LAYOUTS", "Layout", "dpg_crop_boxes", "make_layout", "write_text_atomic"]


def write_text_atomic(path: Path, text: str) -> None:
    """Write ``text`` to a temporary name beside ``path`` and rename it into place."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)


def dpg_crop_boxes(resolution: int) -> list[tuple[int, int, int, int]]:
    """PIL crop boxes (left, upper, right, lower) of the 4 samples in a DPG-Bench grid, in sample order."""
    r = resolution
    return [(0, 0, r, r), (r, 0, 2 * r, r), (0, r, r, 2 * r), (r, r, 2 * r, 2 * r)]


class Layout:
    """Where a prompt's samples go. ``write`` is atomic; ``is_done`` says whether a prompt is finished."""

    name = "plain"

    def __init__(self, root: str | os.PathLike, samples: int) -> None:
        self.root = Path(root)
        self.samples = samples
        self.images = self.root / "images"
        self.partial = self.root / ".partial"

    def prepare(self) -> None:
        self.images.mkdir(parents=True, exist_ok=True)
        self.partial.mkdir(parents=True, exist_ok=True)

    def _staging(self, name: str) -> Path:
        return self.partial / f"{os.getpid()}-{name}"

    def clear_partial(self) -> None:
        """Remove what killed runs left half-written (call while no rank writes)."""
        shutil.rmtree(self.partial, ignore_errors=True)

    # -- per layout -------------------------------------------------------------------------------------------
    def files(self, record: PromptRecord) -> list[Path]:
        if self.samples == 1:
            return [self.images / f"{record.id}.png"]
        return [self.images / f"{record.id}_{k}.png" for k in range(self.samples)]

    def is_done(self, record: PromptRecord) -> bool:
        return all(path.is_file() for path in self.files(record))

    def write(self, record: PromptRecord, images: list[Image.Image]) -> None:
        self._check(images)
        staged = []
        for image, path in zip(images, self.files(record)):
            tmp = self._staging(path.name)
            image.save(tmp)
            staged.append((tmp, path))
        for tmp, path in staged:  # the last rename finishes the prompt
            os.replace(tmp, path)

    def read(self, record: PromptRecord) -> list[Image.Image]:
        """The prompt's samples, in sample order."""
        images = []
        for path in self.files(record):
            with Image.open(path) as image:
                images.append(image.convert("RGB"))
        return images

    def finish(self, records: list[PromptRecord], seeds: dict[int, list[int]]) -> None:
        """Write the layout's index files once every rank is done (rank 0)."""
        lines = []
        for record in records:
            row = record.to_json()
            row["seeds"] = seeds[record.index]
            row["files"] = [p.name for p in self.files(record)]
            lines.append(json.dumps(row, ensure_ascii=False))
        write_text_atomic(self.images / "prompts.jsonl", "".join(f"{line}\n" for line in lines))

    def _check(self, images: list[Image.Image]) -> None:
        if len(images) != self.samples:
            raise ValueError(f"{self.name} layout: expected {self.samples} samples per prompt, got {len(images)}")


class GenevalLayout(Layout):
    name = "geneval"

    def folder(self, record: PromptRecord) -> Path:
        return self.images / f"{record.index:05d}"

    def files(self, record: PromptRecord) -> list[Path]:
        return [self.folder(record) / "samples" / f"{k:04d}.png" for k in range(self.samples)]

    def is_done(self, record: PromptRecord) -> bool:
        return self.folder(record).is_dir()  # a prompt folder appears whole (one rename)

    def write(self, record: PromptRecord, images: list[Image.Image]) -> None:
        self._check(images)
        if record.source_line is None:
            raise ValueError(f"geneval layout: prompt {record.index} has no GenEval metadata line (--prompts file "
                             "in evaluation_metadata.jsonl format)")
        staging = self._staging(self.folder(record).name)
        shutil.rmtree(staging, ignore_errors=True)
        (staging / "samples").mkdir(parents=True)
        (staging / "metadata.jsonl").write_text(record.source_line + "\n", encoding="utf-8")
        for k, image in enumerate(images):
            image.save(staging / "samples" / f"{k:04d}.png")
        target = self.folder(record)
        if target.exists():  # finished by an earlier run with the same settings: replace it whole
            shutil.rmtree(target)
        os.replace(staging, target)

    def finish(self, records, seeds) -> None:  # the official evaluator reads only the prompt folders
        pass


class DpgLayout(Layout):
    name = "dpg"

    def files(self, record: PromptRecord) -> list[Path]:
        return [self.images / f"{record.id}.png"]

    def write(self, record: PromptRecord, images: list[Image.Image]) -> None:
        self._check(images)
        sizes = {image.size for image in images}
        side = images[0].width
        if len(sizes) != 1 or images[0].height != side:
            raise ValueError(f"dpg layout: the 4 samples must be square and of one size, got {sorted(sizes)}; "
                             "use --height equal to --width")
        grid = Image.new("RGB", (2 * side, 2 * side))
        for image, box in zip(images, dpg_crop_boxes(side)):
            grid.paste(image.convert("RGB"), box[:2])
        path = self.files(record)[0]
        tmp = self._staging(path.name)
        grid.save(tmp)
        os.replace(tmp, path)

    def read(self, record: PromptRecord) -> list[Image.Image]:
        with Image.open(self.files(record)[0]) as grid:
            side = grid.width // 2
            return [grid.convert("RGB").crop(box) for box in dpg_crop_boxes(side)]

    def finish(self, records, seeds) -> None:  # the official scorer reads every file in the folder as a grid
        pass


LAYOUTS = {"plain": Layout, "geneval": GenevalLayout, "dpg": DpgLayout}


def make_layout(name: str, root: str | os.PathLike, samples: int) -> Layout:
    if name == "dpg" and samples != 4:
        raise ValueError(f"--samples: DPG-Bench's layout is a 2x2 grid of 4 samples, got {samples}")
    return LAYOUTS[name](root, samples)
