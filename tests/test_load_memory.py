"""Low-RAM loading (issue #22): official weights and the random presets materialised directly in the target dtype.

* Loading official weights in bfloat16 gives exactly the bfloat16 tensors of loading them in float32 and casting,
  for both released layouts (the checkpoint is read tensor by tensor and cast as read; the SCB and the DiT are
  built on meta and take the checkpoint's tensors).
* ``materialize_random`` turns a model built on meta into the random model its constructors would have built, in
  the target dtype: same dtypes and buffers (bit-exact), constant inits (ones, zeros) exact, random inits with the
  constructors' mean and spread; nothing left on meta or uninitialised.
* ``benchmarks/load_memory.py`` answers ``--help`` (its ``--quick`` run is in tests/test_documented_commands.py).
"""

import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file
from torch import nn

from deepgen_components import (
    BridgeConfig,
    ConnectorConfig,
    DeepGenModel,
    LayerSelection,
    StackedChannelBridge,
    deepgen_from_official,
    deepgen_tiny,
)
from deepgen_components.builders import deepgen_1_0, deepgen_small, materialize_random
from deepgen_components.official import to_official_state_dict

ROOT = Path(__file__).resolve().parents[1]


def tiny_official_model() -> DeepGenModel:
    """The tiny model with the official layer rule (one of the 4 VLM layers) and a 64-wide connector (1 head of 64),
    so that its official export imports without extra arguments."""
    tiny = deepgen_tiny(seed=3)
    layers = LayerSelection.official(tiny.vlm.config.text_config.num_hidden_layers)
    bridge = StackedChannelBridge(BridgeConfig(
        num_stacked_layers=len(layers), vlm_hidden_size=64, context_dim=64, pooled_dim=32,
        connector=ConnectorConfig(hidden_size=64, num_layers=2, num_heads=1, intermediate_size=128),
    ))
    with torch.no_grad():  # non-zero heads, so that a head landing wrongly shows
        for head in (bridge.pooled_head, bridge.context_head):
            head.weight.normal_(0, 0.05)
    return DeepGenModel(tiny.vlm, tiny.think_tokens, layers, bridge, tiny.dit, tiny.vae, tiny.scheduler,
                        tiny.tokenizer, tiny.config).eval()


@pytest.fixture(scope="module")
def official_files(tmp_path_factory):
    """Layout (a): one safetensors file beside the VLM, VAE and tokenizer folders; layout (b): the release folder."""
    root = tmp_path_factory.mktemp("low_ram_official")
    model = tiny_official_model()
    model.vlm.save_pretrained(root / "vlm")
    model.vae.save_pretrained(root / "vae")
    model.tokenizer.save_pretrained(root / "tokenizer")
    state = {k: v.detach().contiguous() for k, v in to_official_state_dict(model).items()}
    save_file(state, str(root / "deepgen.safetensors"))
    release = root / "release"
    model.dit.transformer.save_pretrained(release / "transformer")
    model.vae.save_pretrained(release / "vae")
    model.scheduler.save_pretrained(release / "scheduler")
    model.tokenizer.save_pretrained(release / "tokenizer")
    save_file({k: v for k, v in state.items() if not k.startswith("transformer.")}, str(release / "scb.safetensors"))
    return {"root": root, "model": model, "state": state, "release": release}


def load_official(files, layout: str, dtype: torch.dtype, **kwargs) -> DeepGenModel:
    root = files["root"]
    if layout == "file":
        return deepgen_from_official(
            root / "vlm", kwargs.pop("weights", root / "deepgen.safetensors"), vae_path=root / "vae",
            tokenizer_path=root / "tokenizer", transformer_config=files["release"] / "transformer", dtype=dtype,
            **kwargs,
        )
    return deepgen_from_official(root / "vlm", files["release"], dtype=dtype, **kwargs)


def no_meta_and_all_in(model: nn.Module, dtype: torch.dtype) -> None:
    for name, t in (*model.named_parameters(), *model.named_buffers()):
        assert not t.is_meta, name
        if t.is_floating_point():
            assert t.dtype == dtype, name
            assert not t.isnan().any(), name


