"""Prompt templates, reference-image preprocessing and resizing rules of DeepGen 1.0.

* Chat templates (no system turn): text-to-image wraps the prompt as ``"Generate an image: {prompt}"`` in
  the user turn; editing puts one vision block per reference back to back, then ``"\\n{instruction}"``.
* The VLM sees a reference through DeepGen's own preprocessing (not the HF image processor): pixels in
  [-1, 1] with sides that are multiples of 32, bilinear resize by 28/32, CLIP mean/std, the frame
  duplicated to the temporal patch size, 14x14 patches in the 2x2-merge order of the Qwen2.5-VL ViT.
* ``fix_pixels``: the training resize rule (sqrt(H*W) = target, each side rounded up to a multiple of 32).
* ``reference_pixels``: the one normaliser of reference images (PIL or tensors, per prompt) to [-1, 1] pixels
  resized by the official inference rule, used by the pipeline and the model.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from deepgen_components.conventions import (
    CLIP_MEAN,
    CLIP_STD,
    IMAGE_PAD,
    VISION_RESIZE_FACTOR,
    edit_prompt,
    fix_pixels_size,
    left_pad,
    limit_long_side_size,
    patch_layout,
    pil_to_array,
    pixels_to_uint8_array,
    prompts_with_references,
    t2i_prompt,
    truncate_official,
)
from deepgen_components.conventions import reference_pixels as conventions_reference_pixels

__all__ = [
    "CLIP_MEAN",
    "CLIP_STD",
    "PromptBatch",
    "edit_prompt",
    "fix_pixels_size",
    "limit_long_side_size",
    "load_image",
    "pil_to_pixels",
    "pixels_to_pil",
    "reference_pixels",
    "t2i_prompt",
    "tokenize_prompts",
    "vision_patches",
    "vit_resize",
]


def load_image(path):
    """A PIL image from a file, decoded now (not lazily): FileNotFoundError when ``path`` does not exist, ValueError
    naming the file when it is a folder or not an image PIL can read (unknown format, truncated)."""
    from PIL import Image, UnidentifiedImageError

    if not os.path.exists(path):
        raise FileNotFoundError(f"{path}: no such file")
    if os.path.isdir(path):
        raise ValueError(f"{path}: is a folder, not an image file")
    try:
        with Image.open(path) as image:
            image.load()
            return image.copy()
    except UnidentifiedImageError:
        raise ValueError(f"{path}: not a readable image (PIL cannot identify its format)") from None
    except (OSError, SyntaxError) as err:  # truncated or corrupt data; PIL raises SyntaxError for some broken headers
        raise ValueError(f"{path}: not a readable image ({err})") from None


def pil_to_pixels(image, size: tuple[int, int] | None = None) -> torch.Tensor:
    """PIL image (any mode) -> RGB float tensor (3, H, W) in [-1, 1], optionally resized (bicubic) to (H, W)."""
    return torch.from_numpy(pil_to_array(image, size))


def pixels_to_uint8(pixels: torch.Tensor) -> torch.Tensor:
    """[-1, 1] pixels (B, 3, H, W) -> uint8 (B, H, W, 3) the official way: clamp(127.5 * x + 128)."""
    return torch.from_numpy(pixels_to_uint8_array(pixels.detach().float().cpu().numpy()))


def pixels_to_pil(pixels: torch.Tensor) -> list:
    from PIL import Image

    return [Image.fromarray(a) for a in pixels_to_uint8(pixels).cpu().numpy()]


def reference_pixels(
    references, image_size: int, *, resize_tensors: bool = True, log: bool = False, name: str = "image"
) -> list[list[torch.Tensor]] | None:
    """Reference images, one entry per prompt (None, an image, or a list of images), -> per prompt the list of
    (3, H, W) pixels in [-1, 1], by DeepGen's inference rule: the long side at most ``image_size`` (never
    enlarged), each side rounded up to a multiple of 32. None stays None. (The rule is ``conventions.
    reference_pixels``, shared with the torch-free runtime; here for torch tensors.)

    A PIL image (any mode) is converted to RGB and resized (bicubic); ``log`` logs each resize or conversion. A
    tensor must be (3, H, W) in [-1, 1]: with ``resize_tensors`` it is resized by the same rule (bicubic, clamped)
    and returned as float32, without it it is taken as given and its sides must already be multiples of 32.
    Anything else is a ValueError. ``name`` begins each error message; ``{i}`` / ``{j}`` in it are the prompt's and
    the reference's index (e.g. ``"images[{i}][{j}]"``)."""
    return conventions_reference_pixels(
        references, image_size, array_type=torch.Tensor,
        from_array=lambda ref, where: _tensor_reference(ref, image_size, resize_tensors, where),
        from_pil=pil_to_pixels, kind="tensor", path_hint="open files with deepgen_components.processing.load_image",
        log=log, name=name,
    )


