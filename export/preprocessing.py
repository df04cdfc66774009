"""The torch-free preprocessing of the exported pipeline: prompts to token ids and positions, references to
vision patches and the vision encoder's window-ordered inputs. numpy, ``tokenizers`` and Pillow only.

Each function ports one piece of the PyTorch pipeline and names it; ``tests/test_export_numpy.py`` checks every
port against the original. Templates, truncation, left padding, M-RoPE positions and the patch layout come from
``deepgen_components.conventions``, the torch-free module the PyTorch pipeline uses too:

* :class:`PromptProcessor`: chat templates, tokenization with left padding and the official truncation
  (``processing.tokenize_prompts``), M-RoPE positions over prompt + think tokens;
* :func:`vision_patches`: the reference preprocessing for the VLM: bilinear resize by 28/32 with torch's
  coordinate rule, CLIP mean/std, patch order (``processing.vision_patches``);
* :func:`vision_inputs`: the vision tower's window layout (transformers' ``get_vision_window_index``), which the
  exported vision encoder takes as inputs.
"""

from __future__ import annotations

import math
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from deepgen_components.conventions import (
    CLIP_MEAN,
    CLIP_STD,
    VISION_RESIZE_FACTOR,
    left_pad,
    mrope_positions,
    patch_layout,
    prompts_with_references,
    truncate_official,
)

__all__ = [
    "PromptBatch",
    "PromptProcessor",
    "bilinear_resize",
    "vision_inputs",
    "vision_patches",
    "vision_position_ids",
    "vision_window_layout",
]


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
    resize_factor: float = VISION_RESIZE_FACTOR,
    mean: Sequence[float] = CLIP_MEAN,
    std: Sequence[float] = CLIP_STD,
) -> tuple[np.ndarray, tuple[int, int, int]]:
    """``processing.vision_patches`` in numpy: (3, H, W) in [-1, 1] -> (patches (N, 3*tp*p*p), grid (t, h, w))."""
    if pixels.ndim != 3 or pixels.shape[0] != 3:
        raise ValueError(f"pixels: expected (3, H, W), got {tuple(pixels.shape)}")
    x = bilinear_resize(pixels, resize_factor)
    height, width = x.shape[-2:]
    blocks, order, shape, grid = patch_layout(
        height, width, patch_size=patch_size, temporal_patch_size=temporal_patch_size, merge_size=merge_size,
        source=tuple(pixels.shape[-2:]),
    )
    mean = np.asarray(mean, np.float32).reshape(3, 1, 1)
    std = np.asarray(std, np.float32).reshape(3, 1, 1)
    x = ((x + np.float32(1)) / np.float32(2) - mean) / std
    frames = np.broadcast_to(x[None, None], (1, temporal_patch_size, 3, height, width))
    patches = frames.reshape(blocks).transpose(order).reshape(shape)
    return np.ascontiguousarray(patches, dtype=np.float32), grid


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
        texts, patches, grids, image_tokens = [], [], [], []
        for prompt, refs in prompts_with_references(prompts, references):
            counts = []
            for ref in refs:
                p, g = self.patches(ref)
                patches.append(p)
                grids.append(g)
                counts.append(p.shape[0] // (merge * merge))
            texts.append(self.edit_text(prompt, counts) if refs else self.t2i_text(prompt))
            image_tokens.append(sum(counts))
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
        return mrope_positions(
            ext_ids, ext_mask, grids, image_token_id=cfg["image_token_id"], spatial_merge_size=cfg["spatial_merge_size"],
            pad_position=cfg["pad_position"],
        )
