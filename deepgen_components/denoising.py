"""Denoising, in one place: the FlowMatch sigma grid, classifier-free guidance, the Euler step, and the one runner
that turns initial noise into final latents for a :class:`DeepGenModel`.

Sigma convention: x_sigma = (1 - sigma) * x0 + sigma * noise, the model predicts v = noise - x0, and the DiT is given
timestep = 1000 * sigma. Latents, the CFG combination and the Euler update stay fp32 whatever the weights' dtype.

The runner (:class:`DenoiseRunner`) has two loops:

* the plain loop, :func:`denoise_loop`, for any velocity function: per step one velocity call for both CFG halves,
  CFG, the Euler update, the step callback, and the first non-finite step recorded without a host sync per step;
* the fast path: the context embedding (``context_embedder(context)``), every step's timestep+pooled embedding
  (``time_text_embed``) and the patch-embedded reference latents precomputed once per call (:meth:`~DenoiseRunner.
  prepare`); the per-step function is patch-embed -> MMDiT trunk -> unpatchify -> CFG -> Euler update. It has no
  per-step check: when its result is non-finite, the plain loop is replayed from the same start to name the step.

Modes (``pipe.optimize(mode=...)``, :data:`MODES`); the runner's ``"plain"`` mode always runs the plain loop:

* ``eager`` — the plain PyTorch path (SDPA);
* ``kernels`` — eager with our Triton kernels switched on (attention, qk RMSNorm, the SCB projection) where
  they run (CUDA); elsewhere identical to eager;
* ``compile`` — ``torch.compile(fullgraph=True)`` of the step, recompiled per resolution / batch;
* ``compile+graphs`` — the compiled step captured in a CUDA graph (:func:`capture_cuda_graph`) and replayed every
  step (static shapes; on a CPU it falls back to ``compile``).
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable, Iterable
from dataclasses import dataclass

import torch

from deepgen_components.bridge import BridgeOutput
from deepgen_components.conventions import euler_update, guidance  # the rules, shared with the numpy runtime

__all__ = [
    "MODES",
    "RUNNER_MODES",
    "DenoiseRunner",
    "Prepared",
    "capture_cuda_graph",
    "denoise_loop",
    "euler_step",
    "flow_match_sigmas",
    "guidance",
    "kernels_context",
    "model_velocity",
    "position_table",
]

logger = logging.getLogger(__name__)

MODES = ("eager", "kernels", "compile", "compile+graphs")
RUNNER_MODES = ("plain", *MODES)


# -- the maths ----------------------------------------------------------------------------------------------
# guidance(v_u, v_c, s) = v_u + s * (v_c - v_u), classifier-free guidance on velocities, and the Euler update are
# the rules of conventions (shared with the torch-free runtime); flow_match_sigmas reads the scheduler's own grid.


def flow_match_sigmas(scheduler, num_inference_steps: int, device=None) -> tuple[torch.Tensor, torch.Tensor]:
    """(timesteps (N,), sigmas (N + 1,) ending in 0) of diffusers' FlowMatch grid for N steps."""
    if num_inference_steps < 1:
        raise ValueError(f"num_inference_steps must be >= 1, got {num_inference_steps}")
    scheduler.set_timesteps(num_inference_steps, device=device)
    return scheduler.timesteps.float(), scheduler.sigmas.float()


def _euler(x: torch.Tensor, velocity: torch.Tensor, dt) -> torch.Tensor:
    return euler_update(x.float(), velocity.float(), dt).to(x.dtype)


def euler_step(x: torch.Tensor, velocity: torch.Tensor, sigma, sigma_next) -> torch.Tensor:
    """x + (sigma_next - sigma) * v (``conventions.euler_update``), computed in fp32 and returned in x's dtype (the
    pipeline keeps fp32 latents whatever the weights' dtype, so bf16 weights do not round the trajectory at every
    step)."""
    return _euler(x, velocity, sigma_next - sigma)


# -- the plain loop -----------------------------------------------------------------------------------------


