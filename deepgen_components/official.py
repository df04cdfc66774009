"""Import of the official DeepGen 1.0 weights, from local paths only.

Two released layouts are understood:

(a) the original checkpoint (``.safetensors``, or ``.pt`` / ``.pth`` / ``.bin`` read with
    ``torch.load(weights_only=True)``) holding the official model's ``state_dict()``: ``meta_queries``,
    ``projector_1/2/3.*``, ``connector.layers.N.*``, ``transformer.*`` and, in SFT/RL checkpoints, the VLM
    LoRA under ``lmm.*``. The base Qwen2.5-VL-3B-Instruct folder and the SD3 VAE come from their own folders.
(b) the diffusers-format release folder: ``transformer/`` (a diffusers SD3 transformer), ``vae/``,
    ``scheduler/``, optionally ``tokenizer/``, and the SCB weights in any other ``*.safetensors`` file of the
    folder or its sub-folders, keyed by the official names — either in full (``connector.layers.0...``) or
    relative to a sub-folder named after the module (``connector/...: layers.0...``,
    ``projector_1/...: weight``).

Key mapping to our modules: ``meta_queries`` -> ``encoder.think_tokens.weight``; ``projector_1`` ->
``bridge.projector``; ``projector_2`` (pooled head) -> ``bridge.pooled_head``; ``projector_3`` (sequence head)
-> ``bridge.context_head``; ``connector.*`` -> ``bridge.connector.*``; ``transformer.*`` ->
``dit.transformer.*``. ``vae.*`` and ``ema.*`` keys are ignored (the official ``state_dict`` drops them).

The export side writes layout (a) back: ``to_official_state_dict`` (SCB + DiT + the VLM's peft LoRA as
``lmm.<module>.lora_A.default.weight`` in the transformers 4.51 or 4.56 key layout) and
``save_official_checkpoint`` (one safetensors file, written atomically, the LoRA's alpha in its metadata, which
``import_official_weights`` reads when no ``lora_alpha`` is given).
"""

from __future__ import annotations

import json
import logging
import os
import re
import struct
from dataclasses import dataclass, field
from pathlib import Path

import torch

__all__ = [
    "ImportReport",
    "read_official_weights",
    "find_release_folder",
    "import_official_weights",
    "load_state_dict_file",
    "map_official_key",
    "official_lora_state_dict",
    "read_official_metadata",
    "save_official_checkpoint",
    "save_official_files",
    "to_official_state_dict",
]

logger = logging.getLogger(__name__)

_SCB_PREFIXES = {
    "projector_1.": "bridge.projector.",
    "projector_2.": "bridge.pooled_head.",
    "projector_3.": "bridge.context_head.",
    "connector.": "bridge.connector.",
    "transformer.": "dit.transformer.",
}
_IGNORED_PREFIXES = ("vae.", "ema.")
_SKIP_FOLDERS = {"transformer", "vae", "scheduler", "tokenizer", "text_encoder", "vlm", "lmm"}


def map_official_key(key: str) -> str | None:
    """Our parameter name for an official (non-LoRA) key, or None if it is not an SCB/DiT key."""
    if key == "meta_queries":
        return "encoder.think_tokens.weight"
    for prefix, ours in _SCB_PREFIXES.items():
        if key.startswith(prefix):
            return ours + key[len(prefix) :]
    return None


def to_official_state_dict(model, *, vlm_lora: bool = True, vlm_layout: str = "4.51") -> dict[str, torch.Tensor]:
    """Our model's SCB + DiT weights under the official key names (inverse of the import) and, with ``vlm_lora``,
    the VLM's peft LoRA under ``lmm.*`` (:func:`official_lora_state_dict`). The VLM's base weights are not
    written: they come from the Qwen2.5-VL folder, as with the released checkpoints."""
    inverse = {v: k for k, v in _SCB_PREFIXES.items()}
    out = {}
    for name, tensor in model.state_dict().items():
        if name == "encoder.think_tokens.weight":
            out["meta_queries"] = tensor
            continue
        for ours, official in inverse.items():
            if name.startswith(ours):
                out[official + name[len(ours) :]] = tensor
    if vlm_lora:
        out.update(official_lora_state_dict(model.encoder.vlm, layout=vlm_layout))
    return out


