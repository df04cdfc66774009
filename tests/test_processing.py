"""Prompt templates, reference preprocessing and resize rules of DeepGen 1.0 (reference §3, §6, §8).

* Templates: no system turn; text-to-image wraps the prompt as "Generate an image: {p}"; editing puts one
  vision block per reference back to back, then "\\n{instruction}" (no wrapper). Left padding, no BOS.
* The VLM sees a reference through DeepGen's own preprocessing: bilinear x28/32, CLIP mean/std, the frame
  duplicated to the temporal patch, 14x14 patches in the Qwen2.5-VL 2x2-merge order.
* Resize rules: ``fix_pixels`` (training: sqrt(HW) = 512, sides rounded up to x32) and the inference rule
  for references (long side <= target, never enlarged, sides rounded up to x32).
"""

import logging
import math

import pytest
import torch
from PIL import Image

from deepgen_components import conventions
from deepgen_components.processing import (
    CLIP_MEAN,
    CLIP_STD,
    edit_prompt,
    fix_pixels_size,
    limit_long_side_size,
    pil_to_pixels,
    pixels_to_uint8,
    t2i_prompt,
    tokenize_prompts,
    vision_patches,
)
from deepgen_components.tiny import tiny_tokenizer


@pytest.fixture(scope="module")
def tokenizer():
    return tiny_tokenizer()


# -- templates ---------------------------------------------------------------------------------------


def test_t2i_template_is_the_official_string():
    assert t2i_prompt("a red cat") == (
        "<|im_start|>user\nGenerate an image: a red cat<|im_end|>\n<|im_start|>assistant\n"
    )
    # The training null condition (and the default negative prompt) still goes through the template.
    assert t2i_prompt("") == "<|im_start|>user\nGenerate an image: <|im_end|>\n<|im_start|>assistant\n"


def test_edit_template_puts_vision_blocks_back_to_back_then_the_instruction():
    pad = "<|image_pad|>"
    assert edit_prompt("make it blue", [4, 2]) == (
        "<|im_start|>user\n"
        f"<|vision_start|>{pad * 4}<|vision_end|><|vision_start|>{pad * 2}<|vision_end|>"
        "\nmake it blue<|im_end|>\n<|im_start|>assistant\n"
    )
    assert "Generate an image" not in edit_prompt("x", [1])
    assert "system" not in edit_prompt("x", [1]) + t2i_prompt("x")


# -- resize rules ------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "size, expected",
    [
        ((512, 512), (512, 512)),
        ((1024, 1024), (512, 512)),
        ((300, 900), (320, 896)),  # 300 * 0.9853 = 295.6 -> 320, 900 * 0.9853 = 886.8 -> 896
        ((1024, 768), (608, 448)),  # 591.2 -> 608, 443.4 -> 448
        ((100, 100), (512, 512)),  # small images are enlarged to ~512^2
    ],
)
def test_fix_pixels_size_scales_to_512_squared_and_rounds_up_to_32(size, expected):
    height, width = fix_pixels_size(*size)
    assert (height, width) == expected
    assert height % 32 == 0 and width % 32 == 0
    # Rounding up only: the area never falls below the target, and each side is at most 31 px above the exact one.
    scale = 512 / math.sqrt(size[0] * size[1])
    assert 0 <= height - size[0] * scale < 32 and 0 <= width - size[1] * scale < 32


@pytest.mark.parametrize(
    "size, target, expected",
    [
        ((1024, 768), 512, (512, 384)),
        ((768, 1024), 512, (384, 512)),
        ((512, 512), 512, (512, 512)),
        ((70, 50), 64, (64, 64)),  # 50 * 64/70 = 45.7 -> 64
        ((100, 40), 64, (64, 32)),  # 40 * 0.64 = 25.6 -> 32
        ((30, 20), 64, (32, 32)),  # never enlarged, only rounded up
        ((300, 900), 512, (192, 512)),  # 170.7 -> 192
    ],
)
def test_reference_rule_limits_the_long_side_and_rounds_up_to_32(size, target, expected):
    assert limit_long_side_size(*size, target) == expected


@pytest.mark.parametrize("rule", [fix_pixels_size, limit_long_side_size])
def test_resize_rules_reject_empty_images(rule):
    with pytest.raises(ValueError, match="must be positive"):
        rule(0, 10)


