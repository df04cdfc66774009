"""The stochastic denoising steps with log-probabilities used by MR-GRPO rollouts (CPS, and Flow-GRPO's SDE), on
the FlowMatch (rectified flow) sigma grid. The grid itself, the deterministic Euler step and classifier-free
guidance live with the one denoising runner, :mod:`deepgen_components.denoising`.

Sigma convention: x_sigma = (1 - sigma) * x0 + sigma * noise, the model predicts v = noise - x0, and the
DiT is given timestep = 1000 * sigma.
"""

from __future__ import annotations

import math

import torch

__all__ = ["cps_step", "flow_grpo_step"]


# -- stochastic steps with log-probabilities (MR-GRPO rollouts) ------------------------------------------------


def _as_batch(value, like: torch.Tensor) -> torch.Tensor:
    """A scalar or (B,) sigma as a float32 tensor broadcastable over (B, C, H, W)."""
    value = torch.as_tensor(value, dtype=torch.float32, device=like.device)
    return value.view(-1, *([1] * (like.dim() - 1))) if value.dim() == 1 else value


def _step_log_prob(sample: torch.Tensor, mean: torch.Tensor, std: torch.Tensor, kind: str) -> torch.Tensor:
    """Per-sample log-prob of ``sample`` under N(mean, std^2), averaged over the non-batch dims.

    ``mean_squared`` (DeepGen's official CPS form): -mean((x' - mu)^2); it drops the 1/(2 s^2) factor and the
    constants, which cancel in the ratio of two log-probs of the same step. ``gaussian``: the mean over
    elements of the Gaussian log-density (Flow-GRPO's convention)."""
    sq = (sample.detach().float() - mean.float()) ** 2  # x' is data: no gradient through it (official)
    if kind == "mean_squared":
        return -sq.flatten(1).mean(1)
    if kind == "gaussian":
        std = std.float().clamp_min(1e-12)
        density = -sq / (2 * std**2) - torch.log(std) - 0.5 * math.log(2 * math.pi)
        return density.expand_as(sq).flatten(1).mean(1)
    raise ValueError(f"logprob must be 'mean_squared' or 'gaussian', got {kind!r}")


def cps_step(
    x: torch.Tensor,
    v: torch.Tensor,
    sigma,
    sigma_next,
    eta: float = 1.0,
    noise: torch.Tensor | None = None,
    *,
    prev_sample: torch.Tensor | None = None,
    generator: torch.Generator | None = None,
    logprob: str = "mean_squared",
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Coefficients-preserving SDE step (Flow-CPS), the MR-GRPO rollout sampler. Returns (x', log_prob, mean).

    x0_hat = x - sigma v, x1_hat = x + (1 - sigma) v, s = sigma' sin(eta pi / 2),
    mu = (1 - sigma') x0_hat + sqrt(sigma'^2 - s^2) x1_hat, x' = mu + s eps.
    The noise level of x' stays sigma'; with eta = 1 each step re-noises the x0 prediction completely. With
    ``prev_sample`` the step is not sampled: the log-prob of that given x' is returned (training re-evaluation).
    All arithmetic is fp32 (the official code rounds old log-probs to bf16, coarser than the 1e-4 clip range).
    """
    x32, v32 = x.float(), v.float()
    s_cur, s_next = _as_batch(sigma, x32), _as_batch(sigma_next, x32)
    x0_hat = x32 - s_cur * v32
    x1_hat = x32 + (1 - s_cur) * v32
    std = s_next * math.sin(eta * math.pi / 2)
    mean = (1 - s_next) * x0_hat + torch.sqrt((s_next**2 - std**2).clamp_min(0)) * x1_hat
    if prev_sample is None:
        if noise is None:
            noise = torch.randn(x32.shape, generator=generator, device=generator.device if generator else None).to(x32.device)
        prev_sample = mean + std * noise.float()
    log_prob = _step_log_prob(prev_sample, mean, std, logprob)
    return prev_sample.float(), log_prob, mean


def flow_grpo_step(
    x: torch.Tensor,
    v: torch.Tensor,
    sigma,
    sigma_next,
    noise_level: float = 0.7,
    noise: torch.Tensor | None = None,
    *,
    prev_sample: torch.Tensor | None = None,
    generator: torch.Generator | None = None,
    sigma_max: float | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The Flow-GRPO SDE step (alternative sampler). Returns (x', log_prob, mean), Gaussian log-density.

    sigma_t = a sqrt(sigma / (1 - sigma)), where a sigma of exactly 1 (the first step) is replaced by
    ``sigma_max`` in the denominator so that the step stays finite (Flow-GRPO: ``sigma_max`` = the schedule's
    second sigma, ``sigmas[1]``); dt = sigma' - sigma,
    mu = x (1 + sigma_t^2 dt / (2 sigma)) + v (1 + sigma_t^2 (1 - sigma) / (2 sigma)) dt, std = sigma_t sqrt(-dt).
    """
    x32, v32 = x.float(), v.float()
    s_cur, s_next = _as_batch(sigma, x32), _as_batch(sigma_next, x32)
    dt = s_next - s_cur
    at_one = s_cur == 1
    if bool(at_one.any()):
        if sigma_max is None:
            raise ValueError("flow_grpo_step: sigma == 1 needs sigma_max (Flow-GRPO uses the schedule's sigmas[1])")
        denominator = 1 - torch.where(at_one, torch.as_tensor(float(sigma_max), device=s_cur.device), s_cur)
    else:
        denominator = 1 - s_cur
    sigma_t = noise_level * torch.sqrt(s_cur / denominator)
    mean = x32 * (1 + sigma_t**2 / (2 * s_cur) * dt) + v32 * (1 + sigma_t**2 * (1 - s_cur) / (2 * s_cur)) * dt
    std = sigma_t * torch.sqrt(-dt)
    if prev_sample is None:
        if noise is None:
            noise = torch.randn(x32.shape, generator=generator, device=generator.device if generator else None).to(x32.device)
        prev_sample = mean + std * noise.float()
    return prev_sample.float(), _step_log_prob(prev_sample, mean, std, "gaussian"), mean
