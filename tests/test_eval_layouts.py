"""`deepgen eval` writes each benchmark's official layout (rules from the benchmarks README), seeds deterministic and
recorded, prompt sets shipped with their licenses, bad input rejected naming the argument."""

from __future__ import annotations

import json
import re

import numpy as np
import pytest
import torch
from PIL import Image

from deepgen_components.cli import main
from deepgen_components.evaluation import (
    BENCHMARKS,
    dpg_crop_boxes,
    initial_noise,
    load_prompt_file,
    load_prompts,
    resolve_settings,
    sample_seeds,
    shard,
)
from deepgen_components.evaluation.prompts import DATA_DIR
from deepgen_components.pipeline import DeepGenPipeline

TOY = ["--preset", "tiny", "--steps", "2", "--height", "32", "--width", "32", "--quiet"]


def test_prompt_sets_ship_with_their_licenses_and_counts():
    assert len(load_prompts("geneval")) == 553
    assert len(load_prompts("dpg")) == 1065
    for folder, words in (("geneval", "MIT License"), ("dpg_bench", "Apache License")):
        assert words in (DATA_DIR / folder / "LICENSE").read_text()
    dpg_ids = [r.id for r in load_prompts("dpg")]
    assert len(set(dpg_ids)) == 1065
    with pytest.raises(ValueError, match="--prompts"):
        load_prompts("cvtg")  # not shipped: needs a user file


def test_registered_benchmarks_bring_their_prompts_and_evaluators():
    """The shapes world registers its benchmark (the T2I part of its fixed evaluation set) and its evaluator when
    ``deepgen_components.shapes`` is imported (``deepgen`` imports it); an unknown name says so."""
    from deepgen_components.evaluation import available_evaluators
    from deepgen_components.evaluation.prompts import Benchmark, PromptRecord, Protocol, register_benchmark
    from deepgen_components.shapes.evaluation import BENCHMARK, eval_set

    assert BENCHMARKS["shapes"] is BENCHMARK and "shapes" in available_evaluators()
    records = load_prompts("shapes")
    assert [r.prompt for r in records] == eval_set(edits=0).prompts and len(records) == 108
    assert [r.category for r in records] == ["heldout"] * 54 + ["seen"] * 54
    with pytest.raises(ValueError, match=r"--benchmark: unknown benchmark 'nope'; known: .*shapes.*"
                                         r"deepgen_components.shapes is imported"):
        load_prompts("nope")
    toy = Benchmark("toy_for_test", "plain", 1, Protocol(), builtin=True)
    with pytest.raises(ValueError, match="needs its prompts loader"):
        register_benchmark(toy)
    register_benchmark(toy, lambda: [PromptRecord(0, "00000", "a red circle")])
    assert [r.prompt for r in load_prompts("toy_for_test")] == ["a red circle"]
    with pytest.raises(ValueError, match="already registered"):
        register_benchmark(Benchmark("toy_for_test", "plain", 4, Protocol(), builtin=False))
    BENCHMARKS.pop("toy_for_test")  # keep the CLI's --benchmark choices as they ship


def test_geneval_layout_is_exactly_what_the_official_evaluator_reads(tmp_path):
    out = tmp_path / "run"
    assert main(["eval", "--benchmark", "geneval", "--limit", "8", "--out", str(out), *TOY]) == 0
    source = (DATA_DIR / "geneval" / "evaluation_metadata.jsonl").read_text().splitlines()
    images = out / "images"
    assert sorted(p.name for p in images.iterdir()) == [f"{n:05d}" for n in range(8)]
    for n in range(8):
        folder = images / f"{n:05d}"
        assert sorted(p.name for p in folder.iterdir()) == ["metadata.jsonl", "samples"]
        # the N-th line of evaluation_metadata.jsonl, byte for byte
        assert (folder / "metadata.jsonl").read_text() == source[n] + "\n"
        samples = sorted(p.name for p in (folder / "samples").iterdir())
        assert samples == ["0000.png", "0001.png", "0002.png", "0003.png"]
        for name in samples:
            with Image.open(folder / "samples" / name) as image:
                assert image.size == (32, 32) and image.mode == "RGB"
    assert not (out / ".partial").exists()
    summary = json.loads((out / "summary.json").read_text())
    assert summary["prompts"] == 8 and summary["images"] == 32
    assert summary["settings"]["steps"] == 2 and summary["settings"]["protocol"] == "ours"
    seeds = [json.loads(line) for line in (out / "seeds.jsonl").read_text().splitlines()]
    assert [row["seeds"] for row in seeds[:2]] == [[0, 1, 2, 3], [4, 5, 6, 7]]
    assert (out / "summary.md").read_text().startswith("# geneval: 8 prompts, 32 images")
    with Image.open(out / "contact_sheet.png") as sheet:
        assert sheet.width >= 8 * 128 // 2