# -- pixels ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("mode", ["RGBA", "LA", "L", "RGB"])
def test_pil_to_pixels_converts_any_mode_to_rgb_in_minus_one_one(mode):
    image = Image.new("RGB", (50, 70), (255, 0, 128)).convert(mode)
    pixels = pil_to_pixels(image, (64, 32))
    assert pixels.shape == (3, 64, 32) and pixels.dtype == torch.float32
    assert pixels.min() >= -1 and pixels.max() <= 1
    expected = torch.tensor(image.convert("RGB").getpixel((0, 0)), dtype=torch.float32) / 127.5 - 1
    torch.testing.assert_close(pixels[:, 0, 0], expected)


def test_pixels_to_uint8_uses_the_official_rounding():
    # clamp(127.5 * x + 128), truncated: -1 -> 0, 0 -> 128, 1 -> 255 (clamped from 255.5)
    pixels = torch.tensor([-1.5, -1.0, 0.0, 0.5, 1.0, 2.0]).view(1, 1, 1, 6).expand(1, 3, 1, 6)
    out = pixels_to_uint8(pixels)
    assert out.shape == (1, 1, 6, 3) and out.dtype == torch.uint8
    assert out[0, 0, :, 0].tolist() == [0, 0, 128, 191, 255, 255]


# -- vision patches ----------------------------------------------------------------------------------


def test_vision_patches_of_a_constant_image_are_identical_normalised_rows():
    pixels = torch.tensor([0.5, -0.25, 1.0]).view(3, 1, 1).expand(3, 64, 64)
    patches, grid = vision_patches(pixels)
    # 64 px -> 56 px -> 4x4 patches of 14 px (2x2 merged tokens); features = 3 channels x 2 frames x 14 x 14.
    assert grid.tolist() == [[1, 4, 4]]
    assert patches.shape == (16, 3 * 2 * 14 * 14)
    assert torch.equal(patches, patches[:1].expand_as(patches))
    expected = [((v + 1) / 2 - m) / s for v, m, s in zip([0.5, -0.25, 1.0], CLIP_MEAN, CLIP_STD)]
    for channel, value in enumerate(expected):
        block = patches[0, channel * 392 : (channel + 1) * 392]  # (channel, temporal, py, px) order
        torch.testing.assert_close(block, torch.full_like(block, value))


def test_vision_patches_follow_the_two_by_two_merge_order():
    # 56 x 84 pixels at resize factor 1: 4 x 6 patches; patch (r, c) is filled with the value 10 r + c.
    grid_values = torch.arange(4).view(4, 1) * 10 + torch.arange(6).view(1, 6)
    image = grid_values.repeat_interleave(14, 0).repeat_interleave(14, 1).float() / 100
    patches, grid = vision_patches(image.expand(3, -1, -1) * 2 - 1, resize_factor=1.0)
    assert grid.tolist() == [[1, 4, 6]]
    normalised = ((patches[:, 0] * CLIP_STD[0] + CLIP_MEAN[0]) * 100).round().long()
    order = [
        10 * (2 * R + m) + (2 * C + n) for R in range(2) for C in range(3) for m in range(2) for n in range(2)
    ]
    assert normalised.tolist() == order
    # Every 14x14 patch is constant, so each row holds one value per channel.
    assert torch.equal(patches[:, :392], patches[:, :1].expand(-1, 392))


def test_vision_patches_match_the_hugging_face_qwen2_vl_processor():
    from transformers import Qwen2VLImageProcessorPil

    hf = Qwen2VLImageProcessorPil(
        do_resize=False,
        do_rescale=False,
        do_normalize=True,
        image_mean=list(CLIP_MEAN),
        image_std=list(CLIP_STD),
        patch_size=14,
        temporal_patch_size=2,
        merge_size=2,
    )
    pixels = torch.rand(3, 56, 84, generator=torch.Generator().manual_seed(0)) * 2 - 1
    ours, grid = vision_patches(pixels, resize_factor=1.0)
    theirs = hf(images=[((pixels + 1) / 2).numpy()], return_tensors="pt", input_data_format="channels_first")
    assert torch.equal(grid, theirs["image_grid_thw"])
    torch.testing.assert_close(ours, theirs["pixel_values"].float())


def test_vision_patches_resize_by_28_over_32_bilinear():
    pixels = torch.rand(3, 64, 96, generator=torch.Generator().manual_seed(1)) * 2 - 1
    patches, grid = vision_patches(pixels)
    resized = torch.nn.functional.interpolate(
        pixels[None], size=(56, 84), mode="bilinear", align_corners=False
    )[0]
    expected, expected_grid = vision_patches(resized, resize_factor=1.0)
    assert torch.equal(grid, expected_grid)
    torch.testing.assert_close(patches, expected)


