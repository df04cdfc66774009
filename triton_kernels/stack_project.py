"""Stacked-channel projection: ``F.linear(torch.cat(hidden_states, -1), weight, bias)`` without the concat.

The Stacked Channel Bridge concatenates K hidden states of the VLM (each ``(B, L, D)``) along the channel axis
and projects the ``K·D`` channels to ``N``. The Triton kernel reads the K sources through K base pointers and
runs one GEMM whose reduction loop walks the sources one after the other (``out = Σ_k x_k @ W[:, kD:(k+1)D]ᵀ``),
so the ``(B, L, K·D)`` tensor is never built. For small ``B·L`` (fewer output tiles than SMs) the reduction is
split along D into ``SPLIT`` partial GEMMs whose fp32 results are summed afterwards (split-K).

The backward needs no concat either. ``grad_x_k = grad_out @ W[:, kD:(k+1)D]`` is one cuBLAS GEMM
``grad_out @ W`` whose column blocks are the K grads (views, as for ``torch.cat``'s backward; per-source GEMMs when
only some sources need a grad), and ``grad_W[:, kD:(k+1)D] = grad_outᵀ @ x_k`` is written by a matmul straight
into each column block of ``grad_W``.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from deepgen_components.triton_kernels._common import (
    HAS_TRITON,
    INTERPRET,
    autotune,
    check_same,
    check_tensor,
    dot_in_fp32,
    num_sms,
    prune_fp32_configs,
    resolve_backend,
    tl,
    triton,
    triton_unusable_reason,
)

__all__ = ["MAX_SOURCES", "stack_project", "stack_project_reference"]

#: The kernel takes at most this many source pointers; more sources fall back to torch under ``backend="auto"``.
MAX_SOURCES = 8

_OP = "stack_project"


# ----------------------------------------------------------------------------------------------------------
# Torch reference
# ------------------------------------------------------------------------------------------------------------


def stack_project_reference(
    hidden_states: Sequence[torch.Tensor], weight: torch.Tensor, bias: torch.Tensor | None = None
) -> torch.Tensor:
    """The definition: ``F.linear(torch.cat(hidden_states, -1), weight, bias)`` (materialises the concat)."""
    return F.linear(torch.cat(list(hidden_states), dim=-1), weight, bias)


# ----------------------------------------------------------------------------------------------------------
# Triton kernel
# ------------------------------------------------------------------------------------------------------------


#: Reduction step. Fixed (not autotuned) so that EVEN_K (D % BLOCK_K == 0) is known at launch without a
#: ``triton.heuristics`` wrapper, which would cost a Python call per launch.
_BLOCK_K = 16 if INTERPRET else 64


def _fwd_configs():
    if not HAS_TRITON:
        return []
    cfgs = [  # (BLOCK_M, BLOCK_N, GROUP_M, num_warps, num_stages)
        (128, 128, 8, 4, 3),
        (128, 128, 8, 8, 4),
        (128, 128, 8, 4, 5),
        (128, 256, 8, 8, 3),
        (256, 128, 8, 8, 3),
        (64, 128, 8, 4, 4),
        (128, 64, 8, 4, 4),
        (64, 64, 8, 4, 3),  # smallest last: the only one tried for fp32 (prune_fp32_configs)
    ]
    return [
        triton.Config({"BLOCK_M": bm, "BLOCK_N": bn, "GROUP_M": g}, num_warps=w, num_stages=s)
        for bm, bn, g, w, s in cfgs
    ]


if HAS_TRITON:

    @triton.jit
    def _source(k: tl.constexpr, X0, X1, X2, X3, X4, X5, X6, X7):
        # ``k`` is a compile-time constant: only one branch survives.
        if k == 0:
            return X0
        elif k == 1:
            return X1
        elif k == 2:
            return X2
        elif k == 3:
            return X3
        elif k == 4:
            return X4
        elif k == 5:
            return X5
        elif k == 6:
            return X6
        else:
            return X7

    @autotune(
        configs=_fwd_configs(),
        key=["M_BUCKET", "N", "D", "NUM_SRC", "SPLIT", "HAS_BIAS", "EVEN_K"],
        interpret_meta={"BLOCK_M": 16, "BLOCK_N": 32, "GROUP_M": 2},
        prune_configs_by=prune_fp32_configs("X0"),
    )
    @triton.jit
    def _stack_project_fwd_kernel(
        X0, X1, X2, X3, X4, X5, X6, X7,  # the K sources (unused slots repeat X0)
        W, BIAS, OUT,
        M, N, D, L, M_BUCKET,  # M = B*L rows; M_BUCKET only keys the autotune cache
        stride_xb, stride_xl, stride_xd,
        stride_wn, stride_wk,
        stride_os, stride_om, stride_on,
        NUM_SRC: tl.constexpr,
        SPLIT: tl.constexpr,
        HAS_BIAS: tl.constexpr,
        DOT_FP32: tl.constexpr,
        INPUT_PRECISION: tl.constexpr,
        BLOCK_M: tl.constexpr,
        BLOCK_N: tl.constexpr,
        BLOCK_K: tl.constexpr,
        GROUP_M: tl.constexpr,
        EVEN_K: tl.constexpr,
    ):  # fmt: skip
        pid = tl.program_id(0)
        pid_s = tl.program_id(1)  # split-K slice of D handled by this program
        num_pid_m = tl.cdiv(M, BLOCK_M)
        num_pid_n = tl.cdiv(N, BLOCK_N)
        # Grouped tile order: GROUP_M row tiles share the same W column tiles while they are hot in L2.
        num_pid_in_group = GROUP_M * num_pid_n
        group_id = pid // num_pid_in_group
        first_pid_m = group_id * GROUP_M
        group_size_m = min(num_pid_m - first_pid_m, GROUP_M)
        pid_m = first_pid_m + ((pid % num_pid_in_group) % group_size_m)
        pid_n = (pid % num_pid_in_group) // group_size_m

        offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        offs_k = tl.arange(0, BLOCK_K)
        # Out-of-range rows/columns read row/column 0 (valid memory) and are dropped at the store: no M/N masks
        # in the inner loop.
        rows = tl.where(offs_m < M, offs_m, 0)
        cols = tl.where(offs_n < N, offs_n, 0)
        row_off = (rows // L).to(tl.int64) * stride_xb + (rows % L).to(tl.int64) * stride_xl
        col_off = cols.to(tl.int64) * stride_wn

        # This program's share of the D reduction, in whole BLOCK_K chunks (all of D when SPLIT == 1).
        n_chunks = tl.cdiv(D, BLOCK_K)
        d_lo = (pid_s * n_chunks // SPLIT) * BLOCK_K
        d_hi = tl.minimum(((pid_s + 1) * n_chunks // SPLIT) * BLOCK_K, D)

        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        for k in tl.static_range(NUM_SRC):
            x_base = _source(k, X0, X1, X2, X3, X4, X5, X6, X7)
            x_ptrs = x_base + row_off[:, None] + (d_lo + offs_k)[None, :].to(tl.int64) * stride_xd
            w_ptrs = W + col_off[None, :] + (k * D + d_lo + offs_k)[:, None].to(tl.int64) * stride_wk
            for d0 in range(d_lo, d_hi, BLOCK_K):
                if EVEN_K:
                    a = tl.load(x_ptrs)
                    b = tl.load(w_ptrs)
                else:
                    in_k = (d0 + offs_k) < D
                    a = tl.load(x_ptrs, mask=in_k[None, :], other=0.0)
                    b = tl.load(w_ptrs, mask=in_k[:, None], other=0.0)
                if DOT_FP32:
                    a = a.to(tl.float32)
                    b = b.to(tl.float32)
                acc = tl.dot(a, b, acc, input_precision=INPUT_PRECISION)
                x_ptrs += BLOCK_K * stride_xd
                w_ptrs += BLOCK_K * stride_wk

        if HAS_BIAS:
            if pid_s == 0:
                acc += tl.load(BIAS + cols).to(tl.float32)[None, :]
        out_ptrs = (
            OUT + pid_s * stride_os + offs_m[:, None].to(tl.int64) * stride_om + offs_n[None, :] * stride_on
        )
        tl.store(out_ptrs, acc.to(OUT.dtype.element_ty), mask=(offs_m < M)[:, None] & (offs_n < N)[None, :])


def _choose_split(m: int, n: int, d: int, device: torch.device) -> int:
    """Split-K factor: split D only while that still fits in one wave of nominal 128×128 tiles."""
    if INTERPRET or device.type != "cuda":
        return 1
    tiles = triton.cdiv(m, 128) * triton.cdiv(n, 128)
    sms = num_sms(device)
    split = 1
    while split < 8 and tiles * split * 2 <= sms and d // (split * 2) >= 256:
        split *= 2
    return split


def _stack_project_triton(
    hidden_states: list[torch.Tensor],
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    split: int | None = None,
) -> torch.Tensor:
    """Launch the forward kernel (arguments already validated)."""
    reason = triton_unusable_reason(hidden_states[0].device)
    if reason is not None:
        raise RuntimeError(f"{_OP}: cannot run the Triton kernel: {reason}")
    xs = list(hidden_states)
    k_src = len(xs)
    b, seq, d = xs[0].shape
    n = weight.shape[0]
    m = b * seq
    out = torch.empty((b, seq, n), device=xs[0].device, dtype=xs[0].dtype)
    if m == 0 or n == 0:
        return out
    if d == 0:
        return out.copy_(bias.expand_as(out)) if bias is not None else out.zero_()
    # One set of strides serves every source; sources laid out differently are made contiguous (one copy of
    # that source, never a concat).
    if any(x.stride() != xs[0].stride() for x in xs[1:]):
        xs = [x.contiguous() for x in xs]
    sxb, sxl, sxd = xs[0].stride()
    if split is None:
        split = _choose_split(m, n, d, xs[0].device)
    if split == 1:
        dst = out.view(m, n)
        stride_os = 0
    else:
        dst = torch.empty((split, m, n), device=out.device, dtype=torch.float32)
        stride_os = dst.stride(0)
    ptrs = xs + [xs[0]] * (MAX_SOURCES - k_src)
    grid = lambda meta: (triton.cdiv(m, meta["BLOCK_M"]) * triton.cdiv(n, meta["BLOCK_N"]), split)
    _stack_project_fwd_kernel[grid](
        *ptrs, weight, bias if bias is not None else weight, dst,
        m, n, d, seq, triton.next_power_of_2(m),
        sxb, sxl, sxd,
        weight.stride(0), weight.stride(1),
        stride_os, dst.stride(-2), dst.stride(-1),
        NUM_SRC=k_src,
        SPLIT=split,
        HAS_BIAS=bias is not None,
        DOT_FP32=INTERPRET,
        INPUT_PRECISION="ieee" if dot_in_fp32(xs[0].dtype) else "tf32",
        BLOCK_K=_BLOCK_K,
        EVEN_K=d % _BLOCK_K == 0,
        _tune_key=(xs[0].dtype, triton.next_power_of_2(m), n, d, k_src, split, bias is not None, d % _BLOCK_K == 0),
    )  # fmt: skip
    if split > 1:
        out.view(m, n).copy_(dst.sum(dim=0))
    return out


def _stack_project_backward(
    grad_out: torch.Tensor,
    hidden_states: Sequence[torch.Tensor],
    weight: torch.Tensor,
    need_x: Sequence[bool],
    need_w: bool,
    need_b: bool,
):
    """Gradients without a concat: cuBLAS matmuls on per-source views."""
    k_src = len(hidden_states)
    b, seq, d = hidden_states[0].shape
    n = weight.shape[0]
    g = grad_out.reshape(b * seq, n)
    if all(
        need_x
    ):  # one GEMM for all sources; the grads are column blocks of it (as for torch.cat's backward)
        gx = torch.mm(g, weight).view(b, seq, k_src, d)
        grad_xs = [gx[:, :, i] for i in range(k_src)]
    else:
        grad_xs = [
            torch.mm(g, weight[:, i * d : (i + 1) * d]).view(b, seq, d) if need_x[i] else None
            for i in range(k_src)
        ]
    grad_w = None
    if need_w:
        grad_w = torch.empty_like(weight, memory_format=torch.contiguous_format)
        gt = g.t()
        for i, x in enumerate(hidden_states):
            torch.mm(gt, x.reshape(b * seq, d), out=grad_w[:, i * d : (i + 1) * d])
    grad_b = g.sum(0) if need_b else None
    return grad_xs, grad_w, grad_b


class _StackProjectFunction(torch.autograd.Function):
    """Eager autograd wrapper: much cheaper per call than the custom op's dispatcher round trip."""

    @staticmethod
    def forward(ctx, weight, bias, *hidden_states):
        ctx.has_bias = bias is not None
        ctx.save_for_backward(weight, *hidden_states)
        return _stack_project_triton(list(hidden_states), weight, bias)

    @staticmethod
    def backward(ctx, grad_out):
        weight, *hidden_states = ctx.saved_tensors
        need_w, need_b, *need_x = ctx.needs_input_grad
        grad_xs, grad_w, grad_b = _stack_project_backward(
            grad_out, hidden_states, weight, need_x, need_w, need_b and ctx.has_bias
        )
        return grad_w, grad_b, *grad_xs


