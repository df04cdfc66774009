"""The exported stages as small ``nn.Module``s with plain tensor inputs and outputs.

Each wrapper reuses the model's own submodules and routes around only what ``torch.export`` cannot trace with
dynamic shapes; ``tests/test_export_numpy.py`` checks every wrapper against the library's API:

* the condition encoder takes positions and vision features from outside (``ThinkTokenVLM`` computes M-RoPE
  positions with Python loops and the vision features with data-dependent shapes);
* the vision encoder expresses the tower's window attention as a mask over window ids instead of transformers'
  split by ``cu_seqlens.tolist()`` (data-dependent), with the window reordering done by the runtime;
* the DiT wrapper runs ``ConditionedDiT``'s uniform-batch path directly (its ``forward`` unbinds the batch
  into a Python list, which fixes the batch size);
* the VAE wrappers fold the latent scaling/shift in.
"""

from __future__ import annotations

import contextlib

import torch
import torch.nn.functional as F
from torch import nn

from deepgen_components import ops

__all__ = [
    "ConditionEncoder",
    "DiTVelocity",
    "VAEDecoder",
    "VAEEncoder",
    "VisionEncoder",
    "export_friendly",
]


def _attention_with_full_mask(q, k, v, key_padding_mask=None, dropout_p: float = 0.0):
    """``ops.attention`` with the key-padding mask expanded to (B, 1, Sq, Sk): ONNX Runtime's CPU ``Attention``
    (opset 23) rejects a mask that broadcasts over the query axis, which the ONNX spec allows."""
    mask = None
    if key_padding_mask is not None:
        mask = key_padding_mask[:, None, None, :].expand(q.shape[0], 1, q.shape[2], k.shape[2])
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout_p)


def _cropped_pos_embed_by_index(patch_embed, height: int, width: int) -> torch.Tensor:
    """diffusers ``PatchEmbed.cropped_pos_embed`` (the centre crop of the SD3 position table) with index_select
    instead of slicing. With a latent range that reaches ``pos_embed_max_size``, ``torch.export`` cannot prove
    that ``top + height`` stays inside the table, keeps a clamped slice length and the ONNX graph then crops the
    wrong number of rows (e.g. 6 instead of 5); gathering ``top + arange(height)`` has an unambiguous length."""
    size = patch_embed.pos_embed_max_size
    height = height // patch_embed.patch_size
    width = width // patch_embed.patch_size
    top = (size - height) // 2
    left = (size - width) // 2
    table = patch_embed.pos_embed.reshape(1, size, size, -1)
    rows = torch.arange(height, device=table.device) + top
    cols = torch.arange(width, device=table.device) + left
    table = table.index_select(1, rows).index_select(2, cols)
    return table.reshape(1, -1, table.shape[-1])


@contextlib.contextmanager
def export_friendly(module: nn.Module):
    """While exporting ``module``: route ``deepgen_components.ops.attention`` (connector and DiT) through the
    full-mask variant (one Expand per masked attention), and crop every SD3 position table inside ``module`` by
    index (:func:`_cropped_pos_embed_by_index`). Same math; everything is restored afterwards."""
    original = ops.attention
    ops.attention = _attention_with_full_mask
    tables = [m for m in module.modules() if hasattr(m, "cropped_pos_embed") and getattr(m, "pos_embed_max_size", None)]
    for table in tables:
        table.cropped_pos_embed = lambda height, width, table=table: _cropped_pos_embed_by_index(table, height, width)
    try:
        yield
    finally:
        ops.attention = original
        for table in tables:
            del table.cropped_pos_embed  # back to the class method


class ConditionEncoder(nn.Module):
    """input_ids, attention_mask (B, L), position_ids (3, B, L + N), image_features (B, L, D) -> context, pooled, mask.

    The model's own pieces: ``ThinkTokenVLM.embed``, the image features placed at the image-token slots (a
    ``where`` over dense features instead of ``masked_scatter``), ``append_think_tokens``, ``decode``, the selected
    layers through the SCB bridge."""

    def __init__(self, model) -> None:
        super().__init__()
        self.encoder = model.encoder
        self.bridge = model.bridge
        self.image_token_id = int(model.encoder.image_token_id())
        self.indices = tuple(model.encoder.layers.indices)

    def forward(self, input_ids, attention_mask, position_ids, image_features):
        embeds = self.encoder.embed(input_ids)
        slots = (input_ids == self.image_token_id).unsqueeze(-1)
        embeds = torch.where(slots, image_features.to(embeds.dtype), embeds)
        embeds, mask = self.encoder.append_think_tokens(embeds, attention_mask)
        every = self.encoder.decode(embeds, mask, position_ids)
        hidden = tuple(every[i] for i in self.indices)
        if self.bridge.config.tokens == "all":
            condition = self.bridge(hidden, mask)
        else:
            # tokens="think": the bridge selects the last N positions through a data-dependent boolean index;
            # they are the think tokens by construction, so slice them and run the bridge's encode step on them.
            length = input_ids.shape[1]
            condition = self.bridge.encode(tuple(h[:, length:] for h in hidden), mask[:, length:])
        return condition.context, condition.pooled, condition.mask


