"""The torch-free half of the exported pipeline: manifest, preprocessing, scheduler grid and the sampling loop.

Everything here is numpy (plus ``tokenizers`` and Pillow), so an ONNX Runtime deployment needs no PyTorch.
Each function ports one piece of the PyTorch pipeline and names it; ``tests/test_export_numpy.py`` checks every
port against the original:

* chat templates, tokenization with left padding and the official truncation (``processing.tokenize_prompts``);
* M-RoPE positions over prompt + think tokens, templates, truncation, left padding, resize rules and pixel
  conversions come from ``deepgen_components.conventions``, the torch-free module the PyTorch pipeline uses too;
* the reference preprocessing for the VLM: bilinear resize by 28/32 with torch's coordinate rule, CLIP mean/std,
  patch order (``processing.vision_patches``), plus the vision tower's window layout (transformers'
  ``get_vision_window_index``), which the exported vision encoder takes as inputs;
* the FlowMatch Euler grid of diffusers' ``FlowMatchEulerDiscreteScheduler.set_timesteps`` (``sampling.flow_match_sigmas``).

:class:`StagedPipeline` is ``DeepGenPipeline.__call__`` written against five stage calls; the ONNX Runtime and
TensorRT pipelines implement those calls (and a few array helpers) for their own arrays.
"""

from __future__ import annotations

import json
import logging
import math
import os
import time
from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from deepgen_components.conventions import (
    CLIP_MEAN,
    CLIP_STD,
    left_pad,
    limit_long_side_size,
    log_reference_resize,
    output_size,
    references_per_prompt,
    truncate_official,
)
from deepgen_components.conventions import mrope_positions as mrope_position_ids
from deepgen_components.conventions import pil_to_array as pil_to_pixels
from deepgen_components.conventions import pixels_to_uint8_array as pixels_to_uint8

__all__ = [
    "MANIFEST_NAME",
    "SUPPORTED_OPSETS",
    "ExportedModel",
    "PromptBatch",
    "PromptProcessor",
    "StagedPipeline",
    "StagedPipelineOutput",
    "flow_match_grid",
    "limit_long_side_size",
    "mrope_position_ids",
    "vision_inputs",
    "vision_patches",
]

logger = logging.getLogger(__name__)

MANIFEST_NAME = "manifest.json"
FORMAT_VERSION = 1
# Opsets our exporter writes (the dynamo exporter starts at 18) and that the runtimes accept.
SUPPORTED_OPSETS = range(18, 24)
FLOAT_DTYPES = ("float32", "bfloat16", "float16")


# -- manifest ------------------------------------------------------------------------------------------------


def dim_size(axis, values: dict[str, int]) -> int:
    """Size of one axis of a tensor declaration: an int, or ``{"dim", "scale", "offset"}``."""
    if isinstance(axis, int):
        return axis
    return axis["scale"] * values[axis["dim"]] + axis["offset"]


def axis_text(axis) -> str:
    if isinstance(axis, int):
        return str(axis)
    text = axis["dim"] if axis["scale"] == 1 else f"{axis['scale']}*{axis['dim']}"
    return text + (f"+{axis['offset']}" if axis["offset"] else "")