# ----------------------------------------------------------------------------------------------------------
# Custom op (torch.compile / torch.export see one opaque op with a fake implementation)
# ------------------------------------------------------------------------------------------------------------


@torch.library.custom_op("deepgen::stack_project", mutates_args=())
def _stack_project_op(
    hidden_states: list[torch.Tensor], weight: torch.Tensor, bias: torch.Tensor | None
) -> torch.Tensor:
    return _stack_project_triton(hidden_states, weight, bias)


@_stack_project_op.register_fake
def _stack_project_fake(hidden_states, weight, bias):
    b, seq, _ = hidden_states[0].shape
    return hidden_states[0].new_empty((b, seq, weight.shape[0]))


def _stack_project_setup_context(ctx, inputs, output):
    hidden_states, weight, bias = inputs
    ctx.num_sources = len(hidden_states)
    ctx.has_bias = bias is not None
    ctx.save_for_backward(*hidden_states, weight)


def _stack_project_autograd_backward(ctx, grad_out):
    *hidden_states, weight = ctx.saved_tensors
    need_x, need_w, need_b = ctx.needs_input_grad
    grad_xs, grad_w, grad_b = _stack_project_backward(
        grad_out, hidden_states, weight, need_x, bool(need_w), bool(need_b) and ctx.has_bias
    )
    return grad_xs, grad_w, grad_b


