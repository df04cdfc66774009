"""Tiny random pieces of a DeepGen model, built in code (no files, no network) in milliseconds.

Used by the tests, the README demo and the CPU training recipes. Shapes follow the real model's layout
(Qwen2.5-VL with M-RoPE and a vision tower, SD3 MMDiT with dual attention and qk RMSNorm, 16-channel
8x VAE, shift-3 FlowMatch scheduler) at toy widths.
"""

from __future__ import annotations

import torch

__all__ = [
    "QWEN_SPECIAL_TOKENS",
    "tiny_tokenizer",
    "tiny_vlm",
    "tiny_transformer",
    "tiny_vae",
    "tiny_scheduler",
]

# Qwen chat / vision special tokens, in Qwen's id order; <|endoftext|> is the pad token.
QWEN_SPECIAL_TOKENS = (
    "<|endoftext|>",
    "<|im_start|>",
    "<|im_end|>",
    "<|vision_start|>",
    "<|vision_end|>",
    "<|vision_pad|>",
    "<|image_pad|>",
    "<|video_pad|>",
)

# A few byte-pair merges so common words are not all single bytes ("Ġ" is the byte-level space).
_MERGES = (
    ("Ġ", "a"), ("Ġ", "t"), ("h", "e"), ("Ġt", "he"), ("i", "n"), ("e", "r"), ("o", "n"), ("r", "e"),
    ("Ġ", "s"), ("Ġ", "c"), ("Ġ", "b"), ("Ġ", "o"), ("e", "d"), ("a", "n"), ("o", "r"), ("Ġ", "r"),
    ("l", "e"), ("Ġ", "g"), ("Ġ", "m"), ("Ġ", "l"), ("Ġ", "p"), ("e", "n"), ("a", "t"), ("i", "r"),
)


def tiny_tokenizer():
    """A Qwen2 byte-level BPE tokenizer with the Qwen chat special tokens, left padding, pad=<|endoftext|>."""
    from tokenizers import pre_tokenizers
    from transformers import Qwen2Tokenizer

    vocab = {ch: i for i, ch in enumerate(sorted(pre_tokenizers.ByteLevel.alphabet()))}
    for a, b in _MERGES:
        vocab[a + b] = len(vocab)
    tokenizer = Qwen2Tokenizer(vocab=vocab, merges=list(_MERGES), errors="replace")
    tokenizer.add_special_tokens({"additional_special_tokens": list(QWEN_SPECIAL_TOKENS)})
    tokenizer.pad_token = "<|endoftext|>"
    tokenizer.eos_token = "<|im_end|>"
    tokenizer.padding_side = "left"
    return tokenizer


def tiny_vlm(tokenizer=None, *, num_layers: int = 4, hidden_size: int = 64, seed: int | None = 0):
    """A random Qwen2.5-VL (~0.3M parameters): text hidden 64, 4 layers, 4 heads / 2 kv heads, vision tower
    of depth 2 whose merged tokens are 64 wide. Attention implementation "sdpa"."""
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

    tokenizer = tokenizer if tokenizer is not None else tiny_tokenizer()
    ids = {t: tokenizer.convert_tokens_to_ids(t) for t in QWEN_SPECIAL_TOKENS}
    heads = 4
    head_dim = hidden_size // heads
    # M-RoPE sections (temporal, height, width) must sum to head_dim / 2.
    half = head_dim // 2
    section = [half - 2 * (half * 3 // 8), half * 3 // 8, half * 3 // 8]
    config = Qwen2_5_VLConfig(
        text_config=dict(
            vocab_size=len(tokenizer),
            hidden_size=hidden_size,
            intermediate_size=2 * hidden_size,
            num_hidden_layers=num_layers,
            num_attention_heads=heads,
            num_key_value_heads=2,
            max_position_embeddings=4096,
            rms_norm_eps=1e-6,
            rope_parameters=dict(rope_type="default", rope_theta=1_000_000.0, mrope_section=section),
            tie_word_embeddings=True,
            bos_token_id=None,
            eos_token_id=ids["<|im_end|>"],
            pad_token_id=ids["<|endoftext|>"],
        ),
        vision_config=dict(
            depth=2,
            hidden_size=32,
            intermediate_size=64,
            num_heads=2,
            in_channels=3,
            patch_size=14,
            temporal_patch_size=2,
            spatial_merge_size=2,
            window_size=56,
            fullatt_block_indexes=[1],
            out_hidden_size=hidden_size,
        ),
        image_token_id=ids["<|image_pad|>"],
        video_token_id=ids["<|video_pad|>"],
        vision_start_token_id=ids["<|vision_start|>"],
        vision_end_token_id=ids["<|vision_end|>"],
        tie_word_embeddings=True,
    )
    if seed is not None:
        torch.manual_seed(seed)
    model = Qwen2_5_VLForConditionalGeneration(config)
    return model.eval()


def tiny_transformer(
    *,
    context_dim: int = 64,
    pooled_dim: int = 32,
    num_layers: int = 2,
    heads: int = 2,
    head_dim: int = 16,
    seed: int | None = 0,
):
    """A random SD3 MMDiT (~0.1M parameters): patch 2, 16 latent channels, dual attention in block 0,
    qk RMSNorm, position table 64x64 patches (latents up to 128x128, i.e. 1024px images)."""
    from diffusers import SD3Transformer2DModel

    if seed is not None:
        torch.manual_seed(seed)
    return SD3Transformer2DModel(
        sample_size=32,
        patch_size=2,
        in_channels=16,
        out_channels=16,
        num_layers=num_layers,
        num_attention_heads=heads,
        attention_head_dim=head_dim,
        joint_attention_dim=context_dim,
        caption_projection_dim=heads * head_dim,
        pooled_projection_dim=pooled_dim,
        pos_embed_max_size=64,
        dual_attention_layers=(0,),
        qk_norm="rms_norm",
    ).eval()


def tiny_vae(seed: int | None = 0):
    """A random 16-channel AutoencoderKL with the real 8x downsampling and SD3's latent shift/scale."""
    from diffusers import AutoencoderKL

    if seed is not None:
        torch.manual_seed(seed)
    return AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4,
        block_out_channels=(8, 16, 16, 16),
        layers_per_block=1,
        latent_channels=16,
        norm_num_groups=4,
        sample_size=64,
        use_quant_conv=False,
        use_post_quant_conv=False,
        shift_factor=0.0609,
        scaling_factor=1.5305,
    ).eval()


def tiny_scheduler():
    """FlowMatch Euler with shift 3, as DeepGen (and SD3.5) use."""
    from diffusers import FlowMatchEulerDiscreteScheduler

    return FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=3.0)
