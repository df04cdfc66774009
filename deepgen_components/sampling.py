"""Samplers on the FlowMatch (rectified flow) sigma grid: the Euler ODE step used for generation.

Sigma convention: x_sigma = (1 - sigma) * x0 + sigma * noise, the model predicts v = noise - x0, and the
DiT is given timestep = 1000 * sigma.
"""

from __future__ import annotations

import torch

__all__ = ["euler_step", "flow_match_sigmas", "guidance"]


def flow_match_sigmas(scheduler, num_inference_steps: int, device=None) -> tuple[torch.Tensor, torch.Tensor]:
    """(timesteps (N,), sigmas (N + 1,) ending in 0) of diffusers' FlowMatch grid for N steps."""
    if num_inference_steps < 1:
        raise ValueError(f"num_inference_steps must be >= 1, got {num_inference_steps}")
    scheduler.set_timesteps(num_inference_steps, device=device)
    return scheduler.timesteps.float(), scheduler.sigmas.float()


def euler_step(x: torch.Tensor, velocity: torch.Tensor, sigma, sigma_next) -> torch.Tensor:
    """x + (sigma_next - sigma) * v, computed in fp32 and returned in v's dtype (as diffusers' step does)."""
    dt = sigma_next - sigma
    return (x.float() + dt * velocity.float()).to(velocity.dtype)


def guidance(velocity_uncond: torch.Tensor, velocity_cond: torch.Tensor, scale: float) -> torch.Tensor:
    """Classifier-free guidance on velocities: v_u + s * (v_c - v_u)."""
    return velocity_uncond + scale * (velocity_cond - velocity_uncond)