class VisionEncoder(nn.Module):
    """One reference through the Qwen2.5-VL vision tower: patches (N, 1176), position_ids (N, 2), window_ids (N,)
    -> merged features (N / merge^2, D). Inputs and output are in window order (``preprocessing.vision_inputs``).

    The tower's blocks, norms, MLPs, rotary table and merger are the model's own; only the attention is written
    out, so that windows become a mask (tokens attend within their window, or to everything in the
    ``fullatt_block_indexes`` layers) instead of a Python split."""

    def __init__(self, model) -> None:
        super().__init__()
        self.visual = model.encoder.vision_tower
        self.full_attention = set(self.visual.fullatt_block_indexes)

    def forward(self, patches, position_ids, window_ids):
        from transformers.models.qwen2_5_vl.modeling_qwen2_5_vl import apply_rotary_pos_emb_vision

        visual = self.visual
        hidden = visual.patch_embed(patches)  # (N, C)
        count = hidden.shape[0]
        cos, sin = visual.rotary_pos_emb(hidden, position_ids)
        same_window = (window_ids[:, None] == window_ids[None, :])[None, None]  # (1, 1, N, N)
        for index, block in enumerate(visual.blocks):
            attn = block.attn
            # (N, C) -> 3 x (N, H, d)
            q, k, v = attn.qkv(block.norm1(hidden)).reshape(count, 3, attn.num_heads, -1).permute(1, 0, 2, 3).unbind(0)
            q, k = apply_rotary_pos_emb_vision(q, k, cos, sin)
            q, k, v = (t.transpose(0, 1).unsqueeze(0) for t in (q, k, v))  # (1, H, N, d)
            mask = None if index in self.full_attention else same_window
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=attn.scaling)
            hidden = hidden + attn.proj(out[0].transpose(0, 1).reshape(count, -1))
            hidden = hidden + block.mlp(block.norm2(hidden))
        return visual.merger(hidden)


class DiTVelocity(nn.Module):
    """hidden_states (B, C, h, w), encoder_hidden_states (B, L, Cj), pooled (B, P), timestep (B,) fp32
    [, context_mask (B, L) bool][, reference_latents (B, C, h', w')] -> velocity (B, C, h, w).

    ``ConditionedDiT``'s uniform-batch path: targets and the reference share the patch embedding and position
    table, reference tokens follow the target tokens, only target tokens are unpatchified."""

    def __init__(self, model, *, with_reference: bool) -> None:
        super().__init__()
        self.dit = model.dit
        self.masked = bool(model.bridge.config.mask_padding)
        self.with_reference = with_reference

    def forward(self, hidden_states, encoder_hidden_states, pooled, timestep, context_mask=None, reference_latents=None):
        transformer = self.dit.transformer
        tokens = transformer.pos_embed(hidden_states)
        target_tokens = tokens.shape[1]
        if self.with_reference:
            tokens = torch.cat([tokens, transformer.pos_embed(reference_latents)], dim=1)
        attention_kwargs = None
        if self.masked:
            image_mask = torch.ones(tokens.shape[:2], dtype=torch.bool, device=tokens.device)
            attention_kwargs = {"token_masks": (image_mask, context_mask.bool())}
        temb = transformer.time_text_embed(timestep, pooled)
        context = transformer.context_embedder(encoder_hidden_states)
        tokens = self.dit.run_blocks(tokens, context, temb, attention_kwargs)
        return self.dit.unpatchify(tokens[:, :target_tokens], *hidden_states.shape[-2:])


class _VAEStage(nn.Module):
    """The model's VAE with its latent normalisation (SD3: ``(z - shift) * scaling``) as plain floats."""

    def __init__(self, model) -> None:
        super().__init__()
        self.vae = model.vae
        self.scaling = float(model.vae.config.scaling_factor)
        self.shift = float(model.vae.config.shift_factor or 0.0)


class VAEDecoder(_VAEStage):
    """latents (B, 16, h, w) -> pixels (B, 3, 8h, 8w) in about [-1, 1] (``DeepGenModel.decode_latents``)."""

    def forward(self, latents):
        return self.vae.decode(latents / self.scaling + self.shift).sample


class VAEEncoder(_VAEStage):
    """pixels (B, 3, H, W) in [-1, 1] -> posterior mean and std in latent units ((mean - shift) * scaling, std *
    scaling); a sample is mean + std * noise (``DeepGenModel.encode_images``)."""

    def forward(self, pixels):
        posterior = self.vae.encode(pixels).latent_dist
        return (posterior.mean - self.shift) * self.scaling, posterior.std * self.scaling
