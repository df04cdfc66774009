"""RMSNorm (MMDiT qk-norm) and adaLN "LayerNorm + modulate" (SD3), forward and backward.

Both kernels work on 2-D tiles of ``BLOCK_R`` rows × the whole (padded) last dim, with fp32 statistics: one
program normalises ``BLOCK_R`` rows, so narrow rows (the qk-norm's head dim 64) still give each program a few
thousand elements. Rows are addressed through the strides of up to three leading dims, so strided inputs such as
``q.view(B, S, H, d).transpose(1, 2)`` are normalised in place of a copy; the output is laid out like the input
(``torch.empty_like``).

Backward kernels recompute the normalised rows from the saved per-row ``rstd`` (and ``mean``), write dx, and
reduce the parameter gradients per program into an fp32 partial buffer that torch sums afterwards (no atomics,
deterministic).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from deepgen_components.triton_kernels._common import (
    HAS_TRITON,
    INTERPRET,
    check_same,
    check_tensor,
    leading_sizes,
    leading_strides,
    num_sms,
    resolve_backend,
    tl,
    triton,
    triton_unusable_reason,
)

__all__ = [
    "MAX_NORM_WIDTH",
    "layer_norm_modulate",
    "layer_norm_modulate_reference",
    "rms_norm",
    "rms_norm_reference",
]

#: Widest last dim the kernels keep in registers; wider rows fall back to torch under ``backend="auto"``.
MAX_NORM_WIDTH = 16384

_HALF = (torch.float16, torch.bfloat16)


# ----------------------------------------------------------------------------------------------------------
# Torch references
# ------------------------------------------------------------------------------------------------------------


def rms_norm_reference(x: torch.Tensor, weight: torch.Tensor | None, eps: float) -> torch.Tensor:
    """Exactly ``diffusers.models.normalization.RMSNorm.forward`` (non-NPU path, no bias).

    fp32 mean of squares; ``x * rsqrt(var + eps)`` (promotes to fp32); with a half-precision weight the result is
    rounded to the weight dtype before the multiply; without a weight it returns x's dtype. So the output dtype is
    x's dtype when the weight is None or has x's dtype, the weight dtype for a half weight, fp32 for an fp32
    weight (diffusers' behaviour for mixed dtypes).
    """
    input_dtype = x.dtype
    variance = x.to(torch.float32).pow(2).mean(-1, keepdim=True)
    y = x * torch.rsqrt(variance + eps)
    if weight is not None:
        if weight.dtype in _HALF:
            y = y.to(weight.dtype)
        return y * weight
    return y.to(input_dtype)


def layer_norm_modulate_reference(
    x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor, eps: float
) -> torch.Tensor:
    """SD3 adaLN: ``LayerNorm(x, no affine)(x) * (1 + scale[:, None]) + shift[:, None]`` (fp32 statistics
    inside ``F.layer_norm``; the modulation runs in x's dtype, as in diffusers)."""
    return F.layer_norm(x, (x.shape[-1],), eps=eps) * (1 + scale[:, None]) + shift[:, None]


def _rms_out_dtype(x: torch.Tensor, weight: torch.Tensor | None) -> torch.dtype:
    if weight is None:
        return x.dtype
    if weight.dtype in _HALF:
        return weight.dtype
    return torch.promote_types(torch.float32, weight.dtype)


# ----------------------------------------------------------------------------------------------------------
# Triton kernels
# ------------------------------------------------------------------------------------------------------------


def _tile(c: int) -> tuple[int, int, int]:
    """(BLOCK_R, BLOCK_C, num_warps) for rows of width c: about 4k elements per program."""
    block_c = triton.next_power_of_2(c)
    target = 1024 if INTERPRET else 4096
    block_r = max(1, min(128, target // block_c))
    tile = block_r * block_c
    num_warps = 4 if tile <= 4096 else (8 if tile <= 16384 else 16)
    return block_r, block_c, num_warps


if HAS_TRITON:

    @triton.jit
    def _row_offsets(rows, D1, D2, s0, s1, s2):
        # rows index the flattened leading dims (D0, D1, D2); returns int64 element offsets.
        i2 = rows % D2
        i1 = (rows // D2) % D1
        i0 = rows // (D1 * D2)
        return i0.to(tl.int64) * s0 + i1.to(tl.int64) * s1 + i2.to(tl.int64) * s2

    @triton.jit
    def _rms_norm_fwd_kernel(
        X, W, Y, RSTD,
        R, C, D1, D2, eps,
        sx0, sx1, sx2, sxc,
        sy0, sy1, sy2, syc,
        HAS_WEIGHT: tl.constexpr,
        ROUND_TO_W: tl.constexpr,
        BLOCK_R: tl.constexpr,
        BLOCK_C: tl.constexpr,
    ):  # fmt: skip
        rows = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
        cols = tl.arange(0, BLOCK_C)
        r_ok = rows < R
        c_ok = cols < C
        ok = r_ok[:, None] & c_ok[None, :]
        x_off = _row_offsets(rows, D1, D2, sx0, sx1, sx2)
        x = tl.load(X + x_off[:, None] + cols[None, :] * sxc, mask=ok, other=0.0).to(tl.float32)
        rstd = tl.math.rsqrt(tl.sum(x * x, 1) / C + eps)
        y = x * rstd[:, None]
        if HAS_WEIGHT:
            w = tl.load(W + cols, mask=c_ok, other=0.0)
            if ROUND_TO_W:  # diffusers rounds the normalised row to a half-precision weight's dtype first
                y = y.to(W.dtype.element_ty).to(tl.float32)
            y = y * w.to(tl.float32)
        y_off = _row_offsets(rows, D1, D2, sy0, sy1, sy2)
        tl.store(Y + y_off[:, None] + cols[None, :] * syc, y.to(Y.dtype.element_ty), mask=ok)
        tl.store(RSTD + rows, rstd, mask=r_ok)

    @triton.jit
    def _rms_norm_bwd_kernel(
        DY, X, W, RSTD, DX, DW_PART,
        R, C, D1, D2,
        sg0, sg1, sg2, sgc,
        sx0, sx1, sx2, sxc,
        sd0, sd1, sd2, sdc,
        HAS_WEIGHT: tl.constexpr,
        BLOCK_R: tl.constexpr,
        BLOCK_C: tl.constexpr,
    ):  # fmt: skip
        pid = tl.program_id(0)
        cols = tl.arange(0, BLOCK_C)
        c_ok = cols < C
        if HAS_WEIGHT:
            w = tl.load(W + cols, mask=c_ok, other=0.0).to(tl.float32)
        dw = tl.zeros([BLOCK_C], dtype=tl.float32)
        n_tiles = tl.cdiv(R, BLOCK_R)
        for tile in range(pid, n_tiles, tl.num_programs(0)):
            rows = tile * BLOCK_R + tl.arange(0, BLOCK_R)
            r_ok = rows < R
            ok = r_ok[:, None] & c_ok[None, :]
            x = tl.load(X + _row_offsets(rows, D1, D2, sx0, sx1, sx2)[:, None] + cols[None, :] * sxc,
                        mask=ok, other=0.0).to(tl.float32)  # fmt: skip
            dy = tl.load(DY + _row_offsets(rows, D1, D2, sg0, sg1, sg2)[:, None] + cols[None, :] * sgc,
                         mask=ok, other=0.0).to(tl.float32)  # fmt: skip
            rstd = tl.load(RSTD + rows, mask=r_ok, other=0.0)
            y = x * rstd[:, None]
            if HAS_WEIGHT:
                dw += tl.sum(dy * y, 0)
                g = dy * w[None, :]
            else:
                g = dy
            # d/dx of x·rstd: rstd·(g − y·mean(g·y))
            dx = (g - y * (tl.sum(g * y, 1) / C)[:, None]) * rstd[:, None]
            tl.store(DX + _row_offsets(rows, D1, D2, sd0, sd1, sd2)[:, None] + cols[None, :] * sdc,
                     dx.to(DX.dtype.element_ty), mask=ok)  # fmt: skip
        if HAS_WEIGHT:
            tl.store(DW_PART + pid * C + cols, dw, mask=c_ok)

    @triton.jit
    def _ln_modulate_fwd_kernel(
        X, SHIFT, SCALE, Y, MEAN, RSTD,
        S, C, eps,
        sxb, sxs, sxc,
        syb, sys, syc,
        shb, shc, scb, scc,
        BLOCK_R: tl.constexpr,
        BLOCK_C: tl.constexpr,
    ):  # fmt: skip
        b = tl.program_id(1).to(tl.int64)
        rows = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
        cols = tl.arange(0, BLOCK_C)
        r_ok = rows < S
        c_ok = cols < C
        ok = r_ok[:, None] & c_ok[None, :]
        x = tl.load(X + b * sxb + rows[:, None].to(tl.int64) * sxs + cols[None, :] * sxc, mask=ok, other=0.0)
        x = x.to(tl.float32)
        mean = tl.sum(x, 1) / C
        xc = tl.where(ok, x - mean[:, None], 0.0)
        rstd = tl.math.rsqrt(tl.sum(xc * xc, 1) / C + eps)
        shift = tl.load(SHIFT + b * shb + cols * shc, mask=c_ok, other=0.0).to(tl.float32)
        scale = tl.load(SCALE + b * scb + cols * scc, mask=c_ok, other=0.0).to(tl.float32)
        y = xc * rstd[:, None] * (1.0 + scale[None, :]) + shift[None, :]
        tl.store(Y + b * syb + rows[:, None].to(tl.int64) * sys + cols[None, :] * syc, y.to(Y.dtype.element_ty),
                 mask=ok)  # fmt: skip
        tl.store(MEAN + b * S + rows, mean, mask=r_ok)
        tl.store(RSTD + b * S + rows, rstd, mask=r_ok)

    @triton.jit
    def _ln_modulate_bwd_kernel(
        DY, X, SCALE, MEAN, RSTD, DX, DSHIFT_PART, DSCALE_PART,
        S, C,
        sgb, sgs, sgc,
        sxb, sxs, sxc,
        sdb, sds, sdc,
        scb, scc,
        BLOCK_R: tl.constexpr,
        BLOCK_C: tl.constexpr,
    ):  # fmt: skip
        pid = tl.program_id(0)
        n_prog = tl.num_programs(0)
        b = tl.program_id(1).to(tl.int64)
        cols = tl.arange(0, BLOCK_C)
        c_ok = cols < C
        scale = tl.load(SCALE + b * scb + cols * scc, mask=c_ok, other=0.0).to(tl.float32)
        dshift = tl.zeros([BLOCK_C], dtype=tl.float32)
        dscale = tl.zeros([BLOCK_C], dtype=tl.float32)
        for tile in range(pid, tl.cdiv(S, BLOCK_R), n_prog):
            rows = tile * BLOCK_R + tl.arange(0, BLOCK_R)
            r_ok = rows < S
            ok = r_ok[:, None] & c_ok[None, :]
            r64 = rows[:, None].to(tl.int64)
            x = tl.load(X + b * sxb + r64 * sxs + cols[None, :] * sxc, mask=ok, other=0.0).to(tl.float32)
            dy = tl.load(DY + b * sgb + r64 * sgs + cols[None, :] * sgc, mask=ok, other=0.0).to(tl.float32)
            mean = tl.load(MEAN + b * S + rows, mask=r_ok, other=0.0)
            rstd = tl.load(RSTD + b * S + rows, mask=r_ok, other=0.0)
            xhat = tl.where(ok, (x - mean[:, None]) * rstd[:, None], 0.0)
            dshift += tl.sum(dy, 0)
            dscale += tl.sum(dy * xhat, 0)
            g = dy * (1.0 + scale[None, :])
            # d/dx of the LayerNorm: rstd·(g − mean(g) − xhat·mean(g·xhat))
            dx = (g - (tl.sum(g, 1) / C)[:, None] - xhat * (tl.sum(g * xhat, 1) / C)[:, None]) * rstd[:, None]
            tl.store(DX + b * sdb + r64 * sds + cols[None, :] * sdc, dx.to(DX.dtype.element_ty), mask=ok)
        part = (b * n_prog + pid) * C
        tl.store(DSHIFT_PART + part + cols, dshift, mask=c_ok)
        tl.store(DSCALE_PART + part + cols, dscale, mask=c_ok)


def _bwd_programs(n_tiles: int, device: torch.device, groups: int = 1) -> int:
    """Programs of a grid-stride backward launch: about 4 per SM in all (``groups`` launches side by side)."""
    cap = 4 if INTERPRET else max(1, num_sms(device) * 4 // groups)
    return max(1, min(n_tiles, cap))


def _alloc_like(x: torch.Tensor, dtype: torch.dtype | None = None) -> torch.Tensor:
    """Output for a row-wise op: laid out like x when it has at most three leading dims, else contiguous (then
    viewable as (rows, C)). The real and the fake implementations share it, so their strides agree."""
    if x.dim() <= 4:
        return torch.empty_like(x, dtype=dtype)
    return torch.empty(x.shape, device=x.device, dtype=dtype if dtype is not None else x.dtype)


def _flat_rows(x: torch.Tensor) -> torch.Tensor:
    """Up to three leading dims are addressed by strides; more are flattened (a copy only if not viewable)."""
    return x if x.dim() <= 4 else x.reshape(-1, x.shape[-1])


def _check_triton(op: str, device: torch.device) -> None:
    reason = triton_unusable_reason(device)
    if reason is not None:
        raise RuntimeError(f"{op}: cannot run the Triton kernel: {reason}")


def _rms_norm_fwd_triton(x, weight, eps: float):
    _check_triton("rms_norm", x.device)
    out = _alloc_like(x, _rms_out_dtype(x, weight))
    c = x.shape[-1]
    r = x.numel() // c if c else 0
    rstd = torch.empty(r, device=x.device, dtype=torch.float32)
    if r == 0 or c == 0:
        return out, rstd
    xf, of = _flat_rows(x), _flat_rows(out)
    _, d1, d2 = leading_sizes(xf.shape)
    block_r, block_c, num_warps = _tile(c)
    _rms_norm_fwd_kernel[(triton.cdiv(r, block_r),)](
        xf, weight if weight is not None else xf, of, rstd,
        r, c, d1, d2, eps,
        *leading_strides(xf), xf.stride(-1),
        *leading_strides(of), of.stride(-1),
        HAS_WEIGHT=weight is not None,
        ROUND_TO_W=weight is not None and weight.dtype in _HALF,
        BLOCK_R=block_r,
        BLOCK_C=block_c,
        num_warps=num_warps,
    )  # fmt: skip
    return out, rstd


def _rms_norm_bwd_triton(grad_out, x, weight, rstd):
    c = x.shape[-1]
    r = rstd.shape[0]
    dx = _alloc_like(x)
    if r == 0 or c == 0:
        dw = torch.zeros_like(weight) if weight is not None else x.new_empty(0)
        return dx.zero_(), dw
    xf, gf, dxf = _flat_rows(x), _flat_rows(grad_out), _flat_rows(dx)
    _, d1, d2 = leading_sizes(xf.shape)
    block_r, block_c, num_warps = _tile(c)
    n_prog = _bwd_programs(triton.cdiv(r, block_r), x.device)
    dw_part = torch.empty((n_prog, c), device=x.device, dtype=torch.float32) if weight is not None else rstd
    _rms_norm_bwd_kernel[(n_prog,)](
        gf, xf, weight if weight is not None else xf, rstd, dxf, dw_part,
        r, c, d1, d2,
        *leading_strides(gf), gf.stride(-1),
        *leading_strides(xf), xf.stride(-1),
        *leading_strides(dxf), dxf.stride(-1),
        HAS_WEIGHT=weight is not None,
        BLOCK_R=block_r,
        BLOCK_C=block_c,
        num_warps=num_warps,
    )  # fmt: skip
    dw = dw_part.sum(0).to(weight.dtype) if weight is not None else x.new_empty(0)
    return dx, dw


def _ln_modulate_fwd_triton(x, shift, scale, eps: float):
    _check_triton("layer_norm_modulate", x.device)
    b, s, c = x.shape
    out = torch.empty_like(x)
    mean = torch.empty((b, s), device=x.device, dtype=torch.float32)
    rstd = torch.empty((b, s), device=x.device, dtype=torch.float32)
    if out.numel() == 0:
        return out, mean, rstd
    block_r, block_c, num_warps = _tile(c)
    _ln_modulate_fwd_kernel[(triton.cdiv(s, block_r), b)](
        x, shift, scale, out, mean, rstd,
        s, c, eps,
        *x.stride(), *out.stride(), *shift.stride(), *scale.stride(),
        BLOCK_R=block_r,
        BLOCK_C=block_c,
        num_warps=num_warps,
    )  # fmt: skip
    return out, mean, rstd


def _ln_modulate_bwd_triton(grad_out, x, scale, mean, rstd):
    b, s, c = x.shape
    dx = torch.empty_like(x)
    if dx.numel() == 0:
        return dx.zero_(), torch.zeros_like(scale), torch.zeros_like(scale)
    block_r, block_c, num_warps = _tile(c)
    per_batch = _bwd_programs(triton.cdiv(s, block_r), x.device, groups=b)
    parts = torch.empty((2, b, per_batch, c), device=x.device, dtype=torch.float32)
    _ln_modulate_bwd_kernel[(per_batch, b)](
        grad_out, x, scale, mean, rstd, dx, parts[0], parts[1],
        s, c,
        *grad_out.stride(), *x.stride(), *dx.stride(), *scale.stride(),
        BLOCK_R=block_r,
        BLOCK_C=block_c,
        num_warps=num_warps,
    )  # fmt: skip
    return dx, parts[0].sum(1).to(scale.dtype), parts[1].sum(1).to(scale.dtype)


class _RMSNormFunction(torch.autograd.Function):
    """Eager autograd wrapper (cheaper per call than the custom op's dispatcher round trip)."""

    @staticmethod
    def forward(ctx, x, weight, eps):
        out, rstd = _rms_norm_fwd_triton(x, weight, eps)
        ctx.save_for_backward(x, weight, rstd)
        return out

    @staticmethod
    def backward(ctx, grad_out):
        x, weight, rstd = ctx.saved_tensors
        dx, dw = _rms_norm_bwd_triton(grad_out, x, weight, rstd)
        return dx, (dw if weight is not None else None), None


class _LayerNormModulateFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, shift, scale, eps):
        out, mean, rstd = _ln_modulate_fwd_triton(x, shift, scale, eps)
        ctx.save_for_backward(x, scale, mean, rstd)
        return out

    @staticmethod
    def backward(ctx, grad_out):
        x, scale, mean, rstd = ctx.saved_tensors
        dx, dshift, dscale = _ln_modulate_bwd_triton(grad_out, x, scale, mean, rstd)
        return dx, dshift, dscale, None


def _needs_grad(*tensors) -> bool:
    return torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors)


# ----------------------------------------------------------------------------------------------------------
# Custom ops
# ------------------------------------------------------------------------------------------------------------


@torch.library.custom_op("deepgen::rms_norm", mutates_args=())
def _rms_norm_op(
    x: torch.Tensor, weight: torch.Tensor | None, eps: float
) -> tuple[torch.Tensor, torch.Tensor]:
    return _rms_norm_fwd_triton(x, weight, eps)


@_rms_norm_op.register_fake
def _rms_norm_fake(x, weight, eps):
    c = x.shape[-1]
    r = x.numel() // c if c else 0
    return _alloc_like(x, _rms_out_dtype(x, weight)), x.new_empty((r,), dtype=torch.float32)


@torch.library.custom_op("deepgen::rms_norm_backward", mutates_args=())
def _rms_norm_backward_op(
    grad_out: torch.Tensor, x: torch.Tensor, weight: torch.Tensor | None, rstd: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    return _rms_norm_bwd_triton(grad_out, x, weight, rstd)


@_rms_norm_backward_op.register_fake
def _rms_norm_backward_fake(grad_out, x, weight, rstd):
    return _alloc_like(x), (weight.new_empty(weight.shape) if weight is not None else x.new_empty(0))


def _rms_norm_setup_context(ctx, inputs, output):
    x, weight, _ = inputs
    _, rstd = output
    ctx.save_for_backward(x, weight, rstd)


def _rms_norm_autograd_backward(ctx, grad_out, grad_rstd):
    x, weight, rstd = ctx.saved_tensors
    dx, dw = torch.ops.deepgen.rms_norm_backward(grad_out, x, weight, rstd)
    return dx, (dw if weight is not None else None), None


_rms_norm_op.register_autograd(_rms_norm_autograd_backward, setup_context=_rms_norm_setup_context)


@torch.library.custom_op("deepgen::layer_norm_modulate", mutates_args=())
def _ln_modulate_op(
    x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor, eps: float
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    return _ln_modulate_fwd_triton(x, shift, scale, eps)


@_ln_modulate_op.register_fake
def _ln_modulate_fake(x, shift, scale, eps):
    b, s, _ = x.shape
    stats = x.new_empty((b, s), dtype=torch.float32)
    return torch.empty_like(x), stats, torch.empty_like(stats)


@torch.library.custom_op("deepgen::layer_norm_modulate_backward", mutates_args=())
def _ln_modulate_backward_op(
    grad_out: torch.Tensor, x: torch.Tensor, scale: torch.Tensor, mean: torch.Tensor, rstd: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    return _ln_modulate_bwd_triton(grad_out, x, scale, mean, rstd)


@_ln_modulate_backward_op.register_fake
def _ln_modulate_backward_fake(grad_out, x, scale, mean, rstd):
    return torch.empty_like(x), scale.new_empty(scale.shape), scale.new_empty(scale.shape)


def _ln_modulate_setup_context(ctx, inputs, output):
    x, _, scale, _ = inputs
    _, mean, rstd = output
    ctx.save_for_backward(x, scale, mean, rstd)


def _ln_modulate_autograd_backward(ctx, grad_out, grad_mean, grad_rstd):
    x, scale, mean, rstd = ctx.saved_tensors
    dx, dshift, dscale = torch.ops.deepgen.layer_norm_modulate_backward(grad_out, x, scale, mean, rstd)
    return dx, dshift, dscale, None


_ln_modulate_op.register_autograd(_ln_modulate_autograd_backward, setup_context=_ln_modulate_setup_context)


# ----------------------------------------------------------------------------------------------------------
# Public ops
# ------------------------------------------------------------------------------------------------------------


def _check_eps(op: str, eps) -> None:
    if isinstance(eps, bool) or not isinstance(eps, (int, float)) or eps < 0:
        raise ValueError(f"{op}: eps must be a non-negative float, got {eps!r}")


def _width_unsupported(c: int) -> str | None:
    return None if c <= MAX_NORM_WIDTH else f"last dim {c} is wider than {MAX_NORM_WIDTH}"


def rms_norm(
    x: torch.Tensor, weight: torch.Tensor | None, eps: float, *, backend: str = "auto"
) -> torch.Tensor:
    """RMSNorm over the last dim with an fp32 reduction, matching ``diffusers`` ``RMSNorm.forward``.

    Args:
        x: ``(..., C)``, fp16/bf16/fp32, any strides (up to three leading dims are addressed by stride).
        weight: ``(C,)`` or ``None`` (no affine). eps: added to the mean of squares.
        backend: ``"auto"`` | ``"triton"`` | ``"torch"`` (see the package docs).

    Returns x's dtype when weight is None or has x's dtype (the usual case); for mixed dtypes it follows diffusers
    (a half weight's dtype, fp32 for an fp32 weight). Differentiable in x and weight (Triton backward kernel).
    """
    op = "rms_norm"
    check_tensor(op, "x", x, min_ndim=1)
    if weight is not None:
        check_tensor(op, "weight", weight, ndim=1)
        check_same(op, "weight", weight, "x", x, dtype=False)
        if weight.shape[0] != x.shape[-1]:
            raise ValueError(
                f"{op}: weight must have shape ({x.shape[-1]},) (x's last dim), got {tuple(weight.shape)}"
            )
    _check_eps(op, eps)
    if resolve_backend(backend, x.device, op, _width_unsupported(x.shape[-1])) == "torch":
        return rms_norm_reference(x, weight, eps)
    if torch.compiler.is_compiling():  # dynamo / torch.export: the opaque custom op with its fake impl
        return torch.ops.deepgen.rms_norm(x, weight, float(eps))[0]
    if _needs_grad(x, weight):
        return _RMSNormFunction.apply(x, weight, float(eps))
    return _rms_norm_fwd_triton(x, weight, float(eps))[0]


def layer_norm_modulate(
    x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor, eps: float, *, backend: str = "auto"
) -> torch.Tensor:
    """``LayerNorm(x)`` (no affine, fp32 statistics) then ``x_norm * (1 + scale[:, None]) + shift[:, None]``.

    Args:
        x: ``(B, S, C)``; shift, scale: ``(B, C)``, broadcast over S. Same dtype and device, any strides.
        eps: LayerNorm epsilon (SD3 uses 1e-6). backend: ``"auto"`` | ``"triton"`` | ``"torch"``.

    Returns ``(B, S, C)`` in x's dtype. The Triton kernel keeps the whole chain in fp32 and rounds once; the eager
    reference rounds after the norm and after each modulation op. Differentiable in x, shift and scale.
    """
    op = "layer_norm_modulate"
    check_tensor(op, "x", x, ndim=3)
    for name, t in (("shift", shift), ("scale", scale)):
        check_tensor(op, name, t, ndim=2)
        check_same(op, name, t, "x", x)
        if tuple(t.shape) != (x.shape[0], x.shape[2]):
            raise ValueError(
                f"{op}: {name} must have shape (B, C) = {(x.shape[0], x.shape[2])}, got {tuple(t.shape)}"
            )
    _check_eps(op, eps)
    if resolve_backend(backend, x.device, op, _width_unsupported(x.shape[-1])) == "torch":
        return layer_norm_modulate_reference(x, shift, scale, eps)
    if torch.compiler.is_compiling():  # dynamo / torch.export: the opaque custom op with its fake impl
        return torch.ops.deepgen.layer_norm_modulate(x, shift, scale, float(eps))[0]
    if _needs_grad(x, shift, scale):
        return _LayerNormModulateFunction.apply(x, shift, scale, float(eps))
    return _ln_modulate_fwd_triton(x, shift, scale, float(eps))[0]
