"""``deepgen shapes``: the shapes-world chain (base models -> stages 1-3 -> held-out evaluation after each).

The chain runs for real at its ``--quick`` budgets (a few optimiser steps per part, 2 Euler steps in the
evaluations), so these tests check the plumbing — every stage trains through our recipes, hands its
checkpoint to the next, is evaluated on the fixed prompt set, resumes — not the accuracy numbers, which need
full runs (docs/shapes.md; the shipped preset's accuracy is tested in test_shapes_preset.py). The base-model
pieces are checked against the properties the chain relies on.
"""

import json
import math
from dataclasses import fields
from pathlib import Path

import pytest
import torch
from PIL import Image

from deepgen_components.cli import main
from deepgen_components.cli.shapes import CONFIGS as SHAPES_CONFIGS
from deepgen_components.cli.shapes import QUICK_OVERRIDES, STAGES, parse_sets, run_shapes
from deepgen_components.shapes import ShapesWorld, parse_instruction
from deepgen_components.shapes.base import (
    ShapesBaseConfig,
    latent_foreground,
    make_shapes_data,
    shapes_tokenizer,
)
from deepgen_components.shapes.evaluation import eval_set
from deepgen_components.shapes.teacher import PromptEncoder

ROWS = [
    "base DiT (own prompt encoder)",
    "stage-1 start (zero heads)",
    "after stage 1 (align)",
    "after stage 2 (sft)",
    "after stage 3 (rl)",
]


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory):
    torch.set_num_threads(max(1, min(2, torch.get_num_threads())))
    out = tmp_path_factory.mktemp("shapes")
    report = run_shapes(out, quick=True, eval_start=True)
    return out, report


def test_quick_overrides_name_real_config_fields():
    names = {f.name for f in fields(ShapesBaseConfig)}
    assert set(QUICK_OVERRIDES["base"]) <= names


def test_every_stage_trains_and_is_evaluated_on_the_fixed_set(quick_run):
    out, report = quick_run
    assert list(report["results"]) == ROWS
    for stage in STAGES:
        assert (out / stage / "pipeline" / "model_index.json").is_file(), stage
        assert (out / stage / "checkpoints").is_dir(), stage
    evals = eval_set(heldout=QUICK_OVERRIDES["eval"]["heldout"], seen=QUICK_OVERRIDES["eval"]["seen"],
                     edits=QUICK_OVERRIDES["eval"]["edits"])
    for name, scores in report["results"].items():
        assert scores["n_t2i"] == len(evals.prompts) and scores["n_edits"] == len(evals.edits), name
        for attribute in ("color", "shape", "position", "background", "all"):
            assert 0.0 <= scores["t2i"][attribute] <= 1.0, (name, attribute)
    # each stage starts from the previous one: stage 2's config points at stage 1's checkpoints, stage 3's at 2's
    sft = (out / "sft" / "config.yaml").read_text()
    rl = (out / "rl" / "config.yaml").read_text()
    assert str(out / "align" / "checkpoints") in sft and str(out / "sft" / "checkpoints") in rl
    on_disk = json.loads((out / "report.json").read_text())
    assert on_disk["table"] == report["table"] and (out / "report.md").read_text().startswith("| model |")
    for grid in ("t2i_heldout.png", "edits_heldout.png", "legend.json"):
        assert (out / "images" / grid).is_file(), grid


def test_a_finished_run_is_not_retrained(quick_run):
    out, _ = quick_run
    stamps = {stage: (out / stage / "pipeline" / "model_index.json").stat().st_mtime_ns for stage in STAGES}
    base = (out / "base" / "pipeline" / "model_index.json").stat().st_mtime_ns
    report = run_shapes(out, quick=True)
    assert list(report["results"]) == ROWS
    assert stamps == {stage: (out / stage / "pipeline" / "model_index.json").stat().st_mtime_ns for stage in STAGES}
    assert base == (out / "base" / "pipeline" / "model_index.json").stat().st_mtime_ns


def test_the_cli_resumes_the_chain_and_prints_the_table(quick_run, capsys):
    out, _ = quick_run
    assert main(["shapes", "--out", str(out), "--quick", "--threads", "1"]) == 0
    printed = capsys.readouterr().out
    assert "| after stage 3 (rl) |" in printed and "[eval] after stage 1 (align)" in printed


