"""``deepgen data convert``: each official DeepGen data-list format (CaptionDataset, BLIP3oDataset, ImageEditDataset,
ReconstructDataset; training/convert_data.py cites the sources) becomes our manifest, and ManifestSource reads the
rows back with the right task, text and images."""

import json
from pathlib import Path

import pytest
import torch
from deepgen_components.training.convert_data import (
    FORMATS,
    RECONSTRUCT_INSTRUCTION,
    convert_data_list,
    read_data_list,
)
from deepgen_components.training.data import ManifestSource
from PIL import Image

from deepgen_components.cli import main

COLOURS = {"red": (220, 20, 20), "green": (20, 200, 20), "blue": (20, 20, 220), "grey": (128, 128, 128)}


def png(path: Path, colour: str, size=(96, 96)) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", size, COLOURS[colour]).save(path)
    return path


def write_json(path: Path, value) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(value))
    return path


def mean_colour(pixels: torch.Tensor) -> tuple[int, ...]:
    """The (3, H, W) [-1, 1] tensor's mean colour back in 0..255."""
    return tuple(round(v) for v in ((pixels.mean(dim=(1, 2)) + 1) * 127.5).tolist())


def close(pixels: torch.Tensor, colour: str) -> bool:
    return all(abs(a - b) <= 2 for a, b in zip(mean_colour(pixels), COLOURS[colour]))


