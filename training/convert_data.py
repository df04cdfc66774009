"""The official DeepGen 1.0 training data lists, converted into our manifest (issue #27; the CLI is ``deepgen data
convert``).

The official code trains from JSON data lists read by four dataset classes (xtuner/mmengine configs under
``configs/datasets/deepgen_512_fix_pixels/``). Each fact below was read in the official repository
``deepgenteam/deepgen`` (commit 2ca58c61, DATA.md at 1d958492); the readers here are our own.

``caption`` — ``CaptionDataset`` (``src/datasets/text2image/caption_datasets.py``), the pre-training T2I sets
(``redcaps5m.py``, ``laion6m.py``, ``text2image2m.py``, ``megalith10m.py``, ``cc12m.py``; DATA.md points to OpenUni's
data preparation). ``data_path`` is one ``.json`` file holding a JSON list, or a folder whose ``*.json`` files each
hold one (concatenated). An entry is ``{"image": path under image_folder, "annotation": path under cap_folder}``;
the annotation is a JSON object per image and the caption is its ``cap_source`` key: ``"caption"`` by default and in
redcaps5m / laion6m, ``"prompt"`` in text2image2m, ``"caption_internlm2_short"`` in megalith10m. ``cap_folder`` is
the image folder itself in redcaps5m and text2image2m, a separate ``captions`` folder in cc12m, laion6m, megalith10m.

``blip3o`` — ``BLIP3oDataset`` (``src/datasets/text2image/blip3_o.py``), every SFT T2I set (``t2i_sft_zh.py``:
BLIP3o-60k, ShareGPT-4o, Echo-4o, OpenGPT-4o, unireason, banana, text_render, poster). A JSON list of
``{"type": "T2I_SFT", "txt": caption, "image": "", "image_path": path under image_folder}`` (DATA.md, "T2I SFT
data format"); the class reads ``txt`` and ``image_path`` only.

``edit`` — ``ImageEditDataset`` (``src/datasets/image2image/edit_datasets.py``), every editing set
(``edit_pretrain.py``: OpenGPT-4o, ShareGPT-4o, Nano-150k, pico-banana, UniWorld, GPT-Image-Edit hq/omni/ultra,
unireason, X2I2/OmniGen, NHR-Edit). A JSON list of ``{"input_image": [paths], "output_image": path,
"instruction": text}``, paths under image_folder (DATA.md, "Editing data format"). The class uses
``input_image[0]`` alone; we keep that by default (``all_inputs=True`` keeps every input as a reference).

``reconstruct`` — ``ReconstructDataset`` (same file): ``{"image": path}``, trained as an edit whose source and
target are that image and whose instruction is the fixed ``"Keep the image as it is."``.

In every class a path is joined to ``image_folder`` (``os.path.join``: an absolute path stays absolute); our
``images_root`` plays that part. The official size/aspect filter (shorter side > 80 px, 0.1 < width/height < 10)
is applied in ``CaptionDataset._read_image`` only. ``check_images`` applies ours to every image of an entry, on its
header: ``training.samples.ImageFilter``, the rule our training loader applies to every image (references
included), with the aspect bounds themselves kept.

Deliberate differences: a list may also be JSON Lines (one entry per line); folder files are read in sorted order
(the official ``glob`` order is the file system's); ``edit`` accepts a single path string for ``input_image``;
captions and instructions are stripped, and an entry whose text is empty is skipped.
"""

from __future__ import annotations

import json
import os
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

from deepgen_components.training.samples import FilteredImage, ImageFilter

from deepgen_components.jsonl import read_objects

__all__ = [
    "FORMATS",
    "RECONSTRUCT_INSTRUCTION",
    "ConvertReport",
    "OfficialFormat",
    "SkippedEntry",
    "convert_data_list",
    "convert_entry",
    "read_data_list",
]

RECONSTRUCT_INSTRUCTION = "Keep the image as it is."  # ReconstructDataset's fixed prompt


class SkippedEntry(ValueError):
    """An entry that cannot become a manifest row; ``reason`` is the summary's key, the message its detail."""

    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(detail)
        self.reason = reason


