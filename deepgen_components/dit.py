"""ConditionedDiT: a diffusers ``SD3Transformer2DModel`` with what DeepGen needs around it.

* Reference latents (editing, one or several per sample) go through the *same* PatchEmbed, with the same
  sin-cos position table as the target, and are appended after the target tokens (DeepGen / Kontext
  style: the DiT tells them apart only by content, noisy vs clean).
* Samples whose latents (or references) differ in size share one batch: their image tokens are
  right-padded and a key-padding mask keeps the pads out of the joint and the image-only attention.
* An optional context mask removes padded VLM tokens from the joint attention.
* Only the target tokens are unpatchified: the output is the velocity for the target latents.

The transformer's own modules are reused as they are; only its attention processors are replaced by
:class:`MaskedJointAttnProcessor`, which computes exactly diffusers' joint attention when no mask is given, and
its adaLN modules get kernel-aware subclasses (same parameters; the fused Triton ``layer_norm_modulate`` runs
when the kernels are switched on, the parent's forward otherwise).
With no references and no masks the forward equals the plain ``SD3Transformer2DModel`` forward exactly.

Masking note: the official DeepGen DiT builds a pairwise mask (valid_i and valid_j, diagonal forced true).
For every real query that is the same as a key-padding mask; pad query rows, whose outputs are thrown
away, attend to the real keys here instead of only to themselves. Real-token outputs are identical.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from deepgen_components import ops

__all__ = ["ConditionedDiT", "MaskedJointAttnProcessor"]

LatentInput = torch.Tensor | Sequence[torch.Tensor]


class MaskedJointAttnProcessor:
    """SD3 joint attention (diffusers ``JointAttnProcessor2_0`` math) with optional key-padding masks.

    ``token_masks = (image_mask, context_mask)``, each (B, N) / (B, L) bool with True = real token. The joint
    attention masks keys with ``cat(image_mask, context_mask)``, the image-only attention with ``image_mask``.
    """

    def __call__(
        self,
        attn,
        hidden_states: torch.Tensor,
        encoder_hidden_states: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        token_masks: tuple[torch.Tensor, torch.Tensor] | None = None,
    ):
        batch, num_image_tokens = hidden_states.shape[:2]
        query = attn.to_q(hidden_states)
        key = attn.to_k(hidden_states)
        value = attn.to_v(hidden_states)
        head_dim = key.shape[-1] // attn.heads
        # (B, S, H*d) -> (B, H, S, d)
        query = query.view(batch, -1, attn.heads, head_dim).transpose(1, 2)
        key = key.view(batch, -1, attn.heads, head_dim).transpose(1, 2)
        value = value.view(batch, -1, attn.heads, head_dim).transpose(1, 2)
        if attn.norm_q is not None:
            query = ops.rms_norm(attn.norm_q, query)
        if attn.norm_k is not None:
            key = ops.rms_norm(attn.norm_k, key)

        key_padding_mask = None
        if encoder_hidden_states is not None:
            ctx_q = attn.add_q_proj(encoder_hidden_states).view(batch, -1, attn.heads, head_dim).transpose(1, 2)
            ctx_k = attn.add_k_proj(encoder_hidden_states).view(batch, -1, attn.heads, head_dim).transpose(1, 2)
            ctx_v = attn.add_v_proj(encoder_hidden_states).view(batch, -1, attn.heads, head_dim).transpose(1, 2)
            if attn.norm_added_q is not None:
                ctx_q = ops.rms_norm(attn.norm_added_q, ctx_q)
            if attn.norm_added_k is not None:
                ctx_k = ops.rms_norm(attn.norm_added_k, ctx_k)
            query = torch.cat([query, ctx_q], dim=2)
            key = torch.cat([key, ctx_k], dim=2)
            value = torch.cat([value, ctx_v], dim=2)
            if token_masks is not None:
                key_padding_mask = torch.cat(token_masks, dim=1)
        elif token_masks is not None:
            key_padding_mask = token_masks[0]

        out = ops.attention(query, key, value, key_padding_mask)
        out = out.transpose(1, 2).reshape(batch, -1, attn.heads * head_dim).to(query.dtype)

        context_out = None
        if encoder_hidden_states is not None:
            out, context_out = out[:, :num_image_tokens], out[:, num_image_tokens:]
            if not attn.context_pre_only:
                context_out = attn.to_add_out(context_out)
        out = attn.to_out[1](attn.to_out[0](out))
        return out if encoder_hidden_states is None else (out, context_out)


def _plain_layer_norm(norm) -> bool:
    return isinstance(norm, nn.LayerNorm) and not norm.elementwise_affine


def _kernel_ada_norms():
    """Subclasses of diffusers' adaLN modules whose modulation goes through the fused ``layer_norm_modulate``
    kernel when the kernels are switched on (identical results otherwise: they call the parent's forward)."""
    from diffusers.models.normalization import AdaLayerNormContinuous, AdaLayerNormZero, SD35AdaLayerNormZeroX

    from deepgen_components.triton_kernels import kernels_enabled, layer_norm_modulate

    class KernelAdaLayerNormZero(AdaLayerNormZero):
        def forward(self, x, timestep=None, class_labels=None, hidden_dtype=None, emb=None):
            if not kernels_enabled() or self.emb is not None or not _plain_layer_norm(self.norm):
                return super().forward(x, timestep, class_labels, hidden_dtype, emb)
            emb = self.linear(self.silu(emb))
            shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = emb.chunk(6, dim=1)
            return layer_norm_modulate(x, shift_msa, scale_msa, self.norm.eps), gate_msa, shift_mlp, scale_mlp, gate_mlp

    class KernelSD35AdaLayerNormZeroX(SD35AdaLayerNormZeroX):
        def forward(self, hidden_states, emb=None):
            if not kernels_enabled() or not _plain_layer_norm(self.norm):
                return super().forward(hidden_states, emb)
            emb = self.linear(self.silu(emb))
            shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp, shift_msa2, scale_msa2, gate_msa2 = emb.chunk(
                9, dim=1
            )
            eps = self.norm.eps
            first = layer_norm_modulate(hidden_states, shift_msa, scale_msa, eps)
            second = layer_norm_modulate(hidden_states, shift_msa2, scale_msa2, eps)
            return first, gate_msa, shift_mlp, scale_mlp, gate_mlp, second, gate_msa2

    class KernelAdaLayerNormContinuous(AdaLayerNormContinuous):
        def forward(self, x, conditioning_embedding):
            if not kernels_enabled() or not _plain_layer_norm(self.norm):
                return super().forward(x, conditioning_embedding)
            emb = self.linear(self.silu(conditioning_embedding).to(x.dtype))
            scale, shift = torch.chunk(emb, 2, dim=1)
            return layer_norm_modulate(x, shift, scale, self.norm.eps)

    return {
        AdaLayerNormZero: KernelAdaLayerNormZero,
        SD35AdaLayerNormZeroX: KernelSD35AdaLayerNormZeroX,
        AdaLayerNormContinuous: KernelAdaLayerNormContinuous,
    }


def _as_reference_lists(reference_latents, batch: int) -> list[list[torch.Tensor]]:
    """Normalise references to one list of (C, h, w) tensors per sample."""
    if reference_latents is None:
        return [[] for _ in range(batch)]
    if isinstance(reference_latents, torch.Tensor):
        if reference_latents.dim() == 4:  # (B, C, h, w): one reference per sample
            refs = [[r] for r in reference_latents]
        elif reference_latents.dim() == 5:  # (B, R, C, h, w): R references per sample
            refs = [list(r.unbind(0)) for r in reference_latents]
        else:
            raise ValueError(
                "reference_latents: a tensor must be (B, C, h, w) or (B, R, C, h, w), got shape "
                f"{tuple(reference_latents.shape)}"
            )
    else:
        refs = []
        for item in reference_latents:
            if item is None:
                refs.append([])
            elif isinstance(item, torch.Tensor):
                refs.append([item] if item.dim() == 3 else list(item.unbind(0)))
            else:
                refs.append(list(item))
    if len(refs) != batch:
        raise ValueError(f"reference_latents: got {len(refs)} entries for a batch of {batch} latents")
    return refs


class ConditionedDiT(nn.Module):
    """Velocity model: ``forward(latents, timestep, context, pooled, reference_latents=None, context_mask=None)``.

    latents: (B, C, H, W) tensor, or a list of (C, H_i, W_i) tensors of different sizes.
    timestep: (B,) or scalar, in the scheduler's units (1000 * sigma).
    context: (B, L, joint_attention_dim); pooled: (B, pooled_projection_dim).
    reference_latents: None; (B, C, h, w); (B, R, C, h, w); or a list with, per sample, None, a (C, h, w)
        tensor or a list of them (any number and size of references per sample).
    context_mask: (B, L) bool, True = context token the image may attend to; None = all.
    Returns the velocity with the same layout as ``latents`` (a tensor, or a list for a list input).
    """

    def __init__(self, transformer: nn.Module) -> None:
        super().__init__()
        try:
            from diffusers import SD3Transformer2DModel
        except ImportError as err:  # pragma: no cover - diffusers is a hard dependency
            raise ImportError("ConditionedDiT needs diffusers") from err
        if not isinstance(transformer, SD3Transformer2DModel):
            raise ValueError(
                f"transformer: expected a diffusers SD3Transformer2DModel, got {type(transformer).__name__}"
            )
        self.transformer = transformer
        self.set_attention_processor(MaskedJointAttnProcessor())
        # adaLN modules: same parameters and results, plus the fused kernel path when kernels are switched on.
        swaps = _kernel_ada_norms()
        for module in transformer.modules():
            if type(module) in swaps:
                module.__class__ = swaps[type(module)]

    def set_attention_processor(self, processor) -> None:
        for block in self.transformer.transformer_blocks:
            block.attn.set_processor(processor)
            if block.attn2 is not None:
                block.attn2.set_processor(processor)

    @property
    def config(self):
        return self.transformer.config

    @property
    def in_channels(self) -> int:
        return self.transformer.config.in_channels

    @property
    def patch_size(self) -> int:
        return self.transformer.config.patch_size

    def _check_latent(self, name: str, x: torch.Tensor) -> None:
        cfg = self.transformer.config
        if x.dim() != 3:
            raise ValueError(f"{name}: expected a (C, H, W) latent, got shape {tuple(x.shape)}")
        if x.shape[0] != cfg.in_channels:
            raise ValueError(f"{name}: has {x.shape[0]} channels, the DiT takes {cfg.in_channels}")
        h, w = x.shape[-2:]
        p = cfg.patch_size
        if h % p or w % p:
            raise ValueError(f"{name}: latent size {h}x{w} is not divisible by the patch size {p}")
        limit = cfg.pos_embed_max_size * p
        if h > limit or w > limit:
            raise ValueError(
                f"{name}: latent size {h}x{w} exceeds the position table ({limit}x{limit} latents, "
                f"pos_embed_max_size={cfg.pos_embed_max_size})"
            )

    def _embed_image_tokens(self, targets: list[torch.Tensor], refs: list[list[torch.Tensor]]):
        """Patch-embed targets and references -> (tokens (B, N, D), image_mask or None, target token counts)."""
        patch_embed = self.transformer.pos_embed
        p = self.patch_size
        signature = [(tuple(x.shape), tuple(tuple(r.shape) for r in rs)) for x, rs in zip(targets, refs)]
        counts = [(x.shape[-2] // p) * (x.shape[-1] // p) for x in targets]
        if all(s == signature[0] for s in signature):
            # Uniform batch: embed everything batched, no padding.
            parts = [patch_embed(torch.stack(targets))]
            for j in range(len(refs[0])):
                parts.append(patch_embed(torch.stack([rs[j] for rs in refs])))
            return torch.cat(parts, dim=1).contiguous(), None, counts
        sequences = []
        for x, rs in zip(targets, refs):
            parts = [patch_embed(x[None])] + [patch_embed(r[None]) for r in rs]
            sequences.append(torch.cat(parts, dim=1)[0])
        longest = max(s.shape[0] for s in sequences)
        tokens = sequences[0].new_zeros(len(sequences), longest, sequences[0].shape[-1])
        image_mask = torch.zeros(len(sequences), longest, dtype=torch.bool, device=tokens.device)
        for i, s in enumerate(sequences):
            tokens[i, : s.shape[0]] = s
            image_mask[i, : s.shape[0]] = True
        return tokens, image_mask, counts

    def forward(
        self,
        latents: LatentInput,
        timestep: torch.Tensor | float,
        context: torch.Tensor,
        pooled: torch.Tensor,
        reference_latents=None,
        context_mask: torch.Tensor | None = None,
    ) -> LatentInput:
        t = self.transformer
        as_list = not isinstance(latents, torch.Tensor)
        if not as_list and latents.dim() != 4:
            raise ValueError(f"latents: expected (B, C, H, W) or a list of (C, H, W), got {tuple(latents.shape)}")
        targets = list(latents) if as_list else list(latents.unbind(0))
        batch = len(targets)
        if batch == 0:
            raise ValueError("latents: empty batch")
        for i, x in enumerate(targets):
            self._check_latent(f"latents[{i}]", x)
        refs = _as_reference_lists(reference_latents, batch)
        for i, rs in enumerate(refs):
            for j, r in enumerate(rs):
                self._check_latent(f"reference_latents[{i}][{j}]", r)
        if context.dim() != 3 or context.shape[0] != batch:
            raise ValueError(f"context: expected (B={batch}, L, D), got {tuple(context.shape)}")
        if context.shape[-1] != t.config.joint_attention_dim:
            raise ValueError(
                f"context: width {context.shape[-1]} does not match joint_attention_dim {t.config.joint_attention_dim}"
            )
        if pooled.shape != (batch, t.config.pooled_projection_dim):
            raise ValueError(
                f"pooled: expected ({batch}, {t.config.pooled_projection_dim}), got {tuple(pooled.shape)}"
            )
        if context_mask is not None:
            if context_mask.shape != context.shape[:2]:
                raise ValueError(
                    f"context_mask shape {tuple(context_mask.shape)} must be (B, L) = {tuple(context.shape[:2])}"
                )
            context_mask = context_mask.bool()
            if not torch.compiler.is_compiling() and bool(context_mask.all()):
                context_mask = None  # nothing to mask: take the unmasked (exact SD3) path
        timestep = torch.as_tensor(timestep, device=context.device)
        if timestep.dim() == 0:
            timestep = timestep.expand(batch)
        if timestep.shape != (batch,):
            raise ValueError(f"timestep: expected a scalar or shape ({batch},), got {tuple(timestep.shape)}")

        if not as_list and all(not rs for rs in refs):
            hidden = t.pos_embed(latents).contiguous()  # exactly what SD3Transformer2DModel does
            image_mask = None
            counts = [hidden.shape[1]] * batch
        else:
            hidden, image_mask, counts = self._embed_image_tokens(targets, refs)

        token_masks = None
        if image_mask is not None or context_mask is not None:
            if image_mask is None:
                image_mask = torch.ones(hidden.shape[:2], dtype=torch.bool, device=hidden.device)
            if context_mask is None:
                context_mask = torch.ones(context.shape[:2], dtype=torch.bool, device=context.device)
            token_masks = (image_mask, context_mask)
        attention_kwargs = None if token_masks is None else {"token_masks": token_masks}

        temb = t.time_text_embed(timestep, pooled)
        encoder_hidden = t.context_embedder(context)
        hidden = self.run_blocks(hidden, encoder_hidden, temb, attention_kwargs)
        return self._unpatchify(hidden, targets, counts, as_list)

    def run_blocks(
        self,
        hidden: torch.Tensor,
        encoder_hidden: torch.Tensor,
        temb: torch.Tensor,
        attention_kwargs: dict | None = None,
    ) -> torch.Tensor:
        """The MMDiT trunk on embedded tokens: every block, then the output norm and projection -> (B, N, p*p*C).

        ``hidden``: patch-embedded image tokens (B, N, D); ``encoder_hidden``: ``context_embedder(context)``;
        ``temb``: ``time_text_embed(timestep, pooled)``. Split out so a fast path can precompute the last two
        once per call (they do not depend on the latents) and compile / graph-capture only this part.
        """
        t = self.transformer
        for block in t.transformer_blocks:
            if torch.is_grad_enabled() and t.gradient_checkpointing:
                encoder_hidden, hidden = t._gradient_checkpointing_func(
                    block, hidden, encoder_hidden, temb, attention_kwargs
                )
            else:
                encoder_hidden, hidden = block(
                    hidden_states=hidden,
                    encoder_hidden_states=encoder_hidden,
                    temb=temb,
                    joint_attention_kwargs=attention_kwargs,
                )
        return t.proj_out(t.norm_out(hidden, temb))

    def unpatchify(self, tokens: torch.Tensor, height: int, width: int) -> torch.Tensor:
        """(B, N >= h*w/p^2, p*p*C) target tokens -> (B, C, height, width) latents."""
        p = self.patch_size
        return self._unpatchify(tokens, [tokens.new_empty(0, height, width)], [(height // p) * (width // p)], False)

    def _unpatchify(self, tokens: torch.Tensor, targets, counts, as_list: bool) -> LatentInput:
        p = self.patch_size
        channels = self.transformer.out_channels

        def one(x: torch.Tensor, h: int, w: int) -> torch.Tensor:
            # (n, h*w, p*p*C) -> (n, C, h*p, w*p)
            x = x.reshape(x.shape[0], h, w, p, p, channels).permute(0, 5, 1, 3, 2, 4)
            return x.reshape(x.shape[0], channels, h * p, w * p)

        if not as_list:
            h, w = targets[0].shape[-2] // p, targets[0].shape[-1] // p
            return one(tokens[:, : counts[0]], h, w)
        return [
            one(tokens[i : i + 1, : counts[i]], x.shape[-2] // p, x.shape[-1] // p)[0] for i, x in enumerate(targets)
        ]
