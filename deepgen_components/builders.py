"""Model builders: ``deepgen_tiny()`` (random, seconds on a CPU), ``deepgen_shapes()`` (trained on the shapes
world, shipped inside the package), ``deepgen_small()`` (1/8 width, for latency work), ``deepgen_1_0()`` (real
shapes; official weights from local paths, or random / meta for counting and benchmarks). ``build_preset(name)``
picks one by name.
"""

from __future__ import annotations

import contextlib
import logging
from pathlib import Path

import torch

from deepgen_components.bridge import BridgeConfig, StackedChannelBridge
from deepgen_components.connector import ConnectorConfig
from deepgen_components.dit import ConditionedDiT
from deepgen_components.layer_selection import LayerSelection
from deepgen_components.model import DeepGenConfig, DeepGenModel
from deepgen_components.serialization import load_model_folder, load_vlm_folder, model_skeleton
from deepgen_components.think_tokens import ThinkTokens
from deepgen_components.tiny import (
    QWEN_SPECIAL_TOKENS,
    tiny_scheduler,
    tiny_tokenizer,
    tiny_transformer,
    tiny_vae,
    tiny_vlm,
)

__all__ = [
    "PRESETS",
    "QWEN2_5_VL_3B_CONFIG",
    "SD35_MEDIUM_TRANSFORMER_CONFIG",
    "SD3_VAE_CONFIG",
    "build_preset",
    "deepgen_1_0",
    "deepgen_from_official",
    "deepgen_shapes",
    "deepgen_small",
    "deepgen_tiny",
    "materialize_random",
]

logger = logging.getLogger(__name__)

# Public upstream configs ([ext] in the architecture reference), embedded so that the real shapes can be
# built without any download (meta device for counting, random weights for latency).
QWEN2_5_VL_3B_CONFIG = {
    "text_config": {
        "vocab_size": 151936,
        "hidden_size": 2048,
        "intermediate_size": 11008,
        "num_hidden_layers": 36,
        "num_attention_heads": 16,
        "num_key_value_heads": 2,
        "max_position_embeddings": 128000,
        "rms_norm_eps": 1e-6,
        "rope_parameters": {"rope_type": "default", "rope_theta": 1000000.0, "mrope_section": [16, 24, 24]},
        "tie_word_embeddings": True,
        "hidden_act": "silu",
    },
    "vision_config": {
        "depth": 32,
        "hidden_size": 1280,
        "intermediate_size": 3420,
        "num_heads": 16,
        "in_channels": 3,
        "out_hidden_size": 2048,
        "patch_size": 14,
        "spatial_merge_size": 2,
        "temporal_patch_size": 2,
        "window_size": 112,
        "fullatt_block_indexes": [7, 15, 23, 31],
        "tokens_per_second": 2,
        "hidden_act": "silu",
    },
    "tie_word_embeddings": True,
    "image_token_id": 151655,
    "video_token_id": 151656,
    "vision_start_token_id": 151652,
    "vision_end_token_id": 151653,
}

SD35_MEDIUM_TRANSFORMER_CONFIG = {
    "sample_size": 128,
    "patch_size": 2,
    "in_channels": 16,
    "out_channels": 16,
    "num_layers": 24,
    "attention_head_dim": 64,
    "num_attention_heads": 24,
    "joint_attention_dim": 4096,
    "caption_projection_dim": 1536,
    "pooled_projection_dim": 2048,
    "pos_embed_max_size": 384,
    "dual_attention_layers": list(range(13)),
    "qk_norm": "rms_norm",
}

SD3_VAE_CONFIG = {
    "in_channels": 3,
    "out_channels": 3,
    "down_block_types": ["DownEncoderBlock2D"] * 4,
    "up_block_types": ["UpDecoderBlock2D"] * 4,
    "block_out_channels": [128, 256, 512, 512],
    "layers_per_block": 2,
    "latent_channels": 16,
    "norm_num_groups": 32,
    "sample_size": 1024,
    "act_fn": "silu",
    "use_quant_conv": False,
    "use_post_quant_conv": False,
    "shift_factor": 0.0609,
    "scaling_factor": 1.5305,
}