def test_install_copies_the_final_pipeline_with_the_scales_it_was_measured_at(quick_run, tmp_path):
    """``--install`` puts run/rl/pipeline into the package folder as deepgen-shapes with the run's results; the
    preset's default CFG scales are those of the final evaluation (T2I 4, edits 1 by default)."""
    from deepgen_components.cli.shapes import install_preset
    from deepgen_components.pipeline import DeepGenPipeline

    out, report = quick_run
    settings = report["results"]["after stage 3 (rl)"]["settings"]
    assert (settings["guidance"], settings["edit_guidance"]) == (4.0, 1.0)
    target = install_preset(out, package_dir=tmp_path)
    assert target == tmp_path / "deepgen-shapes" and not (tmp_path / "deepgen-shapes.tmp").exists()
    # A resumed run re-evaluates (new seconds): compare with the report on disk.
    installed = json.loads((target / "training_report.json").read_text())
    assert installed["results"] == json.loads((out / "report.json").read_text())["results"]
    assert list(installed["results"]) == ROWS
    model = DeepGenPipeline.from_pretrained(target).model
    assert (model.config.guidance_scale, model.config.edit_guidance_scale) == (4.0, 1.0)
    final = DeepGenPipeline.from_pretrained(out / "rl" / "pipeline").model.state_dict()
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in final.items())
    with pytest.raises(FileNotFoundError, match="no final pipeline"):
        install_preset(tmp_path / "not_a_run", package_dir=tmp_path)


def test_the_prompt_encoders_null_condition_is_what_a_zero_head_bridge_gives():
    """"" -> all-zero context and pooled vector: a fresh SCB (zero heads) hands the base DiT exactly the
    unconditional input it was pretrained with, so stage 1 starts from the unconditional model."""
    torch.manual_seed(0)
    tokenizer = shapes_tokenizer()
    encoder = PromptEncoder(len(tokenizer), 16, 8)
    ids, mask = encoder.tokenize(tokenizer, ["a red circle on the left on a gray background", ""])
    context, pooled, context_mask = encoder(ids, mask, null_lengths=torch.tensor([1, 3]))
    assert context[1].abs().max() == 0 and pooled[1].abs().max() == 0
    assert context[0].abs().max() > 0 and pooled[0].abs().max() > 0
    assert context_mask[1].sum() == 3 and context_mask[0].sum() == mask[0].sum() + 1


def test_the_world_tokenizer_keeps_world_words_whole_and_still_encodes_other_text():
    tokenizer = shapes_tokenizer()
    caption = ShapesWorld(64).t2i_sample(0)[1]
    ids = tokenizer(caption, add_special_tokens=False)["input_ids"]
    assert len(ids) == len(caption.split())
    other = "Zebra 42 ünïcode"
    assert tokenizer.decode(tokenizer(other, add_special_tokens=False)["input_ids"]) == other
    assert tokenizer.padding_side == "left"


def test_latent_foreground_marks_the_cells_a_shape_covers():
    world = ShapesWorld(64, seed=0)
    image, _ = world.t2i_sample(0)
    pixels = torch.from_numpy(__import__("numpy").asarray(image, dtype="float32")).permute(2, 0, 1)[None] / 127.5 - 1
    cells = latent_foreground(pixels, 4)
    assert cells.shape == (1, 1, 16, 16)
    assert 0 < float((cells > 0).float().mean()) < 0.5  # the shape, dilated by a cell, not the background


def test_edit_add_share_draws_that_share_of_the_base_triplets_from_add_alone():
    def kinds(share):
        cfg = ShapesBaseConfig(t2i_images=2, edit_triplets=40, edit_add_share=share)
        data = make_shapes_data(cfg)
        assert data.edit_sources.shape[0] == data.edit_targets.shape[0] == len(data.instructions) == 40
        return [parse_instruction(text).kind for text in data.instructions]

    plain, mixed = kinds(0.0), kinds(0.5)
    assert mixed[:20] == plain[:20]  # the uniform part is the same stream
    assert all(kind == "add" for kind in mixed[20:])
    assert len(set(plain)) > 2  # uniform over the kinds
    with pytest.raises(ValueError, match="edit_add_share"):
        make_shapes_data(ShapesBaseConfig(t2i_images=1, edit_triplets=2, edit_add_share=1.5))