@dataclass(frozen=True)
class _Context:
    images_root: Path
    captions_root: Path
    caption_key: str
    all_inputs: bool


def _text(entry: dict, key: str) -> str:
    if key not in entry or entry[key] is None:
        raise SkippedEntry(f"missing field {key!r}", f"no {key!r}")
    value = entry[key]
    if not isinstance(value, str):
        raise SkippedEntry(f"field {key!r} is not text", f"{key!r} is a {type(value).__name__}")
    if not value.strip():
        raise SkippedEntry(f"empty field {key!r}", f"{key!r} is empty")
    return value.strip()


def _caption_row(entry: dict, ctx: _Context) -> dict:
    image = _text(entry, "image")
    annotation = ctx.captions_root / _text(entry, "annotation")
    try:
        with annotation.open(encoding="utf-8") as handle:
            caption = json.load(handle)
    except FileNotFoundError:
        raise SkippedEntry("missing caption file", f"{annotation}: no such file") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise SkippedEntry("unreadable caption file", f"{annotation}: {err}") from None
    if not isinstance(caption, dict):
        raise SkippedEntry("unreadable caption file", f"{annotation}: not a JSON object")
    try:
        text = _text(caption, ctx.caption_key)
    except SkippedEntry as err:
        raise SkippedEntry(f"caption file: {err.reason}", f"{annotation}: {err}") from None
    return {"task": "t2i", "image": ctx.images_root / image, "caption": text}


def _blip3o_row(entry: dict, ctx: _Context) -> dict:
    return {"task": "t2i", "image": ctx.images_root / _text(entry, "image_path"), "caption": _text(entry, "txt")}


def _edit_row(entry: dict, ctx: _Context) -> dict:
    inputs = entry.get("input_image")
    if isinstance(inputs, str):
        inputs = [inputs]
    if not inputs:
        raise SkippedEntry("missing field 'input_image'", "no 'input_image' (a list of paths)")
    if not isinstance(inputs, list) or not all(isinstance(p, str) and p.strip() for p in inputs):
        raise SkippedEntry("field 'input_image' is not a list of paths", f"'input_image' is {inputs!r}")
    sources = [ctx.images_root / p.strip() for p in (inputs if ctx.all_inputs else inputs[:1])]
    return {"task": "edit", "source": sources if ctx.all_inputs else sources[0],
            "instruction": _text(entry, "instruction"), "target": ctx.images_root / _text(entry, "output_image")}


def _reconstruct_row(entry: dict, ctx: _Context) -> dict:
    image = ctx.images_root / _text(entry, "image")
    return {"task": "edit", "source": image, "instruction": RECONSTRUCT_INSTRUCTION, "target": image}


@dataclass(frozen=True)
class OfficialFormat:
    """One official data-list format: the task its rows train, the official class that reads it, its fields."""

    name: str
    task: str
    dataset_class: str
    fields: str
    row: Callable[[dict, _Context], dict]


FORMATS: dict[str, OfficialFormat] = {
    f.name: f
    for f in (
        OfficialFormat("caption", "t2i", "CaptionDataset",
                       '{"image", "annotation"} + a caption JSON per image ({CAPTION_KEY: text})', _caption_row),
        OfficialFormat("blip3o", "t2i", "BLIP3oDataset", '{"txt", "image_path"}', _blip3o_row),
        OfficialFormat("edit", "edit", "ImageEditDataset", '{"input_image": [...], "output_image", "instruction"}',
                       _edit_row),
        OfficialFormat("reconstruct", "edit", "ReconstructDataset", '{"image"}', _reconstruct_row),
    )
}


def _format(name: str) -> OfficialFormat:
    if name not in FORMATS:
        known = ", ".join(f"{f.name} ({f.dataset_class})" for f in FORMATS.values())
        raise ValueError(f"--format {name}: unknown format; the official data lists are: {known}")
    return FORMATS[name]


def _row_images(row: dict) -> list[Path]:
    if row["task"] == "t2i":
        return [row["image"]]
    sources = row["source"] if isinstance(row["source"], list) else [row["source"]]
    return [*sources, row["target"]]


