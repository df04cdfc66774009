"""The tensor ops the components share, routed to our Triton kernels when they are switched on.

The switch is ``deepgen_components.triton_kernels.use_kernels()`` (context manager) /
``set_kernels_enabled()`` / ``DEEPGEN_TRITON_KERNELS=1``; ``DeepGenPipeline`` turns it on for CUDA inference
unless ``pipe.optimize("eager")`` says otherwise. With the switch on, each op still falls back to its torch
reference where the kernel does not apply (CPU tensors, fp32, unsupported head dims, export, dropout).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F

from deepgen_components import triton_kernels as kernels

__all__ = ["attention", "rms_norm", "stack_project"]


def attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    key_padding_mask: torch.Tensor | None = None,
    dropout_p: float = 0.0,
) -> torch.Tensor:
    """Bidirectional attention over (B, H, S, d); ``key_padding_mask`` (B, S) True = real key."""
    if kernels.kernels_enabled() and dropout_p == 0.0:
        return kernels.attention(q, k, v, key_padding_mask)
    mask = None if key_padding_mask is None else key_padding_mask[:, None, None, :]
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout_p)


def stack_project(
    hidden_states: Sequence[torch.Tensor], weight: torch.Tensor, bias: torch.Tensor | None = None
) -> torch.Tensor:
    """``F.linear(torch.cat(hidden_states, -1), weight, bias)``; with kernels on, without building the concat."""
    if kernels.kernels_enabled():
        return kernels.stack_project(list(hidden_states), weight, bias)
    return F.linear(torch.cat(list(hidden_states), dim=-1), weight, bias)


def rms_norm(norm: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    """Apply a diffusers ``RMSNorm`` module (the MMDiT qk-norm), through the fused kernel when switched on."""
    if kernels.kernels_enabled() and type(norm).__name__ == "RMSNorm":
        return kernels.rms_norm(x, norm.weight, norm.eps)
    return norm(x)