# Our VLM names (transformers >= 4.56 layout) -> the official ``lmm.*`` names: the 4.51 layout the official code
# was written against (its RL trainer remaps checkpoints to it; reference section 9), or the 4.56 layout as is.
# The inverse of ``_VLM_LAYOUT`` below.
_OFFICIAL_VLM_LAYOUTS = {
    "4.51": ((re.compile(r"^model\.language_model\."), "model."), (re.compile(r"^model\.visual\."), "visual.")),
    "4.56": (),
}
_PEFT_LORA_PARAM = re.compile(
    r"^(?P<module>.+)\.(?P<kind>lora_A|lora_B|lora_embedding_A|lora_embedding_B)\.(?P<adapter>[^.]+)(?P<weight>\.weight)?$"
)


def official_lora_state_dict(vlm: torch.nn.Module, *, layout: str = "4.51") -> dict[str, torch.Tensor]:
    """The VLM's peft LoRA under official names, as the whole official module's ``state_dict`` holds it:
    ``lmm.<module>.lora_A.default.weight`` / ``lora_B`` (embeddings: ``lora_embedding_A.default``), the module
    named in the transformers ``layout`` ("4.51": ``model.layers.N...``, ``visual...``; "4.56":
    ``model.language_model.layers.N...``, ``model.visual...``). Empty for a VLM without a LoRA."""
    if layout not in _OFFICIAL_VLM_LAYOUTS:
        raise ValueError(f"vlm_layout must be one of {', '.join(_OFFICIAL_VLM_LAYOUTS)}, got {layout!r}")
    out = {}
    for name, param in vlm.named_parameters():
        match = _PEFT_LORA_PARAM.match(name)
        if match is None:
            continue
        if match["adapter"] != "default":
            raise ValueError(f"vlm: LoRA adapter {match['adapter']!r} on {match['module']}; only the single adapter "
                             "'default' (the one the training recipes inject) can be exported")
        module = match["module"]
        for pattern, replacement in _OFFICIAL_VLM_LAYOUTS[layout]:
            module = pattern.sub(replacement, module)
        out[f"lmm.{module}.{match['kind']}.default{match['weight'] or ''}"] = param.detach()
    return out


def _official_metadata(vlm: torch.nn.Module, layout: str) -> dict[str, str]:
    """safetensors metadata of an exported file: the format, the VLM key layout and the LoRA's alpha. The import
    scales every module by ``alpha / r`` with one alpha and each module's rank read from its ``lora_A``, so a
    LoRA with per-module alphas or rank-stabilised scaling (``alpha / sqrt(r)``) cannot be written."""
    from peft.tuners.lora import LoraLayer

    alphas = set()
    for name, module in vlm.named_modules():
        if isinstance(module, LoraLayer) and "default" in module.r:
            rank, alpha = module.r["default"], module.lora_alpha["default"]
            if module.scaling["default"] != alpha / rank:
                raise ValueError(f"vlm: the LoRA of {name} scales by {module.scaling['default']}, not alpha / r = "
                                 f"{alpha / rank} (rank-stabilised?); the official layout records alpha / r only")
            alphas.add(float(alpha))
    if len(alphas) > 1:
        raise ValueError(f"vlm: the LoRA modules have different alphas {sorted(alphas)}; the official layout records one")
    metadata = {"format": "deepgen-official", "vlm_layout": layout}
    if alphas:
        metadata["lora_alpha"] = repr(alphas.pop())
    return metadata


def save_official_checkpoint(model, path: str | Path, *, vlm_layout: str = "4.51", overwrite: bool = False) -> Path:
    """Write ``model`` as one official layout (a) safetensors file: think tokens, bridge, DiT and the VLM's LoRA
    (unmerged, :func:`to_official_state_dict`), its alpha in the file's metadata. Written atomically: into a
    temporary file beside ``path``, synced, then renamed into place (a failed write leaves no partial file)."""
    from safetensors.torch import save_file

    path = Path(path)
    if path.suffix != ".safetensors":
        raise ValueError(f"path: {path}: an official checkpoint is written as .safetensors, got {path.suffix or 'no extension'!r}")
    if path.exists() and not overwrite:
        raise FileExistsError(f"path: {path} exists; pass overwrite=True to replace it")
    state = {k: v.detach().contiguous().cpu() for k, v in to_official_state_dict(model, vlm_layout=vlm_layout).items()}
    metadata = _official_metadata(model.encoder.vlm, vlm_layout)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        save_file(state, str(tmp), metadata=metadata)
        with tmp.open("rb") as handle:
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return path