def _tensor_reference(ref: torch.Tensor, image_size: int, resize: bool, where: str) -> torch.Tensor:
    if not resize:
        if ref.dim() != 3 or ref.shape[0] != 3 or ref.shape[-1] % 32 or ref.shape[-2] % 32:
            raise ValueError(
                f"{where}: a tensor reference must be (3, H, W) in [-1, 1] with H and W multiples of 32, got "
                f"{tuple(ref.shape)}"
            )
        return ref
    if ref.dim() != 3 or ref.shape[0] != 3:
        raise ValueError(f"{where}: a tensor reference must be (3, H, W) in [-1, 1], got {tuple(ref.shape)}")
    h, w = limit_long_side_size(ref.shape[-2], ref.shape[-1], image_size)
    if (h, w) != tuple(ref.shape[-2:]):
        ref = F.interpolate(ref[None].float(), size=(h, w), mode="bicubic", align_corners=False)[0].clamp(-1, 1)
    return ref.float()


def vit_resize(pixels: torch.Tensor, resize_factor: float = VISION_RESIZE_FACTOR) -> torch.Tensor:
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
    resize_factor: float = VISION_RESIZE_FACTOR,
) -> tuple[torch.Tensor, torch.Tensor]:
    """DeepGen's VLM preprocessing of one reference: (3, H, W) in [-1, 1] -> (patches (N, 3*tp*p*p), grid (1, 3)).

    Bilinear resize by 28/32 (512 -> 448), map to [0, 1], CLIP mean/std, duplicate the frame to fill the
    temporal patch, then cut p x p patches ordered (t, row-block, col-block, row-in-merge, col-in-merge)
    with features ordered (channel, temporal, py, px), as the Qwen2.5-VL vision tower expects.
    """
    x = vit_resize(pixels, resize_factor)
    height, width = x.shape[-2:]
    blocks, order, shape, grid = patch_layout(
        height, width, patch_size=patch_size, temporal_patch_size=temporal_patch_size, merge_size=merge_size,
        source=tuple(pixels.shape[-2:]),
    )
    mean = torch.tensor(CLIP_MEAN, dtype=x.dtype, device=x.device).view(1, 3, 1, 1)
    std = torch.tensor(CLIP_STD, dtype=x.dtype, device=x.device).view(1, 3, 1, 1)
    x = ((x + 1) / 2 - mean) / std
    # (1, 3, H, W) -> (t=1, tp, 3, H, W), then cut as conventions.patch_layout says
    frames = x.unsqueeze(1).expand(1, temporal_patch_size, 3, height, width)
    patches = frames.reshape(blocks).permute(order).reshape(shape)
    grid = torch.tensor([grid], dtype=torch.long)
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
    texts, patches, grids, image_tokens = [], [], [], []
    for prompt, refs in prompts_with_references(prompts, references):
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
    encoded = truncate_official(encoded, image_tokens, tokenizer.convert_tokens_to_ids(IMAGE_PAD), max_length)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    input_ids, attention_mask = (torch.from_numpy(a) for a in left_pad(encoded, pad_id))
    return PromptBatch(
        input_ids=input_ids,
        attention_mask=attention_mask,
        pixel_values=torch.cat(patches) if patches else None,
        image_grid_thw=torch.cat(grids) if grids else None,
        texts=texts,
    )