_stack_project_op.register_autograd(
    _stack_project_autograd_backward, setup_context=_stack_project_setup_context
)


# ----------------------------------------------------------------------------------------------------------
# Public op
# ------------------------------------------------------------------------------------------------------------


def _check_args(hidden_states, weight, bias) -> list[torch.Tensor]:
    if isinstance(hidden_states, torch.Tensor) or not isinstance(hidden_states, (list, tuple)):
        raise ValueError(
            f"{_OP}: hidden_states must be a list or tuple of (B, L, D) tensors, got {type(hidden_states).__name__}"
        )
    xs = list(hidden_states)
    if not xs:
        raise ValueError(f"{_OP}: hidden_states must hold at least one tensor, got an empty sequence")
    for i, x in enumerate(xs):
        check_tensor(_OP, f"hidden_states[{i}]", x, ndim=3)
        if i:
            check_same(_OP, f"hidden_states[{i}]", x, "hidden_states[0]", xs[0])
            if x.shape != xs[0].shape:
                raise ValueError(
                    f"{_OP}: hidden_states[{i}] must have the shape of hidden_states[0] {tuple(xs[0].shape)}, "
                    f"got {tuple(x.shape)}"
                )
    check_tensor(_OP, "weight", weight, ndim=2)
    check_same(_OP, "weight", weight, "hidden_states[0]", xs[0])
    k_src, d = len(xs), xs[0].shape[-1]
    if weight.shape[1] != k_src * d:
        raise ValueError(
            f"{_OP}: weight must have K·D = {k_src}·{d} = {k_src * d} columns for K={k_src} hidden states of width "
            f"D={d}, got weight of shape {tuple(weight.shape)}"
        )
    if bias is not None:
        check_tensor(_OP, "bias", bias, ndim=1)
        check_same(_OP, "bias", bias, "hidden_states[0]", xs[0])
        if bias.shape[0] != weight.shape[0]:
            raise ValueError(f"{_OP}: bias must have shape ({weight.shape[0]},), got {tuple(bias.shape)}")
    return xs