def test_dpg_grid_crops_back_into_the_four_samples_of_their_recorded_seeds(tmp_path):
    out = tmp_path / "dpg"
    assert main(["eval", "--benchmark", "dpg", "--limit", "2", "--batch-size", "1", "--out", str(out), *TOY]) == 0
    records = load_prompts("dpg")[:2]
    assert sorted(p.name for p in (out / "images").iterdir()) == sorted(f"{r.id}.png" for r in records)
    torch.manual_seed(0)  # the CLI builds the random tiny preset under its --seed (0)
    pipe = DeepGenPipeline.from_preset("tiny")
    settings = resolve_settings(BENCHMARKS["dpg"], pipe, protocol="ours", set_size=1065, height=32, width=32,
                                steps=2)
    for record in records:
        with Image.open(out / "images" / f"{record.id}.png") as grid:
            assert grid.size == (64, 64)  # --resolution 32, --pic-num 4
            # The scorer's crops (benchmarks README: R x R each, top-left, top-right, bottom-left, bottom-right),
            # written out here rather than taken from our writer.
            boxes = [(0, 0, 32, 32), (32, 0, 64, 32), (0, 32, 32, 64), (32, 32, 64, 64)]
            assert dpg_crop_boxes(32) == boxes
            crops = [np.asarray(grid.convert("RGB").crop(box)) for box in boxes]
        side = 32 // pipe.model.vae_scale_factor
        latents = initial_noise(settings, record.index, (pipe.model.latent_channels, side, side))
        expected = pipe(record.prompt, num_images_per_prompt=4, latents=latents, height=32, width=32,
                        num_inference_steps=2, guidance_scale=settings.guidance, progress=False).images
        for k in range(4):
            assert np.array_equal(crops[k], np.asarray(expected[k])), (record.id, k)
        assert len({c.tobytes() for c in crops}) == 4  # four different samples, not one repeated


def test_seeds_depend_on_prompt_and_sample_only(tmp_path):
    pipe = DeepGenPipeline.from_preset("tiny")
    settings = resolve_settings(BENCHMARKS["geneval"], pipe, protocol="official", set_size=553, seed=7)
    assert (settings.height, settings.steps, settings.guidance, settings.samples) == (512, 50, 4.0, 4)
    assert sample_seeds(settings, 3) == [19, 20, 21, 22]
    a = initial_noise(settings, 3, (4, 2, 2))
    assert torch.equal(a[1], torch.randn((4, 2, 2), generator=torch.Generator().manual_seed(20)))
    dpg = resolve_settings(BENCHMARKS["dpg"], pipe, protocol="official", set_size=1065)
    assert dpg.guidance == 7.5
    items = list(range(11))
    parts = [shard(items, r, 3) for r in range(3)]
    assert sorted(sum(parts, [])) == items and sum(len(p) for p in parts) == 11