@dataclass
class ExportedModel:
    """An export folder: ``manifest.json`` + the ONNX files + ``tokenizer/``. Loading checks the files exist."""

    path: Path
    manifest: dict

    @classmethod
    def load(cls, path: str | os.PathLike) -> ExportedModel:
        path = Path(path)
        manifest_file = path / MANIFEST_NAME
        if not manifest_file.is_file():
            raise FileNotFoundError(f"path: {manifest_file} not found (not a folder written by `deepgen export`)")
        manifest = json.loads(manifest_file.read_text())
        if manifest.get("format_version") != FORMAT_VERSION:
            raise ValueError(
                f"path: {manifest_file} has format_version {manifest.get('format_version')!r}; this runtime reads "
                f"version {FORMAT_VERSION}: re-export with this version of deepgen-components"
            )
        return cls(path, manifest)

    @property
    def config(self) -> dict:
        return self.manifest["config"]

    @property
    def stages(self) -> dict:
        return self.manifest["stages"]

    def has_stage(self, stage: str) -> bool:
        return stage in self.stages

    def stage(self, stage: str) -> dict:
        if stage not in self.stages:
            reason = self.manifest.get("not_exported", {}).get(stage)
            raise ValueError(
                f"stage {stage!r} is not in this export ({self.path}); exported stages: {', '.join(self.stages)}"
                + (f". Not exported because: {reason}" if reason else "")
            )
        return self.stages[stage]

    def stage_file(self, stage: str) -> Path:
        """The stage's ONNX file, after checking that it and its external-data files are all present."""
        entry = self.stage(stage)
        opset = entry.get("opset")
        if opset not in SUPPORTED_OPSETS:
            raise ValueError(
                f"stage {stage!r}: opset {opset} is not supported by this runtime (supported: "
                f"{SUPPORTED_OPSETS.start}..{SUPPORTED_OPSETS.stop - 1}); re-export with --opset 23 or 20"
            )
        dtype = entry.get("dtype")
        if dtype not in FLOAT_DTYPES:
            raise ValueError(f"stage {stage!r}: unsupported dtype {dtype!r} (supported: {', '.join(FLOAT_DTYPES)})")
        for name in [entry["file"], *entry.get("external_data", [])]:
            if not (self.path / name).is_file():
                kind = "ONNX file" if name == entry["file"] else "external-data file"
                raise FileNotFoundError(
                    f"stage {stage!r}: {kind} {self.path / name} is missing; copy the whole export folder "
                    "(the .onnx files need their .data files beside them) or re-export"
                )
        return self.path / entry["file"]

    def check_shapes(self, stage: str, shapes: dict[str, tuple[int, ...]]) -> None:
        """Raise a clear error when an input does not fit the exported dynamic ranges of ``stage``."""
        entry = self.stage(stage)
        dims = entry["dims"]
        values: dict[str, int] = {}
        for spec in entry["inputs"]:
            name = spec["name"]
            if name not in shapes:
                continue
            shape = tuple(shapes[name])
            if len(shape) != len(spec["shape"]):
                raise ValueError(f"stage {stage!r}: input {name!r} has shape {shape}, expected rank {len(spec['shape'])}")
            for axis, size in zip(spec["shape"], shape):
                if isinstance(axis, int):
                    if size != axis:
                        raise ValueError(
                            f"stage {stage!r}: input {name!r} has shape {shape}; axis of size {size} must be {axis}"
                        )
                    continue
                dim = dims[axis["dim"]]
                value, rest = divmod(size - axis["offset"], axis["scale"])
                low, high = (axis["scale"] * dim[k] + axis["offset"] for k in ("min", "max"))
                if rest or not dim["min"] <= value <= dim["max"]:
                    step = f" in steps of {axis['scale']}" if axis["scale"] > 1 else ""
                    raise ValueError(
                        f"stage {stage!r}: input {name!r} axis {axis_text(axis)} = {size} is outside the exported "
                        f"range {low}..{high}{step} ({dim.get('meaning', axis['dim'])}); re-export with a wider "
                        "range (--min-size/--max-size/--max-batch/--max-prompt-tokens)"
                    )
                if values.setdefault(axis["dim"], value) != value:
                    raise ValueError(f"stage {stage!r}: inputs disagree on dimension {axis['dim']!r}")


# -- preprocessing -------------------------------------------------------------------------------------------