def test_vision_patches_reject_sides_that_are_not_multiples_of_32():
    with pytest.raises(ValueError, match="multiples of 32"):
        vision_patches(torch.zeros(3, 48, 64))
    with pytest.raises(ValueError, match=r"\(3, H, W\)"):
        vision_patches(torch.zeros(1, 3, 64, 64))


# -- tokenization ------------------------------------------------------------------------------------


def test_tokenize_prompts_left_pads_with_endoftext_and_adds_no_bos(tokenizer):
    batch = tokenize_prompts(tokenizer, ["a red cat", "a blue cube on the sky under the sun"])
    assert batch.texts == [t2i_prompt("a red cat"), t2i_prompt("a blue cube on the sky under the sun")]
    short = tokenizer(batch.texts[0])["input_ids"]
    long = tokenizer(batch.texts[1])["input_ids"]
    assert batch.input_ids.shape == (2, len(long))
    pads = len(long) - len(short)
    assert pads > 0
    pad_id = tokenizer.convert_tokens_to_ids("<|endoftext|>")
    assert batch.input_ids[0].tolist() == [pad_id] * pads + short
    assert batch.attention_mask[0].tolist() == [0] * pads + [1] * len(short)
    assert batch.input_ids[1].tolist() == long and bool(batch.attention_mask[1].all())
    assert batch.input_ids[0, pads].item() == tokenizer.convert_tokens_to_ids("<|im_start|>")  # no BOS
    assert batch.pixel_values is None and batch.image_grid_thw is None


def test_tokenize_prompts_with_references_builds_vision_blocks_in_order(tokenizer):
    ref_a, ref_b = torch.zeros(3, 64, 64), torch.ones(3, 32, 64) * 0.5
    batch = tokenize_prompts(tokenizer, ["edit one", "edit two", "plain"], [[ref_a, ref_b], [ref_b], []])
    # 64x64 -> 16 patches -> 4 image tokens; 32x64 -> 8 patches -> 2 image tokens.
    assert batch.texts == [edit_prompt("edit one", [4, 2]), edit_prompt("edit two", [2]), t2i_prompt("plain")]
    assert batch.image_grid_thw.tolist() == [[1, 4, 4], [1, 2, 4], [1, 2, 4]]
    expected = torch.cat([vision_patches(ref_a)[0], vision_patches(ref_b)[0], vision_patches(ref_b)[0]])
    assert torch.equal(batch.pixel_values, expected)
    image_pad = tokenizer.convert_tokens_to_ids("<|image_pad|>")
    assert (batch.input_ids == image_pad).sum(1).tolist() == [6, 2, 0]


def test_long_prompts_keep_their_last_tokens_with_a_warning(tokenizer, caplog, monkeypatch):
    monkeypatch.setattr(conventions, "_warned_truncation", False)
    prompt = "a very long prompt " * 10
    full = tokenizer(t2i_prompt(prompt))["input_ids"]
    with caplog.at_level(logging.WARNING, logger="deepgen_components.processing"):
        batch = tokenize_prompts(tokenizer, [prompt, "short"], max_length=40)
    assert batch.input_ids.shape == (2, 40)
    assert batch.input_ids[0].tolist() == full[-40:]  # official: keep the end (the chat suffix survives)
    assert len(tokenizer(t2i_prompt("short"))["input_ids"]) == int(batch.attention_mask[1].sum())
    assert any("longer than max_length=40" in r.getMessage() for r in caplog.records)


def test_truncation_never_cuts_into_reference_images(tokenizer, monkeypatch):
    monkeypatch.setattr(conventions, "_warned_truncation", True)
    ref = torch.zeros(3, 64, 64)
    # Instruction tokens beyond max_length are dropped from the front, which here would remove image tokens.
    with pytest.raises(ValueError, match="reference images"):
        tokenize_prompts(tokenizer, ["word " * 40], [[ref]], max_length=8)


def test_tokenize_prompts_rejects_a_bare_string_and_mismatched_references(tokenizer):
    with pytest.raises(ValueError, match="single str"):
        tokenize_prompts(tokenizer, "a cat")
    with pytest.raises(ValueError, match="2 entries for 1 prompts"):
        tokenize_prompts(tokenizer, ["a cat"], [[], []])