def _default_device(device):
    """Create parameters directly on ``device`` (meta: no memory at all; cuda: no CPU copy)."""
    return torch.device(device) if device is not None else contextlib.nullcontext()


def _qwen_vl(config_dict: dict, tokenizer=None):
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

    config_dict = {**config_dict, "text_config": dict(config_dict["text_config"])}
    if tokenizer is not None:  # random weights with an offline tokenizer: use its special-token ids
        ids = {t: tokenizer.convert_tokens_to_ids(t) for t in QWEN_SPECIAL_TOKENS}
        config_dict.update(
            image_token_id=ids["<|image_pad|>"],
            video_token_id=ids["<|video_pad|>"],
            vision_start_token_id=ids["<|vision_start|>"],
            vision_end_token_id=ids["<|vision_end|>"],
        )
        config_dict["text_config"].update(pad_token_id=ids["<|endoftext|>"], eos_token_id=ids["<|im_end|>"])
    config = Qwen2_5_VLConfig(**config_dict)
    config._attn_implementation = "sdpa"
    return Qwen2_5_VLForConditionalGeneration(config)


def _randomise_heads(bridge: StackedChannelBridge, std: float = 0.02) -> None:
    with torch.no_grad():
        for head in (bridge.pooled_head, bridge.context_head):
            head.weight.normal_(0.0, std)
            head.bias.normal_(0.0, std)


