"""Bad input to every ``deepgen`` subcommand: one line ``deepgen CMD: error: ...`` naming the argument (or the config
key with its file and line, or the override), a non-zero exit code, and nothing written where the output would go.

The table runs in-process through ``main(argv)`` (most rows fail before a model is built); a few rows also run as
real subprocesses to prove the exit code and that stderr holds exactly that one line, no traceback.
"""

import argparse
import os
import subprocess
import sys
from pathlib import Path

import pytest
from PIL import Image

from deepgen_components.cli import build_parser, main, write_images

CONFIG = Path(__file__).resolve().parents[1] / "training" / "configs" / "align_tiny.yaml"
TINY = ["--preset", "tiny"]

# (id, argv, expected substring of the error line, exit code); {tmp} is a fresh folder, {file} an existing plain file
# (so "{file}/x" cannot be created, whoever runs the test: root ignores permission bits), {out} the output path
# that must not exist afterwards, {notimage} a text file named .png, {badyaml} a malformed YAML config,
# {lryaml} a config whose optim.lr is "abc".
CASES = [
    # generate
    ("generate-out-under-a-file", ["generate", "a cat", *TINY, "--out", "{file}/x.png"],
     "--out {file}/x.png: {file} is a file, not a folder", 2),
    ("generate-out-unknown-extension", ["generate", "a cat", *TINY, "--out", "{out}.foo"],
     "--out {out}.foo: unknown image extension '.foo'", 2),
    ("generate-out-is-a-folder", ["generate", "a cat", *TINY, "--out", "{tmp}"], "--out {tmp}: is a folder", 2),
    ("generate-empty-prompt", ["generate", "", *TINY, "--out", "{out}"], "argument prompt: is empty", 2),
    ("generate-blank-prompt", ["generate", "   ", *TINY, "--out", "{out}"], "argument prompt: is empty", 2),
    ("generate-negative-guidance", ["generate", "a cat", *TINY, "--guidance", "-3", "--out", "{out}"],
     "argument --guidance: must be a finite number >= 0 (1 = no CFG), got -3", 2),
    ("generate-nan-guidance", ["generate", "a cat", *TINY, "--guidance", "nan", "--out", "{out}"],
     "argument --guidance: must be a finite number >= 0", 2),
    ("generate-height-not-multiple-of-32", ["generate", "a cat", *TINY, "--height", "100", "--out", "{out}"],
     "argument --height: must be a positive multiple of 32, got 100; nearest valid: 96 or 128", 2),
    ("generate-height-beyond-the-dit", ["generate", "a cat", *TINY, "--height", "2048", "--steps", "1", "--quiet",
                                       "--out", "{out}"],
     "height must be at most 1024", 2),
    ("generate-zero-steps", ["generate", "a cat", *TINY, "--steps", "0", "--out", "{out}"],
     "argument --steps: must be >= 1, got 0", 2),
    ("generate-steps-not-a-number", ["generate", "a cat", *TINY, "--steps", "many", "--out", "{out}"],
     "argument --steps: expected an integer >= 1, got 'many'", 2),
    ("generate-zero-images", ["generate", "a cat", *TINY, "--num-images", "0", "--out", "{out}"],
     "argument --num-images: must be >= 1", 2),
    ("generate-negative-seed", ["generate", "a cat", *TINY, "--seed", "-1", "--out", "{out}"],
     "argument --seed: must be in 0..2**64-1", 2),
    ("generate-huge-seed", ["generate", "a cat", *TINY, "--seed", str(2**64), "--out", "{out}"],
     "argument --seed: must be in 0..2**64-1", 2),
    ("generate-unknown-device", ["generate", "a cat", *TINY, "--device", "nope", "--out", "{out}"],
     "--device nope: not a torch device", 2),
    ("generate-unknown-preset", ["generate", "a cat", "--preset", "nope", "--out", "{out}"],
     "--preset: unknown preset 'nope'; presets: deepgen-1.0, deepgen-shapes, small, tiny", 2),
    ("generate-missing-pipeline", ["generate", "a cat", "--pipeline", "{tmp}/nowhere", "--out", "{out}"],
     "--pipeline {tmp}/nowhere: no model_index.json there", 2),
    ("generate-two-model-sources", ["generate", "a cat", *TINY, "--pipeline", "{tmp}", "--out", "{out}"],
     "choose one model source", 2),
    ("generate-vlm-without-weights", ["generate", "a cat", "--vlm", "{tmp}", "--out", "{out}"],
     "--vlm and --weights go together", 2),
    ("generate-unknown-flag", ["generate", "a cat", "--colour", "red", "--out", "{out}"],
     "unrecognized arguments: --colour red", 2),
    # edit
    ("edit-not-an-image", ["edit", "{notimage}", "-i", "make it blue", *TINY, "--out", "{out}"],
     "image {notimage}: not a readable image", 2),
    ("edit-missing-image", ["edit", "{tmp}/missing.png", "-i", "make it blue", *TINY, "--out", "{out}"],
     "image {tmp}/missing.png: no such file", 2),
    ("edit-a-folder-as-image", ["edit", "{tmp}", "-i", "make it blue", *TINY, "--out", "{out}"],
     "image {tmp}: is a folder, not an image file", 2),
    ("edit-empty-instruction", ["edit", "{notimage}", "-i", "", *TINY, "--out", "{out}"],
     "argument --instruction/-i: is empty", 2),
    ("edit-out-under-a-file", ["edit", "{notimage}", "-i", "make it blue", *TINY, "--out", "{file}/e.png"],
     "--out {file}/e.png: {file} is a file", 2),
    # info
    ("info-unknown-preset", ["info", "--preset", "nope"], "--preset: unknown preset 'nope'", 2),
    ("info-unknown-flag", ["info", "--yaml"], "unrecognized arguments: --yaml", 2),
    # demo
    ("demo-out-is-a-file", ["demo", *TINY, "--out", "{file}"], "--out {file}: exists and is not a folder", 2),
    ("demo-zero-steps", ["demo", *TINY, "--steps", "0", "--out", "{out}"], "argument --steps: must be >= 1", 2),
    ("demo-empty-prompt", ["demo", *TINY, "--prompt", "", "--out", "{out}"], "argument --prompt: is empty", 2),
    ("demo-negative-guidance", ["demo", *TINY, "--guidance", "-1", "--out", "{out}"],
     "argument --guidance: must be a finite number >= 0", 2),
    # export
    ("export-out-under-a-file", ["export", *TINY, "--out", "{file}/exported", "--quiet"],
     "--out {file}/exported: {file} is a file, not a folder", 2),
    ("export-unknown-stage", ["export", *TINY, "--out", "{out}", "--stages", "dit,unet"],
     "--stages: unknown stage(s) unet; stages: condition_encoder", 2),
    ("export-size-not-multiple-of-32", ["export", *TINY, "--out", "{out}", "--min-size", "100"],
     "argument --min-size: must be a positive multiple of 32", 2),
    ("export-min-above-max", ["export", *TINY, "--out", "{out}", "--min-size", "512", "--max-size", "256"],
     "--min-size 512 must be <= --max-size 256", 2),
    ("export-zero-batch", ["export", *TINY, "--out", "{out}", "--max-batch", "0"],
     "argument --max-batch: must be >= 1", 2),
    ("export-bad-tensorrt-version", ["export", *TINY, "--out", "{out}", "--tensorrt-version", "latest"],
     "--tensorrt-version: expected a version like 10.15 or 11.4.0, got 'latest'", 2),
    ("export-optimization-level-above-5", ["export", *TINY, "--out", "{out}", "--optimization-level", "6"],
     "--optimization-level: must be in 0..5, got 6", 2),
    # train
    ("train-malformed-yaml", ["train", "--config", "{badyaml}", "--out", "{out}"],
     "{badyaml}:3:7: invalid YAML: expected ',' or ']', but got ':'", 2),
    ("train-malformed-override", ["train", "--config", str(CONFIG), "--out", "{out}", "optim.lr=[1,"],
     "override 'optim.lr=[1,': the value is not valid YAML", 2),
    ("train-lr-not-a-number-in-file", ["train", "--config", "{lryaml}", "--out", "{out}"],
     "{lryaml}:3: optim.lr: expected a number, got 'abc' (text)", 2),
    ("train-lr-not-a-number-override", ["train", "--config", str(CONFIG), "--out", "{out}", "optim.lr=abc"],
     "override 'optim.lr=abc': optim.lr: expected a number, got 'abc'", 2),
    ("train-key-under-a-number", ["train", "--config", str(CONFIG), "--out", "{out}", "optim.lr.warmup=3"],
     "override 'optim.lr.warmup=3': optim.lr is number 0.001, not a section with keys", 2),
    ("train-list-index-out-of-range", ["train", "--config", str(CONFIG), "--out", "{out}", "data.sources.7.repeat=2"],
     "override 'data.sources.7.repeat=2': data.sources is a list of 2", 2),
    ("train-unknown-schedule", ["train", "--config", str(CONFIG), "--out", "{out}", "optim.schedule=linear"],
     "optim.schedule: must be one of cosine, constant, got 'linear'", 2),
    ("train-fractional-steps", ["train", "--config", str(CONFIG), "--out", "{out}", "trainer.max_steps=2.5"],
     "trainer.max_steps: expected an integer, got 2.5", 2),
    ("train-unknown-key", ["train", "--config", str(CONFIG), "--out", "{out}", "optim.learning_rate=1"],
     "unknown keys ['learning_rate']", 2),
    ("train-missing-config", ["train", "--config", "{tmp}/none.yaml", "--out", "{out}"],
     "config not found: {tmp}/none.yaml", 2),
    ("train-out-under-a-file", ["train", "--config", str(CONFIG), "--out", "{file}/run"],
     "--out {file}/run: {file} is a file", 2),
    ("train-zero-max-steps", ["train", "--config", str(CONFIG), "--max-steps", "0", "--out", "{out}"],
     "argument --max-steps: must be >= 1", 2),
    # bench
    ("bench-unknown-mode", ["bench", "--modes", "eager,turbo", "--device", "cpu", "--out", "{out}"],
     "--modes: unknown mode(s) turbo", 2),
    ("bench-resolution-not-multiple-of-32", ["bench", "--resolution", "50", "--out", "{out}"],
     "argument --resolution: must be a positive multiple of 32, got 50", 2),
    ("bench-sweep-not-integers", ["bench", "--device", "cpu", "--resolutions", "64,big", "--out", "{out}"],
     "--resolutions 64,big: expected a comma list of integers", 2),
    ("bench-out-under-a-file", ["bench", "--device", "cpu", "--out", "{file}/bench"],
     "--out {file}/bench: {file} is a file", 2),
    ("bench-unknown-memory-mode", ["bench", "--memory-mode", "disk", "--out", "{out}"],
     "argument --memory-mode: invalid choice: 'disk'", 2),
    # shapes
    ("shapes-set-not-an-integer", ["shapes", "--quick", "--out", "{out}", "--set", "base.dit_steps=many"],
     "--set base.dit_steps: 'many' is not a int", 2),
    ("shapes-set-bad-stage-value", ["shapes", "--quick", "--out", "{out}", "--set", "sft.optim.lr=abc"],
     "--set 'sft.optim.lr=abc': optim.lr: expected a number", 2),
    ("shapes-set-without-part", ["shapes", "--quick", "--out", "{out}", "--set", "steps=3"],
     "--set: expected PART.KEY=VALUE", 2),
    ("shapes-zero-eval-steps", ["shapes", "--quick", "--out", "{out}", "--eval-steps", "0"],
     "argument --eval-steps: must be >= 1", 2),
    ("shapes-rl-from-not-a-pipeline", ["shapes", "--out", "{out}", "--rl-from", "{tmp}"],
     "--rl-from {tmp}: no model_index.json there", 2),
    ("shapes-rl-from-with-a-base", ["shapes", "--out", "{out}", "--rl-from", "deepgen-shapes", "--base-from", "{tmp}"],
     "--rl-from runs stage 3 alone: it takes no --base-from or --eval-start", 2),
    ("shapes-rl-from-with-a-stage-2-set", ["shapes", "--out", "{out}", "--rl-from", "deepgen-shapes", "--set",
                                          "sft.optim.lr=1"],
     "--rl-from runs stage 3 alone: only --set rl.KEY=VALUE applies", 2),
    ("shapes-out-under-a-file", ["shapes", "--quick", "--out", "{file}/run"], "--out {file}/run: {file} is a file", 2),
    # eval
    ("eval-unknown-benchmark", ["eval", "--benchmark", "nope", "--out", "{out}"],
     "argument --benchmark: invalid choice: 'nope'", 2),
    ("eval-zero-limit", ["eval", "--benchmark", "geneval", "--preset", "tiny", "--limit", "0", "--out", "{out}"],
     "argument --limit: must be >= 1, got 0", 2),
    ("eval-missing-prompts", ["eval", "--benchmark", "custom", "--prompts", "{tmp}/none.jsonl", "--preset", "tiny",
                              "--out", "{out}"], "--prompts {tmp}/none.jsonl: no such file", 2),
    ("eval-out-under-a-file", ["eval", "--benchmark", "geneval", "--preset", "tiny", "--out", "{file}/ev"],
     "--out {file}/ev: {file} is a file", 2),
    # convert (a checkpoint without config, and an existing output with a real checkpoint: tests/test_convert.py)
    ("convert-unknown-target", ["convert", "--to", "onnx", "{tmp}", "{tmp}/o.safetensors"],
     "argument --to: invalid choice: 'onnx'", 2),
    ("convert-missing-checkpoint", ["convert", "--to", "official", "{tmp}/nowhere", "{tmp}/o.safetensors"],
     "CHECKPOINT {tmp}/nowhere: no such file or folder; expected a checkpoint folder (state.json)", 2),
    ("convert-not-a-checkpoint", ["convert", "--to", "official", "{tmp}", "{tmp}/o.safetensors"],
     "CHECKPOINT {tmp}: not a checkpoint folder (state.json), a run folder (checkpoints/) or a saved pipeline", 2),
    ("convert-official-not-safetensors", ["convert", "--to", "official", "{tmp}", "{tmp}/o.bin"],
     "OUT {tmp}/o.bin: --to official writes one .safetensors file; got '.bin'", 2),
    ("convert-existing-output", ["convert", "--to", "pipeline", "{tmp}", "{tmp}"],
     "OUT {tmp}: exists; pass --overwrite to replace it", 2),
    ("convert-out-under-a-file", ["convert", "--to", "pipeline", "{tmp}", "{file}/pipe"],
     "OUT {file}/pipe: {file} is a file, not a folder", 2),
    # data convert ({badyaml} stands for an input that is not JSON; converted data lists: tests/test_data_convert.py)
    ("data-unknown-format", ["data", "convert", "--format", "laion", "{file}", "--images-root", "{tmp}", "--out",
                             "{out}.jsonl"],
     "--format laion: unknown format; the official data lists are: caption (CaptionDataset), blip3o", 2),
    ("data-missing-input", ["data", "convert", "--format", "edit", "{tmp}/none.json", "--images-root", "{tmp}",
                            "--out", "{out}.jsonl"],
     "INPUT {tmp}/none.json: no such file or folder; expected an official data list (.json)", 2),
    ("data-input-not-json", ["data", "convert", "--format", "edit", "{badyaml}", "--images-root", "{tmp}",
                             "--out", "{out}.jsonl"],
     "INPUT {badyaml}: expected a .json data list, a folder of them or a .jsonl file; got '.yaml'", 2),
    ("data-input-folder-without-lists", ["data", "convert", "--format", "caption", "{tmp}", "--images-root", "{tmp}",
                                         "--out", "{out}.jsonl"],
     "INPUT {tmp}: a folder without *.json data lists", 2),
    ("data-missing-images-root", ["data", "convert", "--format", "edit", "{file}", "--images-root", "{tmp}/no",
                                  "--out", "{out}.jsonl"], "--images-root {tmp}/no: no such folder", 2),
    ("data-task-mismatch", ["data", "convert", "--format", "blip3o", "{file}", "--images-root", "{tmp}", "--task",
                            "edit", "--out", "{out}.jsonl"],
     "--task edit: format 'blip3o' (BLIP3oDataset) holds t2i samples", 2),
    ("data-caption-key-on-another-format", ["data", "convert", "--format", "edit", "{file}", "--images-root",
                                            "{tmp}", "--caption-key", "prompt", "--out", "{out}.jsonl"],
     "--captions-root / --caption-key: only for --format caption", 2),
    ("data-out-not-jsonl", ["data", "convert", "--format", "edit", "{file}", "--images-root", "{tmp}", "--out",
                            "{out}"], "--out {out}: the manifest is JSON Lines; give a .jsonl file name, got '.png'", 2),
    ("data-existing-output", ["data", "convert", "--format", "edit", "{file}", "--images-root", "{tmp}", "--out",
                              "{file}"], "--out {file}: exists; pass --overwrite to replace it", 2),
    ("data-out-under-a-file", ["data", "convert", "--format", "edit", "{file}", "--images-root", "{tmp}", "--out",
                               "{file}/m.jsonl"], "--out {file}/m.jsonl: {file} is a file, not a folder", 2),
]
SUBCOMMANDS = ("generate", "edit", "info", "demo", "export", "train", "convert", "bench", "shapes", "eval", "data")


