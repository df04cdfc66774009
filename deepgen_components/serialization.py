"""Saved model folders: how a :class:`DeepGenModel` is written to disk and read back.

The layout (``DeepGenPipeline.save_pretrained`` / ``from_pretrained``, the ``deepgen-shapes`` preset): one
sub-folder per component with its config and safetensors weights (``vlm``, ``think_tokens``, ``bridge``,
``transformer``, ``vae``) plus ``scheduler`` and ``tokenizer``, and ``model_index.json`` with the model's
config, the layer selection and the VLM class. No pickles.

Format 2: ``think_tokens`` and ``bridge`` are written by their diffusers ``save_pretrained`` (config.json with
``_class_name`` beside ``diffusion_pytorch_model.safetensors``). Format 1 (before the components were diffusers
models) had our own config.json beside ``model.safetensors`` there; both load, through the components'
``from_pretrained``.
"""

from __future__ import annotations

import copy
import json
import logging
import os
import shutil
import tempfile
from pathlib import Path

import torch

from deepgen_components.bridge import StackedChannelBridge
from deepgen_components.dit import ConditionedDiT
from deepgen_components.layer_selection import LayerSelection
from deepgen_components.lora import lora_module_names, merge_lora
from deepgen_components.model import DeepGenConfig, DeepGenModel
from deepgen_components.official import load_state_dict_file
from deepgen_components.think_tokens import ThinkTokens

__all__ = [
    "COMPONENTS",
    "FORMAT_VERSION",
    "load_model_folder",
    "load_vlm_folder",
    "model_skeleton",
    "replace_folder",
    "save_model_folder",
]

logger = logging.getLogger(__name__)

FORMAT_VERSION = 2  # 2: think_tokens/ and bridge/ in diffusers' layout; 1 still loads
COMPONENTS = ("vlm", "think_tokens", "bridge", "transformer", "vae", "scheduler", "tokenizer")


def replace_folder(staging: Path, path: Path) -> None:
    """Put the finished folder ``staging`` at ``path`` (a sibling), replacing what is there: an old folder is moved
    aside first and removed only after the new one is in place, so a crash leaves one of them whole."""
    if path.exists():
        backup = path.with_name(f".{path.name}.old")
        shutil.rmtree(backup, ignore_errors=True)
        os.replace(path, backup)
        os.replace(staging, path)
        shutil.rmtree(backup, ignore_errors=True)
    else:
        os.replace(staging, path)


