"""Import of the official DeepGen 1.0 weights (reference §9), checked with synthetic checkpoints at tiny size.

A tiny DeepGen is built directly from the tiny components, its SCB + DiT weights are written under the
official key names, in both released layouts:

(a) one checkpoint file (``.safetensors``, or a ``.pt`` plain dict read with ``weights_only=True``) holding
    ``meta_queries``, ``projector_1/2/3.*``, ``connector.*``, ``transformer.*`` (and a VLM LoRA under
    ``lmm.*``); the VLM, VAE and tokenizer come from their own folders;
(b) a diffusers-format release folder: ``transformer/``, ``vae/``, ``scheduler/``, ``tokenizer/`` and the
    SCB weights in other safetensors files, keyed relative to a module folder or by the full official names.

``deepgen_from_official`` must rebuild a model whose condition and velocity are identical to the original.
Because those checkpoints are written with ``to_official_state_dict`` (the inverse of the mapping under test), a
consistent mistake in both directions would pass them; layout (b) is therefore also built by hand from
docs/weights.md, every SCB key spelled out in this file, and each weight must land where the docs say.
The official layer rule ``range(num_layers - 1, 0, -6)`` picks one hidden state (index 3) of the 4-layer
tiny VLM, so the reference model here stacks one layer (``deepgen_tiny`` stacks three, uniformly).
"""

import logging

import pytest
import torch
from safetensors.torch import save_file

from deepgen_components import (
    BridgeConfig,
    ConditionedDiT,
    ConnectorConfig,
    DeepGenConfig,
    DeepGenModel,
    LayerSelection,
    StackedChannelBridge,
    ThinkTokens,
    ThinkTokenVLM,
    deepgen_from_official,
    deepgen_tiny,
)
from deepgen_components.official import (
    import_official_weights,
    map_official_key,
    read_official_weights,
    to_official_state_dict,
)
from deepgen_components.tiny import tiny_scheduler, tiny_tokenizer, tiny_transformer, tiny_vae, tiny_vlm

PROMPTS = ["a red cat", "a blue cube on the sky under the sun"]
SCB_MODULES = ("meta_queries", "projector_1", "projector_2", "projector_3", "connector")


def build_reference(seed: int = 0) -> DeepGenModel:
    """A tiny DeepGen in official parity mode whose stacked layers follow the official rule."""
    torch.manual_seed(seed)
    tokenizer = tiny_tokenizer()
    vlm = tiny_vlm(tokenizer, seed=seed)
    layers = LayerSelection.official(vlm.config.text_config.num_hidden_layers)
    assert layers.indices == (3,)
    bridge = StackedChannelBridge(
        BridgeConfig(
            num_stacked_layers=len(layers),
            vlm_hidden_size=64,
            connector=ConnectorConfig(hidden_size=48, num_layers=2, num_heads=4, intermediate_size=96),
            context_dim=64,
            pooled_dim=32,
            tokens="all",
            mask_padding=False,
        )
    )
    with torch.no_grad():  # the official heads start at zero, which would hide the bridge
        for head in (bridge.pooled_head, bridge.context_head):
            head.weight.normal_(0, 0.05)
            head.bias.normal_(0, 0.05)
    model = DeepGenModel(
        vlm,
        ThinkTokens(8, 64),
        layers,
        bridge,
        ConditionedDiT(tiny_transformer(seed=seed + 1)),
        tiny_vae(seed=seed + 2),
        tiny_scheduler(),
        tokenizer,
        DeepGenConfig(image_size=64),
    )
    return model.eval()