def test_set_overrides_are_typed_and_routed_to_their_part():
    base, stages = parse_sets(["base.dit_steps=8000", "base.dit_lr=5e-4", "base.dit_dual_layers=0,1,2",
                               "base.dit_latents=sample", "align.trainer.max_steps=3000", "rl.rl.num_steps=7"])
    assert base == {"dit_steps": 8000, "dit_lr": 5e-4, "dit_dual_layers": (0, 1, 2), "dit_latents": "sample"}
    assert stages == {"align": ["trainer.max_steps=3000"], "sft": [], "rl": ["rl.num_steps=7"]}
    assert ShapesBaseConfig(**base).dit_steps == 8000


@pytest.mark.parametrize(
    ("item", "message"),
    [("dit_steps=5", "PART.KEY=VALUE"), ("base.dit_steps", "PART.KEY=VALUE"), ("base.nope=1", "unknown base field"),
     ("base.dit_steps=many", "is not a int"), ("vae.steps=3", "PART must be one of")],
)
def test_bad_set_overrides_name_the_argument(item, message):
    with pytest.raises(ValueError, match=message) as err:
        parse_sets([item])
    assert "--set" in str(err.value)


def test_set_overrides_reach_the_base_models_and_the_stage_configs(tmp_path):
    torch.set_num_threads(max(1, min(2, torch.get_num_threads())))
    report = run_shapes(tmp_path, quick=True, sets=["base.dit_steps=3", "align.trainer.max_steps=3",
                                                    "sft.optim.lr=0.001"])
    assert report["sets"] == ["base.dit_steps=3", "align.trainer.max_steps=3", "sft.optim.lr=0.001"]
    assert report["device"] == "cpu"
    assert "stage-1 start (zero heads)" not in report["results"]  # evaluated only with --eval-start
    assert report["base"]["config"]["dit_steps"] == 3 and report["base"]["dit"]["step"] == 3
    align = (tmp_path / "align" / "config.yaml").read_text()
    assert "max_steps: 3\n" in align
    assert "lr: 0.001\n" in (tmp_path / "sft" / "config.yaml").read_text()


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_the_quick_chain_runs_on_cuda(tmp_path):
    report = run_shapes(tmp_path, quick=True, device="cuda")  # without --eval-start: no stage-1 start row
    assert list(report["results"]) == [r for r in ROWS if "start" not in r] and report["device"] == "cuda"
    assert "device: cuda" in (tmp_path / "align" / "config.yaml").read_text()


def test_the_prompt_encoder_teacher_is_the_base_dit_under_its_own_encoder(quick_run, tmp_path):
    """Stage 1 with ``teacher: {kind: prompt_encoder}``: the target is the base DiT's velocity under its prompt
    encoder."""
    from deepgen_components.training.config import load_config
    from deepgen_components.training.trainer import train

    from deepgen_components.shapes.teacher import PromptEncoderPipeline, PromptEncoderTeacher

    out, _ = quick_run
    teacher = PromptEncoderTeacher.from_base(out / "base")
    base = PromptEncoderPipeline.from_base(out / "base")
    prompts = ["a red circle on the left on a gray background", ""]
    noisy = torch.randn(2, 16, 16, 16, generator=torch.Generator().manual_seed(0))
    timesteps = torch.tensor([900.0, 300.0])
    tokens, mask = base.encoder.tokenize(base.tokenizer, prompts)
    context, pooled, context_mask = base.encoder(tokens, mask)
    expected = base.dit(noisy, timesteps, context, pooled, None, context_mask=context_mask)
    torch.testing.assert_close(teacher(noisy, timesteps, prompts), expected)
    assert not any(p.requires_grad for p in teacher.dit.parameters())

    cfg = load_config(SHAPES_CONFIGS / "align_shapes.yaml", [
        f"model.pipeline={out / 'base' / 'pipeline'}", f"teacher.options.base={out / 'base'}",
        f"out={tmp_path / 'align'}", "trainer.max_steps=2", "data.batch_size=2", "trainer.tensorboard=false"])
    result = train(cfg, out=tmp_path / "align")
    assert result.steps == 2 and result.final_loss is not None and math.isfinite(result.final_loss)
    with pytest.raises(FileNotFoundError, match="teacher.options.base"):
        PromptEncoderTeacher.from_base(tmp_path)