# -- official weights --------------------------------------------------------------------------------------


@pytest.mark.parametrize("layout", ["file", "release"])
def test_official_weights_in_bf16_are_the_fp32_weights_cast_bit_exactly(official_files, layout):
    fp32 = load_official(official_files, layout, torch.float32)
    bf16 = load_official(official_files, layout, torch.bfloat16)
    no_meta_and_all_in(fp32, torch.float32)
    no_meta_and_all_in(bf16, torch.bfloat16)
    ours, cast = bf16.state_dict(), fp32.state_dict()
    assert ours.keys() == cast.keys()
    for key, value in cast.items():
        expected = value.to(torch.bfloat16) if value.is_floating_point() else value
        assert torch.equal(ours[key], expected), key
    # and the float32 import is the exported model itself
    reference = official_files["model"].state_dict()
    for key in ("bridge.pooled_head.weight", "encoder.think_tokens.weight", "dit.transformer.pos_embed.pos_embed",
                "bridge.connector.layers.1.mlp.fc2.weight"):
        assert torch.equal(cast[key], reference[key]), key


def test_the_checkpoint_tensors_become_the_parameters_without_a_copy(official_files, tmp_path):
    """Built on meta, the bridge takes the tensors read from the checkpoint (already in the target dtype)."""
    model = load_official(official_files, "file", torch.bfloat16)
    weight = model.bridge.projector.weight
    assert isinstance(weight, nn.Parameter) and weight.requires_grad and weight.dtype == torch.bfloat16
    assert torch.equal(weight, official_files["state"]["projector_1.weight"].to(torch.bfloat16))


def test_a_checkpoint_without_the_position_table_gets_the_computed_one(official_files, tmp_path):
    state = {k: v for k, v in official_files["state"].items() if k != "transformer.pos_embed.pos_embed"}
    save_file(state, str(tmp_path / "old.safetensors"))
    model = load_official(official_files, "file", torch.bfloat16, weights=tmp_path / "old.safetensors")
    no_meta_and_all_in(model, torch.bfloat16)
    expected = official_files["model"].dit.transformer.pos_embed.pos_embed.to(torch.bfloat16)
    assert torch.equal(model.dit.transformer.pos_embed.pos_embed, expected)


def test_keys_missing_in_a_non_strict_import_get_their_random_init_and_the_rest_is_kept(official_files, tmp_path):
    state = {k: v for k, v in official_files["state"].items() if not k.startswith("connector.layers.1.mlp.")}
    save_file(state, str(tmp_path / "partial.safetensors"))
    model = load_official(official_files, "file", torch.float32, weights=tmp_path / "partial.safetensors",
                          strict=False)
    no_meta_and_all_in(model, torch.float32)
    assert len(model.import_report.missing) == 4
    layers, reference = model.bridge.connector.layers, official_files["model"].bridge.connector.layers
    # loaded tensors stay, although the connector's init (run for the missing ones) covers every layer
    assert torch.equal(layers[0].mlp.fc1.weight, reference[0].mlp.fc1.weight)
    assert torch.equal(layers[1].self_attn.q_proj.weight, reference[1].self_attn.q_proj.weight)
    # the missing ones get the connector's official init: xavier-uniform weights, N(0, 1e-6) MLP biases
    assert not torch.equal(layers[1].mlp.fc1.weight, reference[1].mlp.fc1.weight)
    assert layers[1].mlp.fc1.weight.abs().max() <= (6 / (64 + 128)) ** 0.5
    assert 0 < layers[1].mlp.fc2.bias.abs().max() < 1e-4


# -- random presets built on meta ----------------------------------------------------------------------------


