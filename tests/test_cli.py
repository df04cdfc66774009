"""The ``deepgen`` command line: generate, edit, info, demo (``python -m deepgen_components.cli`` and the
``deepgen`` console script).

The commands run as real subprocesses on the embedded tiny preset (2 denoising steps); they are started
together once per module, since each one pays the torch/transformers/diffusers import. Argument errors and
the official-weights flags are also checked in-process, where a model build costs a fraction of a second.
"""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from PIL import Image
from safetensors.torch import save_file

from deepgen_components import (
    BridgeConfig,
    ConditionedDiT,
    ConnectorConfig,
    DeepGenConfig,
    DeepGenModel,
    DeepGenPipeline,
    LayerSelection,
    StackedChannelBridge,
    ThinkTokens,
)
from deepgen_components.cli import build_parser, main
from deepgen_components.official import to_official_state_dict
from deepgen_components.tiny import tiny_scheduler, tiny_tokenizer, tiny_transformer, tiny_vae, tiny_vlm

CLI = [sys.executable, "-m", "deepgen_components.cli"]
COMMANDS = ("generate", "edit", "info", "demo")


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """Start every subprocess at once, wait for all; name -> (returncode, stdout, stderr, working folder)."""
    work = tmp_path_factory.mktemp("cli")
    Image.new("RGBA", (40, 100), (200, 30, 30, 128)).save(work / "reference.png")
    script = shutil.which("deepgen", path=str(Path(sys.executable).parent)) or shutil.which("deepgen")
    commands = {
        "generate": CLI
        + [
            "generate",
            "a red cat",
            "--steps",
            "2",
            "--height",
            "32",
            "--width",
            "64",
            "--out",
            "out/cat.png",
            "--quiet",
        ],
        "edit": CLI
        + ["edit", "reference.png", "-i", "make it blue", "--steps", "2", "--out", "edited.png", "--quiet"],
        "info": CLI + ["info", "--preset", "deepgen-1.0", "--json"],
        "info_unknown": CLI + ["info", "--preset", "nope"],
        "demo": CLI + ["demo", "--out", "demo", "--steps", "2", "--quiet"],
        "script_help": [script, "--help"] if script else CLI + ["--help"],
    }
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
    processes = {
        name: subprocess.Popen(
            cmd, cwd=work, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
        )
        for name, cmd in commands.items()
    }
    results = {}
    for name, process in processes.items():
        stdout, stderr = process.communicate(timeout=600)
        results[name] = (process.returncode, stdout, stderr, work)
    return results


def succeeded(runs, name):
    code, stdout, stderr, work = runs[name]
    assert code == 0, f"{name} exited with {code}:\n{stderr[-3000:]}"
    return stdout, work


def test_generate_writes_a_png_of_the_requested_size(runs):
    stdout, work = succeeded(runs, "generate")
    path = work / "out" / "cat.png"
    assert f"wrote {Path('out/cat.png')}" in stdout
    with Image.open(path) as image:
        assert image.format == "PNG" and image.size == (64, 32) and image.mode == "RGB"
    assert "timings: condition" in stdout


def test_edit_writes_a_png_sized_like_the_processed_reference(runs):
    stdout, work = succeeded(runs, "edit")
    # A 40 x 100 RGBA reference at image_size 64: long side -> 64, 25.6 -> 32; the output follows it.
    with Image.open(work / "edited.png") as image:
        assert image.format == "PNG" and image.size == (32, 64)
    assert "wrote edited.png" in stdout


def test_info_reports_the_deepgen_1_0_parameter_counts_from_the_meta_device(runs):
    stdout, _ = succeeded(runs, "info")
    info = json.loads(stdout)
    counts = info["parameters"]
    assert counts["vlm"] == pytest.approx(3.755e9, rel=0.01)
    assert counts["scb"] == pytest.approx(0.432e9, rel=0.01)
    assert counts["dit"] == pytest.approx(2.243e9, rel=0.01)
    assert counts["vae"] == pytest.approx(84e6, rel=0.01)
    assert counts["total"] == counts["vlm"] + counts["scb"] + counts["dit"] + counts["vae"]
    assert info["built_on"] == "meta" and info["layers"] == [35, 29, 23, 17, 11, 5]
    assert info["think_tokens"] == 128


def test_info_with_an_unknown_preset_fails_listing_the_presets(runs):
    code, stdout, stderr, _ = runs["info_unknown"]
    assert code == 2 and stderr.count("\n") == 1
    assert "unknown preset 'nope'" in stderr and "presets: deepgen-1.0, deepgen-shapes, small, tiny" in stderr


def test_demo_writes_pngs_and_prints_per_stage_timings(runs):
    stdout, work = succeeded(runs, "demo")
    names = sorted(p.name for p in (work / "demo").iterdir())
    assert names == ["edit_0.png", "generate_0.png", "generate_1.png"]
    for name in names:
        with Image.open(work / "demo" / name) as image:
            assert image.format == "PNG" and image.size == (64, 64)
    for stage in ("generate", "edit"):
        line = next(line for line in stdout.splitlines() if line.startswith(f"{stage}: "))
        assert (
            all(f"{part} " in line for part in ("condition", "denoise", "decode", "total")) and "ms" in line
        )


