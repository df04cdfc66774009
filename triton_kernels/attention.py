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

Any sequence lengths (query and key lengths may differ), head dims 16/32/64/128 (other head dims fall back to
torch under ``backend="auto"``), fp16/bf16/fp32, arbitrary strides (e.g. ``(B, S, H, d).transpose(1, 2)``).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from deepgen_components.triton_kernels._common import (
    HAS_TRITON,
    INTERPRET,
    autotune,
    check_same,
    check_tensor,
    dot_in_fp32,
    prune_fp32_configs,
    resolve_backend,
    tl,
    triton,
    triton_unusable_reason,
)

__all__ = ["SUPPORTED_HEAD_DIMS", "attention", "attention_reference"]

#: Head dims the Triton kernel is compiled for.
SUPPORTED_HEAD_DIMS = (16, 32, 64, 128)

_OP = "attention"
_LOG2E = 1.4426950408889634


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


# ----------------------------------------------------------------------------------------------------------
# Triton kernels
# ------------------------------------------------------------------------------------------------------------


def _configs(cfgs):
    if not HAS_TRITON:
        return []
    return [triton.Config({"BLOCK_M": bm, "BLOCK_N": bn}, num_warps=w, num_stages=s) for bm, bn, w, s in cfgs]


# The last config of each list is the smallest: the only one autotuned for fp32 (prune_fp32_configs).
_FWD_CONFIGS = _configs([(128, 64, 4, 3), (128, 64, 8, 3), (128, 128, 8, 3), (128, 32, 4, 4), (64, 64, 4, 3)])
_BWD_KV_CONFIGS = _configs([(64, 128, 8, 2), (32, 128, 4, 2), (64, 64, 4, 2), (32, 64, 4, 3)])
_BWD_Q_CONFIGS = _configs([(128, 64, 8, 2), (64, 128, 8, 2), (128, 32, 4, 3), (64, 64, 4, 2)])
_INTERPRET_META = {"BLOCK_M": 16, "BLOCK_N": 16}
_TUNE_KEY = ["S_BUCKET", "HEAD_DIM", "HAS_MASK"]
_PRUNE = prune_fp32_configs("Q")