def test_the_teacher_hook_builds_the_registered_kind_and_names_a_wrong_one(quick_run):
    """``teacher: {kind, target, features, options}``: the shapes world registers ``prompt_encoder`` (its base DiT
    under its own prompt encoder, from ``options.base``); an unknown kind or option is named."""
    from deepgen_components.training.config import TeacherConfig
    from deepgen_components.training.teacher import Teacher, available_teachers, build_teacher

    from deepgen_components.shapes.teacher import PromptEncoderTeacher

    out, _ = quick_run
    assert "prompt_encoder" in available_teachers()
    teacher = build_teacher(TeacherConfig("prompt_encoder", target=False, features=0.5,
                                          options={"base": str(out / "base")}), "cpu")
    assert isinstance(teacher, PromptEncoderTeacher) and isinstance(teacher, Teacher)
    assert teacher.target is False and teacher.feature_weight == 0.5
    with pytest.raises(ValueError, match=r"teacher.kind: unknown teacher kind 'nope'; known: .*prompt_encoder.*"
                                         r"deepgen_components.shapes is imported"):
        build_teacher(TeacherConfig("nope"))
    with pytest.raises(ValueError, match="teacher.options: missing 'base'"):
        build_teacher(TeacherConfig("prompt_encoder"))
    with pytest.raises(ValueError, match=r"teacher.options: unknown keys \['path'\]; accepted: base"):
        build_teacher(TeacherConfig("prompt_encoder", options={"base": "x", "path": "y"}))


def test_base_from_reuses_another_runs_base_models(quick_run, tmp_path):
    out, _ = quick_run
    with pytest.raises(FileNotFoundError, match="base_from"):
        run_shapes(tmp_path / "bad", quick=True, base_from=tmp_path)
    report = run_shapes(tmp_path / "reuse", quick=True, base_from=out)
    assert report["base_from"] == str(out / "base")
    for name in ("pipeline/transformer/config.json", "prompt_encoder.pt"):
        assert (tmp_path / "reuse" / "base" / name).read_bytes() == (out / "base" / name).read_bytes()
    assert "base dit" not in report["seconds"]  # nothing was trained for the base
    assert list(report["results"]) == [r for r in ROWS if "start" not in r]  # no --eval-start


def test_the_teachers_feature_loss_compares_the_bridge_at_the_prompts_words(quick_run):
    """feature_loss: the bridge's context at the caption's words vs the prompt encoder's output for them (and the
    pooled vectors); zero exactly when they agree, whatever the other context tokens hold; "" is skipped."""
    from deepgen_components.bridge import BridgeOutput
    from deepgen_components.pipeline import DeepGenPipeline
    from deepgen_components.shapes.teacher import PromptEncoderTeacher

    out, _ = quick_run
    teacher = PromptEncoderTeacher.from_base(out / "base", feature_weight=1.0)
    model = DeepGenPipeline.from_pretrained(out / "base" / "pipeline").model
    prompts = ["a red circle on the left on a gray background", "make the square blue", ""]
    batch = model.prepare_prompts(prompts)
    condition, _ = model.encode_tokens(batch)
    assert teacher.feature_loss(condition, batch.input_ids, prompts) > 0  # fresh bridge: zero context
    tokens, mask = teacher.encoder.tokenize(teacher.tokenizer, prompts[:2])
    target, pooled, _ = teacher.encoder(tokens, mask)
    context = torch.randn(condition.context.shape)  # other tokens (template, think) may hold anything
    for row, prompt in enumerate(prompts[:2]):
        n = len(teacher.tokenizer(prompt, add_special_tokens=False)["input_ids"])
        ids = batch.input_ids[row].tolist()
        first = next(j for j in range(len(ids)) if teacher.tokenizer.decode(ids[j:j + n]).strip() == prompt)
        context[row, first : first + n] = target[row, 1 : 1 + n]
    matched = BridgeOutput(context=context, pooled=torch.cat([pooled, torch.zeros(1, pooled.shape[1])]),
                           mask=condition.mask)
    assert teacher.feature_loss(matched, batch.input_ids, prompts).item() < 1e-10
    assert teacher.feature_loss(condition, batch.input_ids, [""] * 3).item() == 0.0
    # whole: every other real token of a prompt is pulled to the encoder's start token for it, all of "" to zero
    rest = condition.mask.clone()
    for row, prompt in enumerate(prompts[:2]):
        n = len(teacher.tokenizer(prompt, add_special_tokens=False)["input_ids"])
        ids = batch.input_ids[row].tolist()
        first = next(j for j in range(len(ids)) if teacher.tokenizer.decode(ids[j:j + n]).strip() == prompt)
        rest[row, first : first + n] = False
    starts = torch.zeros_like(context)
    starts[:2] = target[:, :1]  # row 2 is "": zero
    expected = (matched.context - starts)[rest].square().mean().item()
    assert expected > 0.5  # the random other tokens
    assert teacher.feature_loss(matched, batch.input_ids, prompts, whole=True).item() == pytest.approx(expected, rel=1e-5)
    cleared = BridgeOutput(context=torch.where(rest[..., None], starts, context), pooled=matched.pooled,
                           mask=condition.mask)
    assert teacher.feature_loss(cleared, batch.input_ids, prompts, whole=True).item() < 1e-10
    empty = BridgeOutput(context=condition.context, pooled=torch.ones(3, pooled.shape[1]), mask=condition.mask)
    assert teacher.feature_loss(empty, batch.input_ids, [""] * 3, whole=True).item() == pytest.approx(
        1.0 + condition.context[condition.mask].square().mean().item())


