"""MR-GRPO (DeepGen stage 3) as components usable without our training loop.

* :func:`rollout` samples images with the CPS SDE (or Flow-GRPO's) and records, per image, the latent before
  and after every step and the step log-probs, all in fp32;
* :func:`gdpo_advantages` (reward-wise group normalisation, category weights, batch normalisation, clip) and
  :func:`grpo_advantages`;
* :func:`select_timesteps` (the trained subset of denoising steps);
* :class:`MRGRPOLoss`: clipped ratio, velocity-space KL to a frozen reference DiT, and the
  (1 - lambda) GRPO + lambda SFT total.

Differences from the official code, all deliberate (see docs/rl.md): log-probs stay fp32 (official rounds old
log-probs to bf16, ~1e-3 error against a 1e-4 clip range), the batch normalisation of advantages can gather
across ranks, rollouts chunk the DiT batch exactly as the update does so the first ratio is exactly 1.
"""

from __future__ import annotations

import math
import random
from collections.abc import Callable
from dataclasses import dataclass

import torch

from deepgen_components.bridge import BridgeOutput
from deepgen_components.denoising import flow_match_sigmas, guidance
from deepgen_components.rl.sampling import cps_step, flow_grpo_step

__all__ = [
    "MRGRPOLoss",
    "Trajectory",
    "gdpo_advantages",
    "grpo_advantages",
    "policy_step_log_prob",
    "rollout",
    "select_timesteps",
]


# -- advantages --------------------------------------------------------------------------------------------