if HAS_TRITON:

    @triton.jit
    def _operand(x, DTYPE: tl.constexpr, DOT_FP32: tl.constexpr):
        # Round to the storage dtype like the GPU path does, then (interpreter) widen for an fp32 tl.dot.
        x = x.to(DTYPE)
        if DOT_FP32:
            x = x.to(tl.float32)
        return x

    @triton.jit
    def _key_valid(MASK_ROW, stride_ms, offs_n, S_K, HAS_MASK: tl.constexpr):
        if HAS_MASK:
            valid = tl.load(MASK_ROW + offs_n * stride_ms, mask=offs_n < S_K, other=0) != 0
        else:
            valid = offs_n < S_K
        return valid

    @triton.jit
    def _kv_end(MASK_ROW, stride_ms, S_K, SCAN: tl.constexpr):
        # One past the last real key of this sample (0 when it has none): the key loops stop there, so
        # right-padding costs nothing. Scanning the mask row is cheap next to the attention loop.
        offs = tl.arange(0, SCAN)
        end = tl.zeros([SCAN], dtype=tl.int32)
        for start in range(0, S_K, SCAN):
            idx = start + offs
            real = tl.load(MASK_ROW + idx * stride_ms, mask=idx < S_K, other=0) != 0
            end = tl.maximum(end, tl.where(real, idx + 1, 0))
        return tl.max(end, 0)

    @triton.jit
    def _attn_fwd_block(
        acc, l_i, m_i, q, k_ptrs, v_ptrs, MASK_ROW, stride_ms, offs_n, S_K, qk_scale,
        HAS_MASK: tl.constexpr,
        CHECK_BOUNDS: tl.constexpr,
        DOT_FP32: tl.constexpr,
        INPUT_PRECISION: tl.constexpr,
    ):  # fmt: skip
        if CHECK_BOUNDS:
            kt = tl.load(k_ptrs, mask=(offs_n < S_K)[None, :], other=0.0)
            v = tl.load(v_ptrs, mask=(offs_n < S_K)[:, None], other=0.0)
        else:
            kt = tl.load(k_ptrs)
            v = tl.load(v_ptrs)
        if DOT_FP32:
            kt = kt.to(tl.float32)
        s = tl.dot(q, kt, input_precision=INPUT_PRECISION) * qk_scale
        if HAS_MASK or CHECK_BOUNDS:
            valid = _key_valid(MASK_ROW, stride_ms, offs_n, S_K, HAS_MASK)
            s = tl.where(valid[None, :], s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        # Rows that have seen only masked keys keep m = -inf; shift by 0 then so exp2 gives 0, not NaN.
        m_use = tl.where(m_new == float("-inf"), 0.0, m_new)
        alpha = tl.math.exp2(m_i - m_use)
        p = tl.math.exp2(s - m_use[:, None])
        l_i = l_i * alpha + tl.sum(p, 1)
        acc = acc * alpha[:, None]
        if DOT_FP32:
            v = v.to(tl.float32)
        acc = tl.dot(_operand(p, v_ptrs.dtype.element_ty, DOT_FP32), v, acc, input_precision=INPUT_PRECISION)
        return acc, l_i, m_new

    @autotune(configs=_FWD_CONFIGS, key=_TUNE_KEY, interpret_meta=_INTERPRET_META, prune_configs_by=_PRUNE)
    @triton.jit
    def _attn_fwd_kernel(
        Q, K, V, Out, LSE, MASK,
        qk_scale,
        stride_qb, stride_qh, stride_qs, stride_qd,
        stride_kb, stride_kh, stride_ks, stride_kd,
        stride_vb, stride_vh, stride_vs, stride_vd,
        stride_ob, stride_oh, stride_os, stride_od,
        stride_mb, stride_ms,
        H, S_Q, S_K, S_BUCKET,
        HEAD_DIM: tl.constexpr,
        HAS_MASK: tl.constexpr,
        STORE_LSE: tl.constexpr,
        DOT_FP32: tl.constexpr,
        INPUT_PRECISION: tl.constexpr,
        SCAN: tl.constexpr,
        BLOCK_M: tl.constexpr,
        BLOCK_N: tl.constexpr,
    ):  # fmt: skip
        pid_m = tl.program_id(0)
        pid_bh = tl.program_id(1)
        b = (pid_bh // H).to(tl.int64)
        h = (pid_bh % H).to(tl.int64)
        offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        offs_n0 = tl.arange(0, BLOCK_N)
        offs_d = tl.arange(0, HEAD_DIM)

        q = tl.load(
            Q + b * stride_qb + h * stride_qh + offs_m[:, None] * stride_qs + offs_d[None, :] * stride_qd,
            mask=(offs_m < S_Q)[:, None],
            other=0.0,
        )
        if DOT_FP32:
            q = q.to(tl.float32)
        k_base = K + b * stride_kb + h * stride_kh + offs_d[:, None] * stride_kd
        v_base = V + b * stride_vb + h * stride_vh + offs_d[None, :] * stride_vd
        mask_row = MASK + b * stride_mb

        kv_end = S_K
        if HAS_MASK:
            kv_end = _kv_end(mask_row, stride_ms, S_K, SCAN)
        n_full = (kv_end // BLOCK_N) * BLOCK_N

        m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
        l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
        acc = tl.zeros([BLOCK_M, HEAD_DIM], dtype=tl.float32)
        for start_n in range(0, n_full, BLOCK_N):
            offs_n = start_n + offs_n0
            acc, l_i, m_i = _attn_fwd_block(
                acc, l_i, m_i, q,
                k_base + offs_n[None, :].to(tl.int64) * stride_ks,
                v_base + offs_n[:, None].to(tl.int64) * stride_vs,
                mask_row, stride_ms, offs_n, S_K, qk_scale,
                HAS_MASK, False, DOT_FP32, INPUT_PRECISION,
            )  # fmt: skip
        if n_full < kv_end:
            offs_n = n_full + offs_n0
            acc, l_i, m_i = _attn_fwd_block(
                acc, l_i, m_i, q,
                k_base + offs_n[None, :].to(tl.int64) * stride_ks,
                v_base + offs_n[:, None].to(tl.int64) * stride_vs,
                mask_row, stride_ms, offs_n, S_K, qk_scale,
                HAS_MASK, True, DOT_FP32, INPUT_PRECISION,
            )  # fmt: skip

        has_keys = l_i > 0.0
        l_safe = tl.where(has_keys, l_i, 1.0)
        out = acc / l_safe[:, None]
        tl.store(
            Out + b * stride_ob + h * stride_oh + offs_m[:, None] * stride_os + offs_d[None, :] * stride_od,
            out.to(Out.dtype.element_ty),
            mask=(offs_m < S_Q)[:, None],
        )
        # Base-2 log-sum-exp of the scaled logits; +inf for rows without keys makes their backward exactly 0.
        if STORE_LSE:
            lse = tl.where(has_keys, m_i + tl.math.log2(l_safe), float("inf"))
            tl.store(LSE + pid_bh.to(tl.int64) * S_Q + offs_m, lse, mask=offs_m < S_Q)

    @triton.jit
    def _attn_bwd_delta_kernel(
        Out, DO, DELTA,
        stride_ob, stride_oh, stride_os, stride_od,
        stride_gb, stride_gh, stride_gs, stride_gd,
        H, S_Q,
        HEAD_DIM: tl.constexpr,
        BLOCK_M: tl.constexpr,
    ):  # fmt: skip
        pid_m = tl.program_id(0)
        pid_bh = tl.program_id(1)
        b = (pid_bh // H).to(tl.int64)
        h = (pid_bh % H).to(tl.int64)
        offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        offs_d = tl.arange(0, HEAD_DIM)
        row_ok = (offs_m < S_Q)[:, None]
        o = tl.load(Out + b * stride_ob + h * stride_oh + offs_m[:, None] * stride_os + offs_d[None, :] * stride_od,
                    mask=row_ok, other=0.0).to(tl.float32)  # fmt: skip
        do = tl.load(DO + b * stride_gb + h * stride_gh + offs_m[:, None] * stride_gs + offs_d[None, :] * stride_gd,
                     mask=row_ok, other=0.0).to(tl.float32)  # fmt: skip
        tl.store(DELTA + pid_bh.to(tl.int64) * S_Q + offs_m, tl.sum(o * do, 1), mask=offs_m < S_Q)

    @autotune(configs=_BWD_KV_CONFIGS, key=_TUNE_KEY, interpret_meta=_INTERPRET_META, prune_configs_by=_PRUNE)
    @triton.jit
    def _attn_bwd_dkdv_kernel(
        Q, K, V, DO, LSE, DELTA, DK, DV, MASK,
        sm_scale, qk_scale,
        stride_qb, stride_qh, stride_qs, stride_qd,
        stride_kb, stride_kh, stride_ks, stride_kd,
        stride_vb, stride_vh, stride_vs, stride_vd,
        stride_gb, stride_gh, stride_gs, stride_gd,
        stride_dkb, stride_dkh, stride_dks, stride_dkd,
        stride_dvb, stride_dvh, stride_dvs, stride_dvd,
        stride_mb, stride_ms,
        H, S_Q, S_K, S_BUCKET,
        HEAD_DIM: tl.constexpr,
        HAS_MASK: tl.constexpr,
        DOT_FP32: tl.constexpr,
        INPUT_PRECISION: tl.constexpr,
        SCAN: tl.constexpr,
        BLOCK_M: tl.constexpr,
        BLOCK_N: tl.constexpr,
    ):  # fmt: skip
        pid_n = tl.program_id(0)
        pid_bh = tl.program_id(1)
        b = (pid_bh // H).to(tl.int64)
        h = (pid_bh % H).to(tl.int64)
        offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        offs_m0 = tl.arange(0, BLOCK_M)
        offs_d = tl.arange(0, HEAD_DIM)
        n_ok = (offs_n < S_K)[:, None]
        k = tl.load(K + b * stride_kb + h * stride_kh + offs_n[:, None] * stride_ks + offs_d[None, :] * stride_kd,
                    mask=n_ok, other=0.0)  # fmt: skip
        v = tl.load(V + b * stride_vb + h * stride_vh + offs_n[:, None] * stride_vs + offs_d[None, :] * stride_vd,
                    mask=n_ok, other=0.0)  # fmt: skip
        dtype = k.dtype
        if DOT_FP32:
            k = k.to(tl.float32)
            v = v.to(tl.float32)
        valid = _key_valid(MASK + b * stride_mb, stride_ms, offs_n, S_K, HAS_MASK)
        q_end = S_Q
        if HAS_MASK:
            # A block wholly past the sample's last real key has no gradient: skip the query loop.
            q_end = tl.where(pid_n * BLOCK_N < _kv_end(MASK + b * stride_mb, stride_ms, S_K, SCAN), S_Q, 0)

        q_base = Q + b * stride_qb + h * stride_qh + offs_d[None, :] * stride_qd
        do_base = DO + b * stride_gb + h * stride_gh + offs_d[None, :] * stride_gd
        row_base = pid_bh.to(tl.int64) * S_Q
        dk = tl.zeros([BLOCK_N, HEAD_DIM], dtype=tl.float32)
        dv = tl.zeros([BLOCK_N, HEAD_DIM], dtype=tl.float32)
        for start_m in range(0, q_end, BLOCK_M):
            offs_m = start_m + offs_m0
            m_ok = offs_m < S_Q
            q = tl.load(q_base + offs_m[:, None].to(tl.int64) * stride_qs, mask=m_ok[:, None], other=0.0)
            do = tl.load(do_base + offs_m[:, None].to(tl.int64) * stride_gs, mask=m_ok[:, None], other=0.0)
            lse = tl.load(LSE + row_base + offs_m, mask=m_ok, other=float("inf"))
            delta = tl.load(DELTA + row_base + offs_m, mask=m_ok, other=0.0)
            if DOT_FP32:
                q = q.to(tl.float32)
                do = do.to(tl.float32)
            # Transposed scores: rows are keys, columns are queries.
            s_t = tl.dot(k, tl.trans(q), input_precision=INPUT_PRECISION) * qk_scale
            p_t = tl.math.exp2(s_t - lse[None, :])
            p_t = tl.where(valid[:, None], p_t, 0.0)
            dv = tl.dot(_operand(p_t, dtype, DOT_FP32), do, dv, input_precision=INPUT_PRECISION)
            dp_t = tl.dot(v, tl.trans(do), input_precision=INPUT_PRECISION)
            ds_t = p_t * (dp_t - delta[None, :])
            dk = tl.dot(_operand(ds_t, dtype, DOT_FP32), q, dk, input_precision=INPUT_PRECISION)
        dk = dk * sm_scale
        tl.store(DK + b * stride_dkb + h * stride_dkh + offs_n[:, None] * stride_dks + offs_d[None, :] * stride_dkd,
                 dk.to(DK.dtype.element_ty), mask=n_ok)  # fmt: skip
        tl.store(DV + b * stride_dvb + h * stride_dvh + offs_n[:, None] * stride_dvs + offs_d[None, :] * stride_dvd,
                 dv.to(DV.dtype.element_ty), mask=n_ok)  # fmt: skip

    @autotune(configs=_BWD_Q_CONFIGS, key=_TUNE_KEY, interpret_meta=_INTERPRET_META, prune_configs_by=_PRUNE)
    @triton.jit
    def _attn_bwd_dq_kernel(
        Q, K, V, DO, LSE, DELTA, DQ, MASK,
        sm_scale, qk_scale,
        stride_qb, stride_qh, stride_qs, stride_qd,
        stride_kb, stride_kh, stride_ks, stride_kd,
        stride_vb, stride_vh, stride_vs, stride_vd,
        stride_gb, stride_gh, stride_gs, stride_gd,
        stride_dqb, stride_dqh, stride_dqs, stride_dqd,
        stride_mb, stride_ms,
        H, S_Q, S_K, S_BUCKET,
        HEAD_DIM: tl.constexpr,
        HAS_MASK: tl.constexpr,
        DOT_FP32: tl.constexpr,
        INPUT_PRECISION: tl.constexpr,
        SCAN: tl.constexpr,
        BLOCK_M: tl.constexpr,
        BLOCK_N: tl.constexpr,
    ):  # fmt: skip
        pid_m = tl.program_id(0)
        pid_bh = tl.program_id(1)
        b = (pid_bh // H).to(tl.int64)
        h = (pid_bh % H).to(tl.int64)
        offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        offs_n0 = tl.arange(0, BLOCK_N)
        offs_d = tl.arange(0, HEAD_DIM)
        m_ok = offs_m < S_Q
        q = tl.load(Q + b * stride_qb + h * stride_qh + offs_m[:, None] * stride_qs + offs_d[None, :] * stride_qd,
                    mask=m_ok[:, None], other=0.0)  # fmt: skip
        do = tl.load(DO + b * stride_gb + h * stride_gh + offs_m[:, None] * stride_gs + offs_d[None, :] * stride_gd,
                     mask=m_ok[:, None], other=0.0)  # fmt: skip
        dtype = q.dtype
        if DOT_FP32:
            q = q.to(tl.float32)
            do = do.to(tl.float32)
        row_base = pid_bh.to(tl.int64) * S_Q
        lse = tl.load(LSE + row_base + offs_m, mask=m_ok, other=float("inf"))
        delta = tl.load(DELTA + row_base + offs_m, mask=m_ok, other=0.0)
        kv_end = S_K
        if HAS_MASK:
            kv_end = _kv_end(MASK + b * stride_mb, stride_ms, S_K, SCAN)
        k_base = K + b * stride_kb + h * stride_kh + offs_d[None, :] * stride_kd
        v_base = V + b * stride_vb + h * stride_vh + offs_d[None, :] * stride_vd
        mask_row = MASK + b * stride_mb
        dq = tl.zeros([BLOCK_M, HEAD_DIM], dtype=tl.float32)
        for start_n in range(0, kv_end, BLOCK_N):
            offs_n = start_n + offs_n0
            n_ok = (offs_n < S_K)[:, None]
            k = tl.load(k_base + offs_n[:, None].to(tl.int64) * stride_ks, mask=n_ok, other=0.0)
            v = tl.load(v_base + offs_n[:, None].to(tl.int64) * stride_vs, mask=n_ok, other=0.0)
            if DOT_FP32:
                k = k.to(tl.float32)
                v = v.to(tl.float32)
            s = tl.dot(q, tl.trans(k), input_precision=INPUT_PRECISION) * qk_scale
            p = tl.math.exp2(s - lse[:, None])
            valid = _key_valid(mask_row, stride_ms, offs_n, S_K, HAS_MASK)
            p = tl.where(valid[None, :], p, 0.0)
            dp = tl.dot(do, tl.trans(v), input_precision=INPUT_PRECISION)
            ds = p * (dp - delta[:, None])
            dq = tl.dot(_operand(ds, dtype, DOT_FP32), k, dq, input_precision=INPUT_PRECISION)
        dq = dq * sm_scale
        tl.store(DQ + b * stride_dqb + h * stride_dqh + offs_m[:, None] * stride_dqs + offs_d[None, :] * stride_dqd,
                 dq.to(DQ.dtype.element_ty), mask=m_ok[:, None])  # fmt: skip


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
    _attn_fwd_kernel[grid](
        q, k, v, out, lse if store_lse else out, mask,
        scale * _LOG2E,
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
    _attn_bwd_delta_kernel[(triton.cdiv(s_q, block), b * h)](
        out, grad_out, delta, *out.stride(), *grad_out.stride(), h, s_q, HEAD_DIM=d, BLOCK_M=block
    )
    mask, smb, sms = _mask_args(key_padding_mask, q)
    common = dict(
        HEAD_DIM=d,
        HAS_MASK=key_padding_mask is not None,
        DOT_FP32=INTERPRET,
        INPUT_PRECISION="ieee" if dot_in_fp32(q.dtype) else "tf32",
        SCAN=_SCAN,
    )
    bucket = _s_bucket(s_q, s_k)
    common["_tune_key"] = (q.dtype, bucket, d, key_padding_mask is not None)
    _attn_bwd_dkdv_kernel[lambda meta: (triton.cdiv(s_k, meta["BLOCK_N"]), b * h)](
        q, k, v, grad_out, lse, delta, dk, dv, mask,
        scale, scale * _LOG2E,
        *q.stride(), *k.stride(), *v.stride(), *grad_out.stride(), *dk.stride(), *dv.stride(),
        smb, sms,
        h, s_q, s_k, bucket,
        **common,
    )  # fmt: skip
    _attn_bwd_dq_kernel[lambda meta: (triton.cdiv(s_q, meta["BLOCK_M"]), b * h)](
        q, k, v, grad_out, lse, delta, dq, mask,
        scale, scale * _LOG2E,
        *q.stride(), *k.stride(), *v.stride(), *grad_out.stride(), *dq.stride(),
        smb, sms,
        h, s_q, s_k, bucket,
        **common,
    )  # fmt: skip
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
