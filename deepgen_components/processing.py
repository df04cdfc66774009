"""Prompt templates, reference-image preprocessing and resizing rules of DeepGen 1.0.

* Chat templates (no system turn): text-to-image wraps the prompt as ``"Generate an image: {prompt}"`` in
  the user turn; editing puts one vision block per reference back to back, then ``"\\n{instruction}"``.
* The VLM sees a reference through DeepGen's own preprocessing (not the HF image processor): pixels in
  [-1, 1] with sides that are multiples of 32, bilinear resize by 28/32, CLIP mean/std, the frame
  duplicated to the temporal patch size, 14x14 patches in the 2x2-merge order of the Qwen2.5-VL ViT.
* ``fix_pixels``: the training resize rule (sqrt(H*W) = target, each side rounded up to a multiple of 32).
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

__all__ = [
    "CLIP_MEAN",
    "CLIP_STD",
    "PromptBatch",
    "edit_prompt",
    "fix_pixels_size",
    "limit_long_side_size",
    "pil_to_pixels",
    "pixels_to_pil",
    "t2i_prompt",
    "tokenize_prompts",
    "vision_patches",
    "vit_resize",
]

logger = logging.getLogger(__name__)

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)

USER_TURN = "<|im_start|>user\n{content}<|im_end|>\n<|im_start|>assistant\n"
T2I_WRAPPER = "Generate an image: {prompt}"
VISION_BLOCK = "<|vision_start|>{pads}<|vision_end|>"
IMAGE_PAD = "<|image_pad|>"


def t2i_prompt(prompt: str) -> str:
    """The official text-to-image chat text."""
    return USER_TURN.format(content=T2I_WRAPPER.format(prompt=prompt))


def edit_prompt(instruction: str, image_token_counts: Sequence[int]) -> str:
    """The official editing chat text: one vision block per reference, then the instruction (no wrapper)."""
    blocks = "".join(VISION_BLOCK.format(pads=IMAGE_PAD * n) for n in image_token_counts)
    return USER_TURN.format(content=f"{blocks}\n{instruction}")


def _round_up(value: float, multiple: int) -> int:
    return int(math.ceil(value / multiple) * multiple)


def fix_pixels_size(height: int, width: int, target: int = 512, multiple: int = 32) -> tuple[int, int]:
    """Official ``fix_pixels``: scale so sqrt(H*W) = target, keep the aspect, round each side *up* to a
    multiple of 32."""
    if height < 1 or width < 1:
        raise ValueError(f"image size must be positive, got {height}x{width}")
    scale = target / math.sqrt(height * width)
    return _round_up(height * scale, multiple), _round_up(width * scale, multiple)


def limit_long_side_size(height: int, width: int, target: int = 512, multiple: int = 32) -> tuple[int, int]:
    """The official inference rule for references: shrink so the long side is at most ``target`` (never
    enlarge), then round each side up to a multiple of 32."""
    if height < 1 or width < 1:
        raise ValueError(f"image size must be positive, got {height}x{width}")
    scale = min(1.0, target / max(height, width))
    return _round_up(height * scale, multiple), _round_up(width * scale, multiple)


def pil_to_pixels(image, size: tuple[int, int] | None = None) -> torch.Tensor:
    """PIL image (any mode) -> RGB float tensor (3, H, W) in [-1, 1], optionally resized (bicubic) to (H, W)."""
    from PIL import Image

    if not isinstance(image, Image.Image):
        raise ValueError(f"image: expected a PIL.Image, got {type(image).__name__}")
    if image.mode != "RGB":
        image = image.convert("RGB")
    if size is not None and (image.height, image.width) != tuple(size):
        image = image.resize((size[1], size[0]), Image.BICUBIC)
    array = np.asarray(image, dtype=np.float32) / 127.5 - 1.0
    return torch.from_numpy(array).permute(2, 0, 1).contiguous()


def pixels_to_uint8(pixels: torch.Tensor) -> torch.Tensor:
    """[-1, 1] pixels (B, 3, H, W) -> uint8 (B, H, W, 3) the official way: clamp(127.5 * x + 128)."""
    return (pixels.float() * 127.5 + 128.0).clamp(0, 255).to(torch.uint8).permute(0, 2, 3, 1)


def pixels_to_pil(pixels: torch.Tensor) -> list:
    from PIL import Image

    return [Image.fromarray(a) for a in pixels_to_uint8(pixels).cpu().numpy()]


def vit_resize(pixels: torch.Tensor, resize_factor: float = 28 / 32) -> torch.Tensor:
    """DeepGen's first VLM preprocessing step: bilinear resize by 28/32 (align_corners False), still in [-1, 1].

    (3, H, W) -> (1, 3, H', W'); a 512x512 reference becomes 448x448 (32x32 ViT patches of 14 px)."""
    if pixels.dim() != 3 or pixels.shape[0] != 3:
        raise ValueError(f"pixels: expected (3, H, W), got {tuple(pixels.shape)}")
    return F.interpolate(pixels[None].float(), scale_factor=resize_factor, mode="bilinear", align_corners=False)


def vision_patches(
    pixels: torch.Tensor,
    *,
    patch_size: int = 14,
    temporal_patch_size: int = 2,
    merge_size: int = 2,
    resize_factor: float = 28 / 32,
) -> tuple[torch.Tensor, torch.Tensor]:
    """DeepGen's VLM preprocessing of one reference: (3, H, W) in [-1, 1] -> (patches (N, 3*tp*p*p), grid (1, 3)).

    Bilinear resize by 28/32 (512 -> 448), map to [0, 1], CLIP mean/std, duplicate the frame to fill the
    temporal patch, then cut p x p patches ordered (t, row-block, col-block, row-in-merge, col-in-merge)
    with features ordered (channel, temporal, py, px), as the Qwen2.5-VL vision tower expects.
    """
    x = vit_resize(pixels, resize_factor)
    height, width = x.shape[-2:]
    unit = patch_size * merge_size
    if height % unit or width % unit:
        raise ValueError(
            f"pixels: a {pixels.shape[-2]}x{pixels.shape[-1]} reference resizes to {height}x{width}, which is not "
            f"a multiple of {unit}; reference sides must be multiples of 32"
        )
    mean = torch.tensor(CLIP_MEAN, dtype=x.dtype, device=x.device).view(1, 3, 1, 1)
    std = torch.tensor(CLIP_STD, dtype=x.dtype, device=x.device).view(1, 3, 1, 1)
    x = ((x + 1) / 2 - mean) / std
    # (1, 3, H, W) -> (t=1, tp, 3, H, W)
    frames = x.unsqueeze(1).expand(1, temporal_patch_size, 3, height, width)
    gh, gw = height // unit, width // unit
    # dims: t tp c (h m p) (w n q)
    frames = frames.reshape(1, temporal_patch_size, 3, gh, merge_size, patch_size, gw, merge_size, patch_size)
    # -> (t h w m n) (c tp p q)
    patches = frames.permute(0, 3, 6, 4, 7, 2, 1, 5, 8).reshape(
        gh * gw * merge_size * merge_size, 3 * temporal_patch_size * patch_size * patch_size
    )
    grid = torch.tensor([[1, height // patch_size, width // patch_size]], dtype=torch.long)
    return patches, grid


@dataclass
class PromptBatch:
    """Tokenized, left-padded prompts with their vision inputs (all references of all prompts, in order)."""

    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    pixel_values: torch.Tensor | None = None
    image_grid_thw: torch.Tensor | None = None
    texts: list[str] | None = None

    def to(self, device) -> PromptBatch:
        move = lambda t: None if t is None else t.to(device)
        return PromptBatch(
            move(self.input_ids), move(self.attention_mask), move(self.pixel_values), move(self.image_grid_thw),
            self.texts,
        )


_warned_truncation = False


def tokenize_prompts(
    tokenizer,
    prompts: Sequence[str],
    references: Sequence[Sequence[torch.Tensor]] | None = None,
    *,
    max_length: int | None = 1024,
    merge_size: int = 2,
) -> PromptBatch:
    """Build the official chat texts, tokenize with left padding and prepare the vision input.

    ``references[i]`` is the list of (3, H, W) [-1, 1] reference pixels of prompt i (empty or None for
    text-to-image). Prompts longer than ``max_length`` text tokens (plus their image tokens) keep their last
    tokens, as the official code does, with a warning.
    """
    global _warned_truncation
    if isinstance(prompts, str):
        raise ValueError("prompts: expected a list of strings, got a single str")
    references = list(references) if references is not None else [[] for _ in prompts]
    if len(references) != len(prompts):
        raise ValueError(f"references: got {len(references)} entries for {len(prompts)} prompts")
    texts, patches, grids, image_tokens = [], [], [], []
    for prompt, refs in zip(prompts, references):
        if not isinstance(prompt, str):
            raise ValueError(f"prompts: every prompt must be a str, got {type(prompt).__name__}")
        refs = list(refs or [])
        if refs:
            counts = []
            for ref in refs:
                p, g = vision_patches(ref)
                patches.append(p)
                grids.append(g)
                counts.append(p.shape[0] // (merge_size * merge_size))
            texts.append(edit_prompt(prompt, counts))
            image_tokens.append(sum(counts))
        else:
            texts.append(t2i_prompt(prompt))
            image_tokens.append(0)

    encoded = [tokenizer(t, add_special_tokens=True)["input_ids"] for t in texts]
    if max_length is not None:
        for i, ids in enumerate(encoded):
            limit = max_length + image_tokens[i]
            if len(ids) > limit:
                kept = ids[-limit:]
                if sum(1 for tok in kept if tok == tokenizer.convert_tokens_to_ids(IMAGE_PAD)) != image_tokens[i]:
                    raise ValueError(
                        f"prompts[{i}]: the instruction is too long ({len(ids)} tokens > {limit}); truncating it "
                        "the official way (keep the last tokens) would cut into the reference images"
                    )
                if not _warned_truncation:
                    logger.warning(
                        "prompt of %d tokens is longer than max_length=%d: keeping its last %d tokens (official "
                        "behaviour)", len(ids) - image_tokens[i], max_length, limit,
                    )
                    _warned_truncation = True
                encoded[i] = kept
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    length = max(len(ids) for ids in encoded)
    input_ids = torch.full((len(encoded), length), pad_id, dtype=torch.long)
    attention_mask = torch.zeros((len(encoded), length), dtype=torch.long)
    for i, ids in enumerate(encoded):
        input_ids[i, length - len(ids) :] = torch.tensor(ids, dtype=torch.long)
        attention_mask[i, length - len(ids) :] = 1
    return PromptBatch(
        input_ids=input_ids,
        attention_mask=attention_mask,
        pixel_values=torch.cat(patches) if patches else None,
        image_grid_thw=torch.cat(grids) if grids else None,
        texts=texts,
    )