def _check_image(path: Path, filters: ImageFilter) -> None:
    """Skip an entry whose image is missing, unreadable or dropped by ``filters`` (header only, never decoded)."""
    from PIL import Image, UnidentifiedImageError

    if not path.is_file():
        raise SkippedEntry("missing image", f"{path}: no such file")
    try:
        with Image.open(path) as image:
            filters.check(image.width, image.height)
    except FilteredImage as err:
        raise SkippedEntry(err.reason, f"{path}: {err}") from None
    except (OSError, UnidentifiedImageError, ValueError, SyntaxError) as err:
        raise SkippedEntry("unreadable image", f"{path}: {err}") from None


def convert_entry(fmt: str | OfficialFormat, entry: object, images_root: str | Path, *,
                  captions_root: str | Path | None = None, caption_key: str = "caption", all_inputs: bool = False,
                  filters: ImageFilter | None = None) -> dict:
    """Our manifest row (image paths as joined to ``images_root``, not yet made relative) of one entry of an
    official data list; raises :class:`SkippedEntry` when the entry is unusable (and, with ``filters``, when one of
    its images is missing, unreadable or filtered out)."""
    fmt = _format(fmt) if isinstance(fmt, str) else fmt
    if not isinstance(entry, dict):
        raise SkippedEntry("entry is not a JSON object", f"got {type(entry).__name__}")
    ctx = _Context(Path(images_root), Path(captions_root if captions_root is not None else images_root),
                   caption_key, all_inputs)
    row = fmt.row(entry, ctx)
    if filters is not None:
        for image in _row_images(row):
            _check_image(image, filters)
    return row