def _bilinear_taps(in_size: int, scale_factor: float) -> tuple[int, np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Output size, source indices and weights of torch's CPU bilinear resize with ``scale_factor`` and
    ``align_corners=False``: size floor(in * s); source x = max((dst + 0.5) / s - 0.5, 0) in float32 with the
    coordinate scale 1/s (not in/out); index floor(x) clamped, the right neighbour clamped at the border."""
    out_size = int(math.floor(in_size * scale_factor))
    if out_size == in_size:  # torch copies the input through
        index = np.arange(in_size)
        return out_size, index, index, np.ones(in_size, np.float32), np.zeros(in_size, np.float32)
    scale = np.float32(1.0 / scale_factor)
    source = scale * (np.arange(out_size, dtype=np.float32) + np.float32(0.5)) - np.float32(0.5)
    source = np.maximum(source, np.float32(0))
    index0 = np.minimum(np.floor(source).astype(np.int64), in_size - 1)
    lam1 = np.clip(source - index0.astype(np.float32), 0, 1).astype(np.float32)
    index1 = index0 + (index0 < in_size - 1)
    return out_size, index0, index1, (np.float32(1) - lam1).astype(np.float32), lam1


def bilinear_resize(image: np.ndarray, scale_factor: float) -> np.ndarray:
    """``F.interpolate(x[None], scale_factor=s, mode="bilinear", align_corners=False)[0]`` for (C, H, W) float32,
    with torch's evaluation order: interpolate along W in each source row, then blend the two rows."""
    out_h, h0, h1, wh0, wh1 = _bilinear_taps(image.shape[1], scale_factor)
    out_w, w0, w1, ww0, ww1 = _bilinear_taps(image.shape[2], scale_factor)
    image = image.astype(np.float32, copy=False)

    def along_width(rows: np.ndarray) -> np.ndarray:
        return rows[:, :, w0] * ww0 + rows[:, :, w1] * ww1

    top, bottom = along_width(image[:, h0]), along_width(image[:, h1])
    return (top * wh0[:, None] + bottom * wh1[:, None]).astype(np.float32)


def vision_patches(
    pixels: np.ndarray,
    *,
    patch_size: int = 14,
    temporal_patch_size: int = 2,
    merge_size: int = 2,
    resize_factor: float = 28 / 32,
    mean: Sequence[float] = CLIP_MEAN,
    std: Sequence[float] = CLIP_STD,
) -> tuple[np.ndarray, tuple[int, int, int]]:
    """``processing.vision_patches`` in numpy: (3, H, W) in [-1, 1] -> (patches (N, 3*tp*p*p), grid (t, h, w))."""
    if pixels.ndim != 3 or pixels.shape[0] != 3:
        raise ValueError(f"pixels: expected (3, H, W), got {tuple(pixels.shape)}")
    x = bilinear_resize(pixels, resize_factor)
    height, width = x.shape[-2:]
    unit = patch_size * merge_size
    if height % unit or width % unit:
        raise ValueError(
            f"pixels: a {pixels.shape[-2]}x{pixels.shape[-1]} reference resizes to {height}x{width}, which is not a "
            f"multiple of {unit}; reference sides must be multiples of 32"
        )
    mean = np.asarray(mean, np.float32).reshape(3, 1, 1)
    std = np.asarray(std, np.float32).reshape(3, 1, 1)
    x = ((x + np.float32(1)) / np.float32(2) - mean) / std
    frames = np.broadcast_to(x[None, None], (1, temporal_patch_size, 3, height, width))
    gh, gw = height // unit, width // unit
    # dims: t tp c (h m p) (w n q) -> (t h w m n) (c tp p q)
    frames = frames.reshape(1, temporal_patch_size, 3, gh, merge_size, patch_size, gw, merge_size, patch_size)
    patches = frames.transpose(0, 3, 6, 4, 7, 2, 1, 5, 8).reshape(
        gh * gw * merge_size * merge_size, 3 * temporal_patch_size * patch_size * patch_size
    )
    return np.ascontiguousarray(patches, dtype=np.float32), (1, height // patch_size, width // patch_size)


def vision_window_layout(
    grid: tuple[int, int, int], *, merge_size: int, window_size: int, patch_size: int
) -> tuple[np.ndarray, np.ndarray]:
    """transformers' ``get_vision_window_index`` for one image: (window_index over merge units, tokens per window).

    Merge units are cut into windows of ``window_size / merge / patch`` units per side, row by row; the last
    row/column of windows is partial. The quirk of padding a full extra window when a side divides evenly is kept
    (it only adds empty windows)."""
    t, h, w = grid
    per_window = window_size // merge_size // patch_size
    unit = merge_size * merge_size
    llm_h, llm_w = h // merge_size, w // merge_size
    index = np.arange(t * llm_h * llm_w).reshape(t, llm_h, llm_w)
    pad_h = per_window - llm_h % per_window
    pad_w = per_window - llm_w % per_window
    windows_h, windows_w = (llm_h + pad_h) // per_window, (llm_w + pad_w) // per_window
    padded = np.pad(index, ((0, 0), (0, pad_h), (0, pad_w)), constant_values=-100)
    padded = padded.reshape(t, windows_h, per_window, windows_w, per_window).transpose(0, 1, 3, 2, 4)
    padded = padded.reshape(t, windows_h * windows_w, per_window, per_window)
    units_per_window = (padded != -100).sum(axis=(2, 3)).reshape(-1)
    flat = padded.reshape(-1)
    return flat[flat != -100], units_per_window * unit


def vision_position_ids(grid: tuple[int, int, int], merge_size: int) -> np.ndarray:
    """transformers' ``get_vision_position_ids``: (row, col) of every patch in the block-major patch order, (N, 2)."""
    t, h, w = grid
    rows, cols = np.meshgrid(np.arange(h), np.arange(w), indexing="ij")
    shape = (h // merge_size, merge_size, w // merge_size, merge_size)
    rows = rows.reshape(shape).transpose(0, 2, 1, 3).reshape(-1)
    cols = cols.reshape(shape).transpose(0, 2, 1, 3).reshape(-1)
    return np.tile(np.stack([rows, cols], axis=-1), (t, 1)).astype(np.int64)


def vision_inputs(
    patches: np.ndarray, grid: tuple[int, int, int], *, merge_size: int, window_size: int, patch_size: int
) -> tuple[dict[str, np.ndarray], np.ndarray]:
    """The exported vision encoder's inputs for one reference, and the permutation that restores token order.

    The tower's windowed attention works on tokens reordered window by window (merge units stay together). The
    graph takes them already reordered, with each token's window id (tokens attend within their window in the
    windowed layers, to all tokens in the full-attention layers); its merged output comes back in window order
    and ``features[restore]`` puts it back in image order."""
    window_index, tokens_per_window = vision_window_layout(
        grid, merge_size=merge_size, window_size=window_size, patch_size=patch_size
    )
    unit = merge_size * merge_size
    count = patches.shape[0]

    def reorder(array: np.ndarray) -> np.ndarray:
        return np.ascontiguousarray(array.reshape(count // unit, unit, -1)[window_index].reshape(count, -1))

    window_ids = np.repeat(np.arange(len(tokens_per_window), dtype=np.int64), tokens_per_window)
    feeds = {
        "patches": reorder(patches),
        "position_ids": reorder(vision_position_ids(grid, merge_size)),
        "window_ids": window_ids,
    }
    return feeds, np.argsort(window_index)


@dataclass
class PromptBatch:
    """The condition encoder's inputs (numpy) and, for editing, each reference's place in the batch."""

    input_ids: np.ndarray  # (B, L) int64, left-padded
    attention_mask: np.ndarray  # (B, L) int64
    position_ids: np.ndarray  # (3, B, L + N) int64
    grids: list[tuple[int, int, int]]  # one per reference, in batch order
    patches: list[np.ndarray]  # one (tokens, 1176) array per reference, in batch order
    texts: list[str]


class PromptProcessor:
    """Templates, tokenizer and vision preprocessing from an export's manifest (``processing.tokenize_prompts``)."""

    def __init__(self, config: dict, tokenizer_file: str | os.PathLike) -> None:
        from tokenizers import Tokenizer

        if not Path(tokenizer_file).is_file():
            raise FileNotFoundError(f"tokenizer: {tokenizer_file} is missing from the export folder")
        self.config = config
        self.tokenizer = Tokenizer.from_file(str(tokenizer_file))
        self.tokenizer.no_truncation()  # truncation and padding are done here, the official way
        self.tokenizer.no_padding()
        self.template = config["chat_template"]

    def t2i_text(self, prompt: str) -> str:
        return self.template["user_turn"].format(content=self.template["t2i_wrapper"].format(prompt=prompt))

    def edit_text(self, instruction: str, image_token_counts: Sequence[int]) -> str:
        block = self.template["vision_block"]
        pad = self.template["image_pad"]
        blocks = "".join(block.format(pads=pad * n) for n in image_token_counts)
        return self.template["user_turn"].format(content=f"{blocks}\n{instruction}")

    def patches(self, pixels: np.ndarray) -> tuple[np.ndarray, tuple[int, int, int]]:
        cfg = self.config
        return vision_patches(
            pixels,
            patch_size=cfg["patch_size"],
            temporal_patch_size=cfg["temporal_patch_size"],
            merge_size=cfg["spatial_merge_size"],
            resize_factor=cfg["vision_resize_factor"],
            mean=cfg["clip_mean"],
            std=cfg["clip_std"],
        )

    def __call__(self, prompts: Sequence[str], references: Sequence[Sequence[np.ndarray]] | None = None) -> PromptBatch:
        cfg = self.config
        merge = cfg["spatial_merge_size"]
        references = list(references) if references is not None else [[] for _ in prompts]
        if len(references) != len(prompts):
            raise ValueError(f"references: got {len(references)} entries for {len(prompts)} prompts")
        texts, patches, grids, image_tokens = [], [], [], []
        for prompt, refs in zip(prompts, references):
            if not isinstance(prompt, str):
                raise ValueError(f"prompts: every prompt must be a str, got {type(prompt).__name__}")
            if refs:
                counts = []
                for ref in refs:
                    p, g = self.patches(ref)
                    patches.append(p)
                    grids.append(g)
                    counts.append(p.shape[0] // (merge * merge))
                texts.append(self.edit_text(prompt, counts))
                image_tokens.append(sum(counts))
            else:
                texts.append(self.t2i_text(prompt))
                image_tokens.append(0)
        encoded = [self.tokenizer.encode(t, add_special_tokens=True).ids for t in texts]
        encoded = truncate_official(encoded, image_tokens, cfg["image_token_id"], cfg.get("max_length"))
        input_ids, attention_mask = left_pad(encoded, cfg["pad_token_id"])
        positions = self.positions(input_ids, attention_mask, grids)
        return PromptBatch(input_ids, attention_mask, positions, grids, patches, texts)

    def positions(self, input_ids: np.ndarray, attention_mask: np.ndarray, grids) -> np.ndarray:
        """M-RoPE positions over the prompt plus the appended think tokens (which count as text)."""
        cfg = self.config
        batch = input_ids.shape[0]
        count = cfg["num_think_tokens"]
        # Think-token placeholders are text: any id that is not the image token (official uses 0).
        placeholder = 0 if cfg["image_token_id"] != 0 else 1
        ext_ids = np.concatenate([input_ids, np.full((batch, count), placeholder, np.int64)], axis=1)
        ext_mask = np.concatenate([attention_mask, np.ones((batch, count), np.int64)], axis=1)
        return mrope_position_ids(
            ext_ids, ext_mask, grids, image_token_id=cfg["image_token_id"], spatial_merge_size=cfg["spatial_merge_size"],
            pad_position=cfg["pad_position"],
        )


# -- scheduler -----------------------------------------------------------------------------------------------


def flow_match_grid(scheduler_config: dict, num_inference_steps: int) -> tuple[np.ndarray, np.ndarray]:
    """(timesteps (N,), sigmas (N + 1,)) float32 of diffusers' ``FlowMatchEulerDiscreteScheduler.set_timesteps(N)``
    for a static shift (no dynamic shifting, no Karras/exponential/beta sigmas, no terminal stretch).

    Construction: sigma_max/min are the first/last entries of the training table (float32:
    s * x / (1 + (s - 1) x) with x = linspace(1, T, T)[::-1] / T); the grid is linspace(1000 sigma_max,
    1000 sigma_min, N) / T in float64, shifted again in float64, rounded to float32; timesteps = sigmas * T in
    float32; a terminal 0 is appended."""
    if num_inference_steps < 1:
        raise ValueError(f"num_inference_steps must be >= 1, got {num_inference_steps}")
    cfg = scheduler_config
    unsupported = [
        key for key in ("use_dynamic_shifting", "use_karras_sigmas", "use_exponential_sigmas", "use_beta_sigmas",
                        "invert_sigmas", "shift_terminal", "stochastic_sampling") if cfg.get(key)
    ]
    if unsupported:
        raise ValueError(f"scheduler: options {unsupported} are not supported by the exported runtimes")
    train_steps = int(cfg.get("num_train_timesteps", 1000))
    shift = float(cfg.get("shift", 1.0))
    table = np.linspace(1, train_steps, train_steps, dtype=np.float32)[::-1] / np.float32(train_steps)
    table = np.float32(shift) * table / (np.float32(1) + np.float32(shift - 1) * table)
    sigma_max, sigma_min = float(table[0]), float(table[-1])
    timesteps = np.linspace(sigma_max * train_steps, sigma_min * train_steps, num_inference_steps)
    sigmas = timesteps / train_steps
    sigmas = (shift * sigmas / (1 + (shift - 1) * sigmas)).astype(np.float32)
    timesteps = (sigmas * np.float32(train_steps)).astype(np.float32)
    return timesteps, np.concatenate([sigmas, np.zeros(1, np.float32)])


# -- the sampling loop ---------------------------------------------------------------------------------------


@dataclass
class StagedPipelineOutput:
    """images: PIL images, uint8 (B, H, W, 3), float (B, 3, H, W) in [-1, 1], or latents; timings in seconds."""

    images: object
    timings: dict[str, float] = field(default_factory=dict)


class StagedPipeline(ABC):
    """``DeepGenPipeline.__call__`` over exported stages. Subclasses run the stages and provide array helpers.

    Stage calls take and return the subclass's arrays: ``_run(stage, feeds) -> {output name: array}``. Helpers:
    ``_asarray(numpy)``, ``_numpy(array)``, ``_cat(arrays)``, ``_take(array, numpy index)``, ``_all_finite(array)``.
    """

    output_types = ("pil", "np", "float", "latent")

    def __init__(self, exported: ExportedModel) -> None:
        self.exported = exported
        self.config = exported.config
        self.processor = PromptProcessor(self.config, exported.path / exported.manifest["tokenizer"])
        self._progress_config: dict = {}

    # -- backend hooks ---------------------------------------------------------------------------------
    @abstractmethod
    def _run(self, stage: str, feeds: dict) -> dict:
        """Backend hook (see the class docstring)."""

    @abstractmethod
    def _asarray(self, array: np.ndarray):
        """Backend hook (see the class docstring)."""

    @abstractmethod
    def _numpy(self, array) -> np.ndarray:
        """Backend hook (see the class docstring)."""

    @abstractmethod
    def _cat(self, arrays: list):
        """Backend hook (see the class docstring)."""

    @abstractmethod
    def _take(self, array, index: np.ndarray):
        """Backend hook (see the class docstring)."""

    @abstractmethod
    def _all_finite(self, array) -> bool:
        """Backend hook (see the class docstring)."""

    def _float_dtype(self, stage: str) -> np.dtype:
        """numpy dtype of the stage's float inputs (bf16 through ml_dtypes)."""
        dtype = self.exported.stage(stage)["dtype"]
        if dtype == "bfloat16":
            import ml_dtypes

            return np.dtype(ml_dtypes.bfloat16)
        return np.dtype(dtype)

    def _stage(self, stage: str, feeds: dict) -> dict:
        self.exported.check_shapes(stage, {k: tuple(v.shape) for k, v in feeds.items()})
        return self._run(stage, feeds)

    def set_progress_bar_config(self, **kwargs) -> None:
        """tqdm options for the denoising loop, e.g. ``disable=True``."""
        self._progress_config = dict(kwargs)

    # -- inputs ------------------------------------------------------------------------------------------
    def _references(self, image, batch: int) -> list[list[np.ndarray]] | None:
        """Per prompt, the list of reference pixels (3, H, W) in [-1, 1], resized by the official rule."""
        per_prompt = references_per_prompt(image, batch)
        if per_prompt is None:
            return None
        target = self.config["image_size"]
        out = []
        for refs in per_prompt:
            pixels = []
            for ref in refs:
                if isinstance(ref, np.ndarray):
                    if ref.ndim != 3 or ref.shape[0] != 3:
                        raise ValueError(f"image: an array reference must be (3, H, W) in [-1, 1], got {ref.shape}")
                    size = limit_long_side_size(ref.shape[-2], ref.shape[-1], target)
                    if size != tuple(ref.shape[-2:]):
                        raise ValueError(
                            f"image: an array reference of {ref.shape[-2]}x{ref.shape[-1]} would be resized to "
                            f"{size[0]}x{size[1]} (long side <= {target}, sides multiples of 32); the torch-free "
                            "runtime resizes PIL images only: pass a PIL image or an array of that size"
                        )
                    pixels.append(ref.astype(np.float32))
                    continue
                if not hasattr(ref, "convert"):
                    raise ValueError(f"image: expected PIL images or (3, H, W) arrays, got {type(ref).__name__}")
                size = limit_long_side_size(ref.height, ref.width, target)
                log_reference_resize(ref, size, target)
                pixels.append(pil_to_pixels(ref, size))
            out.append(pixels)
        return out

    def _output_size(self, height, width, references) -> tuple[int, int]:
        sizes = None if references is None else [[tuple(r.shape[-2:]) for r in refs] for refs in references]
        height, width = output_size(height, width, sizes, self.config["image_size"])
        ranges = self.exported.manifest["ranges"]
        for name, value in (("height", height), ("width", width)):
            if not ranges["min_size"] <= value <= ranges["max_size"]:
                raise ValueError(
                    f"{name}={value} is outside the exported resolution range {ranges['min_size']}..{ranges['max_size']} "
                    "px; re-export with --min-size/--max-size covering it"
                )
        return height, width

    def _reference_latents(self, references, generator: np.random.Generator, mode: str) -> list[list]:
        """Per prompt, each reference's clean latents (1, C, h, w): the VAE posterior mean, or mean + std * noise."""
        out = []
        for refs in references:
            encoded = []
            for ref in refs:
                result = self._stage("vae_encoder", {"pixels": self._asarray(ref[None].astype(self._float_dtype("vae_encoder")))})
                latent = result["mean"]
                if mode == "sample":
                    noise = generator.standard_normal(tuple(latent.shape), dtype=np.float32)
                    latent = latent + result["std"] * self._asarray(noise.astype(self._float_dtype("vae_encoder")))
                encoded.append(latent)
            out.append(encoded)
        return out

    def _image_features(self, batch: PromptBatch) -> np.ndarray:
        """(B, L, D): each reference's vision-tower features at its image-token slots, zeros elsewhere."""
        cfg = self.config
        width = cfg["vlm_hidden_size"]
        features = np.zeros((*batch.input_ids.shape, width), dtype=np.float32)
        if not batch.grids:
            return features
        if not self.exported.has_stage("vision_encoder"):
            self.exported.stage("vision_encoder")  # raises, with the reason it was not exported
        per_image = []
        for patches, grid in zip(batch.patches, batch.grids):
            feeds, restore = vision_inputs(
                patches, grid, merge_size=cfg["spatial_merge_size"], window_size=cfg["vision_window_size"],
                patch_size=cfg["patch_size"],
            )
            feeds["patches"] = feeds["patches"].astype(self._float_dtype("vision_encoder"))
            out = self._stage("vision_encoder", {k: self._asarray(v) for k, v in feeds.items()})["features"]
            per_image.append(self._numpy(out).astype(np.float32)[restore])
        slots = batch.input_ids == cfg["image_token_id"]
        stacked = np.concatenate(per_image)
        if int(slots.sum()) != stacked.shape[0]:
            raise ValueError(
                f"input_ids hold {int(slots.sum())} image tokens but the references give {stacked.shape[0]} features"
            )
        features[slots] = stacked  # row-major order = the order the references were tokenized in
        return features

    # -- the algorithm -----------------------------------------------------------------------------------
    def __call__(
        self,
        prompt: str | list[str],
        image=None,
        negative_prompt: str | list[str] = "",
        height: int | None = None,
        width: int | None = None,
        num_inference_steps: int = 50,
        guidance_scale: float = 4.0,
        num_images_per_prompt: int = 1,
        generator: np.random.Generator | int | None = None,
        latents=None,
        output_type: str = "pil",
        progress: bool = True,
        reference_latents: str | None = None,
    ) -> StagedPipelineOutput:
        """Same arguments and steps as ``DeepGenPipeline.__call__``. ``generator`` is a numpy Generator or seed: its
        noise differs from torch's, so pass ``latents`` for runs that must match PyTorch. ``reference_latents``
        ("mean" / "sample") overrides the exported model's rule for editing."""
        cfg = self.config
        prompts = [prompt] if isinstance(prompt, str) else list(prompt)
        if not prompts:
            raise ValueError("prompt: give at least one prompt")
        batch = len(prompts)
        negatives = [negative_prompt] * batch if isinstance(negative_prompt, str) else list(negative_prompt)
        if len(negatives) != batch:
            raise ValueError(f"negative_prompt: got {len(negatives)} for {batch} prompts")
        if output_type not in self.output_types:
            raise ValueError(f"output_type must be one of {', '.join(map(repr, self.output_types))}, got {output_type!r}")
        if num_images_per_prompt < 1:
            raise ValueError(f"num_images_per_prompt must be >= 1, got {num_images_per_prompt}")
        mode = reference_latents or cfg["reference_latents"]
        if mode not in ("mean", "sample"):
            raise ValueError(f"reference_latents must be 'mean' or 'sample', got {mode!r}")
        if not isinstance(generator, np.random.Generator):
            generator = np.random.default_rng(generator)
        references = self._references(image, batch)
        if references is not None:
            counts = {len(refs) for refs in references}
            sizes = {tuple(ref.shape[-2:]) for refs in references for ref in refs}
            if counts != {1} or len(sizes) != 1:
                raise ValueError(
                    "image: the exported DiT (dit_edit) takes exactly one reference per prompt, all of one size; got "
                    f"{sorted(counts)} references per prompt and sizes {sorted(sizes)}. Use the PyTorch pipeline for "
                    "multi-reference or mixed-size editing"
                )
        height, width = self._output_size(height, width, references)
        do_cfg = guidance_scale != 1.0
        timings: dict[str, float] = {}

        # 1. Condition: once per call; prompt and negative prompt share one left-padded batch.
        start = time.perf_counter()
        texts = prompts + negatives if do_cfg else prompts
        refs_for_vlm = None if references is None else (references + references if do_cfg else references)
        tokens = self.processor(texts, refs_for_vlm)
        feeds = {
            "input_ids": tokens.input_ids,
            "attention_mask": tokens.attention_mask,
            "position_ids": tokens.position_ids,
            "image_features": self._image_features(tokens).astype(self._float_dtype("condition_encoder")),
        }
        condition = self._stage("condition_encoder", {k: self._asarray(v) for k, v in feeds.items()})
        index = np.repeat(np.arange(len(texts)), num_images_per_prompt)
        if do_cfg:  # DiT batch order: [negative; positive]
            half = batch * num_images_per_prompt
            index = index[np.concatenate([np.arange(half, 2 * half), np.arange(half)])]
        condition = {name: self._take(value, index) for name, value in condition.items()}
        timings["condition"] = self._synced(start)

        # 2. Latents: the given initial noise or the generator's; clean reference latents for editing.
        start = time.perf_counter()
        scale = cfg["vae_scale_factor"]
        shape = (batch * num_images_per_prompt, cfg["latent_channels"], height // scale, width // scale)
        if latents is None:
            latents = generator.standard_normal(shape, dtype=np.float32)
        else:
            latents = self._numpy(latents) if not isinstance(latents, np.ndarray) else latents
            if tuple(latents.shape) != shape:
                raise ValueError(f"latents: expected shape {shape}, got {tuple(latents.shape)}")
        dit_dtype = self._float_dtype("dit")
        latents = self._asarray(latents.astype(np.float32).astype(dit_dtype))
        stage, extra = "dit", {}
        if references is not None:
            encoded = self._reference_latents(references, generator, mode)
            per_image = [refs[0] for refs in encoded for _ in range(num_images_per_prompt)]
            extra["reference_latents"] = self._cat(per_image + per_image if do_cfg else per_image)
            stage = "dit_edit"
        if cfg["mask_padding"]:
            extra["context_mask"] = condition["mask"]

        # 3. Denoising: FlowMatch Euler on diffusers' grid; CFG as one batched DiT call.
        timesteps, sigmas = flow_match_grid(cfg["scheduler"], num_inference_steps)
        steps = range(len(timesteps))
        if progress and not self._progress_config.get("disable", False):
            from tqdm.auto import tqdm

            steps = tqdm(steps, total=len(timesteps), **{k: v for k, v in self._progress_config.items() if k != "disable"})
        first_bad_step = -1
        for i in steps:
            model_input = self._cat([latents, latents]) if do_cfg else latents
            t = self._asarray(np.full((model_input.shape[0],), timesteps[i], dtype=np.float32))
            velocity = self._stage(
                stage,
                {
                    "hidden_states": model_input,
                    "encoder_hidden_states": condition["context"],
                    "pooled": condition["pooled"],
                    "timestep": t,
                    **extra,
                },
            )["velocity"]
            if do_cfg:
                half = velocity.shape[0] // 2
                velocity_uncond, velocity_cond = velocity[:half], velocity[half:]
                velocity = velocity_uncond + guidance_scale * (velocity_cond - velocity_uncond)
            dt = np.float32(sigmas[i + 1] - sigmas[i])
            latents = self._euler(latents, velocity, dt)
            if first_bad_step < 0 and not self._all_finite(latents):
                first_bad_step = i
        if first_bad_step >= 0:
            raise FloatingPointError(
                f"non-finite latents (NaN/inf) appeared at denoising step {first_bad_step} of {len(timesteps)}; "
                "try float32 or a smaller guidance_scale"
            )
        timings["denoise"] = self._synced(start)

        # 4. Decode.
        start = time.perf_counter()
        if output_type == "latent":
            images = latents
        else:
            pixels = self._stage("vae_decoder", {"latents": latents})["pixels"]
            images = self._convert_pixels(pixels, output_type)
        timings["decode"] = self._synced(start)
        timings["total"] = timings["condition"] + timings["denoise"] + timings["decode"]
        return StagedPipelineOutput(images=images, timings=timings)

    @abstractmethod
    def _euler(self, latents, velocity, dt: np.float32):
        """x + (sigma_next - sigma) * v in float32, returned in v's dtype (``sampling.euler_step``)."""

    def _synced(self, start: float) -> float:
        return time.perf_counter() - start

    def _convert_pixels(self, pixels, output_type: str):
        array = self._numpy(pixels).astype(np.float32)
        if output_type == "float":
            return array
        uint8 = pixels_to_uint8(array)
        if output_type == "np":
            return uint8
        from PIL import Image

        return [Image.fromarray(a) for a in uint8]