def lora_tensors(rank: int = 4, seed: int = 5) -> dict[str, torch.Tensor]:
    """A peft-style VLM LoRA under lmm.*: transformers 4.56 keys, 4.51 keys (as re-saved by the official RL
    code) and an embedding LoRA."""
    g = torch.Generator().manual_seed(seed)
    rand = lambda *shape: torch.randn(*shape, generator=g) * 0.1
    return {
        "lmm.model.language_model.layers.0.self_attn.q_proj.lora_A.weight": rand(rank, 64),
        "lmm.model.language_model.layers.0.self_attn.q_proj.lora_B.weight": rand(64, rank),
        "lmm.model.layers.1.mlp.down_proj.lora_A.weight": rand(rank, 128),  # 4.51 layout
        "lmm.model.layers.1.mlp.down_proj.lora_B.weight": rand(64, rank),
        "lmm.visual.blocks.0.attn.qkv.lora_A.weight": rand(rank, 32),  # 4.51 layout of the vision tower
        "lmm.visual.blocks.0.attn.qkv.lora_B.weight": rand(96, rank),
        "lmm.model.language_model.embed_tokens.lora_embedding_A": rand(rank, 288),  # (r, vocab)
        "lmm.model.language_model.embed_tokens.lora_embedding_B": rand(64, rank),  # (dim, r)
    }


# Our module name of each synthetic LoRA above.
LORA_MODULES = {
    "lmm.model.language_model.layers.0.self_attn.q_proj": "model.language_model.layers.0.self_attn.q_proj",
    "lmm.model.layers.1.mlp.down_proj": "model.language_model.layers.1.mlp.down_proj",
    "lmm.visual.blocks.0.attn.qkv": "model.visual.blocks.0.attn.qkv",
    "lmm.model.language_model.embed_tokens": "model.language_model.embed_tokens",
}


def peft_parameter(key: str) -> str:
    """The parameter name peft gives a synthetic lmm.* LoRA tensor (adapter "default")."""
    official_name = next(m for m in LORA_MODULES if key.startswith(m + "."))
    kind = key[len(official_name) + 1 :].removesuffix(".weight")  # lora_A, lora_embedding_A, ...
    return f"{LORA_MODULES[official_name]}.{kind}.default" + ("" if "embedding" in kind else ".weight")


@pytest.fixture(scope="module")
def reference():
    return build_reference(seed=0)


@pytest.fixture(scope="module")
def official(reference):
    return to_official_state_dict(reference)


def save_scb(folder, scb: dict, relative: bool) -> None:
    """The SCB tensors as a release writes them: per-module sub-folders (``connector/...: layers.0...``,
    ``projector_1/...: weight``, ``meta_queries.safetensors``) or one ``deepgen_scb.safetensors``."""
    if relative:
        for module in SCB_MODULES[1:]:
            (folder / module).mkdir()
            part = {k[len(module) + 1 :]: v for k, v in scb.items() if k.startswith(module + ".")}
            save_file(part, str(folder / module / "diffusion_pytorch_model.safetensors"))
        save_file({"meta_queries": scb["meta_queries"]}, str(folder / "meta_queries.safetensors"))
    else:
        save_file(scb, str(folder / "deepgen_scb.safetensors"))


@pytest.fixture(scope="module")
def files(reference, official, tmp_path_factory):
    """The reference model on disk: the VLM, VAE and tokenizer folders and both checkpoint layouts."""
    root = tmp_path_factory.mktemp("official")
    reference.vlm.save_pretrained(root / "qwen2_5_vl")
    reference.vae.save_pretrained(root / "vae")
    reference.tokenizer.save_pretrained(root / "tokenizer")
    contiguous = {k: v.contiguous() for k, v in official.items()}
    save_file(contiguous, str(root / "deepgen.safetensors"))
    torch.save(dict(contiguous), root / "deepgen.pt")
    save_file({**contiguous, **lora_tensors()}, str(root / "deepgen_sft.safetensors"))

    def release(name: str, relative: bool):
        folder = root / name
        reference.dit.transformer.save_pretrained(folder / "transformer")
        reference.vae.save_pretrained(folder / "vae")
        reference.scheduler.save_pretrained(folder / "scheduler")
        reference.tokenizer.save_pretrained(folder / "tokenizer")
        save_scb(folder, {k: v for k, v in contiguous.items() if not k.startswith("transformer.")}, relative)
        return folder

    return {
        "root": root,
        "transformer_config": dict(reference.dit.transformer.config),
        "vlm": root / "qwen2_5_vl",
        "vae": root / "vae",
        "tokenizer": root / "tokenizer",
        "safetensors": root / "deepgen.safetensors",
        "pt": root / "deepgen.pt",
        "sft": root / "deepgen_sft.safetensors",
        "release_relative": release("release_relative", relative=True),
        "release_full": release("release_full", relative=False),
    }