def read_data_list(path: str | Path) -> Iterator[tuple[str, object]]:
    """``(where, entry)`` for every entry of an official data list: a ``.json`` file holding a JSON list, a folder of
    such files (sorted, not recursive, as ``CaptionDataset`` globs ``*.json``), or a ``.jsonl`` file (ours: one entry
    per line). ``where`` is ``file[index]`` or ``file:line``, for the summary's examples."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"INPUT {path}: no such file or folder; expected an official data list (.json)")
    if path.is_dir():
        files = sorted(path.glob("*.json"))
        if not files:
            raise FileNotFoundError(f"INPUT {path}: a folder without *.json data lists")
    elif path.suffix.lower() in (".json", ".jsonl"):
        files = [path]
    else:
        raise ValueError(f"INPUT {path}: expected a .json data list, a folder of them or a .jsonl file; "
                         f"got {repr(path.suffix) if path.suffix else 'no extension'}")
    for file in files:
        if file.suffix.lower() == ".jsonl":
            for number, _, entry in read_objects(file, argument="INPUT"):
                yield f"{file}:{number}", entry
            continue
        try:
            with file.open(encoding="utf-8") as handle:
                entries = json.load(handle)
        except (json.JSONDecodeError, UnicodeDecodeError) as err:
            raise ValueError(f"INPUT {file}: not valid JSON ({err})") from None
        if not isinstance(entries, list):
            raise ValueError(f"INPUT {file}: expected a JSON list of entries (the official data list), "
                             f"got a JSON {type(entries).__name__}")
        for index, entry in enumerate(entries):
            yield f"{file}[{index}]", entry


@dataclass
class ConvertReport:
    """What :func:`convert_data_list` did: entries read, rows written, skips per reason with a first example."""

    out: Path
    format: str
    task: str
    entries: int = 0
    written: int = 0
    skipped: Counter = field(default_factory=Counter)
    examples: dict[str, str] = field(default_factory=dict)

    def skip(self, reason: str, example: str) -> None:
        self.skipped[reason] += 1
        self.examples.setdefault(reason, example)

    def summary(self) -> str:
        lines = [f"wrote {self.out}: {self.written} {self.task} rows from {self.entries} entries "
                 f"(format {self.format}); skipped {sum(self.skipped.values())}"]
        for reason, count in sorted(self.skipped.items(), key=lambda item: (-item[1], item[0])):
            lines.append(f"  {count:>8}  {reason}  (first: {self.examples[reason]})")
        return "\n".join(lines)


def _check_out(out: Path, overwrite: bool) -> None:
    if out.is_dir():
        raise ValueError(f"--out {out}: is a folder; give a .jsonl file name")
    if out.exists() and not overwrite:
        raise FileExistsError(f"--out {out}: exists; pass --overwrite to replace it")
    if out.suffix != ".jsonl":
        got = repr(out.suffix) if out.suffix else "no extension"
        raise ValueError(f"--out {out}: the manifest is JSON Lines; give a .jsonl file name, got {got}")
    ancestor = out.parent
    while not ancestor.exists() and ancestor != ancestor.parent:
        ancestor = ancestor.parent
    if not ancestor.is_dir():
        raise ValueError(f"--out {out}: {ancestor} is a file, not a folder")


def convert_data_list(fmt: str, data_list: str | Path, images_root: str | Path, out: str | Path, *,
                      captions_root: str | Path | None = None, caption_key: str = "caption", task: str | None = None,
                      all_inputs: bool = False, check_images: bool = False, filters: ImageFilter | None = None,
                      absolute: bool = False, overwrite: bool = False) -> ConvertReport:
    """Convert an official data list (format ``fmt``, see the module docstring) into our JSONL manifest ``out``.

    Paths are written relative to the manifest's folder (``ManifestSource`` resolves them there), or absolute with
    ``absolute``. ``check_images`` skips entries whose images are missing, unreadable or dropped by ``filters``
    (default: the official 80 px / [0.1, 10] filter). The file appears atomically (a temporary file renamed into
    place) and only when at least one row was converted; nothing is written otherwise."""
    spec = _format(fmt)
    if task is not None and task != spec.task:
        raise ValueError(f"--task {task}: format {spec.name!r} ({spec.dataset_class}) holds {spec.task} samples")
    if spec.name != "caption" and (captions_root is not None or caption_key != "caption"):
        raise ValueError(f"--captions-root / --caption-key: only for --format caption (the per-image caption files "
                         f"of CaptionDataset); format {spec.name!r} has its text in the list")
    if not caption_key:
        raise ValueError("--caption-key: is empty; the official keys are caption, prompt, caption_internlm2_short")
    images_root = Path(images_root)
    for flag, folder in (("--images-root", images_root), ("--captions-root", captions_root)):
        if folder is not None and not Path(folder).is_dir():
            raise FileNotFoundError(f"{flag} {folder}: no such folder")
    out = Path(out)
    _check_out(out, overwrite)
    if check_images and filters is None:
        filters = ImageFilter()
    entries = read_data_list(data_list)  # a generator: INPUT errors surface on the first next()
    report = ConvertReport(out, spec.name, spec.task)
    base = os.path.abspath(out.parent)

    def place(path: Path) -> str:
        full = os.path.abspath(path)
        return Path(full if absolute else os.path.relpath(full, base)).as_posix()

    created = [d for d in reversed(out.parents) if not d.exists()]
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.{os.getpid()}.tmp")
    try:
        with tmp.open("w", encoding="utf-8") as handle:
            for where, entry in entries:
                report.entries += 1
                try:
                    row = convert_entry(spec, entry, images_root, captions_root=captions_root,
                                        caption_key=caption_key, all_inputs=all_inputs,
                                        filters=filters if check_images else None)
                except SkippedEntry as err:
                    report.skip(err.reason, f"{where}: {err}")
                    continue
                for key in ("image", "target"):
                    if key in row:
                        row[key] = place(row[key])
                if "source" in row:
                    row["source"] = [place(s) for s in row["source"]] if all_inputs else place(row["source"])
                handle.write(json.dumps(row, ensure_ascii=False) + "\n")
                report.written += 1
        if report.written == 0:
            reasons = "; ".join(f"{n} {r} (first: {report.examples[r]})" for r, n in report.skipped.most_common())
            raise ValueError(f"INPUT {data_list}: no entry could be converted into a manifest row "
                             f"({report.entries} entries{'; skipped: ' + reasons if reasons else ''})")
        os.replace(tmp, out)
    except BaseException:
        tmp.unlink(missing_ok=True)
        for folder in reversed(created):
            try:
                folder.rmdir()
            except OSError:
                pass
        raise
    return report