def test_plain_layout_with_a_user_file_and_resume_refuses_other_settings(tmp_path, capsys):
    prompts = tmp_path / "texts.jsonl"
    prompts.write_text('{"id": "sign", "prompt": "a sign that says \\"OPEN\\"", "category": "one"}\n'
                       '{"id": "poster", "prompt": "a poster", "category": "two"}\n')
    out = tmp_path / "plain"
    args = ["eval", "--benchmark", "custom", "--prompts", str(prompts), "--out", str(out), "--samples", "2", *TOY]
    assert main(args) == 0
    names = sorted(p.name for p in (out / "images").iterdir())
    assert names == ["poster_0.png", "poster_1.png", "prompts.jsonl", "sign_0.png", "sign_1.png"]
    rows = [json.loads(line) for line in (out / "images" / "prompts.jsonl").read_text().splitlines()]
    assert rows[0]["id"] == "sign" and rows[0]["seeds"] == [0, 1] and rows[1]["files"] == ["poster_0.png", "poster_1.png"]
    assert main([*args[:-len(TOY)], "--preset", "tiny", "--steps", "3", "--height", "32", "--width", "32"]) == 2
    assert "--out" in capsys.readouterr().err


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--benchmark", "cvtg"], "--prompts"),
        (["--benchmark", "dpg", "--samples", "2"], "--samples"),
        (["--benchmark", "geneval", "--evaluators", "nope"], "--evaluators"),
        (["--benchmark", "geneval", "--evaluators", "clip"], "--clip-model"),
        (["--benchmark", "geneval", "--scorer-cmd", "python score.py"], "--scorer-cmd"),
        (["--benchmark", "wise", "--prompts", "missing.jsonl"], "--prompts"),
    ],
)
def test_bad_input_is_one_line_naming_the_argument(tmp_path, capsys, argv, message):
    assert main(["eval", *argv, "--out", str(tmp_path / "x"), "--limit", "1", *TOY]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and message in err, err


def test_bad_prompt_file_lines_name_file_and_line(tmp_path):
    path = tmp_path / "p.jsonl"
    path.write_text('{"prompt": "ok"}\n{"id": "x"}\n')
    with pytest.raises(ValueError, match=re.escape(f"--prompts {path}:2")):
        load_prompt_file(path)


def test_batching_and_optimize_mode_change_images_by_rounding_only(tmp_path):
    """The noise is per (prompt, sample): batch size and pipe.optimize mode change pixels by float rounding at most
    (the tiny model masks padding, so a batch's longest prompt does not enter the others' condition)."""
    runs = {}
    for name, extra in (("b1", ["--batch-size", "1"]), ("b3", ["--batch-size", "3"]),
                        ("kernels", ["--batch-size", "3", "--optimize", "kernels"])):
        out = tmp_path / name
        assert main(["eval", "--benchmark", "geneval", "--limit", "3", "--out", str(out), *extra, *TOY]) == 0
        runs[name] = [np.asarray(Image.open(out / "images" / f"{n:05d}" / "samples" / f"{k:04d}.png"), dtype=int)
                      for n in range(3) for k in range(4)]
        assert json.loads((out / "run.json").read_text())["model"]["mode"] == ("kernels" if name == "kernels" else "auto")
    for name in ("b3", "kernels"):
        assert max(int(np.abs(a - b).max()) for a, b in zip(runs["b1"], runs[name])) <= 1, name
    assert len({a.tobytes() for a in runs["b1"]}) == 12


def test_editing_prompts_take_their_source_image(tmp_path):
    from deepgen_components.shapes import ShapesWorld

    source, caption = ShapesWorld(64).t2i_sample(0)
    source.save(tmp_path / "source.png")
    prompts = tmp_path / "edits.jsonl"
    prompts.write_text(json.dumps({"id": "e0", "prompt": "make the background white", "image": "source.png"}) + "\n"
                       + json.dumps({"id": "t0", "prompt": caption}) + "\n")
    out = tmp_path / "edit"
    assert main(["eval", "--benchmark", "custom", "--prompts", str(prompts), "--out", str(out), *TOY]) == 0
    rows = [json.loads(line) for line in (out / "images" / "prompts.jsonl").read_text().splitlines()]
    assert rows[0]["image"] == str(tmp_path / "source.png") and "image" not in rows[1]
    assert {p.name for p in (out / "images").iterdir()} == {"e0.png", "t0.png", "prompts.jsonl"}
    (tmp_path / "source.png").unlink()
    assert main(["eval", "--benchmark", "custom", "--prompts", str(prompts), "--out", str(tmp_path / "again"),
                 *TOY]) == 2
