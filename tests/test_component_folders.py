"""The bridge and the think tokens as diffusers models: ``save_pretrained`` / ``from_pretrained(torch_dtype=...)``
round trips, the folders the library wrote before (pipeline folder format 1, ``tests/data/legacy_v1``) and the
errors for bad folders and configs (issue #22)."""

import json
import re
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from deepgen_components import (
    BridgeConfig,
    ConnectorConfig,
    DeepGenPipeline,
    StackedChannelBridge,
    ThinkTokens,
    deepgen_tiny,
)
from deepgen_components.serialization import load_model_folder, model_skeleton, save_model_folder

ROOT = Path(__file__).resolve().parents[1]
LEGACY = ROOT / "tests" / "data" / "legacy_v1"
WEIGHTS = "diffusion_pytorch_model.safetensors"
CONFIG = BridgeConfig(
    num_stacked_layers=3,
    vlm_hidden_size=16,
    connector=ConnectorConfig(hidden_size=32, num_layers=2, num_heads=4, intermediate_size=48),
    context_dim=24,
    pooled_dim=8,
    tokens="all",
    mask_padding=True,
)


def trained_bridge(config: BridgeConfig = CONFIG) -> StackedChannelBridge:
    """A bridge whose every weight is random (a fresh one has zero heads, which would hide a lost weight)."""
    torch.manual_seed(0)
    bridge = StackedChannelBridge(config).eval()
    with torch.no_grad():
        for parameter in bridge.parameters():
            parameter.copy_(torch.randn_like(parameter) * 0.2)
    return bridge


def bridge_inputs(dtype: torch.dtype = torch.float32):
    g = torch.Generator().manual_seed(1)
    states = [torch.randn(2, 5, CONFIG.vlm_hidden_size, generator=g).to(dtype) for _ in range(CONFIG.num_stacked_layers)]
    mask = torch.tensor([[0, 0, 1, 1, 1], [1, 1, 1, 1, 1]], dtype=torch.bool)
    return states, mask


def assert_same_weights(loaded: torch.nn.Module, reference: dict[str, torch.Tensor]) -> None:
    state = loaded.state_dict()
    assert sorted(state) == sorted(reference)
    for name, tensor in reference.items():
        assert state[name].dtype == tensor.dtype, name
        assert torch.equal(state[name], tensor), name


