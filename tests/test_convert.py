"""``deepgen convert``: a trained tiny stage-2 checkpoint (LoRA on) goes through the official layout and back bit for
bit, and becomes a pipeline folder that draws what the trained model draws."""

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from deepgen_components.training.checkpoint import load_checkpoint
from deepgen_components.training.config import LoraConfigSpec, load_config
from deepgen_components.training.stage_model import apply_lora, build_model
from peft.tuners.lora import LoraLayer
from safetensors import safe_open
from safetensors.torch import load as load_file_bytes

from deepgen_components import official
from deepgen_components.builders import deepgen_tiny
from deepgen_components.cli import main
from deepgen_components.cli.convert import load_trained_model
from deepgen_components.lora import lora_module_names
from deepgen_components.pipeline import DeepGenPipeline

SFT_TINY = Path(__file__).resolve().parents[1] / "training" / "configs" / "sft_tiny.yaml"
CALL = dict(height=64, width=64, num_inference_steps=2, guidance_scale=3.0)


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """Two stage-2 steps of the tiny SFT config (LoRA r 8, alpha 16 on the VLM's language model)."""
    out = tmp_path_factory.mktemp("convert") / "run"
    code = main(["train", "--config", str(SFT_TINY), "--max-steps", "2", "--out", str(out), "data.batch_size=2",
                 "trainer.tensorboard=false"])
    assert code == 0
    return out


@pytest.fixture(scope="module")
def checkpoint(run):
    return run / "checkpoints" / "step_00000002"


@pytest.fixture(scope="module")
def official_file(checkpoint):
    out = checkpoint.parents[2] / "sft.safetensors"
    assert main(["convert", "--to", "official", str(checkpoint), str(out)]) == 0
    return out


def latents(model, prompt="a red circle above a blue square"):
    pipe = DeepGenPipeline(model)
    return pipe(prompt, generator=torch.Generator().manual_seed(7), output_type="latent", **CALL).images


def lora_scalings(model) -> set[float]:
    return {m.scaling["default"] for m in model.modules() if isinstance(m, LoraLayer)}


def imported(path, **kwargs):
    """A freshly built tiny model of the run's config (its frozen VLM, VAE) with the official file imported."""
    model = build_model(load_config(SFT_TINY).model)
    model.import_report = official.import_official_weights(model, path, **kwargs)
    return model.eval()


def test_official_file_holds_scb_dit_and_the_lora_in_the_official_names(official_file, checkpoint):
    with safe_open(str(official_file), "pt") as f:
        keys, metadata = set(f.keys()), f.metadata()
    trained = load_checkpoint(checkpoint)["trainable"]
    lora = {k for k in keys if k.startswith("lmm.")}
    assert {"meta_queries", "projector_1.weight", "projector_2.weight", "projector_3.weight"} <= keys
    assert any(k.startswith("connector.layers.1.") for k in keys) and any(k.startswith("transformer.") for k in keys)
    # transformers 4.51 layout, peft's module naming: lmm.model.layers.N.<proj>.lora_A.default.weight
    assert "lmm.model.layers.0.self_attn.q_proj.lora_A.default.weight" in lora
    assert len(lora) == sum("lora_" in k for k in trained) == 2 * 7 * 3  # 7 targets x 3 read layers, A and B
    assert metadata == {"format": "deepgen-official", "vlm_layout": "4.51", "lora_alpha": "16.0"}


def test_official_round_trip_is_bit_exact_for_every_trained_tensor(official_file, checkpoint):
    model = imported(official_file, merge_lora=False)  # the LoRA injected unmerged: the trained computation
    report = model.import_report
    assert report.missing == [] and report.unexpected == [] and len(report.lora_modules) == 21
    trained = load_checkpoint(checkpoint)["trainable"]
    assert any("lora_B" in k and v.abs().max() > 0 for k, v in trained.items())  # the LoRA learned something
    state = model.state_dict()
    different = [k for k, v in trained.items() if not torch.equal(state[k], v)]
    assert not different and set(trained) <= set(state)
    assert lora_scalings(model) == {16 / 8}
    # The whole model, frozen parts included, equals the trained one; so do the pipeline's outputs.
    reference = load_trained_model(checkpoint)
    assert all(torch.equal(v, state[k]) for k, v in reference.state_dict().items())
    assert torch.equal(latents(model), latents(reference))