def denoise_loop(
    velocity_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
    latents: torch.Tensor,
    timesteps: torch.Tensor,
    sigmas: torch.Tensor,
    *,
    guidance_scale: float,
    do_cfg: bool,
    steps: Iterable[int] | None = None,
    callback_on_step_end=None,
) -> tuple[torch.Tensor, int]:
    """The FlowMatch Euler loop with CFG for any ``velocity_fn(model_input, timestep) -> velocity``.

    Per step i: ``model_input`` is the fp32 latents, twice along the batch with CFG ([uncond; cond] rows come from
    the condition the velocity function closes over); the velocity halves are combined by :func:`guidance` in fp32
    and the latents updated by :func:`euler_step`; then ``callback_on_step_end(i, timesteps[i], latents,
    velocity_uncond, velocity_cond)`` (``velocity_uncond`` None without CFG). ``steps``: the step indices to run
    (e.g. a progress bar over ``range(len(timesteps))``, the default).

    Returns (latents, the first step after which the latents held NaN/inf, or -1); the check costs no host sync per
    step.
    """
    latents = latents.float()
    first_bad_step = torch.full((), -1, dtype=torch.long, device=latents.device)
    for i in range(len(timesteps)) if steps is None else steps:
        model_input = torch.cat([latents, latents]) if do_cfg else latents
        velocity = velocity_fn(model_input, timesteps[i])
        velocity_uncond, velocity_cond = None, velocity
        if do_cfg:
            velocity_uncond, velocity_cond = velocity.chunk(2)
            velocity = guidance(velocity_uncond.float(), velocity_cond.float(), guidance_scale)
        latents = euler_step(latents, velocity, sigmas[i], sigmas[i + 1])
        if callback_on_step_end is not None:
            callback_on_step_end(i, timesteps[i], latents, velocity_uncond, velocity_cond)
        bad = ~torch.isfinite(latents).all()
        first_bad_step = torch.where(bad & (first_bad_step < 0), torch.full_like(first_bad_step, i), first_bad_step)
    return latents, int(first_bad_step)


def model_velocity(model, condition: BridgeOutput, reference_latents=None) -> Callable:
    """The velocity function of :func:`denoise_loop` for a :class:`DeepGenModel`: ``model.velocity`` under
    ``condition`` (and the reference latents), the input and the timestep cast to the weights' dtype."""

    def velocity(model_input: torch.Tensor, timestep: torch.Tensor) -> torch.Tensor:
        t = timestep.expand(model_input.shape[0]).to(model.dtype)
        return model.velocity(model_input.to(model.dtype), t, condition, reference_latents)

    return velocity


# -- the fast path's pieces ---------------------------------------------------------------------------------


def kernels_context(enabled: bool):
    """Our Triton kernels switched on for the block (``triton_kernels.use_kernels(True)``), or nothing."""
    if not enabled:
        return contextlib.nullcontext()
    from deepgen_components.triton_kernels import use_kernels

    return use_kernels(True)


def capture_cuda_graph(fn, *args, warmup: int = 2) -> tuple[torch.cuda.CUDAGraph, object]:
    """Run ``fn(*args)`` ``warmup`` times on a side stream (compilation, autotuning, the allocator: outside the
    capture), then capture one call in a CUDA graph. Returns (graph, the captured call's static output): fill the
    tensors in ``args`` in place and ``graph.replay()`` recomputes the output into the same memory."""
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for _ in range(warmup):
            fn(*args)
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        static_out = fn(*args)
    return graph, static_out


@dataclass
class Prepared:
    """What the fast path computes once per call (:meth:`DenoiseRunner.prepare`)."""

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


def _uniform(reference_latents) -> bool:
    """Whether every sample has references of the same shapes (the fast path batches them)."""
    if reference_latents is None:
        return True
    return len({tuple(tuple(r.shape) for r in refs) for refs in reference_latents}) == 1


# -- the runner ---------------------------------------------------------------------------------------------