def stack_project(
    hidden_states: Sequence[torch.Tensor],
    weight: torch.Tensor,
    bias: torch.Tensor | None = None,
    *,
    backend: str = "auto",
) -> torch.Tensor:
    """``F.linear(torch.cat(hidden_states, -1), weight, bias)`` without materialising the concatenation.

    Args:
        hidden_states: K tensors of shape ``(B, L, D)``, same shape, dtype (fp16/bf16/fp32) and device; any strides
            (sources whose strides differ from the first one's are copied contiguous, one at a time).
        weight: ``(N, K·D)``, same dtype. bias: ``(N,)`` or ``None``.
        backend: ``"auto"`` (Triton on fp16/bf16 CUDA tensors when Triton imports and K ≤ 8; the torch
            reference for fp32, on CPU, without Triton and while exporting), ``"triton"`` (force the kernel) or
            ``"torch"`` (force the reference).

    Returns ``(B, L, N)`` in the input dtype (fp32 accumulation). Differentiable in every input; the backward
    uses per-source matmuls, never the concat.
    """
    xs = _check_args(hidden_states, weight, bias)
    unsupported = None
    if len(xs) > MAX_SOURCES:
        unsupported = f"the kernel takes at most {MAX_SOURCES} hidden states, got {len(xs)}"
    if backend == "auto" and xs[0].dtype == torch.float32:
        backend = "torch"  # the kernel targets fp16/bf16; cuBLAS fp32 (or TF32) is the better fp32 path
    if resolve_backend(backend, xs[0].device, _OP, unsupported) == "torch":
        return stack_project_reference(xs, weight, bias)
    if torch.compiler.is_compiling():  # dynamo / torch.export: the opaque custom op with its fake impl
        return torch.ops.deepgen.stack_project(xs, weight, bias)
    tensors = (weight, *xs) if bias is None else (weight, bias, *xs)
    if torch.is_grad_enabled() and any(t.requires_grad for t in tensors):
        return _StackProjectFunction.apply(weight, bias, *xs)
    return _stack_project_triton(xs, weight, bias)