def read_official_metadata(path: str | Path) -> dict[str, str]:
    """The metadata of a safetensors checkpoint (``{}`` for a pickle, a folder or a file without any): for a file
    written by :func:`save_official_checkpoint`, ``format``, ``vlm_layout`` and the LoRA's ``lora_alpha``."""
    path = Path(path)
    if not (path.is_file() and path.suffix == ".safetensors"):
        return {}
    with open(path, "rb") as f:
        (size,) = struct.unpack("<Q", f.read(8))
        return dict(json.loads(f.read(size)).get("__metadata__") or {})


def save_official_files(model, folder: str | Path) -> dict[str, Path]:
    """Write ``model`` in both file layouts of the official release, as ``deepgen_from_official`` reads them:
    layout (a) — ``qwen2_5_vl/``, ``vae/``, ``tokenizer/`` folders beside one ``deepgen.safetensors`` (SCB + DiT
    under the official keys); layout (b) — a ``release/`` folder with diffusers-format ``transformer/``, ``vae/``,
    ``scheduler/``, ``tokenizer/`` and the SCB in ``deepgen_scb.safetensors``. Returns the paths by name."""
    from safetensors.torch import save_file

    folder = Path(folder)
    paths = {"vlm": folder / "qwen2_5_vl", "vae": folder / "vae", "tokenizer": folder / "tokenizer",
             "weights": folder / "deepgen.safetensors", "release": folder / "release"}
    model.vlm.save_pretrained(paths["vlm"])
    model.vae.save_pretrained(paths["vae"])
    model.tokenizer.save_pretrained(paths["tokenizer"])
    state = {k: v.detach().contiguous() for k, v in to_official_state_dict(model).items()}
    save_file(state, str(paths["weights"]), metadata=_official_metadata(model.encoder.vlm, "4.51"))
    release = paths["release"]
    model.dit.transformer.save_pretrained(release / "transformer")
    model.vae.save_pretrained(release / "vae")
    model.scheduler.save_pretrained(release / "scheduler")
    model.tokenizer.save_pretrained(release / "tokenizer")
    scb = {k: v for k, v in state.items() if not k.startswith("transformer.")}
    save_file(scb, str(release / "deepgen_scb.safetensors"))
    return paths


_SAFETENSORS_DTYPES = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
    "BOOL": torch.bool, "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2,
}


def _cast(tensor: torch.Tensor, dtype: torch.dtype | None) -> torch.Tensor:
    return tensor.to(dtype) if dtype is not None and tensor.is_floating_point() else tensor


_CHUNK_BYTES = 16 << 20