def load(files, weights, **kwargs) -> DeepGenModel:
    """deepgen_from_official with what the tiny sizes need (the 48-wide connector has 4 heads)."""
    if weights in ("safetensors", "pt", "sft"):
        kwargs.setdefault("vae_path", files["vae"])
        kwargs.setdefault("transformer_config", files["transformer_config"])
        kwargs.setdefault("tokenizer_path", files["tokenizer"])
    return deepgen_from_official(files["vlm"], files[weights], connector_heads=4, **kwargs)


@torch.no_grad()
def outputs(model: DeepGenModel) -> dict[str, torch.Tensor]:
    """The condition for a text-to-image and an editing batch, and a DiT velocity with a reference."""
    g = torch.Generator().manual_seed(0)
    reference_pixels = torch.rand(3, 64, 32, generator=g) * 2 - 1
    t2i = model.encode_condition(PROMPTS)
    edit = model.encode_condition(["make it blue", "blurry"], [[reference_pixels], [reference_pixels]])
    latents = torch.randn(2, 16, 8, 8, generator=g)
    ref_latents = torch.randn(2, 16, 8, 4, generator=g)
    velocity = model.velocity(latents, torch.tensor([900.0, 250.0]), edit, ref_latents)
    return {
        "t2i.context": t2i.context,
        "t2i.pooled": t2i.pooled,
        "edit.context": edit.context,
        "edit.pooled": edit.pooled,
        "velocity": velocity,
    }


def assert_identical_outputs(model, reference):
    ours, expected = outputs(model), outputs(reference)
    for name in expected:
        assert torch.equal(ours[name], expected[name]), name


# -- key mapping -------------------------------------------------------------------------------------------


def test_official_key_names_map_to_our_modules(reference, official):
    assert map_official_key("meta_queries") == "encoder.think_tokens.weight"
    assert map_official_key("projector_1.weight") == "bridge.projector.weight"
    assert map_official_key("projector_2.bias") == "bridge.pooled_head.bias"
    assert map_official_key("projector_3.weight") == "bridge.context_head.weight"
    assert map_official_key("connector.layers.1.mlp.fc2.weight") == "bridge.connector.layers.1.mlp.fc2.weight"
    assert map_official_key("transformer.proj_out.weight") == "dit.transformer.proj_out.weight"
    assert map_official_key("lmm.model.embed_tokens.weight") is None
    assert {k.split(".")[0] for k in official} == {*SCB_MODULES, "transformer"}
    ours = reference.state_dict()
    assert all(torch.equal(ours[map_official_key(k)], v) for k, v in official.items())
    expected = [k for k in ours if k.startswith(("encoder.think_tokens.", "bridge.", "dit.transformer."))]
    assert len(official) == len(expected)


# -- layout (a): one checkpoint file -----------------------------------------------------------------------


@pytest.mark.parametrize("weights", ["safetensors", "pt"])
def test_layout_a_import_reproduces_the_original_model_exactly(files, reference, weights):
    model = load(files, weights)
    assert model.layers == reference.layers
    assert model.think_tokens.num_tokens == 8
    assert model.bridge.config == reference.bridge.config
    assert model.import_report.missing == [] and model.import_report.unexpected == []
    assert_identical_outputs(model, reference)