@pytest.fixture
def places(tmp_path):
    """The values of the table's placeholders, in a fresh folder per row."""
    plain = tmp_path / "plain.txt"
    plain.write_text("a plain file\n")
    notimage = tmp_path / "notes.png"
    notimage.write_text("not an image\n")
    badyaml = tmp_path / "bad.yaml"
    badyaml.write_text("stage: align\nmodel: [tiny\n  seed: 0\n")
    lryaml = tmp_path / "lr.yaml"
    lryaml.write_text('stage: align\noptim:\n  lr: "abc"\n')
    return {"tmp": str(tmp_path), "file": str(plain), "out": str(tmp_path / "out" / "result.png"),
            "notimage": str(notimage), "badyaml": str(badyaml), "lryaml": str(lryaml)}


def fill(values, places):
    return [v.format(**places) for v in values] if isinstance(values, list) else values.format(**places)


def run_main(argv, capsys) -> tuple[int, str]:
    try:
        code = main(argv)
    except SystemExit as stop:  # argparse errors exit through SystemExit
        code = stop.code
    return code, capsys.readouterr().err


def test_every_subcommand_has_bad_input_rows():
    assert {argv[0] for _, argv, _, _ in CASES} == set(SUBCOMMANDS)
    parser = build_parser()
    subparsers = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    assert set(subparsers.choices) == set(SUBCOMMANDS)  # a new subcommand needs rows here