def _read_safetensors(path: Path, dtype: torch.dtype | None) -> dict[str, torch.Tensor]:
    """A safetensors file read tensor by tensor with plain reads (no memory map, whose touched pages would count
    as resident), each floating tensor allocated in ``dtype`` and filled in 16 MiB chunks cast as they are read:
    the peak is the result plus one chunk."""
    out: dict[str, torch.Tensor] = {}
    chunk = torch.empty(_CHUNK_BYTES, dtype=torch.uint8)
    with open(path, "rb") as f:
        (size,) = struct.unpack("<Q", f.read(8))
        header = json.loads(f.read(size))
        start = 8 + size
        for name, info in header.items():
            if name == "__metadata__":
                continue
            if info["dtype"] not in _SAFETENSORS_DTYPES:
                raise ValueError(f"weights_path: {path}: tensor {name} has unsupported dtype {info['dtype']}")
            source = _SAFETENSORS_DTYPES[info["dtype"]]
            begin, end = info["data_offsets"]
            target = dtype if dtype is not None and source.is_floating_point else source
            tensor = torch.empty(info["shape"], dtype=target)
            flat = tensor.reshape(-1)
            f.seek(start + begin)
            if target == source:
                read = f.readinto(flat.view(torch.uint8).numpy()) if end > begin else 0
            else:
                read, step = 0, _CHUNK_BYTES // source.itemsize * source.itemsize
                while read < end - begin:
                    n = f.readinto(chunk[: min(step, end - begin - read)].numpy())
                    if not n:
                        break
                    flat[read // source.itemsize : (read + n) // source.itemsize].copy_(chunk[:n].view(source))
                    read += n
            if read != end - begin:
                raise ValueError(f"weights_path: {path} is truncated (tensor {name})")
            out[name] = tensor
    return out


def load_state_dict_file(path: str | Path, *, dtype: torch.dtype | None = None) -> dict[str, torch.Tensor]:
    """Read a checkpoint file: safetensors, or a torch pickle with ``weights_only=True`` (no code runs).
    ``dtype``: floating tensors are cast to it one at a time while reading (no full copy in the file's dtype)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"weights_path: no such file: {path}")
    if path.suffix == ".safetensors":
        return _read_safetensors(path, dtype)
    if path.suffix in (".pt", ".pth", ".bin", ".ckpt"):
        data = torch.load(path, map_location="cpu", weights_only=True)
        for wrapper in ("state_dict", "model", "module"):
            if isinstance(data, dict) and wrapper in data and isinstance(data[wrapper], dict):
                data = data[wrapper]
        if not isinstance(data, dict):
            raise ValueError(f"weights_path: {path} does not hold a state dict (got {type(data).__name__})")
        # A pickle is read whole; each tensor is cast and its original dropped in turn.
        tensors = {k: v for k, v in data.items() if isinstance(v, torch.Tensor)}
        del data
        return {k: _cast(tensors.pop(k), dtype) for k in list(tensors)}
    raise ValueError(f"weights_path: unsupported file type {path.suffix!r}; use .safetensors, .pt, .pth or .bin")


def find_release_folder(path: str | Path) -> Path | None:
    """The diffusers-format release folder, or None when ``path`` is an original-layout checkpoint file."""
    path = Path(path)
    if path.is_file():
        return None
    if not path.exists():
        raise FileNotFoundError(f"weights_path: no such file or folder: {path}")
    if not (path / "transformer").is_dir():
        raise ValueError(
            f"weights_path: {path} is a folder without a transformer/ sub-folder; expected a checkpoint file "
            "(.safetensors / .pt) or the diffusers-format DeepGen release folder"
        )
    return path


def _read_release_folder(root: Path, dtype: torch.dtype | None) -> dict[str, torch.Tensor]:
    """Collect official-named keys from a diffusers-format release folder."""
    state: dict[str, torch.Tensor] = {}
    transformer_files = sorted((root / "transformer").glob("*.safetensors"))
    if not transformer_files:
        raise FileNotFoundError(f"weights_path: no *.safetensors in {root / 'transformer'}")
    for f in transformer_files:
        state.update({f"transformer.{k}": v for k, v in _read_safetensors(f, dtype).items()})
    for f in sorted(root.rglob("*.safetensors")):
        relative = f.relative_to(root)
        if relative.parts[0] in _SKIP_FOLDERS:
            continue
        folder = relative.parts[0] if len(relative.parts) > 1 else None
        for key, value in _read_safetensors(f, dtype).items():
            if map_official_key(key) is None and key != "meta_queries" and folder is not None:
                key = f"{folder}.{key}" if folder != "meta_queries" else "meta_queries"
            state[key] = value
    return state


def read_official_weights(weights_path: str | Path, *, dtype: torch.dtype | None = None) -> dict[str, torch.Tensor]:
    """All official-named tensors of a layout (a) file or a layout (b) release folder; floating tensors cast to
    ``dtype`` (when given) one at a time as they are read."""
    path = Path(weights_path)
    release = find_release_folder(path)
    return _read_release_folder(release, dtype) if release is not None else load_state_dict_file(path, dtype=dtype)


@dataclass
class ImportReport:
    loaded: list[str] = field(default_factory=list)
    missing: list[str] = field(default_factory=list)
    unexpected: list[str] = field(default_factory=list)
    ignored: list[str] = field(default_factory=list)
    lora_modules: list[str] = field(default_factory=list)
    lora_merged: bool = False

    def summary(self) -> str:
        return (
            f"{len(self.loaded)} tensors loaded, {len(self.missing)} missing, {len(self.unexpected)} unexpected, "
            f"{len(self.ignored)} ignored (vae./ema.), {len(self.lora_modules)} LoRA modules"
            f"{' merged' if self.lora_merged else ''}"
        )


# transformers 4.51-style VLM keys (as re-saved by the official RL code) -> the 4.56 / 5.x layout we load.
_VLM_LAYOUT = (
    (re.compile(r"^model\.layers\."), "model.language_model.layers."),
    (re.compile(r"^model\.embed_tokens\."), "model.language_model.embed_tokens."),
    (re.compile(r"^model\.norm\."), "model.language_model.norm."),
    (re.compile(r"^visual\."), "model.visual."),
)
_LORA_KEY = re.compile(
    r"^(?P<module>.+?)\.(?P<kind>lora_A|lora_B|lora_embedding_A|lora_embedding_B)(?:\.(?P<adapter>[^.]+))?(?:\.weight)?$"
)


def _vlm_key(key: str) -> str:
    key = key[len("lmm.") :]
    if key.startswith("base_model.model."):
        key = key[len("base_model.model.") :]
    for pattern, replacement in _VLM_LAYOUT:
        key = pattern.sub(replacement, key)
    return key


def _apply_vlm_weights(
    vlm: torch.nn.Module, lmm: dict[str, torch.Tensor], report: ImportReport, *, merge: bool, lora_alpha: float | None
) -> None:
    """Load base VLM tensors and the LoRA found under ``lmm.*`` into the Hugging Face VLM."""
    lora: dict[str, dict[str, torch.Tensor]] = {}
    base: dict[str, torch.Tensor] = {}
    for key, value in lmm.items():
        vkey = _vlm_key(key)
        match = _LORA_KEY.match(vkey)
        if match:
            lora.setdefault(match["module"], {})[match["kind"]] = value
        else:
            base[vkey.replace(".base_layer.", ".")] = value
    params = dict(vlm.named_parameters())
    with torch.no_grad():
        for key, value in base.items():
            if key not in params:
                report.unexpected.append(f"lmm:{key}")
                continue
            if params[key].shape != value.shape:
                raise ValueError(f"weights: lmm key {key} has shape {tuple(value.shape)}, the VLM expects {tuple(params[key].shape)}")
            params[key].copy_(value)
            report.loaded.append(f"lmm:{key}")
    if not lora:
        return
    modules = dict(vlm.named_modules())
    for name, parts in lora.items():
        if name not in modules:
            report.unexpected.append(f"lmm:{name} (LoRA)")
            continue
        if name.endswith("lm_head"):
            report.ignored.append(f"lmm:{name} (LoRA on lm_head: logits are never computed)")
            continue
        a = parts.get("lora_A", parts.get("lora_embedding_A"))
        b = parts.get("lora_B", parts.get("lora_embedding_B"))
        if a is None or b is None:
            raise ValueError(f"weights: LoRA for {name} lacks its A or B matrix")
        report.lora_modules.append(name)
    if merge:
        # W += (alpha / r) * B @ A  (embeddings: (B @ A)^T, since peft's embedding A is (r, vocab)).
        with torch.no_grad():
            for name in report.lora_modules:
                module, parts = modules[name], lora[name]
                embedding = "lora_embedding_A" in parts
                a = parts.get("lora_A", parts.get("lora_embedding_A")).float()
                b = parts.get("lora_B", parts.get("lora_embedding_B")).float()
                rank = a.shape[0]
                scale = (lora_alpha if lora_alpha is not None else 2.0 * rank) / rank
                delta = (b @ a) * scale
                weight = module.weight
                delta = delta.T if embedding else delta
                if delta.shape != weight.shape:
                    raise ValueError(f"weights: LoRA for {name} gives a {tuple(delta.shape)} update for a {tuple(weight.shape)} weight")
                weight.add_(delta.to(weight.dtype))
        report.lora_merged = True
        return
    if not report.lora_modules:  # e.g. only an lm_head LoRA: nothing to inject
        return
    from peft import LoraConfig, inject_adapter_in_model

    # Per-module rank (and alpha = 2r by default), as the merge above uses: peft takes the first module's as
    # the default and the others through rank_pattern / alpha_pattern.
    ranks = {name: lora[name].get("lora_A", lora[name].get("lora_embedding_A")).shape[0] for name in report.lora_modules}
    alphas = {name: lora_alpha if lora_alpha is not None else 2 * r for name, r in ranks.items()}
    first = report.lora_modules[0]
    config = LoraConfig(
        r=ranks[first],
        lora_alpha=alphas[first],
        rank_pattern={name: r for name, r in ranks.items() if r != ranks[first]},
        alpha_pattern={name: a for name, a in alphas.items() if a != alphas[first]},
        target_modules=report.lora_modules,
        init_lora_weights=False,
    )
    inject_adapter_in_model(config, vlm)
    params = dict(vlm.named_parameters())
    with torch.no_grad():
        for name in report.lora_modules:
            for kind, value in lora[name].items():
                target = f"{name}.{kind}.default.weight" if kind.startswith("lora_") and "embedding" not in kind else f"{name}.{kind}.default"
                if target not in params:
                    raise ValueError(f"weights: cannot place LoRA tensor {name}.{kind} (no parameter {target})")
                params[target].copy_(value)
                report.loaded.append(f"lmm:{name}.{kind}")


def import_official_weights(
    model,
    weights_path: str | Path | None = None,
    *,
    state: dict[str, torch.Tensor] | None = None,
    strict: bool = True,
    merge_lora: bool = True,
    lora_alpha: float | None = None,
    dtype: torch.dtype | None = None,
    device: str | torch.device | None = None,
) -> ImportReport:
    """Load official DeepGen weights (layout (a) file or layout (b) folder, or an already read ``state``)
    into a ``DeepGenModel``.

    Missing think-token / bridge / DiT keys raise in ``strict`` mode (the message lists them); unexpected keys
    are reported and logged. The VLM LoRA (``lmm.*``) is merged into the VLM weights (``merge_lora``) or
    injected with peft (exact unmerged computation). The LoRA scale is ``lora_alpha / r``; when ``lora_alpha`` is
    None, the alpha recorded in the file's metadata (:func:`save_official_checkpoint`), else the official alpha 128
    at r 64, i.e. 2r.

    A think-token / bridge / DiT tensor still on the meta device (a model built on meta, as
    ``deepgen_from_official`` does) is replaced by the checkpoint's tensor itself, cast to ``dtype`` (default: the
    target's) and moved to ``device`` (default: CPU): no second copy. A materialised one is copied into in place.
    """
    if state is None:
        if weights_path is None:
            raise ValueError("import_official_weights needs weights_path or state")
        state = read_official_weights(weights_path)
    path = weights_path if weights_path is not None else "<state dict>"
    if lora_alpha is None and weights_path is not None and "lora_alpha" in (recorded := read_official_metadata(weights_path)):
        lora_alpha = float(recorded["lora_alpha"])

    report = ImportReport()
    ours = model.state_dict()
    expected = {k for k in ours if k.startswith(("encoder.think_tokens.", "bridge.", "dit.transformer."))}
    mapped: dict[str, torch.Tensor] = {}
    lmm: dict[str, torch.Tensor] = {}
    for key, value in state.items():
        if key.startswith(_IGNORED_PREFIXES):
            report.ignored.append(key)
            continue
        if key.startswith("lmm."):
            lmm[key] = value
            continue
        target = map_official_key(key)
        if target is None or target not in ours:
            report.unexpected.append(key)
            continue
        if ours[target].shape != value.shape:
            raise ValueError(
                f"weights: {key} has shape {tuple(value.shape)} but {target} expects {tuple(ours[target].shape)}"
            )
        mapped[target] = value
    # The DiT's sin-cos position table is a fixed buffer; old checkpoints may lack it.
    report.missing = sorted(k for k in expected - set(mapped) if not k.endswith("pos_embed.pos_embed"))
    if strict and report.missing:
        shown = ", ".join(report.missing[:10])
        raise ValueError(
            f"weights: {len(report.missing)} expected keys are missing from {path} (first: {shown}); pass "
            "strict=False to load the rest"
        )
    with torch.no_grad():
        params = {**dict(model.named_parameters()), **dict(model.named_buffers())}
        assign = {}
        for target in list(mapped):
            value, current = mapped.pop(target), params[target]
            if current.is_meta:
                cast = (dtype or current.dtype) if value.is_floating_point() else None
                assign[target] = value.to(device=device or "cpu", dtype=cast)
            else:
                current.copy_(value.to(current.dtype))
            report.loaded.append(target)
        if assign:
            model.load_state_dict(assign, strict=False, assign=True)
    if lmm:
        _apply_vlm_weights(model.encoder.vlm, lmm, report, merge=merge_lora, lora_alpha=lora_alpha)
    if report.unexpected:
        logger.warning("unexpected keys in %s (not loaded): %s", path, ", ".join(report.unexpected[:20]))
    return report