def test_stage1_on_the_feature_loss_alone_trains_the_bridge_without_running_the_dit(quick_run, tmp_path):
    """model.flow_weight=0: stage 1 on the teacher's feature loss alone. The bridge and think tokens move, the
    DiT is never run (its weights are bit-identical, and with DeepGen's loss at 0 nothing reads the latents)."""

    from deepgen_components.training.config import load_config
    from deepgen_components.training.trainer import train

    from deepgen_components.pipeline import DeepGenPipeline

    out, _ = quick_run
    cfg = load_config(
        SHAPES_CONFIGS / "align_shapes.yaml",
        [f"model.pipeline={out / 'base' / 'pipeline'}", f"teacher.options.base={out / 'base'}", "model.flow_weight=0",
         "trainer.max_steps=4", "data.batch_size=4", "trainer.checkpoint_every=4", f"out={tmp_path / 'fo'}"],
    )
    result = train(cfg)
    assert result.steps == 4 and math.isfinite(result.final_loss) and result.final_loss > 0
    before = DeepGenPipeline.from_pretrained(out / "base" / "pipeline").model
    after = DeepGenPipeline.from_pretrained(result.pipeline).model
    for name, weight in before.dit.state_dict().items():
        assert torch.equal(weight, after.dit.state_dict()[name]), name
    moved = [n for n, w in before.bridge.state_dict().items() if not torch.equal(w, after.bridge.state_dict()[n])]
    assert moved and any("head" in n or "proj" in n for n in moved)


def test_the_base_pipeline_is_bit_identical_to_its_recorded_outputs():
    """``PromptEncoderPipeline`` (the base DiT under its own prompt encoder, as a pipeline) reproduces, bit for bit,
    the images recorded before the one-runner redesign (``prompt_encoder/*`` of tests/data/denoising/
    reference.safetensors, written by make_reference.py at c959c70: tiny preset seed 3, encoder seed 5, one
    thread, 4 steps, CFG 4, text-to-image and an edit)."""
    import numpy as np
    from safetensors.torch import load_file

    from deepgen_components import DeepGenPipeline, deepgen_tiny
    from deepgen_components.shapes.teacher import PromptEncoderPipeline

    data = Path(__file__).resolve().parent / "data" / "denoising"
    reference = load_file(str(data / "reference.safetensors"))
    image = Image.fromarray(np.random.default_rng(0).integers(0, 256, (64, 64, 3), dtype=np.uint8))
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as the script ran
    try:
        model = DeepGenPipeline(deepgen_tiny(seed=3)).model
        torch.manual_seed(5)
        cfg = model.dit.config
        encoder = PromptEncoder(len(model.tokenizer), cfg.joint_attention_dim, cfg.pooled_projection_dim).eval()
        base = PromptEncoderPipeline(model.dit, encoder, model.tokenizer, model.vae, model.scheduler, 64)
        for name, kwargs in {"t2i": {}, "edit": {"image": [image, image]}}.items():
            images = base(["a red circle on the left", "a blue square"], num_inference_steps=4, guidance_scale=4.0,
                          generator=torch.Generator().manual_seed(0), **kwargs).images
            got = torch.from_numpy(np.stack([np.asarray(im) for im in images]))
            assert torch.equal(got, reference[f"prompt_encoder/{name}"]), name
    finally:
        torch.set_num_threads(threads)