def _fresh_like(t: torch.Tensor, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """Uninitialised memory for a meta tensor (floating tensors in ``dtype``), filled with NaN so that a tensor no
    init touches is caught afterwards."""
    out = torch.empty_like(t, device=device, dtype=dtype if t.is_floating_point() else t.dtype)
    return out.fill_(float("nan")) if out.is_floating_point() else out.zero_()


def _init_rule(module: torch.nn.Module):
    """The init a module's constructor gives its own tensors (its children's for the connector), or None."""
    from diffusers.models.embeddings import PatchEmbed, get_2d_sincos_pos_embed

    if isinstance(module, PatchEmbed) and module.pos_embed is not None:  # the fixed sin-cos position table

        def table():
            grid = module.pos_embed_max_size or int((module.height * module.width) ** 0.5)
            value = get_2d_sincos_pos_embed(module.pos_embed.shape[-1], grid, base_size=module.base_size,
                                            interpolation_scale=module.interpolation_scale, output_type="pt")
            module.pos_embed.copy_(value.float().unsqueeze(0))

        return table
    if isinstance(module, ThinkTokens):  # N(0, 1/sqrt(D)), the official init
        return lambda: module.weight.normal_(0.0, module.hidden_size**-0.5)
    if isinstance(module, StackedChannelBridge):  # zero heads (its other layers have their own rules)
        return module.reset_heads
    if hasattr(module, "reset_parameters"):  # torch layers; the connector's official init
        return module.reset_parameters
    if "Norm" in type(module).__name__:  # RMSNorm-like layers without reset_parameters: weight 1, bias 0
        affine = [(getattr(module, n), v) for n, v in (("weight", 1.0), ("bias", 0.0)) if hasattr(module, n)]
        return lambda: [t.fill_(v) for t, v in affine if isinstance(t, torch.Tensor)]
    return None


def _uninitialised(named_tensors) -> list[str]:
    return [name for name, t in named_tensors if t.is_floating_point() and t.isnan().any()]


@torch.no_grad()
def materialize_random(
    model: torch.nn.Module, *, dtype: torch.dtype = torch.float32, device: str | torch.device | None = None
) -> torch.nn.Module:
    """Give every tensor of ``model`` still on the meta device memory in ``dtype`` (floating tensors) on ``device``
    (default CPU) and its initial value, without an fp32 copy: a model built on meta becomes the random model its
    constructors would have built, directly in ``dtype``; tensors already materialised (loaded weights) are kept.

    A Hugging Face model wholly on meta gets its own ``init_weights`` (rotary tables included, tied weights
    re-tied). Every other module, children before parents, gets the init its constructor runs:
    ``reset_parameters`` (torch layers, the connector's official init), zero bridge heads, N(0, 1/sqrt(D)) think
    tokens, weight 1 / bias 0 for norm layers without ``reset_parameters``, the DiT's sin-cos position table;
    loaded tensors a parent's init would overwrite are restored. Every new tensor starts as NaN, and one that no
    init reached raises ValueError naming it: nothing is left uninitialised. Returns ``model``."""
    from transformers import PreTrainedModel

    device = torch.device(device if device is not None else "cpu")
    left: list[str] = []
    hf_roots = [(n, m) for n, m in model.named_modules() if isinstance(m, PreTrainedModel)]
    hf_roots = [(n, m) for n, m in hf_roots if not any(n.startswith(f"{o}.") for o, _ in hf_roots if o and o != n)]
    for name, module in hf_roots:
        tensors = [*module.parameters(), *module.buffers()]
        if not any(t.is_meta for t in tensors):
            continue
        if not all(t.is_meta for t in tensors):
            raise ValueError(f"model: {name or type(module).__name__} is partly on the meta device; load it whole")
        module.to(dtype=dtype).to_empty(device=device)
        for t in (*module.parameters(), *module.buffers()):
            t.fill_(float("nan")) if t.is_floating_point() else t.zero_()
        module.init_weights()
        left += _uninitialised([(f"{name}.{k}", t) for k, t in (*module.named_parameters(), *module.named_buffers())])
    skip = {id(m) for _, root in hf_roots for m in root.modules()}
    fresh: dict[int, tuple[str, torch.Tensor]] = {}  # every tensor allocated below, by id (kept alive here)

    def visit(module: torch.nn.Module, prefix: str) -> bool:
        """Materialise and initialise ``module``'s subtree; True when it holds a tensor allocated here."""
        if id(module) in skip:
            return False
        touched = any([visit(child, f"{prefix}{name}.") for name, child in module.named_children()])
        for registry in (module._parameters, module._buffers):
            for key, t in registry.items():
                if t is not None and t.is_meta:
                    new = _fresh_like(t, dtype, device)
                    registry[key] = torch.nn.Parameter(new, t.requires_grad) if registry is module._parameters else new
                    fresh[id(registry[key])] = (prefix + key, registry[key])
                    touched = True
        rule = _init_rule(module) if touched else None
        if rule is not None:
            kept = [(t, t.clone()) for t in (*module.parameters(), *module.buffers()) if id(t) not in fresh]
            rule()
            for t, value in kept:
                t.copy_(value)
        return touched

    visit(model, "")
    left += _uninitialised(fresh.values())
    if left:
        raise ValueError(f"model: no initialisation rule for {len(left)} tensors built on meta: {', '.join(left[:10])}")
    return model


def deepgen_tiny(
    seed: int = 0,
    *,
    num_think_tokens: int = 8,
    mask_padding: bool = True,
    tokens: str = "all",
    zero_heads: bool = False,
    device: str | torch.device | None = None,
    config: DeepGenConfig | None = None,
) -> DeepGenModel:
    """A random DeepGen with the real layout at toy size (~1M parameters, builds in well under a second).

    VLM: Qwen2.5-VL hidden 64, 4 layers, vision tower depth 2; stacks layers (3, 2, 1); connector 48 wide,
    2 layers; DiT: 2 MMDiT blocks (block 0 with dual attention), 32 wide; VAE: 16 channels, 8x. Heads are
    random (``zero_heads=False``) so the prompt reaches the DiT; pass ``zero_heads=True`` for a
    training-start model like the official one. ``image_size`` is 64 (8x8 latents).
    """
    torch.manual_seed(seed)
    with _default_device(device):
        tokenizer = tiny_tokenizer()
        vlm = tiny_vlm(tokenizer, seed=seed)
        layers = LayerSelection.uniform(vlm.config.text_config.num_hidden_layers, 3)
        think = ThinkTokens(num_think_tokens, vlm.config.text_config.hidden_size)
        bridge = StackedChannelBridge(
            BridgeConfig(
                num_stacked_layers=len(layers),
                vlm_hidden_size=vlm.config.text_config.hidden_size,
                connector=ConnectorConfig(hidden_size=48, num_layers=2, num_heads=4, intermediate_size=96),
                context_dim=64,
                pooled_dim=32,
                tokens=tokens,
                mask_padding=mask_padding,
            )
        )
        if not zero_heads:
            _randomise_heads(bridge)
        dit = ConditionedDiT(tiny_transformer(context_dim=64, pooled_dim=32, seed=seed + 1))
        vae = tiny_vae(seed=seed + 2)
    config = config or DeepGenConfig(image_size=64)
    return DeepGenModel(vlm, think, layers, bridge, dit, vae, tiny_scheduler(), tokenizer, config).eval()


def deepgen_small(
    seed: int = 0, *, device: str | torch.device | None = None, dtype: torch.dtype | None = None
) -> DeepGenModel:
    """About 1/8 the width of DeepGen 1.0 with the same depth pattern (36-layer VLM, 6 stacked layers,
    6-layer connector, 24-block DiT with 13 dual-attention blocks): random weights, for latency and
    export work on CPUs. Uses the offline tiny tokenizer."""
    from diffusers import AutoencoderKL, SD3Transformer2DModel

    torch.manual_seed(seed)
    tokenizer = tiny_tokenizer()
    vlm_cfg = {
        **QWEN2_5_VL_3B_CONFIG,
        "text_config": {
            **QWEN2_5_VL_3B_CONFIG["text_config"],
            "vocab_size": len(tokenizer),
            "hidden_size": 256,
            "intermediate_size": 1376,
            "num_attention_heads": 2,
            "num_key_value_heads": 1,
            "max_position_embeddings": 8192,
        },
        "vision_config": {
            **QWEN2_5_VL_3B_CONFIG["vision_config"],
            "depth": 8,
            "hidden_size": 160,
            "intermediate_size": 428,
            "num_heads": 2,
            "out_hidden_size": 256,
            "fullatt_block_indexes": [3, 7],
        },
    }
    dit_cfg = {
        **SD35_MEDIUM_TRANSFORMER_CONFIG,
        "num_attention_heads": 3,
        "caption_projection_dim": 192,
        "joint_attention_dim": 512,
        "pooled_projection_dim": 256,
    }
    with _default_device(device):
        vlm = _qwen_vl(vlm_cfg, tokenizer)
        layers = LayerSelection.official(36)
        think = ThinkTokens(128, 256)
        bridge = StackedChannelBridge(
            BridgeConfig(
                num_stacked_layers=6,
                vlm_hidden_size=256,
                connector=ConnectorConfig(hidden_size=256, num_layers=6, num_heads=4, intermediate_size=1493),
                context_dim=512,
                pooled_dim=256,
                mask_padding=True,
            )
        )
        _randomise_heads(bridge)
        dit = ConditionedDiT(SD3Transformer2DModel(**dit_cfg))
        vae = AutoencoderKL(**{**SD3_VAE_CONFIG, "block_out_channels": [32, 64, 128, 128], "norm_num_groups": 16})
    model = DeepGenModel(vlm, think, layers, bridge, dit, vae, tiny_scheduler(), tokenizer, DeepGenConfig())
    if dtype is not None:
        model = model.to(dtype)
    return model.eval()


def deepgen_from_official(
    vlm_path: str | Path,
    weights_path: str | Path,
    *,
    vae_path: str | Path | None = None,
    transformer_config: dict | str | Path | None = None,
    scheduler_path: str | Path | None = None,
    tokenizer_path: str | Path | None = None,
    connector_heads: int | None = None,
    device: str | torch.device | None = None,
    dtype: torch.dtype = torch.float32,
    mask_padding: bool = False,
    tokens: str = "all",
    merge_lora: bool = True,
    strict: bool = True,
    config: DeepGenConfig | None = None,
) -> DeepGenModel:
    """Build a DeepGen model of whatever size an official-layout checkpoint has, and load it.

    The SCB sizes come from the checkpoint's tensors (think tokens from ``meta_queries``, stacked width from
    ``projector_1``, connector depth / FFN from ``connector.*``, head widths from ``projector_2/3``); the layers
    follow the official rule ``range(num_layers - 1, 0, -6)`` of the VLM in ``vlm_path``. The connector's head
    count cannot be read from weights: it is ``connector_heads`` or width / 64 (official head_dim 64). The DiT
    config comes from ``transformer_config`` (dict, config.json or folder), the release folder's
    ``transformer/``, or SD3.5-Medium. Official parity (``mask_padding=False``, ``tokens="all"``) by default.
    """
    import json

    from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel
    from transformers import AutoTokenizer, Qwen2_5_VLForConditionalGeneration

    from deepgen_components import official

    vlm_path = Path(vlm_path)
    if not (vlm_path / "config.json").is_file():
        raise FileNotFoundError(f"vlm_path: no config.json in {vlm_path} (expected a Qwen2.5-VL folder)")
    release = official.find_release_folder(weights_path)
    state = official.read_official_weights(weights_path, dtype=dtype)  # cast tensor by tensor as read
    for key in ("meta_queries", "projector_1.weight", "projector_2.weight", "projector_3.weight"):
        if key not in state:
            raise ValueError(f"weights_path: {weights_path} has no {key!r}; is it an official DeepGen checkpoint?")

    tokenizer_dir = Path(tokenizer_path) if tokenizer_path else (
        release / "tokenizer" if release is not None and (release / "tokenizer").is_dir() else vlm_path
    )
    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    tokenizer.padding_side = "left"
    with _default_device(device):  # the libraries' own loaders, in the target dtype
        vlm = load_vlm_folder(Qwen2_5_VLForConditionalGeneration, vlm_path, dtype)
    text = vlm.config.text_config
    layers = LayerSelection.official(text.num_hidden_layers)
    num_tokens, hidden = state["meta_queries"].shape
    width, stacked = state["projector_1.weight"].shape
    if stacked != len(layers) * hidden:
        raise ValueError(
            f"weights_path: projector_1 takes {stacked} channels but the official rule selects {len(layers)} layers "
            f"x {hidden} = {len(layers) * hidden} from this {text.num_hidden_layers}-layer VLM"
        )
    depth = len({k.split(".")[2] for k in state if k.startswith("connector.layers.")})
    heads = connector_heads or (width // 64 if width % 64 == 0 else None)
    if heads is None:
        raise ValueError(f"connector_heads: the connector is {width} wide (not a multiple of 64); give its head count")
    if isinstance(transformer_config, dict):
        dit_cfg = transformer_config
    elif transformer_config is not None:
        cfg_path = Path(transformer_config)
        dit_cfg = json.loads((cfg_path / "config.json" if cfg_path.is_dir() else cfg_path).read_text())
    elif release is not None:
        dit_cfg = SD3Transformer2DModel.load_config(release / "transformer")
    else:
        dit_cfg = SD35_MEDIUM_TRANSFORMER_CONFIG
    vae_dir = Path(vae_path) if vae_path is not None else (release / "vae" if release is not None else None)
    if vae_dir is None or not (vae_dir / "config.json").is_file():
        raise FileNotFoundError(
            f"vae_path: {'no config.json in ' + str(vae_dir) if vae_dir else 'not given'}; an original-layout "
            "DeepGen checkpoint holds no VAE: pass the SD3 VAE folder (e.g. UniPic2-SD3.5M-Kontext-2B/vae)"
        )
    with _default_device(device):
        vae = AutoencoderKL.from_pretrained(vae_dir, torch_dtype=dtype)
    scheduler_dir = Path(scheduler_path) if scheduler_path else (
        release / "scheduler" if release is not None and (release / "scheduler").is_dir() else None
    )
    scheduler = (
        FlowMatchEulerDiscreteScheduler.from_pretrained(scheduler_dir)
        if scheduler_dir is not None
        else FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=3.0)
    )
    connector = ConnectorConfig(hidden_size=width, num_layers=depth, num_heads=heads,
                                intermediate_size=state["connector.layers.0.mlp.fc1.weight"].shape[0])
    with torch.device("meta"):  # the checkpoint's tensors become these modules' weights: no allocation here
        bridge = StackedChannelBridge(
            BridgeConfig(
                num_stacked_layers=len(layers), vlm_hidden_size=hidden, connector=connector,
                context_dim=state["projector_3.weight"].shape[0], pooled_dim=state["projector_2.weight"].shape[0],
                tokens=tokens, mask_padding=mask_padding,
            )
        )
        think, transformer = ThinkTokens(num_tokens, hidden), SD3Transformer2DModel.from_config(dit_cfg)
    model = DeepGenModel(vlm, think, layers, bridge, ConditionedDiT(transformer), vae, scheduler, tokenizer,
                         config or DeepGenConfig())
    report = official.import_official_weights(
        model, weights_path, state=state, strict=strict, merge_lora=merge_lora, dtype=dtype, device=device
    )
    del state
    materialize_random(model, dtype=dtype, device=device)  # what the checkpoint lacks (strict=False, old tables)
    logger.info("imported official weights from %s: %s", weights_path, report.summary())
    model.import_report = report
    return model.to(dtype).eval()


def deepgen_1_0(
    vlm_path: str | Path | None = None,
    weights_path: str | Path | None = None,
    *,
    vae_path: str | Path | None = None,
    transformer_path: str | Path | None = None,
    scheduler_path: str | Path | None = None,
    device: str | torch.device | None = None,
    dtype: torch.dtype = torch.float32,
    mask_padding: bool | None = None,
    tokens: str = "all",
    merge_lora: bool = True,
) -> DeepGenModel:
    """DeepGen 1.0 at its real shapes.

    * With ``weights_path`` (the official checkpoint, ``.safetensors`` / ``.pt`` original layout, or the
      diffusers-format release folder) and ``vlm_path`` (a local Qwen2.5-VL-3B-Instruct folder; plus
      ``vae_path`` for the original layout): the official model, in official parity mode (all tokens reach the
      DiT, no pad masking) unless ``mask_padding`` says otherwise. See :func:`deepgen_from_official`.
    * Without ``weights_path``: a fresh SCB (official init, zero heads) between whatever pretrained parts are
      given — ``vlm_path``, ``transformer_path`` (a diffusers SD3 transformer folder, e.g. UniPic2's, the
      official stage-1 start), ``vae_path``, ``scheduler_path`` — and random weights for the rest, from the
      embedded upstream configs (the offline tiny tokenizer when there is no ``vlm_path``). Padding is masked
      unless ``mask_padding=False``. ``device="meta"`` allocates no memory at all (parameter counts, planning);
      a CUDA device materialises random weights directly on the GPU (benchmarks: latency does not depend on
      weight values).
    """
    from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel

    is_meta = device is not None and str(device) == "meta"
    if weights_path is not None:
        if vlm_path is None:
            raise ValueError("vlm_path: the official weights hold no base VLM; give the Qwen2.5-VL folder too")
        if is_meta:
            raise ValueError("device='meta' builds shapes only; do not pass weight paths with it")
        return deepgen_from_official(
            vlm_path, weights_path, vae_path=vae_path, device=device, dtype=dtype,
            mask_padding=bool(mask_padding), tokens=tokens, merge_lora=merge_lora,
        )
    if is_meta and (vlm_path or transformer_path or vae_path):
        raise ValueError("device='meta' builds shapes only; do not pass weight paths with it")
    # Check every given folder before building anything (the random parts are billions of parameters).
    for name, folder, what in (("vlm_path", vlm_path, "a Qwen2.5-VL folder"),
                               ("transformer_path", transformer_path, "a diffusers SD3 transformer folder"),
                               ("vae_path", vae_path, "a diffusers AutoencoderKL folder")):
        if folder is not None and not (Path(folder) / "config.json").is_file():
            raise FileNotFoundError(f"{name}: no config.json in {folder} (expected {what})")
    # Given folders load with their libraries' loaders in ``dtype``; the random parts are built on meta and
    # materialised in ``dtype`` (no fp32 copy), unless device="meta".
    with _default_device(device):
        if vlm_path is not None:
            from transformers import AutoTokenizer, Qwen2_5_VLForConditionalGeneration

            vlm = load_vlm_folder(Qwen2_5_VLForConditionalGeneration, vlm_path, dtype)
            tokenizer = AutoTokenizer.from_pretrained(vlm_path)
            tokenizer.padding_side = "left"
        transformer = SD3Transformer2DModel.from_pretrained(transformer_path, torch_dtype=dtype) if transformer_path else None
        vae = AutoencoderKL.from_pretrained(vae_path, torch_dtype=dtype) if vae_path is not None else None
    with torch.device("meta"):
        if vlm_path is None:
            tokenizer = tiny_tokenizer()
            vlm = _qwen_vl(QWEN2_5_VL_3B_CONFIG, tokenizer)
        text = vlm.config.text_config
        think = ThinkTokens(128, text.hidden_size)
        bridge = StackedChannelBridge(
            BridgeConfig.deepgen_1_0(mask_padding=True if mask_padding is None else mask_padding, tokens=tokens)
        )
        transformer = transformer if transformer is not None else SD3Transformer2DModel(**SD35_MEDIUM_TRANSFORMER_CONFIG)
        vae = vae if vae is not None else AutoencoderKL(**SD3_VAE_CONFIG)
    scheduler = FlowMatchEulerDiscreteScheduler.from_pretrained(scheduler_path) if scheduler_path else tiny_scheduler()
    model = DeepGenModel(
        vlm, think, LayerSelection.official(text.num_hidden_layers), bridge, ConditionedDiT(transformer), vae,
        scheduler, tokenizer, DeepGenConfig(),
    )
    if not is_meta:
        model = materialize_random(model, dtype=dtype, device=device).to(dtype)
    return model.eval()


SHAPES_PRESET_DIR = Path(__file__).resolve().parent / "shapes" / "preset"


def deepgen_shapes(
    *, device: str | torch.device | None = None, dtype: torch.dtype | None = None
) -> DeepGenModel:
    """The shapes-world model shipped inside the package (``shapes/preset``, a ``DeepGenPipeline`` folder, 64 px),
    trained from scratch by ``deepgen shapes``: base VAE / DiT / VLM, then DeepGen's stages 1-3. It follows
    shapes-world prompts ("a red circle on the left on a gray background") and edits ("turn the circle into a
    square"); its measured quality is in docs/shapes.md and the run's own numbers in ``training_report.json``
    beside the weights. Loads offline, reading the folder only; ``device="meta"`` builds the same modules from the
    folder's configs without reading any weights."""
    path = SHAPES_PRESET_DIR
    if not (path / "model_index.json").is_file():
        raise FileNotFoundError(
            f"deepgen-shapes: {path} is missing; reinstall the package or rebuild it with "
            "`deepgen shapes --out runs/shapes --install`"
        )
    if device is not None and str(device) == "meta":
        return model_skeleton(path).eval()
    return load_model_folder(path, device=device, dtype=dtype)


PRESETS = {
    "tiny": deepgen_tiny,
    "deepgen-shapes": deepgen_shapes,
    "small": deepgen_small,
    "deepgen-1.0": deepgen_1_0,
}


def build_preset(name: str, *, device: str | torch.device | None = None, **kwargs) -> DeepGenModel:
    """Build a preset by name: ``tiny``, ``deepgen-shapes`` (trained, shipped), ``small``, ``deepgen-1.0`` (random
    weights unless paths are given)."""
    if name not in PRESETS:
        raise ValueError(f"unknown preset {name!r}; presets: {', '.join(sorted(PRESETS))}")
    return PRESETS[name](device=device, **kwargs)