@pytest.mark.parametrize(("argv", "expected", "code"), [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_bad_input_is_one_line_naming_the_argument(argv, expected, code, places, capsys):
    before = sorted(p.relative_to(places["tmp"]) for p in Path(places["tmp"]).rglob("*"))
    exit_code, stderr = run_main(fill(argv, places), capsys)
    lines = [line for line in stderr.splitlines() if line.strip()]
    assert exit_code == code, stderr
    assert len(lines) == 1, stderr
    assert lines[0].startswith(f"deepgen {argv[0]}: error: "), lines[0]
    assert fill(expected, places) in lines[0]
    # Nothing written: the output path does not exist and the folder holds exactly what it held before.
    assert not Path(places["out"]).exists() and not Path(places["out"]).parent.exists()
    assert sorted(p.relative_to(places["tmp"]) for p in Path(places["tmp"]).rglob("*")) == before


def test_a_failed_write_leaves_no_partial_file(tmp_path):
    """write_images renames into place only after every image is saved: a failure on the second image leaves
    neither the first image nor a temporary file nor the folder it created."""
    blocker = tmp_path / "blocker"
    blocker.write_text("a file where a folder would go")
    images = [Image.new("RGB", (8, 8), (200, 0, 0)), Image.new("RGB", (8, 8), (0, 0, 200))]
    first = tmp_path / "new" / "first.png"
    with pytest.raises(OSError):
        write_images([(images[0], first), (images[1], blocker / "second.png")])
    assert sorted(p.name for p in tmp_path.iterdir()) == ["blocker"]
    write_images([(images[0], first)])
    assert sorted(p.name for p in first.parent.iterdir()) == ["first.png"]


def test_debug_shows_the_traceback(places, capsys):
    with pytest.raises(ValueError, match="unknown preset 'nope'"):
        main(["--debug", "info", "--preset", "nope"])


# Real processes: the exit code a shell sees, and stderr that is exactly one line (no traceback).
SUBPROCESS_CASES = ("generate-out-under-a-file", "train-malformed-yaml", "edit-not-an-image", "export-unknown-stage")


def test_real_processes_print_one_line_and_exit_2(places):
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
    cases = {c[0]: c for c in CASES if c[0] in SUBPROCESS_CASES}
    processes = {
        name: subprocess.Popen([sys.executable, "-m", "deepgen_components.cli", *fill(argv, places)],
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
        for name, (_, argv, _, _) in cases.items()
    }
    for name, process in processes.items():
        _, stderr = process.communicate(timeout=300)
        _, argv, expected, code = cases[name]
        assert process.returncode == code, f"{name}: {stderr}"
        assert stderr.count("\n") == 1 and stderr.startswith(f"deepgen {argv[0]}: error: "), f"{name}: {stderr}"
        assert fill(expected, places) in stderr and "Traceback" not in stderr
    assert not Path(places["out"]).exists()