# -- the diffusers format ------------------------------------------------------------------------------------
def test_bridge_save_pretrained_writes_a_diffusers_folder(tmp_path):
    trained_bridge().save_pretrained(tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["config.json", WEIGHTS]
    config = json.loads((tmp_path / "config.json").read_text())
    assert config["_class_name"] == "StackedChannelBridge"
    assert config["connector_config"] == CONFIG.connector.to_dict()
    assert {k: v for k, v in config.items() if not k.startswith("_")} == {
        **{k: v for k, v in CONFIG.to_dict().items() if k != "connector"},
        "connector_config": CONFIG.connector.to_dict(),
    }


def test_bridge_round_trips_bit_exactly(tmp_path):
    bridge = trained_bridge()
    bridge.save_pretrained(tmp_path)
    loaded = StackedChannelBridge.from_pretrained(tmp_path)
    assert loaded.config == bridge.config
    assert not loaded.training
    assert_same_weights(loaded, bridge.state_dict())
    states, mask = bridge_inputs()
    with torch.no_grad():
        expected, got = bridge(states, mask), loaded(states, mask)
    assert torch.equal(got.context, expected.context) and torch.equal(got.pooled, expected.pooled)
    assert torch.equal(got.mask, expected.mask)


def test_bridge_loads_in_bfloat16_as_the_cast_of_the_saved_weights(tmp_path):
    bridge = trained_bridge()
    bridge.save_pretrained(tmp_path)
    loaded = StackedChannelBridge.from_pretrained(tmp_path, torch_dtype=torch.bfloat16)
    assert {p.dtype for p in loaded.parameters()} == {torch.bfloat16}
    cast = bridge.to(torch.bfloat16)
    assert_same_weights(loaded, cast.state_dict())
    states, mask = bridge_inputs(torch.bfloat16)
    with torch.no_grad():
        expected, got = cast(states, mask), loaded(states, mask)
    assert got.context.dtype == torch.bfloat16
    assert torch.equal(got.context, expected.context) and torch.equal(got.pooled, expected.pooled)


def test_think_tokens_round_trip_bit_exactly_also_in_bfloat16(tmp_path):
    torch.manual_seed(0)
    tokens = ThinkTokens(6, 16)
    tokens.save_pretrained(tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["config.json", WEIGHTS]
    assert json.loads((tmp_path / "config.json").read_text())["_class_name"] == "ThinkTokens"
    loaded = ThinkTokens.from_pretrained(tmp_path)
    assert (loaded.num_tokens, loaded.hidden_size) == (6, 16)
    assert_same_weights(loaded, tokens.state_dict())
    assert torch.equal(loaded(3), tokens(3))
    half = ThinkTokens.from_pretrained(tmp_path, torch_dtype=torch.bfloat16)
    assert_same_weights(half, {"weight": tokens.weight.detach().to(torch.bfloat16)})
    assert torch.equal(half(2), tokens.to(torch.bfloat16)(2))


def test_loading_draws_no_random_numbers(tmp_path):
    trained_bridge().save_pretrained(tmp_path / "bridge")
    ThinkTokens(4, 8).save_pretrained(tmp_path / "think")
    state = torch.random.get_rng_state()
    StackedChannelBridge.from_pretrained(tmp_path / "bridge")
    ThinkTokens.from_pretrained(tmp_path / "think")
    ThinkTokens.from_pretrained(LEGACY / "pipeline" / "think_tokens")
    assert torch.equal(torch.random.get_rng_state(), state)


def test_bridge_from_keyword_arguments_equals_the_bridge_from_its_config():
    flat = StackedChannelBridge(
        num_stacked_layers=3, vlm_hidden_size=16, connector_config=CONFIG.connector.to_dict(), context_dim=24, pooled_dim=8
    )
    assert flat.config == CONFIG
    assert StackedChannelBridge().config == BridgeConfig()  # every argument left out: the BridgeConfig defaults
    mine = BridgeConfig(**{**CONFIG.to_dict(), "mask_padding": True})
    bridge = StackedChannelBridge(mine)
    mine.mask_padding = False  # the caller reuses its config for another bridge: this one keeps its own
    assert bridge.config.mask_padding is True
    with pytest.raises(ValueError, match=r"config: give a BridgeConfig or keyword arguments, not both \(got \['tokens'\]"):
        StackedChannelBridge(CONFIG, tokens="think")
    with pytest.raises(TypeError, match="config: expected a BridgeConfig"):
        StackedChannelBridge({"num_stacked_layers": 3})
    with pytest.raises(ValueError, match="tokens must be 'all' or 'think'"):
        StackedChannelBridge(tokens="prompt")


def test_the_readme_save_and_load_block_runs_as_written(tmp_path, monkeypatch):
    """README.md, "Put the SCB bridge between another VLM/LLM and DiT pair": the save/load block, run verbatim."""
    blocks = re.findall(r"```python\n(.*?)```", (ROOT / "README.md").read_text(), flags=re.S)
    (block,) = [b for b in blocks if 'bridge.save_pretrained("my_bridge")' in b]
    monkeypatch.chdir(tmp_path)
    scope = {}
    exec(compile(block, "README.md", "exec"), scope)
    loaded = scope["bridge"]
    assert isinstance(loaded, StackedChannelBridge) and loaded.dtype == torch.bfloat16
    saved = load_file(str(tmp_path / "my_bridge" / WEIGHTS))
    assert_same_weights(loaded, {k: v.to(torch.bfloat16) for k, v in saved.items()})


# -- folders written before (pipeline folder format 1) -------------------------------------------------------
@pytest.mark.parametrize("dtype", [None, torch.bfloat16])
def test_legacy_component_folders_load_bit_exactly(dtype):
    folder = LEGACY / "pipeline"
    cast = (lambda t: t) if dtype is None else (lambda t: t.to(dtype))
    bridge = StackedChannelBridge.from_pretrained(folder / "bridge", torch_dtype=dtype)
    saved = json.loads((folder / "bridge" / "config.json").read_text())
    assert bridge.config == BridgeConfig.from_dict(saved)
    assert_same_weights(bridge, {k: cast(v) for k, v in load_file(str(folder / "bridge" / "model.safetensors")).items()})
    tokens = ThinkTokens.from_pretrained(folder / "think_tokens", torch_dtype=dtype)
    assert (tokens.num_tokens, tokens.hidden_size) == (8, 64)
    assert_same_weights(tokens, {k: cast(v) for k, v in load_file(str(folder / "think_tokens" / "model.safetensors")).items()})


@pytest.mark.parametrize("converted", [False, True], ids=["as_written", "converted"])
def test_legacy_pipeline_folder_reproduces_its_latents(converted, tmp_path):
    """As written, and after ``python -m deepgen_components.cli.convert_folder`` rewrote a copy in today's schema."""
    folder = LEGACY / "pipeline"
    if converted:
        import shutil

        from deepgen_components.cli.convert_folder import main as convert

        folder = shutil.copytree(folder, tmp_path / "pipeline")
        assert convert([str(folder)]) == 0
        assert isinstance(json.loads((folder / "model_index.json").read_text())["_class_name"], list)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as the latents were recorded (tests/data/legacy_v1/README.md)
    try:
        pipe = DeepGenPipeline.from_pretrained(str(folder))
        out = pipe(
            ["a red circle on the left"], num_inference_steps=3, guidance_scale=4.0, output_type="latent",
            generator=torch.Generator().manual_seed(0),
        )
    finally:
        torch.set_num_threads(threads)
    expected = load_file(str(LEGACY / "expected_latents.safetensors"))["latents"]
    assert torch.equal(out.images, expected)


def test_legacy_folder_skeleton_matches_the_loaded_model():
    skeleton = model_skeleton(LEGACY / "pipeline")
    assert skeleton.bridge.config == StackedChannelBridge.from_pretrained(LEGACY / "pipeline" / "bridge").config
    assert skeleton.think_tokens.weight.is_meta and skeleton.think_tokens.num_tokens == 8


# -- the pipeline folder ------------------------------------------------------------------------------------
def test_pipeline_folder_writes_the_components_in_the_diffusers_format_and_reads_them_in_bfloat16(tmp_path):
    model = deepgen_tiny(seed=0)
    save_model_folder(model, tmp_path / "pipe")
    index = json.loads((tmp_path / "pipe" / "model_index.json").read_text())
    assert index["format_version"] == 2
    for name, cls in (("bridge", StackedChannelBridge), ("think_tokens", ThinkTokens)):
        assert sorted(p.name for p in (tmp_path / "pipe" / name).iterdir()) == ["config.json", WEIGHTS]
        assert json.loads((tmp_path / "pipe" / name / "config.json").read_text())["_class_name"] == cls.__name__
    loaded = load_model_folder(tmp_path / "pipe", dtype=torch.bfloat16)
    assert loaded.bridge.config == model.bridge.config
    for part in ("bridge", "think_tokens"):
        reference = {k: v.to(torch.bfloat16) for k, v in getattr(model, part).state_dict().items()}
        assert_same_weights(getattr(loaded, part), reference)
    assert model_skeleton(tmp_path / "pipe").bridge.config == model.bridge.config


def test_a_pipeline_folder_of_a_newer_format_is_refused(tmp_path):
    shutil.copytree(LEGACY / "pipeline", tmp_path / "pipe")
    index_file = tmp_path / "pipe" / "model_index.json"
    index_file.write_text(json.dumps({**json.loads(index_file.read_text()), "format_version": 99}))
    with pytest.raises(ValueError, match="format_version 99"):
        load_model_folder(tmp_path / "pipe")


# -- bad folders and configs --------------------------------------------------------------------------------
def test_a_folder_without_config_json_is_named(tmp_path):
    trained_bridge().save_pretrained(tmp_path)
    (tmp_path / "config.json").unlink()
    with pytest.raises(FileNotFoundError, match=rf"pretrained_model_name_or_path: {tmp_path} has no config.json"):
        StackedChannelBridge.from_pretrained(tmp_path)
    with pytest.raises(FileNotFoundError, match="pretrained_model_name_or_path: no folder"):
        ThinkTokens.from_pretrained(tmp_path / "missing")


@pytest.mark.parametrize("legacy", [False, True])
def test_a_config_with_unknown_keys_is_refused_by_name(tmp_path, legacy):
    if legacy:
        shutil.copytree(LEGACY / "pipeline" / "bridge", tmp_path, dirs_exist_ok=True)
    else:
        trained_bridge().save_pretrained(tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    (tmp_path / "config.json").write_text(json.dumps({**config, "num_layers": 3}))
    with pytest.raises(ValueError, match=r"config: unknown StackedChannelBridge keys \['num_layers'\]"):
        StackedChannelBridge.from_pretrained(tmp_path)


def test_a_folder_of_another_component_is_refused(tmp_path):
    ThinkTokens(4, 8).save_pretrained(tmp_path)
    with pytest.raises(ValueError, match="_class_name is 'ThinkTokens'; this config is not a StackedChannelBridge"):
        StackedChannelBridge.from_pretrained(tmp_path)
    with pytest.raises(ValueError, match=r"unknown ThinkTokens keys \['connector', 'context_dim'"):
        ThinkTokens.from_pretrained(LEGACY / "pipeline" / "bridge")


def test_legacy_weights_that_do_not_fit_the_config_are_named(tmp_path):
    shutil.copytree(LEGACY / "pipeline" / "think_tokens", tmp_path, dirs_exist_ok=True)
    (tmp_path / "config.json").write_text(json.dumps({"num_tokens": 8, "hidden_size": 32}))
    with pytest.raises(ValueError, match=r"model.safetensors does not fit the config"):
        ThinkTokens.from_pretrained(tmp_path)
