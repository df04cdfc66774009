"""Bidirectional (non-causal) attention with an optional key-padding mask, FA2-style.

Forward: one program per (query block, batch·head); it streams key/value blocks with an online softmax (exp2,
fp32 running max / sum / accumulator) and stores the output plus the base-2 log-sum-exp of each query row. Keys
where ``key_padding_mask`` is False get probability 0; the key loop stops after the last real key of the sample
(``kv_end``, found by scanning the mask row in the kernel), so right-padded batches skip the padding entirely.
A query row whose keys are all masked outputs 0 (what ``F.scaled_dot_product_attention`` returns for such rows
in torch ≥ 2.5).

Backward (Triton too): ``delta = rowsum(dO·O)``, then one kernel per key block accumulates dK, dV over all query
blocks and one kernel per query block accumulates dQ over all key blocks, recomputing the probabilities from the
stored log-sum-exp (no atomics, deterministic).

The kernels themselves are in ``attention_kernels.py``; this module holds the torch reference, the launchers, the
autograd wiring, the ``torch.library`` custom ops and the public op.

Any sequence lengths (query and key lengths may differ), head dims 16/32/64/128 (other head dims fall back to
torch under ``backend="auto"``), fp16/bf16/fp32, arbitrary strides (e.g. ``(B, S, H, d).transpose(1, 2)``).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from deepgen_components.triton_kernels._common import (
    INTERPRET,
    check_same,
    check_tensor,
    dot_in_fp32,
    resolve_backend,
    triton,
    triton_unusable_reason,
)
from deepgen_components.triton_kernels.attention_kernels import (
    LOG2E,
    attn_bwd_delta_kernel,
    attn_bwd_dkdv_kernel,
    attn_bwd_dq_kernel,
    attn_fwd_kernel,
)

__all__ = ["SUPPORTED_HEAD_DIMS", "attention", "attention_reference"]

#: Head dims the Triton kernel is compiled for.
SUPPORTED_HEAD_DIMS = (16, 32, 64, 128)

_OP = "attention"


# ----------------------------------------------------------------------------------------------------------
# Torch reference
# ------------------------------------------------------------------------------------------------------------


def attention_reference(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    key_padding_mask: torch.Tensor | None = None,
    scale: float | None = None,
) -> torch.Tensor:
    """``F.scaled_dot_product_attention`` with the (B, S) boolean mask broadcast as (B, 1, 1, S)."""
    attn_mask = None if key_padding_mask is None else key_padding_mask[:, None, None, :]
    return F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, scale=scale)


_SCAN = 64 if INTERPRET else 512  # mask elements scanned per step when looking for the last real key


def _mask_args(key_padding_mask: torch.Tensor | None, q: torch.Tensor):
    """(mask pointer, its strides): the bool mask viewed as uint8 (no copy); q as an unused stand-in without one."""
    if key_padding_mask is None:
        return q, 0, 0
    mask_u8 = key_padding_mask.view(torch.uint8)
    return mask_u8, mask_u8.stride(0), mask_u8.stride(1)


def _s_bucket(s_q: int, s_k: int) -> int:
    return triton.next_power_of_2(max(s_q, s_k, 1))


def _attention_fwd_triton(q, k, v, key_padding_mask, scale: float, store_lse: bool = True):
    """Launch the forward kernel; returns (out, lse), lse being ``None`` when not stored."""
    reason = triton_unusable_reason(q.device)
    if reason is not None:
        raise RuntimeError(f"{_OP}: cannot run the Triton kernel: {reason}")
    b, h, s_q, d = q.shape
    s_k = k.shape[2]
    out = torch.empty_like(q)
    lse = torch.empty((b, h, s_q), device=q.device, dtype=torch.float32) if store_lse else None
    if out.numel() == 0:
        return out, lse
    mask, smb, sms = _mask_args(key_padding_mask, q)
    grid = lambda meta: (triton.cdiv(s_q, meta["BLOCK_M"]), b * h)
    attn_fwd_kernel[grid](
        q, k, v, out, lse if store_lse else out, mask,
        scale * LOG2E,
        *q.stride(), *k.stride(), *v.stride(), *out.stride(),
        smb, sms,
        h, s_q, s_k, _s_bucket(s_q, s_k),
        HEAD_DIM=d,
        HAS_MASK=key_padding_mask is not None,
        STORE_LSE=store_lse,
        DOT_FP32=INTERPRET,
        INPUT_PRECISION="ieee" if dot_in_fp32(q.dtype) else "tf32",
        SCAN=_SCAN,
        _tune_key=(q.dtype, _s_bucket(s_q, s_k), d, key_padding_mask is not None, store_lse),
    )  # fmt: skip
    return out, lse


def _attention_bwd_triton(grad_out, q, k, v, out, lse, key_padding_mask, scale: float):
    b, h, s_q, d = q.shape
    s_k = k.shape[2]
    dq = torch.empty_like(q)
    dk = torch.empty_like(k)
    dv = torch.empty_like(v)
    if q.numel() == 0 or k.numel() == 0:
        return dq.zero_(), dk.zero_(), dv.zero_()
    delta = torch.empty((b, h, s_q), device=q.device, dtype=torch.float32)
    block = 16 if INTERPRET else 64
    attn_bwd_delta_kernel[(triton.cdiv(s_q, block), b * h)](
        out, grad_out, delta, *out.stride(), *grad_out.stride(), h, s_q, HEAD_DIM=d, BLOCK_M=block
    )
    mask, smb, sms = _mask_args(key_padding_mask, q)
    bucket = _s_bucket(s_q, s_k)
    args = (
        q, k, v, grad_out, lse, delta, dq, dk, dv, mask,
        scale, scale * LOG2E,
        *q.stride(), *k.stride(), *v.stride(), *grad_out.stride(), *dq.stride(), *dk.stride(), *dv.stride(),
        smb, sms,
        h, s_q, s_k, bucket,
    )  # fmt: skip
    common = dict(
        HEAD_DIM=d,
        HAS_MASK=key_padding_mask is not None,
        DOT_FP32=INTERPRET,
        INPUT_PRECISION="ieee" if dot_in_fp32(q.dtype) else "tf32",
        SCAN=_SCAN,
        _tune_key=(q.dtype, bucket, d, key_padding_mask is not None),
    )
    attn_bwd_dkdv_kernel[lambda meta: (triton.cdiv(s_k, meta["BLOCK_N"]), b * h)](*args, KEY_PASS=True, **common)
    attn_bwd_dq_kernel[lambda meta: (triton.cdiv(s_q, meta["BLOCK_M"]), b * h)](*args, KEY_PASS=False, **common)
    return dq, dk, dv


class _AttentionFunction(torch.autograd.Function):
    """Eager autograd wrapper (cheaper per call than the custom op's dispatcher round trip)."""

    @staticmethod
    def forward(ctx, q, k, v, key_padding_mask, scale):
        out, lse = _attention_fwd_triton(q, k, v, key_padding_mask, scale)
        ctx.scale = scale
        ctx.save_for_backward(q, k, v, out, lse, key_padding_mask)
        return out

    @staticmethod
    def backward(ctx, grad_out):
        q, k, v, out, lse, key_padding_mask = ctx.saved_tensors
        dq, dk, dv = _attention_bwd_triton(grad_out, q, k, v, out, lse, key_padding_mask, ctx.scale)
        return dq, dk, dv, None, None


# ----------------------------------------------------------------------------------------------------------
# Custom ops
# ------------------------------------------------------------------------------------------------------------


@torch.library.custom_op("deepgen::attention", mutates_args=())
def _attention_op(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, key_padding_mask: torch.Tensor | None, scale: float
) -> tuple[torch.Tensor, torch.Tensor]:
    return _attention_fwd_triton(q, k, v, key_padding_mask, scale)


@_attention_op.register_fake
def _attention_fake(q, k, v, key_padding_mask, scale):
    b, h, s_q, _ = q.shape
    return torch.empty_like(q), q.new_empty((b, h, s_q), dtype=torch.float32)


@torch.library.custom_op("deepgen::attention_backward", mutates_args=())
def _attention_backward_op(
    grad_out: torch.Tensor,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    out: torch.Tensor,
    lse: torch.Tensor,
    key_padding_mask: torch.Tensor | None,
    scale: float,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    return _attention_bwd_triton(grad_out, q, k, v, out, lse, key_padding_mask, scale)


@_attention_backward_op.register_fake
def _attention_backward_fake(grad_out, q, k, v, out, lse, key_padding_mask, scale):
    return torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)


def _attention_setup_context(ctx, inputs, output):
    q, k, v, key_padding_mask, scale = inputs
    out, lse = output
    ctx.scale = scale
    ctx.save_for_backward(q, k, v, out, lse, key_padding_mask)


def _attention_autograd_backward(ctx, grad_out, grad_lse):
    q, k, v, out, lse, key_padding_mask = ctx.saved_tensors
    dq, dk, dv = torch.ops.deepgen.attention_backward(
        grad_out, q, k, v, out, lse, key_padding_mask, ctx.scale
    )
    return dq, dk, dv, None, None


_attention_op.register_autograd(_attention_autograd_backward, setup_context=_attention_setup_context)


# ----------------------------------------------------------------------------------------------------------
# Public op
# ------------------------------------------------------------------------------------------------------------


def _check_args(q, k, v, key_padding_mask, scale) -> None:
    for name, t in (("q", q), ("k", k), ("v", v)):
        check_tensor(_OP, name, t, ndim=4)
    for name, t in (("k", k), ("v", v)):
        check_same(_OP, name, t, "q", q)
        if t.shape[:2] != q.shape[:2]:
            raise ValueError(
                f"{_OP}: {name} must have the batch and head dims of q {tuple(q.shape[:2])} (layout (B, H, S, d)), "
                f"got shape {tuple(t.shape)}"
            )
    if k.shape[3] != q.shape[3]:
        raise ValueError(f"{_OP}: k must have the head dim of q ({q.shape[3]}), got shape {tuple(k.shape)}")
    if v.shape[2] != k.shape[2]:
        raise ValueError(
            f"{_OP}: v must have the sequence length of k ({k.shape[2]}), got shape {tuple(v.shape)}"
        )
    if key_padding_mask is not None:
        if not isinstance(key_padding_mask, torch.Tensor) or key_padding_mask.dtype != torch.bool:
            got = (
                key_padding_mask.dtype
                if isinstance(key_padding_mask, torch.Tensor)
                else type(key_padding_mask)
            )
            raise ValueError(f"{_OP}: key_padding_mask must be a bool tensor (True = real token), got {got}")
        if tuple(key_padding_mask.shape) != (k.shape[0], k.shape[2]):
            raise ValueError(
                f"{_OP}: key_padding_mask must have shape (B, S_k) = {(k.shape[0], k.shape[2])}, "
                f"got {tuple(key_padding_mask.shape)}"
            )
        if key_padding_mask.device != q.device:
            raise ValueError(f"{_OP}: key_padding_mask must be on {q.device}, got {key_padding_mask.device}")
    if scale is not None and (isinstance(scale, bool) or not isinstance(scale, (int, float))):
        raise ValueError(f"{_OP}: scale must be a float or None, got {type(scale).__name__}")


def attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    key_padding_mask: torch.Tensor | None = None,
    scale: float | None = None,
    *,
    backend: str = "auto",
) -> torch.Tensor:
    """Non-causal attention ``softmax(q kᵀ · scale + mask) v`` over (B, H, S, d) tensors.

    Args:
        q: ``(B, H, S_q, d)``; k, v: ``(B, H, S_k, d)``; same dtype (fp16/bf16/fp32) and device, any strides
            (e.g. ``x.view(B, S, H, d).transpose(1, 2)``, no copy is made).
        key_padding_mask: ``(B, S_k)`` bool, True = real token; keys with False get zero weight (query rows are
            still computed; a row with no real key returns 0). ``None`` = no mask.
        scale: softmax scale, default ``1/sqrt(d)``.
        backend: ``"auto"`` (Triton on fp16/bf16 CUDA tensors when Triton imports and d ∈ {16, 32, 64, 128};
            the SDPA reference for fp32, otherwise and while exporting), ``"triton"`` or ``"torch"``.

    Returns the output in q's dtype, laid out like q when q is dense (``torch.empty_like``). The Triton path is
    differentiable in q, k and v through Triton backward kernels.
    """
    _check_args(q, k, v, key_padding_mask, scale)
    d = q.shape[-1]
    unsupported = None
    if d not in SUPPORTED_HEAD_DIMS:
        unsupported = f"head dim {d} is not one of {SUPPORTED_HEAD_DIMS}"
    if backend == "auto" and q.dtype == torch.float32:
        backend = "torch"  # the kernel targets fp16/bf16; SDPA's fp32 kernels are the better fp32 path
    if resolve_backend(backend, q.device, _OP, unsupported) == "torch":
        return attention_reference(q, k, v, key_padding_mask, scale)
    sm_scale = float(scale) if scale is not None else 1.0 / math.sqrt(d)
    if torch.compiler.is_compiling():  # dynamo / torch.export: the opaque custom op with its fake impl
        out, _ = torch.ops.deepgen.attention(q, k, v, key_padding_mask, sm_scale)
        return out
    if torch.is_grad_enabled() and (q.requires_grad or k.requires_grad or v.requires_grad):
        return _AttentionFunction.apply(q, k, v, key_padding_mask, sm_scale)
    return _attention_fwd_triton(q, k, v, key_padding_mask, sm_scale, store_lse=False)[0]