def assert_same_init(ours: nn.Module, reference: nn.Module, min_numel: int = 1024) -> None:
    """Same names, dtypes, devices and buffers; constant inits equal; random inits with the same mean and spread."""
    mine, theirs = dict(ours.state_dict()), dict(reference.state_dict())
    assert mine.keys() == theirs.keys()
    buffers = {name for name, _ in reference.named_buffers()}
    checked = 0
    for key, expected in theirs.items():
        value = mine[key]
        assert value.dtype == expected.dtype and value.shape == expected.shape and not value.is_meta, key
        if key in buffers or not expected.is_floating_point() or expected.float().std() == 0:
            assert torch.equal(value, expected), key
        elif expected.numel() >= min_numel:
            spread, mean = expected.float().std().item(), expected.float().mean().item()
            assert abs(value.float().std().item() - spread) < 0.15 * spread, key
            assert abs(value.float().mean().item() - mean) < 0.2 * spread, key
            checked += 1
    assert checked > 20


def test_a_meta_built_model_materialises_with_its_constructors_init_in_bf16():
    reference = deepgen_tiny(seed=0).to(torch.bfloat16)
    reference.bridge.reset_heads()  # deepgen_tiny randomises the heads; the official init (and ours) zeroes them
    model = materialize_random(deepgen_tiny(device="meta"), dtype=torch.bfloat16).to(torch.bfloat16)
    no_meta_and_all_in(model, torch.bfloat16)
    assert_same_init(model, reference)
    assert model.vlm.lm_head.weight is model.vlm.model.language_model.embed_tokens.weight  # re-tied
    with torch.no_grad():  # and it runs
        condition = model.encode_condition(["a red cat"])
    assert condition.context.dtype == torch.bfloat16 and torch.isfinite(condition.context).all()


def test_the_small_preset_materialises_from_meta_at_deepgen_1_0_depth():
    """deepgen_small has DeepGen 1.0's depth pattern at 1/8 width (deepgen-1.0 itself needs ~13 GB in bf16)."""
    skeleton = deepgen_small(device="meta")
    shapes = {k: (v.shape, v.dtype) for k, v in skeleton.state_dict().items()}
    model = materialize_random(skeleton, dtype=torch.bfloat16).to(torch.bfloat16)
    no_meta_and_all_in(model, torch.bfloat16)
    assert {k: v.shape for k, v in model.state_dict().items()} == {k: s for k, (s, _) in shapes.items()}
    assert torch.equal(model.bridge.pooled_head.weight, torch.zeros_like(model.bridge.pooled_head.weight))


def test_the_deepgen_1_0_preset_on_meta_allocates_nothing():
    model = deepgen_1_0(device="meta")
    tensors = [*model.parameters()]
    assert all(t.is_meta for t in tensors)
    assert 5e9 < sum(t.numel() for t in tensors) < 8e9


def test_materialize_keeps_loaded_tensors_and_names_what_it_cannot_initialise():
    with torch.device("meta"):
        layer = nn.Linear(8, 4)
    layer.weight = nn.Parameter(torch.full((4, 8), 2.0))  # "loaded"
    materialize_random(layer, dtype=torch.float16)
    assert torch.equal(layer.weight, torch.full((4, 8), 2.0)) and layer.bias.dtype == torch.float16
    assert layer.bias.abs().max() <= 8**-0.5  # torch's Linear init of the missing bias

    class Scaled(nn.Module):
        def __init__(self):
            super().__init__()
            self.scale = nn.Parameter(torch.ones(3))

    with torch.device("meta"):
        odd = nn.Sequential(nn.Linear(3, 3), Scaled())
    with pytest.raises(ValueError, match=r"no initialisation rule for 1 tensors.*1\.scale"):
        materialize_random(odd)


# -- the benchmark ------------------------------------------------------------------------------------------


def test_load_memory_benchmark_answers_help():
    """Its ``--quick`` run, as docs/benchmarks.md shows it, is in tests/test_documented_commands.py."""
    script = ROOT / "benchmarks" / "load_memory.py"
    help_text = subprocess.run([sys.executable, str(script), "--help"], capture_output=True, text=True, check=True)
    assert "--quick" in help_text.stdout and "--out" in help_text.stdout