def save_model_folder(model: DeepGenModel, path: str | os.PathLike) -> None:
    """Write ``model`` to the folder ``path``, atomically: into a temporary folder beside it, then moved in place
    (an existing folder is replaced only once the new one is complete; a failed save leaves it untouched)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", dir=path.parent))
    try:
        vlm = _plain_vlm(model.encoder.vlm)
        vlm.save_pretrained(tmp / "vlm", safe_serialization=True)
        model.think_tokens.save_pretrained(tmp / "think_tokens")
        model.bridge.save_pretrained(tmp / "bridge")
        model.dit.transformer.save_pretrained(tmp / "transformer", safe_serialization=True)
        model.vae.save_pretrained(tmp / "vae", safe_serialization=True)
        model.scheduler.save_pretrained(tmp / "scheduler")
        model.tokenizer.save_pretrained(tmp / "tokenizer")
        _write_json(
            tmp / "model_index.json",
            {
                "_class_name": "DeepGenPipeline",
                "_library": "deepgen-components",
                "format_version": FORMAT_VERSION,
                "config": model.config.to_dict(),
                "layers": model.layers.to_dict(),
                "vlm_class": type(vlm).__name__,
            },
        )
        replace_folder(tmp, path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def load_model_folder(path: str | os.PathLike, *, device=None, dtype: torch.dtype | None = None) -> DeepGenModel:
    """The model saved in the folder ``path`` (in eval mode), optionally cast to ``dtype`` and moved to ``device``.
    FileNotFoundError naming the path when the folder or a component folder is missing.

    Low-RAM: each component is built on the meta device from its config and takes the tensors of its safetensors
    files, read with plain reads (no memory map) and cast to ``dtype`` in 16 MiB chunks as they are read
    (:func:`deepgen_components.official.load_state_dict_file`): the weights are allocated once, in ``dtype``. The VLM
    goes through transformers' ``from_pretrained`` with its tensors already read and cast (its rotary tables and
    tied weights are transformers' business). Bit-identical to each library's own ``from_pretrained`` of the
    component followed by ``.to(dtype)``. A component folder without safetensors (``.bin``) loads through that
    ``from_pretrained``."""
    import transformers
    from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel
    from transformers import AutoTokenizer

    path = Path(path)
    index = _read_index(path)
    for sub in COMPONENTS:
        if not (path / sub).is_dir():
            raise FileNotFoundError(f"path: component folder {path / sub} is missing")
    vlm_class = getattr(transformers, index["vlm_class"], None)
    if vlm_class is None:
        raise ValueError(f"path: unknown VLM class {index['vlm_class']!r} in {path / 'model_index.json'}")
    vlm = load_vlm_folder(vlm_class, path / "vlm", dtype)
    think = _load_component(ThinkTokens, path / "think_tokens", dtype)
    bridge = _load_component(StackedChannelBridge, path / "bridge", dtype)
    transformer = _load_component(SD3Transformer2DModel, path / "transformer", dtype)
    vae = _load_component(AutoencoderKL, path / "vae", dtype)
    scheduler = FlowMatchEulerDiscreteScheduler.from_pretrained(path / "scheduler")
    tokenizer = AutoTokenizer.from_pretrained(path / "tokenizer")
    tokenizer.padding_side = "left"
    model = DeepGenModel(
        vlm, think, LayerSelection.from_dict(index["layers"]), bridge, transformer, vae, scheduler, tokenizer,
        DeepGenConfig.from_dict(index.get("config", {})),
    )
    if dtype is not None:
        model = model.to(dtype)  # what is left in another dtype (e.g. the VLM's rotary tables); loaded tensors stay
    if device is not None:
        model = model.to(device)
    return model.eval()


# Weight file stems: diffusers' models, then the VLM's and a format-1 component's (``LEGACY_WEIGHTS_NAME``).
_DIFFUSERS_STEM, _LEGACY_STEM = "diffusion_pytorch_model", "model"


def _safetensors_files(folder: Path, stems: tuple[str, ...]) -> list[Path] | None:
    """The safetensors files of a component folder (a sharded one through its index), first stem found; None when
    the folder holds none of them."""
    for stem in stems:
        shard_index = folder / f"{stem}.safetensors.index.json"
        if shard_index.is_file():
            shards = sorted(set(json.loads(shard_index.read_text())["weight_map"].values()))
            return [folder / name for name in shards]
        if (folder / f"{stem}.safetensors").is_file():
            return [folder / f"{stem}.safetensors"]
    return None


def _read_state(files: list[Path], dtype: torch.dtype | None) -> dict[str, torch.Tensor]:
    state: dict[str, torch.Tensor] = {}
    for file in files:
        state.update(load_state_dict_file(file, dtype=dtype))
    return state


def _load_component(cls, folder: Path, dtype: torch.dtype | None):
    """A diffusers model (ours or diffusers') built on meta from the folder's config, taking the folder's tensors
    (already in ``dtype``) as its parameters and buffers; in eval mode, as ``from_pretrained`` returns it."""
    files = _safetensors_files(folder, (_DIFFUSERS_STEM, _LEGACY_STEM))
    if files is None:
        return cls.from_pretrained(folder, torch_dtype=dtype)
    with torch.device("meta"):
        module = cls.from_config(cls.load_config(folder))
    try:
        module.load_state_dict(_read_state(files, dtype), strict=True, assign=True)
    except RuntimeError as error:
        raise ValueError(f"path: the weights in {folder} do not fit its config: {error}") from None
    if left := [n for n, t in (*module.named_parameters(), *module.named_buffers()) if t.is_meta]:
        raise ValueError(f"path: {folder} leaves {cls.__name__} tensors unloaded: {', '.join(left)}")
    module.register_to_config(_name_or_path=str(folder))
    return module.eval()


def load_vlm_folder(vlm_class, folder: str | os.PathLike, dtype: torch.dtype | None = None):
    """A VLM folder (a saved pipeline's ``vlm/``, an official Qwen2.5-VL folder) through transformers'
    ``from_pretrained``, fed with the folder's tensors read and cast to ``dtype`` tensor by tensor (its own read
    would keep a float32 file's memory-mapped pages resident while casting: twice the bf16 bytes)."""
    from transformers import AutoConfig, GenerationConfig

    folder = Path(folder)
    kwargs = {"dtype": dtype} if dtype is not None else {}
    files = _safetensors_files(folder, (_LEGACY_STEM,))
    if files is None:  # .bin folders: transformers' own reader
        return vlm_class.from_pretrained(folder, attn_implementation="sdpa", **kwargs)
    vlm = vlm_class.from_pretrained(
        None, config=AutoConfig.from_pretrained(folder), state_dict=_read_state(files, dtype),
        attn_implementation="sdpa", **kwargs,
    )
    if (folder / "generation_config.json").is_file():
        vlm.generation_config = GenerationConfig.from_pretrained(folder)
    return vlm


def model_skeleton(path: str | os.PathLike) -> DeepGenModel:
    """The model of a saved folder built from its configs on the meta device (no weights read)."""
    import transformers
    from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel
    from transformers import AutoConfig, AutoTokenizer

    path = Path(path)
    index = _read_index(path)
    tokenizer = AutoTokenizer.from_pretrained(path / "tokenizer")
    tokenizer.padding_side = "left"
    scheduler = FlowMatchEulerDiscreteScheduler.from_pretrained(path / "scheduler")
    with torch.device("meta"):
        vlm_config = AutoConfig.from_pretrained(path / "vlm")
        vlm_config._attn_implementation = "sdpa"
        vlm = getattr(transformers, index["vlm_class"])(vlm_config)
        think = ThinkTokens.from_config(ThinkTokens.load_config(path / "think_tokens"))
        bridge = StackedChannelBridge.from_config(StackedChannelBridge.load_config(path / "bridge"))
        transformer = SD3Transformer2DModel.from_config(SD3Transformer2DModel.load_config(path / "transformer"))
        vae = AutoencoderKL.from_config(AutoencoderKL.load_config(path / "vae"))
        return DeepGenModel(
            vlm, think, LayerSelection.from_dict(index["layers"]), bridge, ConditionedDiT(transformer), vae, scheduler,
            tokenizer, DeepGenConfig.from_dict(index.get("config", {})),
        )


def _read_index(path: Path) -> dict:
    index_file = path / "model_index.json"
    if not index_file.is_file():
        raise FileNotFoundError(f"path: {index_file} not found (not a DeepGenPipeline folder)")
    index = json.loads(index_file.read_text())
    version = index.get("format_version", FORMAT_VERSION)
    if not isinstance(version, int) or version > FORMAT_VERSION:
        raise ValueError(
            f"path: {index_file} has format_version {version!r}; this version of deepgen-components reads folder "
            f"formats 1 to {FORMAT_VERSION}"
        )
    return index


def _plain_vlm(vlm: torch.nn.Module) -> torch.nn.Module:
    """The VLM as a plain Hugging Face model for saving: a peft wrapper is unwrapped and LoRA layers injected
    into it (e.g. ``deepgen_from_official(merge_lora=False)``, stage-2 training) are merged into a copy.
    Saved unmerged, their weights would be unknown keys to ``from_pretrained`` and the wrapped base weights
    would load as missing (randomly re-initialised)."""
    if type(vlm).__name__.startswith("Peft") and hasattr(vlm, "get_base_model"):
        vlm = vlm.get_base_model()
    if not lora_module_names(vlm):
        return vlm
    merged = copy.deepcopy(vlm)
    count = merge_lora(merged)
    logger.warning("saving the VLM with its %d LoRA layers merged into the weights", count)
    return merged


def _write_json(path: Path, data: dict) -> None:
    path.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")