def test_run_folder_converts_its_newest_checkpoint_in_the_456_layout(run, official_file, tmp_path):
    out = tmp_path / "sft_456.safetensors"
    assert main(["convert", "--to", "official", str(run), str(out), "--vlm-layout", "4.56"]) == 0
    with safe_open(str(out), "pt") as new, safe_open(str(official_file), "pt") as old:
        assert "lmm.model.language_model.layers.2.mlp.down_proj.lora_B.default.weight" in new.keys()
        scb = sorted(k for k in old.keys() if not k.startswith("lmm."))
        assert scb == sorted(k for k in new.keys() if not k.startswith("lmm.")) and scb
        assert all(torch.equal(new.get_tensor(k), old.get_tensor(k)) for k in scb)
    assert torch.equal(latents(imported(out, merge_lora=False)), latents(imported(official_file, merge_lora=False)))


def test_pipeline_folder_draws_the_trained_image(run, checkpoint, tmp_path):
    out = tmp_path / "pipeline"
    assert main(["convert", "--to", "pipeline", str(checkpoint), str(out)]) == 0
    converted = DeepGenPipeline.from_pretrained(out)
    assert not lora_module_names(converted.model.encoder.vlm)  # merged into the VLM's weights
    # The trainer saved its in-memory model as run/pipeline the same way: the two folders are the same model.
    trained = DeepGenPipeline.from_pretrained(run / "pipeline")
    before, after = trained.model.state_dict(), converted.model.state_dict()
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)
    image = lambda pipe: pipe("a red circle", generator=torch.Generator().manual_seed(3), output_type="np",
                              **CALL).images
    assert np.array_equal(image(converted), image(trained))


def test_lora_alpha_other_than_2r_travels_in_the_metadata(tmp_path):
    model = deepgen_tiny(0)
    apply_lora(model, LoraConfigSpec(r=4, alpha=3.0, dropout=0.0))
    with torch.no_grad():
        for name, param in model.encoder.vlm.named_parameters():
            if "lora_B" in name:
                param.normal_(std=0.05)
    path = official.save_official_checkpoint(model, tmp_path / "a.safetensors")
    assert official.read_official_metadata(path)["lora_alpha"] == "3.0"
    fresh = deepgen_tiny(0)
    official.import_official_weights(fresh, path, merge_lora=False)
    assert lora_scalings(fresh) == {3.0 / 4}
    assert torch.equal(latents(fresh.eval()), latents(model.eval()))
    with pytest.raises(FileExistsError, match="pass overwrite=True"):
        official.save_official_checkpoint(model, path)


def test_existing_output_is_refused_unless_overwrite(official_file, checkpoint, capsys):
    before = official_file.read_bytes()
    assert main(["convert", "--to", "official", str(checkpoint), str(official_file)]) == 2
    assert "exists; pass --overwrite to replace it" in capsys.readouterr().err
    assert official_file.read_bytes() == before
    assert main(["convert", "--to", "official", str(checkpoint), str(official_file), "--overwrite"]) == 0
    # The same checkpoint, the same tensors (safetensors orders the metadata as it likes: compare contents).
    with safe_open(str(official_file), "pt") as f:
        rewritten = {k: f.get_tensor(k) for k in f.keys()}
    original = load_file_bytes(before)
    assert rewritten.keys() == original.keys() and all(torch.equal(rewritten[k], original[k]) for k in original)
    assert not [p for p in official_file.parent.iterdir() if p.name.startswith(f".{official_file.name}")]


def test_checkpoint_without_config_is_a_clear_error(checkpoint, tmp_path, capsys):
    alone = tmp_path / "step_00000002"
    shutil.copytree(checkpoint, alone)
    state = json.loads((alone / "state.json").read_text())
    (alone / "state.json").write_text(json.dumps({**state, "extra": {}}))
    assert main(["convert", "--to", "official", str(alone), str(tmp_path / "o.safetensors")]) == 2
    err = capsys.readouterr().err
    assert f"CHECKPOINT {alone}: no config to rebuild its model from" in err and "config.yaml" in err
    assert not (tmp_path / "o.safetensors").exists()


def test_a_pipeline_folder_converts_to_scb_and_dit_without_lora(run, tmp_path):
    out = tmp_path / "from_pipeline.safetensors"
    assert main(["convert", "--to", "official", str(run / "pipeline"), str(out)]) == 0
    with safe_open(str(out), "pt") as f:
        assert "meta_queries" in f.keys() and not [k for k in f.keys() if k.startswith("lmm.")]