class DenoiseRunner:
    """Runs the FlowMatch Euler loop with CFG for a :class:`DeepGenModel`: the plain loop in mode ``"plain"`` (and,
    in any mode, for a call with a step callback or with references of different shapes per sample), else the
    fast path in one of :data:`MODES`. Raises ``FloatingPointError`` naming the first non-finite step."""

    def __init__(self, model, mode: str = "eager") -> None:
        if mode not in RUNNER_MODES:
            raise ValueError(f"mode must be one of {RUNNER_MODES}, got {mode!r}")
        self.model = model
        self.mode = mode
        self._compiled = None

    def uses_fast_path(self, reference_latents=None, callback_on_step_end=None) -> bool:
        return self.mode != "plain" and callback_on_step_end is None and _uniform(reference_latents)

    # -- pieces --------------------------------------------------------------------------------------------
    def prepare(self, condition: BridgeOutput, reference_latents, timesteps: torch.Tensor) -> Prepared:
        """The fast path's per-call precomputation (see :class:`Prepared`)."""
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
        return Prepared(encoder_hidden, temb, reference_tokens, context_mask)

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
            velocity = guidance(*velocity.chunk(2), guidance_scale)
        return _euler(latents, velocity, dt)

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
        progress: Iterable[int] | None = None,
        callback_on_step_end=None,
    ) -> torch.Tensor:
        """Initial noise -> final fp32 latents. ``condition`` and ``reference_latents`` are in DiT-batch order
        ([negative; positive] with CFG); ``progress``: the step indices to run (a progress bar), default all."""
        latents = latents.float()
        count = len(timesteps)
        if not self.uses_fast_path(reference_latents, callback_on_step_end):
            latents, bad_step = denoise_loop(
                model_velocity(self.model, condition, reference_latents), latents, timesteps, sigmas,
                guidance_scale=guidance_scale, do_cfg=do_cfg, steps=progress, callback_on_step_end=callback_on_step_end,
            )
            if bad_step >= 0:
                raise FloatingPointError(
                    f"non-finite latents (NaN/inf) appeared at denoising step {bad_step} of {count}; "
                    "try float32 or a smaller guidance_scale"
                )
            return latents
        start = latents  # the fast path never writes into its input: the replay below starts from it
        latents = self._fast_path(latents, condition, reference_latents, timesteps, sigmas, guidance_scale, do_cfg,
                                  range(count) if progress is None else progress)
        if not bool(torch.isfinite(latents).all()):
            _, bad_step = denoise_loop(model_velocity(self.model, condition, reference_latents), start, timesteps,
                                       sigmas, guidance_scale=guidance_scale, do_cfg=do_cfg)
            where = (f"at denoising step {bad_step} of {count} (found by replaying the eager loop)" if bad_step >= 0
                     else f"after the last of {count} denoising steps (the eager replay stayed finite: the optimized "
                     "step itself produced them)")
            raise FloatingPointError(
                f"non-finite latents (NaN/inf) appeared {where}; mode {self.mode!r}; try float32, a smaller "
                "guidance_scale or optimize('eager')"
            )
        return latents

    def _fast_path(self, latents, condition, reference_latents, timesteps, sigmas, guidance_scale, do_cfg, steps):
        with kernels_context(self.mode == "kernels"):
            prepared = self.prepare(condition, reference_latents, timesteps)
            step_fn = self.step
            if self.mode in ("compile", "compile+graphs"):
                if self._compiled is None:
                    self._compiled = torch.compile(self.step, fullgraph=True, dynamic=False)
                step_fn = self._compiled
            dts = (sigmas[1:] - sigmas[:-1]).float()
            table = position_table(self.model.dit.transformer.pos_embed, *latents.shape[-2:])
            args = (prepared.encoder_hidden, prepared.reference_tokens, prepared.context_mask, guidance_scale, do_cfg,
                    table)
            if self.mode == "compile+graphs" and latents.is_cuda:
                return self._replay_graph(step_fn, latents, prepared.temb, dts, args, steps)
            for i in steps:
                latents = step_fn(latents, prepared.temb[i], dts[i], *args)
        return latents

    @staticmethod
    def _replay_graph(step_fn, latents, temb, dts, args, steps) -> torch.Tensor:
        """One step captured in a CUDA graph (static buffers), replayed for every step."""
        static_latents, static_temb, static_dt = latents.clone(), temb[0].clone(), dts[0].clone()
        graph, static_out = capture_cuda_graph(step_fn, static_latents, static_temb, static_dt, *args)
        for i in steps:
            static_temb.copy_(temb[i])
            static_dt.copy_(dts[i])
            graph.replay()
            static_latents.copy_(static_out)
        return static_latents.clone()

    _prepare = prepare  # the old name, for cli/bench until it calls prepare (issue #21)


_kernels_context = kernels_context  # the old name, for cli/bench until it calls kernels_context (issue #21)