def rows(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_caption_format_reads_a_folder_of_lists_and_the_caption_files(tmp_path):
    """CaptionDataset: a folder of *.json lists of {image, annotation}; the caption is the cap_source key of a JSON
    file per image under cap_folder (here "prompt", as text-to-image-2M's config)."""
    raw, captions = tmp_path / "t2i2m" / "raw", tmp_path / "t2i2m" / "captions"
    png(raw / "00" / "a.png", "red")
    png(raw / "00" / "b.png", "blue")
    write_json(captions / "00" / "a.json", {"prompt": "a red square", "caption": "ignored"})
    write_json(captions / "00" / "b.json", {"prompt": " a blue square \n"})
    write_json(captions / "00" / "c.json", {"caption": "no prompt key"})
    lists = tmp_path / "t2i2m" / "data"
    write_json(lists / "part1.json", [{"image": "00/a.png", "annotation": "00/a.json"},
                                      {"image": "00/c.png", "annotation": "00/c.json"}])
    write_json(lists / "part0.json", [{"image": "00/b.png", "annotation": "00/b.json"},
                                      {"image": "00/d.png"}])
    out = tmp_path / "manifests" / "t2i2m.jsonl"
    report = convert_data_list("caption", lists, raw, out, captions_root=captions, caption_key="prompt")

    assert (report.entries, report.written) == (4, 2)
    assert report.skipped == {"missing field 'annotation'": 1, "caption file: missing field 'prompt'": 1}
    written = rows(out)  # part0 before part1 (sorted), paths relative to the manifest's folder
    assert written == [{"task": "t2i", "image": "../t2i2m/raw/00/b.png", "caption": "a blue square"},
                       {"task": "t2i", "image": "../t2i2m/raw/00/a.png", "caption": "a red square"}]
    source = ManifestSource(out, image_size=64)
    assert (source.task, len(source)) == ("t2i", 2)
    sample = source[1]
    assert (sample.task, sample.text, tuple(sample.target.shape)) == ("t2i", "a red square", (3, 64, 64))
    assert close(sample.target, "red")


def test_caption_files_default_to_the_image_folder(tmp_path):
    """redcaps5m / text-to-image-2M keep each caption JSON beside its image (cap_folder == image_folder)."""
    raw = tmp_path / "raw"
    png(raw / "x.png", "green")
    write_json(raw / "x.json", {"caption": "green"})
    data = write_json(tmp_path / "data.json", [{"image": "x.png", "annotation": "x.json"}])
    report = convert_data_list("caption", data, raw, tmp_path / "m.jsonl")
    assert report.written == 1 and rows(tmp_path / "m.jsonl")[0]["caption"] == "green"


def test_blip3o_format_is_the_sft_t2i_list(tmp_path):
    """BLIP3oDataset / DATA.md's "T2I SFT data format": {"type", "txt", "image": "", "image_path"}."""
    root = tmp_path / "BLIP3o"
    png(root / "image" / "1.png", "red")
    png(root / "image" / "2.png", "blue")
    data = write_json(root / "blip3o_60k.json", [
        {"type": "T2I_SFT", "txt": "a red poster", "image": "", "image_path": "image/1.png"},
        {"type": "T2I_SFT", "txt": "", "image": "", "image_path": "image/2.png"},
        {"type": "T2I_SFT", "image": "", "image_path": "image/2.png"},
        {"type": "T2I_SFT", "txt": "a blue poster", "image": "", "image_path": "image/2.png"},
        "not an entry",
    ])
    out = root / "manifest.jsonl"
    report = convert_data_list("blip3o", data, root, out, task="t2i")
    assert report.written == 2
    assert report.skipped == {"empty field 'txt'": 1, "missing field 'txt'": 1, "entry is not a JSON object": 1}
    assert "blip3o_60k.json[1]" in report.examples["empty field 'txt'"]
    assert rows(out)[0] == {"task": "t2i", "image": "image/1.png", "caption": "a red poster"}
    source = ManifestSource(out, image_size=64)
    assert [source[i].text for i in range(2)] == ["a red poster", "a blue poster"]
    assert close(source[0].target, "red") and close(source[1].target, "blue")


def test_edit_format_uses_the_first_input_image_like_the_official_class(tmp_path):
    """ImageEditDataset / DATA.md's "Editing data format": {"input_image": [...], "output_image", "instruction"}; the
    official class reads input_image[0] only; --all-inputs keeps every input as a reference."""
    root = tmp_path / "Nano-150k"
    png(root / "editing" / "in_0.jpg", "red")
    png(root / "editing" / "in_1.png", "green")
    png(root / "editing" / "out_0.png", "blue")
    data = write_json(root / "data.json", [
        {"input_image": ["editing/in_0.jpg", "editing/in_1.png"], "output_image": "editing/out_0.png",
         "instruction": "Make it blue."},
        {"input_image": [], "output_image": "editing/out_0.png", "instruction": "nothing to edit"},
        {"input_image": ["editing/in_0.jpg"], "instruction": "no target"},
    ])
    first = convert_data_list("edit", data, root, tmp_path / "first.jsonl")
    assert first.skipped == {"missing field 'input_image'": 1, "missing field 'output_image'": 1}
    assert rows(tmp_path / "first.jsonl") == [{"task": "edit", "source": "Nano-150k/editing/in_0.jpg",
                                               "instruction": "Make it blue.", "target": "Nano-150k/editing/out_0.png"}]
    sample = ManifestSource(tmp_path / "first.jsonl", image_size=64)[0]
    assert (sample.task, sample.text, len(sample.references)) == ("edit", "Make it blue.", 1)
    assert close(sample.references[0], "red") and close(sample.target, "blue")

    convert_data_list("edit", data, root, tmp_path / "all.jsonl", all_inputs=True)
    sample = ManifestSource(tmp_path / "all.jsonl", image_size=64, task="edit")[0]
    assert [close(r, c) for r, c in zip(sample.references, ("red", "green"))] == [True, True]


def test_reconstruct_format_is_an_edit_that_keeps_the_image(tmp_path):
    png(tmp_path / "img" / "k.png", "grey")
    data = write_json(tmp_path / "recon.json", [{"image": "img/k.png"}])
    convert_data_list("reconstruct", data, tmp_path, tmp_path / "out" / "m.jsonl", absolute=True)
    row = rows(tmp_path / "out" / "m.jsonl")[0]
    assert row["source"] == row["target"] == str(tmp_path / "img" / "k.png")  # --absolute
    sample = ManifestSource(tmp_path / "out" / "m.jsonl", image_size=64)[0]
    assert sample.text == RECONSTRUCT_INSTRUCTION and torch.equal(sample.references[0], sample.target)


def test_check_images_skips_missing_unreadable_and_filtered_images(tmp_path):
    """Without --check-images no image is opened; with it, an entry is skipped when an image is missing, not an
    image, or dropped by the official filter (shorter side <= 80 px, aspect outside [0.1, 10])."""
    png(tmp_path / "ok.png", "red")
    png(tmp_path / "small.png", "red", (60, 120))
    png(tmp_path / "wide.png", "red", (1100, 100))
    (tmp_path / "broken.png").write_text("not an image")
    names = ["ok.png", "small.png", "wide.png", "broken.png", "gone.png"]
    data = write_json(tmp_path / "l.json", [{"txt": n, "image_path": n} for n in names])
    assert convert_data_list("blip3o", data, tmp_path, tmp_path / "all.jsonl").written == 5
    report = convert_data_list("blip3o", data, tmp_path, tmp_path / "checked.jsonl", check_images=True)
    assert report.written == 1 and rows(tmp_path / "checked.jsonl")[0]["caption"] == "ok.png"
    assert report.skipped == {"too_small": 1, "aspect_ratio": 1, "unreadable image": 1, "missing image": 1}
    assert "60x120" in report.examples["too_small"]
    assert "too_small" in report.summary() and "wrote" in report.summary()


def test_an_edit_is_skipped_when_its_source_image_is_missing(tmp_path):
    png(tmp_path / "t.png", "blue")
    data = write_json(tmp_path / "e.json", [{"input_image": ["s.png"], "output_image": "t.png", "instruction": "x"},
                                            {"input_image": ["t.png"], "output_image": "t.png", "instruction": "y"}])
    report = convert_data_list("edit", data, tmp_path, tmp_path / "m.jsonl", check_images=True)
    assert report.written == 1 and report.skipped == {"missing image": 1}


def test_jsonl_lists_and_folder_order(tmp_path):
    (tmp_path / "l.jsonl").write_text('{"txt": "a", "image_path": "a.png"}\n\n{"txt": "b", "image_path": "b.png"}\n')
    assert [w.rsplit(":", 1)[1] for w, _ in read_data_list(tmp_path / "l.jsonl")] == ["1", "3"]
    with pytest.raises(ValueError, match=r"INPUT .*bad\.json: expected a JSON list of entries .* got a JSON dict"):
        list(read_data_list(write_json(tmp_path / "bad.json", {"txt": "a"})))


def test_nothing_is_written_when_no_entry_converts_or_the_input_is_bad(tmp_path):
    data = write_json(tmp_path / "l.json", [{"caption": "wrong format"}])
    out = tmp_path / "new" / "m.jsonl"
    with pytest.raises(ValueError, match=r"no entry could be converted .* 1 missing field 'image_path'"):
        convert_data_list("blip3o", data, tmp_path, out)
    (tmp_path / "broken.json").write_text("[{")
    with pytest.raises(ValueError, match="broken.json: not valid JSON"):
        convert_data_list("blip3o", tmp_path / "broken.json", tmp_path, out)
    assert not (tmp_path / "new").exists()


def test_overwrite_replaces_atomically(tmp_path):
    png(tmp_path / "a.png", "red")
    data = write_json(tmp_path / "l.json", [{"txt": "one", "image_path": "a.png"}])
    out = tmp_path / "m.jsonl"
    out.write_text("old\n")
    with pytest.raises(FileExistsError, match="exists; pass --overwrite"):
        convert_data_list("blip3o", data, tmp_path, out)
    convert_data_list("blip3o", data, tmp_path, out, overwrite=True)
    assert rows(out)[0]["caption"] == "one"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.png", "l.json", "m.jsonl"]  # no temporary file left


def test_every_format_names_its_official_class_and_task():
    assert {n: (f.dataset_class, f.task) for n, f in FORMATS.items()} == {
        "caption": ("CaptionDataset", "t2i"), "blip3o": ("BLIP3oDataset", "t2i"),
        "edit": ("ImageEditDataset", "edit"), "reconstruct": ("ReconstructDataset", "edit")}


def test_cli_converts_as_a_user_types_it(tmp_path, capsys):
    root = tmp_path / "OpenGPT-4o-Image"
    png(root / "editing" / "input_1.jpg", "red")
    png(root / "editing" / "output_1.png", "green", (128, 96))
    png(root / "editing" / "output_2.png", "green", (40, 40))
    data = write_json(root / "editing.json", [
        {"input_image": ["editing/input_1.jpg"], "output_image": "editing/output_1.png", "instruction": "Go green."},
        {"input_image": ["editing/input_1.jpg"], "output_image": "editing/output_2.png", "instruction": "Tiny."},
    ])
    out = tmp_path / "manifests" / "open4o_edit.jsonl"
    code = main(["data", "convert", "--format", "edit", str(data), "--images-root", str(root), "--out", str(out),
                 "--task", "edit", "--check-images"])
    printed = capsys.readouterr().out
    assert code == 0
    assert f"wrote {out}: 1 edit rows from 2 entries (format edit); skipped 1" in printed
    assert "too_small" in printed and "editing.json[1]" in printed
    sample = ManifestSource(out, image_size=64)[0]
    assert sample.text == "Go green." and close(sample.target, "green") and close(sample.references[0], "red")
    # --min-side 0 keeps the 40 px image (a tiny training run's filter is smaller than the official 80 px)
    assert main(["data", "convert", "--format", "edit", str(data), "--images-root", str(root), "--out", str(out),
                 "--check-images", "--min-side", "0", "--overwrite"]) == 0
    assert len(ManifestSource(out, image_size=64)) == 2
