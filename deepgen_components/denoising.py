"""The inference fast path of :class:`DeepGenPipeline`: one denoising step as a single compiled, graph-captured
function, with everything that does not depend on the latents computed once per call.

Per call: the context embedding (``context_embedder(context)``), every step's timestep+pooled embedding
(``time_text_embed``), and the patch-embedded reference latents are precomputed; the per-step function is
patch-embed -> MMDiT trunk -> unpatchify -> CFG combine -> Euler update, latents kept in fp32.

Modes (``pipe.optimize(mode=...)``):

* ``eager`` — the plain PyTorch path (SDPA);
* ``kernels`` — eager with our Triton kernels switched on (attention, qk RMSNorm, the SCB projection) where
  they run (CUDA); elsewhere identical to eager;
* ``compile`` — ``torch.compile(fullgraph=True)`` of the step, recompiled per resolution / batch;
* ``compile+graphs`` — the compiled step captured in a CUDA graph and replayed every step (static shapes;
  on a CPU it falls back to ``compile``).
"""

from __future__ import annotations

import contextlib
import logging
from dataclasses import dataclass

import torch

from deepgen_components.bridge import BridgeOutput

__all__ = ["MODES", "DenoiseRunner", "position_table"]

logger = logging.getLogger(__name__)

MODES = ("eager", "kernels", "compile", "compile+graphs")


def _kernels_context(enabled: bool):
    if not enabled:
        return contextlib.nullcontext()
    from deepgen_components.triton_kernels import use_kernels

    return use_kernels(True)


@dataclass
class _Prepared:
    encoder_hidden: torch.Tensor  # (n, L, D) context embedding, DiT-batch order
    temb: torch.Tensor  # (T, n, D) per-step timestep + pooled embedding
    reference_tokens: torch.Tensor | None  # (n, R, D) patch-embedded references
    context_mask: torch.Tensor | None  # (n, L) bool, only when padding is masked and present


def position_table(patch_embed, height: int, width: int) -> torch.Tensor | None:
    """The (1, tokens, D) position table diffusers' SD3 ``PatchEmbed`` adds for latents of ``height`` x ``width``
    (cropped from its ``pos_embed_max_size`` table), computed once per call instead of once per step. None where
    the table is not a fixed crop (no position table, or an interpolated one): the step then calls ``PatchEmbed``."""
    if getattr(patch_embed, "pos_embed", None) is None or not getattr(patch_embed, "pos_embed_max_size", None):
        return None
    return patch_embed.cropped_pos_embed(height, width)


def _patch_embed(patch_embed, x: torch.Tensor, table: torch.Tensor) -> torch.Tensor:
    """``PatchEmbed.forward`` with the position table given: projection, flatten, optional norm, + table."""
    latent = patch_embed.proj(x)
    if patch_embed.flatten:
        latent = latent.flatten(2).transpose(1, 2)
    if patch_embed.layer_norm:
        latent = patch_embed.norm(latent)
    return (latent + table).to(latent.dtype)