def _group_normalise(values: torch.Tensor, group_size: int, eps: float) -> torch.Tensor:
    """(N, ...) -> per consecutive group of ``group_size``: (x - mean) / (unbiased std + eps)."""
    if group_size < 2:
        raise ValueError(f"group_size must be >= 2 (the std is unbiased), got {group_size}")
    if values.shape[0] % group_size:
        raise ValueError(f"rewards: {values.shape[0]} images are not a whole number of groups of {group_size}")
    grouped = values.view(values.shape[0] // group_size, group_size, *values.shape[1:])
    mean = grouped.mean(1, keepdim=True)
    std = grouped.std(1, unbiased=True, keepdim=True)
    return ((grouped - mean) / (std + eps)).view_as(values)


def gdpo_advantages(
    rewards: torch.Tensor,
    weights: torch.Tensor,
    group_size: int,
    eps: float = 1e-4,
    clip: float = 5.0,
    gather: Callable[[torch.Tensor], torch.Tensor] | None = None,
) -> torch.Tensor:
    """GDPO advantages, (N, R) rewards and per-image weights -> (N,).

    1. per reward, normalise within each group of ``group_size`` (unbiased std + eps): a constant reward gives 0;
    2. weighted sum with each image's own category weights;
    3. normalise over the batch — over every rank when ``gather`` concatenates the ranks' advantages (the
       official code uses the local batch only);
    4. clamp to [-clip, clip].
    """
    rewards = rewards.float()
    weights = weights.float().to(rewards.device)
    if rewards.dim() != 2 or weights.shape != rewards.shape:
        raise ValueError(f"rewards and weights must both be (N, R); got {tuple(rewards.shape)} and {tuple(weights.shape)}")
    per_reward = _group_normalise(rewards, group_size, eps)
    combined = (per_reward * weights).sum(-1)
    population = gather(combined) if gather is not None else combined
    mean = population.mean()
    std = population.std(unbiased=True) if population.numel() > 1 else torch.zeros((), device=combined.device)
    return ((combined - mean) / (std + eps)).clamp(-clip, clip)


def grpo_advantages(
    rewards: torch.Tensor, weights: torch.Tensor, group_size: int, eps: float = 1e-4, clip: float = 5.0
) -> torch.Tensor:
    """Plain GRPO: group mean/std normalisation of the weighted reward sum, then clamp."""
    rewards = rewards.float()
    combined = (rewards * weights.float().to(rewards.device)).sum(-1)
    return _group_normalise(combined, group_size, eps).clamp(-clip, clip)


def select_timesteps(
    num_steps: int, fraction: float = 0.6, *, include_last: bool = False, rng: random.Random | None = None
) -> list[int]:
    """The denoising steps trained this iteration: int(num_steps * fraction) indices drawn without replacement
    from the non-final steps (the last step is deterministic under CPS), sorted, shared by every image."""
    pool = list(range(num_steps if include_last else num_steps - 1))
    count = min(len(pool), max(1, int(num_steps * fraction)))
    rng = rng or random.Random()
    return sorted(rng.sample(pool, count))


# -- rollouts ----------------------------------------------------------------------------------------------


@dataclass
class Trajectory:
    """Per image: ``latents[:, i]`` before step i and ``latents[:, i + 1]`` after it (T + 1 of them), the step
    log-probs (N, T), and the shared timesteps (T,) / sigmas (T + 1,). fp32, on ``latents``' device."""

    latents: torch.Tensor
    log_probs: torch.Tensor
    timesteps: torch.Tensor
    sigmas: torch.Tensor

    @property
    def final(self) -> torch.Tensor:
        return self.latents[:, -1]


def _guided_velocity(model, latents, t, condition, negative_condition, guidance_scale, reference_latents):
    v = model.velocity(latents, t, condition, reference_latents)
    if guidance_scale != 1.0:
        if negative_condition is None:
            raise ValueError("negative_condition is required when guidance_scale != 1")
        v = guidance(model.velocity(latents, t, negative_condition, reference_latents), v, guidance_scale)
    return v


def _sde_step(sampler, x, v, sigmas, i, eta, noise_level, logprob, noise=None, prev_sample=None):
    if sampler == "cps":
        return cps_step(x, v, sigmas[i], sigmas[i + 1], eta, noise, prev_sample=prev_sample, logprob=logprob)
    if sampler == "flow_grpo":
        return flow_grpo_step(x, v, sigmas[i], sigmas[i + 1], noise_level, noise, prev_sample=prev_sample,
                              sigma_max=float(sigmas[1]))
    raise ValueError(f"sampler must be 'cps' or 'flow_grpo', got {sampler!r}")


def policy_step_log_prob(
    model,
    latents: torch.Tensor,
    next_latents: torch.Tensor,
    step: int,
    trajectory_sigmas: torch.Tensor,
    trajectory_timesteps: torch.Tensor,
    condition: BridgeOutput,
    *,
    eta: float = 1.0,
    sampler: str = "cps",
    logprob: str = "mean_squared",
    noise_level: float = 0.7,
    negative_condition: BridgeOutput | None = None,
    guidance_scale: float = 1.0,
    reference_latents=None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(log p_theta(next | latents), velocity) for one stored transition, with gradients through the DiT.

    Uses the same velocity as :func:`rollout` (CFG-guided when ``guidance_scale != 1``), so a policy that has
    not changed since the rollout reproduces the stored log-probs exactly."""
    t = trajectory_timesteps[step].expand(latents.shape[0]).to(model.dtype)
    velocity = _guided_velocity(model, latents.to(model.dtype), t, condition, negative_condition, guidance_scale,
                                reference_latents)
    _, log_prob, _ = _sde_step(sampler, latents, velocity, trajectory_sigmas, step, eta, noise_level, logprob,
                               prev_sample=next_latents)
    return log_prob, velocity


@torch.no_grad()
def rollout(
    model,
    condition: BridgeOutput,
    *,
    height: int,
    width: int,
    num_steps: int = 50,
    group_size: int = 8,
    eta: float = 1.0,
    sampler: str = "cps",
    logprob: str = "mean_squared",
    noise_level: float = 0.7,
    same_noise_in_group: bool = True,
    generator: torch.Generator | None = None,
    micro_batch: int | None = None,
    negative_condition: BridgeOutput | None = None,
    guidance_scale: float = 1.0,
    reference_latents=None,
    store_device: torch.device | str | None = None,
) -> Trajectory:
    """Sample one image per condition row (rows are already repeated ``group_size`` times per prompt).

    ``micro_batch`` chunks the DiT calls; use the same chunking in the update so that the first ratio is
    exactly 1. CFG is off by default (official); with ``guidance_scale != 1`` a ``negative_condition`` is used.
    ``sampler``: ``"cps"`` (noise set by ``eta``, log-prob by ``logprob``) or ``"flow_grpo"`` (noise set by
    ``noise_level``, Gaussian log-prob, the first step's sigma = 1 replaced by ``sigmas[1]`` as in Flow-GRPO).
    """
    device = model.device
    count = condition.context.shape[0]
    micro_batch = micro_batch or count
    scale = model.vae_scale_factor
    shape = (model.latent_channels, height // scale, width // scale)
    gen_device = generator.device if generator is not None else torch.device("cpu")
    if same_noise_in_group:
        if count % group_size:
            raise ValueError(f"condition: {count} rows are not a whole number of groups of {group_size}")
        base = torch.randn((count // group_size, *shape), generator=generator, device=gen_device)
        x = base.repeat_interleave(group_size, 0)
    else:
        x = torch.randn((count, *shape), generator=generator, device=gen_device)
    x = x.to(device, torch.float32)
    timesteps, sigmas = flow_match_sigmas(model.scheduler, num_steps, device=device)
    store = torch.device(store_device) if store_device is not None else device
    latents = torch.empty((count, num_steps + 1, *shape), dtype=torch.float32, device=store)
    log_probs = torch.empty((count, num_steps), dtype=torch.float32, device=store)
    latents[:, 0] = x.to(store)
    for i in range(num_steps):
        x_next = torch.empty_like(x)
        noise = torch.randn(x.shape, generator=generator, device=gen_device).to(device)
        for start in range(0, count, micro_batch):
            rows = slice(start, start + micro_batch)
            refs = reference_latents[rows] if reference_latents is not None else None
            t = timesteps[i].expand(x[rows].shape[0]).to(model.dtype)
            negative = negative_condition.select(rows) if negative_condition is not None else None
            v = _guided_velocity(model, x[rows].to(model.dtype), t, condition.select(rows), negative,
                                 guidance_scale, refs)
            x_new, lp, _ = _sde_step(sampler, x[rows], v, sigmas, i, eta, noise_level, logprob, noise=noise[rows])
            x_next[rows] = x_new
            log_probs[rows, i] = lp.to(store)
        x = x_next
        latents[:, i + 1] = x.to(store)
    return Trajectory(latents=latents, log_probs=log_probs, timesteps=timesteps.float(), sigmas=sigmas.float())


# -- the loss ------------------------------------------------------------------------------------------------


class MRGRPOLoss:
    """The MR-GRPO objective for one trained timestep of a micro-batch.

    policy = mean_b max(-A r, -A clamp(r, 1 - c, 1 + c)), r = exp(log p_theta - log p_old);
    kl_b = mean_elems (v_theta - v_ref)^2 / (2 s^2 + 1e-7), s = sigma' sin(eta pi / 2) (velocity space);
    grpo = policy + beta mean_b kl_b; total = (1 - lambda) grpo + lambda sft (``combine``).
    Official values: clip 1e-4, beta 5e-7, lambda 1e-4, eta 1.
    """

    def __init__(self, clip_range: float = 1e-4, kl_beta: float = 5e-7, sft_lambda: float = 1e-4, eta: float = 1.0):
        if clip_range <= 0:
            raise ValueError(f"clip_range must be > 0, got {clip_range}")
        if not 0 <= sft_lambda <= 1:
            raise ValueError(f"sft_lambda must be in [0, 1], got {sft_lambda}")
        self.clip_range = clip_range
        self.kl_beta = kl_beta
        self.sft_lambda = sft_lambda
        self.eta = eta

    def __call__(
        self,
        log_prob: torch.Tensor,
        old_log_prob: torch.Tensor,
        advantages: torch.Tensor,
        *,
        velocity: torch.Tensor | None = None,
        reference_velocity: torch.Tensor | None = None,
        sigma_next: float | torch.Tensor | None = None,
    ) -> dict[str, torch.Tensor]:
        advantages = advantages.float().to(log_prob.device)
        ratio = torch.exp(log_prob.float() - old_log_prob.float().to(log_prob.device))
        unclipped = -advantages * ratio
        clipped = -advantages * ratio.clamp(1 - self.clip_range, 1 + self.clip_range)
        policy = torch.maximum(unclipped, clipped).mean()
        out = {
            "policy_loss": policy,
            "ratio_mean": ratio.detach().mean(),
            "clip_fraction": ((ratio - 1).abs() > self.clip_range).float().mean().detach(),
        }
        kl = torch.zeros((), device=log_prob.device)
        if velocity is not None and reference_velocity is not None:
            if sigma_next is None:
                raise ValueError("sigma_next is required for the velocity-space KL")
            s = float(sigma_next) * math.sin(self.eta * math.pi / 2)
            per_sample = ((velocity.float() - reference_velocity.float()) ** 2).flatten(1).mean(1)
            kl = (per_sample / (2 * s * s + 1e-7)).mean()
        out["kl"] = kl.detach()
        out["loss"] = policy + self.kl_beta * kl
        return out

    def combine(self, grpo_loss: torch.Tensor, sft_loss: torch.Tensor | None) -> torch.Tensor:
        if sft_loss is None:
            return (1 - self.sft_lambda) * grpo_loss
        return (1 - self.sft_lambda) * grpo_loss + self.sft_lambda * sft_loss