def test_console_script_help_lists_every_command(runs):
    stdout, _ = succeeded(runs, "script_help")
    assert "usage: deepgen" in stdout
    assert all(command in stdout for command in COMMANDS)


@pytest.mark.parametrize("command", COMMANDS)
def test_every_command_has_help(command, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main([command, "--help"])
    assert exit_info.value.code == 0
    out = capsys.readouterr().out
    assert out.startswith(f"usage: deepgen {command}")
    if command != "info":
        assert "--preset" in out and "--vlm" in out and "--weights" in out and "--vae" in out


def test_bad_sizes_fail_with_the_nearest_valid_sizes(tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["generate", "a cat", "--height", "100", "--steps", "1", "--quiet", "--out", str(tmp_path / "x.png")])
    assert exit_info.value.code == 2
    assert (
        "argument --height: must be a positive multiple of 32, got 100; nearest valid: 96 or 128"
        in capsys.readouterr().err
    )
    assert not (tmp_path / "x.png").exists()


def test_a_missing_reference_image_is_named(tmp_path, capsys):
    assert main(["edit", str(tmp_path / "no_such.png"), "-i", "x", "--quiet"]) == 2
    assert f"deepgen edit: error: image {tmp_path / 'no_such.png'}: no such file" in capsys.readouterr().err


def test_model_sources_are_exclusive():
    args = build_parser().parse_args(["generate", "x", "--preset", "tiny", "--pipeline", "somewhere"])
    with pytest.raises(ValueError, match="choose one model source"):
        args.func(args)
    args = build_parser().parse_args(["generate", "x", "--vlm", "somewhere"])
    with pytest.raises(ValueError, match="--vlm and --weights go together"):
        args.func(args)


def test_official_weights_flags_load_a_release_folder(tmp_path, capsys):
    """--vlm DIR --weights RELEASE_DIR: the same image as the pipeline built from the original model."""
    torch.manual_seed(0)
    tokenizer = tiny_tokenizer()
    vlm = tiny_vlm(tokenizer, seed=0)
    bridge = StackedChannelBridge(
        BridgeConfig(
            num_stacked_layers=1,
            vlm_hidden_size=64,
            context_dim=64,
            pooled_dim=32,
            mask_padding=False,
            # 64 wide: the CLI derives the head count as width / 64 (the official head_dim).
            connector=ConnectorConfig(hidden_size=64, num_layers=1, num_heads=1, intermediate_size=64),
        )
    )
    with torch.no_grad():
        bridge.context_head.weight.normal_(0, 0.05)
        bridge.pooled_head.weight.normal_(0, 0.05)
    model = DeepGenModel(
        vlm,
        ThinkTokens(8, 64),
        LayerSelection.official(4),
        bridge,
        ConditionedDiT(tiny_transformer(seed=1)),
        tiny_vae(seed=2),
        tiny_scheduler(),
        tokenizer,
        DeepGenConfig(),
    ).eval()
    vlm.save_pretrained(tmp_path / "qwen")
    release = tmp_path / "release"
    model.dit.transformer.save_pretrained(release / "transformer")
    model.vae.save_pretrained(release / "vae")
    model.scheduler.save_pretrained(release / "scheduler")
    tokenizer.save_pretrained(release / "tokenizer")
    scb = {
        k: v.contiguous()
        for k, v in to_official_state_dict(model).items()
        if not k.startswith("transformer.")
    }
    save_file(scb, str(release / "deepgen_scb.safetensors"))

    out = tmp_path / "official.png"
    code = main(
        [
            "generate",
            "a red cat",
            "--vlm",
            str(tmp_path / "qwen"),
            "--weights",
            str(release),
            "--steps",
            "2",
            "--height",
            "64",
            "--width",
            "64",
            "--seed",
            "3",
            "--out",
            str(out),
            "--quiet",
        ]
    )
    assert code == 0, capsys.readouterr().err
    reference = DeepGenPipeline(model)
    reference.set_progress_bar_config(disable=True)
    expected = reference(
        "a red cat",
        height=64,
        width=64,
        num_inference_steps=2,
        generator=torch.Generator().manual_seed(3),
    ).images[0]
    with Image.open(out) as image:
        assert list(image.getdata()) == list(expected.getdata())


def test_the_shapes_preset_loads_through_diffusers_from_pretrained():
    """``deepgen demo`` (and every --preset deepgen-shapes command) reads the shipped folder with diffusers'
    DiffusionPipeline.from_pretrained: a DeepGenPipeline with the very weights builders.deepgen_shapes reads."""
    from diffusers import DiffusionPipeline

    from deepgen_components.builders import build_preset
    from deepgen_components.cli.args import load_pipeline

    pipe = load_pipeline(build_parser().parse_args(["demo", "--preset", "deepgen-shapes"]))
    assert isinstance(pipe, DiffusionPipeline) and isinstance(pipe, DeepGenPipeline)
    assert str(pipe.name_or_path).endswith("preset")  # diffusers recorded where it loaded from
    ours, theirs = build_preset("deepgen-shapes").state_dict(), pipe.model.state_dict()
    assert set(ours) == set(theirs) and all(torch.equal(ours[k], theirs[k]) for k in ours)