class DenoiseRunner:
    """Runs the FlowMatch Euler loop with CFG for a :class:`DeepGenModel` in one of :data:`MODES`."""

    def __init__(self, model, mode: str = "eager") -> None:
        if mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
        self.model = model
        self.mode = mode
        self._compiled = None
        self._graphs: dict = {}

    # -- pieces --------------------------------------------------------------------------------------------
    def _prepare(self, condition: BridgeOutput, reference_latents, timesteps: torch.Tensor) -> _Prepared:
        model = self.model
        t = model.dit.transformer
        dtype = model.dtype
        encoder_hidden = t.context_embedder(condition.context.to(dtype))
        batch = condition.context.shape[0]
        temb = torch.stack([t.time_text_embed(ts.expand(batch).to(dtype), condition.pooled.to(dtype)) for ts in timesteps])
        reference_tokens = None
        if reference_latents is not None:
            per_sample = [list(r) for r in reference_latents]
            count = len(per_sample[0])
            reference_tokens = torch.cat(
                [t.pos_embed(torch.stack([refs[j] for refs in per_sample]).to(dtype)) for j in range(count)], dim=1
            )
        context_mask = None
        if model.bridge.config.mask_padding and not bool(condition.mask.all()):
            context_mask = condition.mask.bool()
        return _Prepared(encoder_hidden, temb, reference_tokens, context_mask)

    def step(
        self,
        latents: torch.Tensor,
        temb: torch.Tensor,
        dt: torch.Tensor,
        encoder_hidden: torch.Tensor,
        reference_tokens: torch.Tensor | None,
        context_mask: torch.Tensor | None,
        guidance_scale: float,
        do_cfg: bool,
        pos_table: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """One Euler step: fp32 latents (B, C, H, W) -> fp32 latents after the update. ``pos_table``: the
        position table of this resolution, precomputed once per call (:func:`position_table`); None computes it
        inside the step as diffusers' ``PatchEmbed`` does."""
        model = self.model
        dit = model.dit
        t = dit.transformer
        x = torch.cat([latents, latents]) if do_cfg else latents
        x = x.to(model.dtype)
        height, width = x.shape[-2:]
        hidden = t.pos_embed(x) if pos_table is None else _patch_embed(t.pos_embed, x, pos_table)
        count = hidden.shape[1]
        if reference_tokens is not None:
            hidden = torch.cat([hidden, reference_tokens], dim=1)
        hidden = hidden.contiguous()
        kwargs = None
        if context_mask is not None:
            image_mask = torch.ones(hidden.shape[:2], dtype=torch.bool, device=hidden.device)
            kwargs = {"token_masks": (image_mask, context_mask)}
        tokens = dit.run_blocks(hidden, encoder_hidden, temb, kwargs)
        velocity = dit.unpatchify(tokens[:, :count], height, width).float()
        if do_cfg:
            velocity_uncond, velocity_cond = velocity.chunk(2)
            velocity = velocity_uncond + guidance_scale * (velocity_cond - velocity_uncond)
        return latents + dt * velocity

    # -- the loop --------------------------------------------------------------------------------------------
    @torch.no_grad()
    def __call__(
        self,
        latents: torch.Tensor,
        condition: BridgeOutput,
        reference_latents,
        timesteps: torch.Tensor,
        sigmas: torch.Tensor,
        guidance_scale: float,
        do_cfg: bool,
        progress=None,
    ) -> torch.Tensor:
        latents = latents.float()
        use_kernels = self.mode == "kernels"
        with _kernels_context(use_kernels):
            prepared = self._prepare(condition, reference_latents, timesteps)
            context_mask = prepared.context_mask
            step_fn = self.step
            if self.mode in ("compile", "compile+graphs"):
                if self._compiled is None:
                    self._compiled = torch.compile(self.step, fullgraph=True, dynamic=False)
                step_fn = self._compiled
            dts = (sigmas[1:] - sigmas[:-1]).float()
            steps = progress if progress is not None else range(len(timesteps))
            table = position_table(self.model.dit.transformer.pos_embed, *latents.shape[-2:])
            if self.mode == "compile+graphs" and latents.is_cuda:
                return self._run_graph(step_fn, latents, prepared, context_mask, dts, guidance_scale, do_cfg, steps,
                                       table)
            for i in steps:
                latents = step_fn(latents, prepared.temb[i], dts[i], prepared.encoder_hidden,
                                  prepared.reference_tokens, context_mask, guidance_scale, do_cfg, table)
        return latents

    def _run_graph(self, step_fn, latents, prepared, context_mask, dts, guidance_scale, do_cfg, steps, table=None):
        """Capture one step in a CUDA graph (static buffers), replay it for every step."""
        static_latents = latents.clone()
        static_temb = prepared.temb[0].clone()
        static_dt = dts[0].clone()
        args = (prepared.encoder_hidden, prepared.reference_tokens, context_mask, guidance_scale, do_cfg, table)
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            for _ in range(2):  # warm-up (compilation, autotuning, allocator) outside the capture
                step_fn(static_latents, static_temb, static_dt, *args)
        torch.cuda.current_stream().wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            static_out = step_fn(static_latents, static_temb, static_dt, *args)
        for i in steps:
            static_temb.copy_(prepared.temb[i])
            static_dt.copy_(dts[i])
            graph.replay()
            static_latents.copy_(static_out)
        return static_latents.clone()