def test_official_parity_mode_is_the_default_after_import(files):
    model = load(files, "safetensors")
    assert model.bridge.config.mask_padding is False and model.bridge.config.tokens == "all"
    # Parity: the pads of a batch take part, so a prompt's condition depends on its batch.
    with torch.no_grad():
        alone = model.encode_condition(PROMPTS[:1]).pooled
        batched = model.encode_condition(PROMPTS).pooled[:1]
    assert (alone - batched).abs().max() > 1e-4


def test_masked_mode_can_be_chosen_at_import(files):
    model = load(files, "safetensors", mask_padding=True)
    assert model.bridge.config.mask_padding is True
    with torch.no_grad():
        alone = model.encode_condition(PROMPTS[:1])
        batched = model.encode_condition(PROMPTS)
    pads = int((~batched.mask[0]).sum())
    assert pads > 0
    torch.testing.assert_close(batched.pooled[:1], alone.pooled, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(batched.context[:1, pads:], alone.context, atol=1e-5, rtol=1e-5)


# -- layout (b): diffusers-format release folder ------------------------------------------------------------


@pytest.mark.parametrize("weights", ["release_relative", "release_full"])
def test_layout_b_release_folder_import_reproduces_the_original_model_exactly(files, reference, weights):
    # transformer config, VAE, scheduler and tokenizer all come from the folder.
    model = load(files, weights)
    assert model.import_report.missing == [] and model.import_report.unexpected == []
    assert_identical_outputs(model, reference)


def test_both_layouts_read_the_same_official_tensors(files, official):
    for name in ("safetensors", "pt", "release_relative", "release_full"):
        state = read_official_weights(files[name])
        assert set(state) - {"transformer.pos_embed.pos_embed"} == set(official) - {
            "transformer.pos_embed.pos_embed"
        }
        assert all(torch.equal(state[k], official[k]) for k in state), name


# -- layout (b) built by hand from docs/weights.md ------------------------------------------------------------
#
# The release folder below is written from the documented layout alone: every SCB key is spelled out here, and
# nothing goes through to_official_state_dict / map_official_key (the mapping under test). transformer/, vae/,
# scheduler/ and tokenizer/ are plain diffusers / transformers folders. Sizes: a 4-layer 64-wide VLM (the
# official rule selects one layer), 8 think tokens, a 48-wide 2-layer connector (4 heads, FFN 96), pooled 32,
# context 64 (the tiny DiT's pooled_projection_dim / joint_attention_dim).

# official key -> (our key, shape), both as docs/weights.md ("Key mapping") spells them.
DOCUMENTED_SCB = {
    "meta_queries": ("encoder.think_tokens.weight", (8, 64)),
    "projector_1.weight": ("bridge.projector.weight", (48, 64)),
    "projector_1.bias": ("bridge.projector.bias", (48,)),
    "projector_2.weight": ("bridge.pooled_head.weight", (32, 48)),
    "projector_2.bias": ("bridge.pooled_head.bias", (32,)),
    "projector_3.weight": ("bridge.context_head.weight", (64, 48)),
    "projector_3.bias": ("bridge.context_head.bias", (64,)),
}
CONNECTOR_LAYER = {  # connector.layers.N.<name> -> bridge.connector.layers.N.<name>
    "self_attn.q_proj.weight": (48, 48),
    "self_attn.q_proj.bias": (48,),
    "self_attn.k_proj.weight": (48, 48),
    "self_attn.k_proj.bias": (48,),
    "self_attn.v_proj.weight": (48, 48),
    "self_attn.v_proj.bias": (48,),
    "self_attn.out_proj.weight": (48, 48),
    "self_attn.out_proj.bias": (48,),
    "layer_norm1.weight": (48,),
    "layer_norm1.bias": (48,),
    "layer_norm2.weight": (48,),
    "layer_norm2.bias": (48,),
    "mlp.fc1.weight": (96, 48),
    "mlp.fc1.bias": (96,),
    "mlp.fc2.weight": (48, 96),
    "mlp.fc2.bias": (48,),
}
for _n in (0, 1):
    for _name, _shape in CONNECTOR_LAYER.items():
        DOCUMENTED_SCB[f"connector.layers.{_n}.{_name}"] = (f"bridge.connector.layers.{_n}.{_name}", _shape)


def documented_scb_tensors(seed: int = 11) -> dict[str, torch.Tensor]:
    """Distinct random values for every documented SCB key (so a weight landing in the wrong place shows)."""
    g = torch.Generator().manual_seed(seed)
    return {key: torch.randn(shape, generator=g) * 0.1 for key, (_, shape) in DOCUMENTED_SCB.items()}


@pytest.fixture(scope="module")
def hand_built(tmp_path_factory):
    """Two release folders written by hand (full official names in one file; module-relative names in
    per-module sub-folders), the diffusers / transformers components they hold, and the VLM folder."""
    from safetensors.torch import load_file

    root = tmp_path_factory.mktemp("hand_built")
    tokenizer = tiny_tokenizer()
    tiny_vlm(tokenizer, seed=3).save_pretrained(root / "qwen2_5_vl")
    transformer, vae = tiny_transformer(seed=4), tiny_vae(seed=5)
    scheduler = tiny_scheduler()
    scheduler.register_to_config(shift=2.0)  # not the built-in default (3), to see it is read from the folder
    scb = documented_scb_tensors()

    def release(name: str, relative: bool):
        folder = root / name
        transformer.save_pretrained(folder / "transformer")
        vae.save_pretrained(folder / "vae")
        scheduler.save_pretrained(folder / "scheduler")
        tokenizer.save_pretrained(folder / "tokenizer")
        # Documented as never searched for SCB weights: a decoy there must not replace projector_1.
        (folder / "vlm").mkdir()
        save_file({"projector_1.weight": torch.zeros(48, 64)}, str(folder / "vlm" / "decoy.safetensors"))
        save_scb(folder, scb, relative)
        return folder

    return {
        "vlm": root / "qwen2_5_vl",
        "scb": scb,
        "transformer": load_file(str(release("full", False) / "transformer" / "diffusion_pytorch_model.safetensors")),
        "vae": vae.state_dict(),
        "full": root / "full",
        "relative": release("relative", True),
    }


def test_hand_built_relative_folder_uses_the_documented_module_relative_names(hand_built):
    from safetensors.torch import load_file

    assert set(load_file(str(hand_built["relative"] / "projector_1" / "diffusion_pytorch_model.safetensors"))) == {
        "weight",
        "bias",
    }
    connector = load_file(str(hand_built["relative"] / "connector" / "diffusion_pytorch_model.safetensors"))
    assert "layers.0.mlp.fc1.weight" in connector and len(connector) == 2 * len(CONNECTOR_LAYER)


@pytest.mark.parametrize("layout", ["full", "relative"])
def test_layout_b_hand_built_from_the_docs_puts_every_weight_where_documented(hand_built, layout):
    model = deepgen_from_official(hand_built["vlm"], hand_built[layout], connector_heads=4)
    report = model.import_report
    assert report.missing == [] and report.unexpected == [] and report.ignored == []
    transformer = hand_built["transformer"]
    assert len(report.loaded) == len(DOCUMENTED_SCB) + len(transformer)
    ours = model.state_dict()
    for official_key, (our_key, shape) in DOCUMENTED_SCB.items():
        assert tuple(ours[our_key].shape) == shape, our_key
        assert torch.equal(ours[our_key], hand_built["scb"][official_key]), (official_key, our_key)
    for key, value in transformer.items():  # transformer/<key> -> dit.transformer.<key>
        assert torch.equal(ours[f"dit.transformer.{key}"], value), key
    # The other documented folders: vae/, scheduler/ (shift 2, not the default 3), tokenizer/; layers by the
    # official rule on the 4-layer VLM; the connector sizes from the tensors.
    assert all(torch.equal(model.vae.state_dict()[k], v) for k, v in hand_built["vae"].items())
    assert model.scheduler.config.shift == 2.0
    assert model.layers.indices == (3,)
    assert model.think_tokens.num_tokens == 8
    assert len(model.bridge.connector.layers) == 2
    assert model.bridge.config.mask_padding is False and model.bridge.config.tokens == "all"


# -- strictness and reporting -------------------------------------------------------------------------------


def test_missing_keys_raise_listing_them(official):
    target = build_reference(seed=1)
    state = {k: v for k, v in official.items() if not k.startswith("connector.layers.1.")}
    with pytest.raises(
        ValueError, match=r"expected keys are missing.*bridge\.connector\.layers\.1\..*strict=False"
    ):
        import_official_weights(target, state=state)


def test_non_strict_import_loads_the_rest_and_reports_the_missing_keys(reference, official):
    target = build_reference(seed=1)
    before = {k: v.clone() for k, v in target.state_dict().items()}
    state = {k: v for k, v in official.items() if not k.startswith("connector.layers.1.")}
    report = import_official_weights(target, state=state, strict=False)
    missing = sorted(map_official_key(k) for k in official if k.startswith("connector.layers.1."))
    assert report.missing == missing
    ours, expected = target.state_dict(), reference.state_dict()
    for official_key in state:
        key = map_official_key(official_key)
        assert torch.equal(ours[key], expected[key]), key
    for key in missing:
        assert torch.equal(ours[key], before[key]), key  # left as they were


def test_unexpected_keys_are_reported_and_logged(official, caplog):
    target = build_reference(seed=1)
    extra = {
        "projector_9.weight": torch.zeros(2),
        "connector.layers.7.mlp.fc1.weight": torch.zeros(2),
        "foo": torch.zeros(1),
    }
    with caplog.at_level(logging.WARNING, logger="deepgen_components.official"):
        report = import_official_weights(target, state={**official, **extra})
    assert sorted(report.unexpected) == sorted(extra)
    assert report.missing == []
    assert any("projector_9.weight" in r.getMessage() for r in caplog.records)


def test_vae_and_ema_keys_are_ignored(reference, official):
    target = build_reference(seed=1)
    ignored = {"vae.encoder.conv_in.weight": torch.zeros(3), "ema.projector_1.weight": torch.zeros(7, 7)}
    report = import_official_weights(target, state={**official, **ignored})
    assert sorted(report.ignored) == sorted(ignored) and report.unexpected == []
    assert torch.equal(target.bridge.projector.weight, reference.bridge.projector.weight)


def test_a_shape_mismatch_raises_naming_the_key(official):
    target = build_reference(seed=1)
    bad = {**official, "projector_1.weight": torch.zeros(48, 65)}
    with pytest.raises(ValueError, match=r"projector_1\.weight has shape \(48, 65\).*\(48, 64\)"):
        import_official_weights(target, state=bad)


# -- the VLM LoRA under lmm.* ---------------------------------------------------------------------------------


def test_merged_lora_adds_alpha_over_r_times_b_a_to_each_weight(reference, official):
    target = build_reference(seed=0)  # same VLM weights as the reference
    lora = lora_tensors(rank=4)
    report = import_official_weights(target, state={**official, **lora}, merge_lora=True, lora_alpha=16.0)
    assert report.lora_merged and sorted(report.lora_modules) == sorted(LORA_MODULES.values())
    ours, before = dict(target.vlm.named_modules()), dict(reference.vlm.named_modules())
    scale = 16.0 / 4
    for official_name, name in LORA_MODULES.items():
        if "embed_tokens" in name:
            delta = (lora[f"{official_name}.lora_embedding_B"] @ lora[f"{official_name}.lora_embedding_A"]).T
        else:
            delta = lora[f"{official_name}.lora_B.weight"] @ lora[f"{official_name}.lora_A.weight"]
        torch.testing.assert_close(ours[name].weight, before[name].weight + scale * delta)
    untouched = "model.language_model.layers.0.self_attn.k_proj"
    assert torch.equal(ours[untouched].weight, before[untouched].weight)


def test_lora_alpha_defaults_to_twice_the_rank_as_officially_trained(reference, official):
    target = build_reference(seed=0)
    lora = lora_tensors(rank=4)
    import_official_weights(target, state={**official, **lora})
    q = "model.language_model.layers.0.self_attn.q_proj"
    key = "lmm.model.language_model.layers.0.self_attn.q_proj"
    expected = (
        dict(reference.vlm.named_modules())[q].weight
        + 2.0 * lora[f"{key}.lora_B.weight"] @ lora[f"{key}.lora_A.weight"]
    )
    torch.testing.assert_close(dict(target.vlm.named_modules())[q].weight, expected)


def test_lora_on_lm_head_is_ignored_and_base_weights_under_lmm_are_loaded(official):
    target = build_reference(seed=1)
    source = build_reference(seed=0)
    extra = {
        "lmm.lm_head.lora_A.weight": torch.zeros(4, 64),
        "lmm.lm_head.lora_B.weight": torch.zeros(288, 4),
        # peft keeps the base weight of a wrapped Linear as base_layer.weight.
        "lmm.model.layers.2.mlp.up_proj.base_layer.weight": source.vlm.model.language_model.layers[
            2
        ].mlp.up_proj.weight,
    }
    report = import_official_weights(target, state={**official, **extra})
    assert any("lm_head" in item for item in report.ignored)
    assert "lmm:model.language_model.layers.2.mlp.up_proj.weight" in report.loaded
    assert torch.equal(
        target.vlm.model.language_model.layers[2].mlp.up_proj.weight,
        source.vlm.model.language_model.layers[2].mlp.up_proj.weight,
    )


@pytest.mark.filterwarnings("ignore:Model has `tie_word_embeddings=True`:UserWarning")
@torch.no_grad()
def test_unmerged_lora_gives_the_hidden_states_of_a_peft_model_built_directly(files, reference):
    from peft import LoraConfig, inject_adapter_in_model
    from transformers import Qwen2_5_VLForConditionalGeneration

    imported = load(files, "sft", merge_lora=False)
    assert not imported.import_report.lora_merged

    vlm = Qwen2_5_VLForConditionalGeneration.from_pretrained(files["vlm"], attn_implementation="sdpa").eval()
    inject_adapter_in_model(
        LoraConfig(r=4, lora_alpha=8, target_modules=list(LORA_MODULES.values()), init_lora_weights=False),
        vlm,
    )
    params = dict(vlm.named_parameters())
    for key, value in lora_tensors().items():
        params[peft_parameter(key)].copy_(value)
    direct = ThinkTokenVLM(vlm, think_tokens=reference.think_tokens, layers=reference.layers)

    pixels = torch.rand(3, 64, 32, generator=torch.Generator().manual_seed(0)) * 2 - 1
    batch = imported.prepare_prompts(["make it blue", "a red cat"], [[pixels], []])
    ours = imported.encoder(
        batch.input_ids,
        batch.attention_mask,
        batch.pixel_values,
        batch.image_grid_thw,
        output_all_hidden_states=True,
    )
    theirs = direct(
        batch.input_ids,
        batch.attention_mask,
        batch.pixel_values,
        batch.image_grid_thw,
        output_all_hidden_states=True,
    )
    assert len(ours.all_hidden_states) == 5
    for i, (a, b) in enumerate(zip(ours.all_hidden_states, theirs.all_hidden_states)):
        assert torch.equal(a, b), i
    # ... and the LoRA matters: the plain VLM gives different states.
    plain = reference.encoder(batch.input_ids, batch.attention_mask, batch.pixel_values, batch.image_grid_thw)
    assert (plain.hidden_states[0] - ours.hidden_states[0]).abs().max() > 1e-3

    merged = load(files, "sft", merge_lora=True)
    torch.testing.assert_close(
        outputs(merged)["t2i.context"], outputs(imported)["t2i.context"], atol=1e-5, rtol=1e-5
    )


@pytest.mark.filterwarnings("ignore:Model has `tie_word_embeddings=True`:UserWarning")
@torch.no_grad()
def test_unmerged_lora_of_mixed_ranks_matches_the_merged_one(official):
    lora = lora_tensors(rank=4)
    g = torch.Generator().manual_seed(9)
    lora["lmm.model.layers.1.mlp.down_proj.lora_A.weight"] = torch.randn(2, 128, generator=g) * 0.1  # rank 2
    lora["lmm.model.layers.1.mlp.down_proj.lora_B.weight"] = torch.randn(64, 2, generator=g) * 0.1
    merged, injected = build_reference(seed=0), build_reference(seed=0)
    import_official_weights(merged, state={**official, **lora}, merge_lora=True)
    import_official_weights(injected, state={**official, **lora}, merge_lora=False)
    down = injected.vlm.model.language_model.layers[1].mlp.down_proj
    assert down.r["default"] == 2 and down.scaling["default"] == 2.0  # alpha = 2r per module
    torch.testing.assert_close(
        outputs(injected)["t2i.context"], outputs(merged)["t2i.context"], atol=1e-5, rtol=1e-5
    )


def test_an_lm_head_only_lora_injects_nothing(official):
    target = build_reference(seed=1)
    lora = {"lmm.lm_head.lora_A.weight": torch.zeros(4, 64), "lmm.lm_head.lora_B.weight": torch.zeros(288, 4)}
    report = import_official_weights(target, state={**official, **lora}, merge_lora=False)
    assert report.lora_modules == [] and any("lm_head" in item for item in report.ignored)


# -- bad input ------------------------------------------------------------------------------------------------


def test_missing_files_raise_file_not_found_with_the_path(files, tmp_path):
    with pytest.raises(FileNotFoundError, match=str(tmp_path / "nothing.safetensors")):
        deepgen_from_official(files["vlm"], tmp_path / "nothing.safetensors", vae_path=files["vae"])
    with pytest.raises(FileNotFoundError, match=str(tmp_path / "no_vlm")):
        deepgen_from_official(tmp_path / "no_vlm", files["safetensors"], vae_path=files["vae"])
    with pytest.raises(FileNotFoundError, match="vae_path"):
        deepgen_from_official(
            files["vlm"],
            files["safetensors"],
            tokenizer_path=files["tokenizer"],
            transformer_config=files["transformer_config"],
            connector_heads=4,
        )


def test_a_checkpoint_for_a_different_layer_selection_is_rejected(files, tmp_path):
    # deepgen_tiny stacks 3 layers (uniform); the official rule on this 4-layer VLM selects one.
    path = tmp_path / "three_layers.safetensors"
    save_file({k: v.contiguous() for k, v in to_official_state_dict(deepgen_tiny()).items()}, str(path))
    with pytest.raises(
        ValueError, match="projector_1 takes 192 channels but the official rule selects 1 layers"
    ):
        deepgen_from_official(files["vlm"], path, vae_path=files["vae"], connector_heads=4)


def test_connector_heads_are_required_when_the_width_is_not_a_multiple_of_64(files):
    with pytest.raises(ValueError, match="connector_heads"):
        deepgen_from_official(
            files["vlm"], files["safetensors"], vae_path=files["vae"], tokenizer_path=files["tokenizer"]
        )


def test_a_file_that_is_not_an_official_checkpoint_is_rejected(files, tmp_path):
    path = tmp_path / "other.safetensors"
    save_file({"weight": torch.zeros(2)}, str(path))
    with pytest.raises(ValueError, match="meta_queries"):
        deepgen_from_official(files["vlm"], path, vae_path=files["vae"])
    folder = tmp_path / "folder"
    folder.mkdir()
    with pytest.raises(ValueError, match="transformer/"):
        deepgen_from_official(files["vlm"], folder, vae_path=files["vae"])
