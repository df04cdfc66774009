"""The few tensor ops the components share, routed to Triton kernels when they are switched on."""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F

__all__ = ["attention", "stack_project"]


def attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    key_padding_mask: torch.Tensor | None = None,
    dropout_p: float = 0.0,
) -> torch.Tensor:
    """Bidirectional attention over (B, H, S, d); ``key_padding_mask`` (B, S) True = real key."""
    mask = None if key_padding_mask is None else key_padding_mask[:, None, None, :]
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout_p)


def stack_project(
    hidden_states: Sequence[torch.Tensor], weight: torch.Tensor, bias: torch.Tensor | None = None
) -> torch.Tensor:
    """``F.linear(torch.cat(hidden_states, -1), weight, bias)``."""
    return F.linear(torch.cat(list(hidden_states), dim=-1), weight, bias)
