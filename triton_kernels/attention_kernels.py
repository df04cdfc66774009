"""The Triton kernels of :mod:`~deepgen_components.triton_kernels.attention` (device code only; the launchers,
autograd and the public op are in ``attention.py``).

* :data:`attn_fwd_kernel` — one program per (query block, batch·head): streams key/value blocks with an online
  softmax (exp2, fp32 running max / sum / accumulator), stores the output and the base-2 log-sum-exp per row;
* :data:`attn_bwd_delta_kernel` — ``delta = rowsum(dO·O)``;
* :data:`attn_bwd_dkdv_kernel` — one program per key block: dK, dV over all query blocks;
* :data:`attn_bwd_dq_kernel` — one program per query block: dQ over all key blocks. The two backward passes are
  one kernel (same arguments, ``KEY_PASS`` picks the pass) autotuned separately.

The backward kernels recompute the probabilities from the stored log-sum-exp (no atomics, deterministic). Keys
where the mask is False get probability 0; the key loops stop after the last real key of the sample (``_kv_end``).
Tensors are (B, H, S, d) with arbitrary strides; the small jit helpers below address a row tile of one
(batch, head), load it and widen operands for the interpreter's fp32 ``tl.dot``.
"""

from __future__ import annotations

from deepgen_components.triton_kernels._common import HAS_TRITON, autotune, prune_fp32_configs, tl, triton

__all__ = [
    "LOG2E",
    "attn_bwd_delta_kernel",
    "attn_bwd_dkdv_kernel",
    "attn_bwd_dq_kernel",
    "attn_fwd_kernel",
]

#: exp(x) = exp2(x * LOG2E): the kernels work in base 2, the launchers fold LOG2E into the logit scale.
LOG2E = 1.4426950408889634


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

attn_fwd_kernel = attn_bwd_delta_kernel = attn_bwd_dkdv_kernel = attn_bwd_dq_kernel = None  # without Triton


if HAS_TRITON:

    @triton.jit
    def _batch_head(H):
        # (batch·head program id, batch, head) of this program; batch and head as int64 for the offsets.
        pid_bh = tl.program_id(1)
        return pid_bh, (pid_bh // H).to(tl.int64), (pid_bh % H).to(tl.int64)

    @triton.jit
    def _rows(BASE, b, h, rows, offs_d, stride_b, stride_h, stride_s, stride_d):
        # Pointers to a (rows, head dim) tile of one (batch, head).
        return BASE + b * stride_b + h * stride_h + rows[:, None] * stride_s + offs_d[None, :] * stride_d

    @triton.jit
    def _widen(x, DOT_FP32: tl.constexpr):
        # The interpreter's bf16/fp16 tl.dot is wrong: its operands are widened to fp32 (a no-op on the GPU path).
        if DOT_FP32:
            x = x.to(tl.float32)
        return x

    @triton.jit
    def _operand(x, DTYPE: tl.constexpr, DOT_FP32: tl.constexpr):
        # Round to the storage dtype like the GPU path does, then (interpreter) widen for an fp32 tl.dot.
        return _widen(x.to(DTYPE), DOT_FP32)

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
        s = tl.dot(q, _widen(kt, DOT_FP32), input_precision=INPUT_PRECISION) * qk_scale
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
        v = _widen(v, DOT_FP32)
        acc = tl.dot(_operand(p, v_ptrs.dtype.element_ty, DOT_FP32), v, acc, input_precision=INPUT_PRECISION)
        return acc, l_i, m_new

    @autotune(configs=_FWD_CONFIGS, key=_TUNE_KEY, interpret_meta=_INTERPRET_META, prune_configs_by=_PRUNE)
    @triton.jit
    def attn_fwd_kernel(
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
        pid_bh, b, h = _batch_head(H)
        offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        offs_n0 = tl.arange(0, BLOCK_N)
        offs_d = tl.arange(0, HEAD_DIM)

        q = tl.load(_rows(Q, b, h, offs_m, offs_d, stride_qb, stride_qh, stride_qs, stride_qd),
                    mask=(offs_m < S_Q)[:, None], other=0.0)  # fmt: skip
        q = _widen(q, DOT_FP32)
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
        tl.store(_rows(Out, b, h, offs_m, offs_d, stride_ob, stride_oh, stride_os, stride_od),
                 out.to(Out.dtype.element_ty), mask=(offs_m < S_Q)[:, None])  # fmt: skip
        # Base-2 log-sum-exp of the scaled logits; +inf for rows without keys makes their backward exactly 0.
        if STORE_LSE:
            lse = tl.where(has_keys, m_i + tl.math.log2(l_safe), float("inf"))
            tl.store(LSE + pid_bh.to(tl.int64) * S_Q + offs_m, lse, mask=offs_m < S_Q)

    @triton.jit
    def attn_bwd_delta_kernel(
        Out, DO, DELTA,
        stride_ob, stride_oh, stride_os, stride_od,
        stride_gb, stride_gh, stride_gs, stride_gd,
        H, S_Q,
        HEAD_DIM: tl.constexpr,
        BLOCK_M: tl.constexpr,
    ):  # fmt: skip
        pid_m = tl.program_id(0)
        pid_bh, b, h = _batch_head(H)
        offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        offs_d = tl.arange(0, HEAD_DIM)
        row_ok = (offs_m < S_Q)[:, None]
        o = tl.load(_rows(Out, b, h, offs_m, offs_d, stride_ob, stride_oh, stride_os, stride_od),
                    mask=row_ok, other=0.0).to(tl.float32)  # fmt: skip
        do = tl.load(_rows(DO, b, h, offs_m, offs_d, stride_gb, stride_gh, stride_gs, stride_gd),
                     mask=row_ok, other=0.0).to(tl.float32)  # fmt: skip
        tl.store(DELTA + pid_bh.to(tl.int64) * S_Q + offs_m, tl.sum(o * do, 1), mask=offs_m < S_Q)

    @triton.jit
    def _attn_bwd_kernel(
        Q, K, V, DO, LSE, DELTA, DQ, DK, DV, MASK,
        sm_scale, qk_scale,
        stride_qb, stride_qh, stride_qs, stride_qd,
        stride_kb, stride_kh, stride_ks, stride_kd,
        stride_vb, stride_vh, stride_vs, stride_vd,
        stride_gb, stride_gh, stride_gs, stride_gd,
        stride_dqb, stride_dqh, stride_dqs, stride_dqd,
        stride_dkb, stride_dkh, stride_dks, stride_dkd,
        stride_dvb, stride_dvh, stride_dvs, stride_dvd,
        stride_mb, stride_ms,
        H, S_Q, S_K, S_BUCKET,
        HEAD_DIM: tl.constexpr,
        HAS_MASK: tl.constexpr,
        DOT_FP32: tl.constexpr,
        INPUT_PRECISION: tl.constexpr,
        SCAN: tl.constexpr,
        KEY_PASS: tl.constexpr,
        BLOCK_M: tl.constexpr,
        BLOCK_N: tl.constexpr,
    ):  # fmt: skip
        # Both backward passes take the same arguments: KEY_PASS programs own a key block and write dK, dV; the
        # others own a query block and write dQ.
        pid_bh, b, h = _batch_head(H)
        offs_d = tl.arange(0, HEAD_DIM)
        row_base = pid_bh.to(tl.int64) * S_Q
        mask_row = MASK + b * stride_mb
        if KEY_PASS:
            offs_n = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
            offs_m0 = tl.arange(0, BLOCK_M)
            n_ok = (offs_n < S_K)[:, None]
            k = tl.load(_rows(K, b, h, offs_n, offs_d, stride_kb, stride_kh, stride_ks, stride_kd),
                        mask=n_ok, other=0.0)  # fmt: skip
            v = tl.load(_rows(V, b, h, offs_n, offs_d, stride_vb, stride_vh, stride_vs, stride_vd),
                        mask=n_ok, other=0.0)  # fmt: skip
            dtype = k.dtype
            k = _widen(k, DOT_FP32)
            v = _widen(v, DOT_FP32)
            valid = _key_valid(mask_row, stride_ms, offs_n, S_K, HAS_MASK)
            q_end = S_Q
            if HAS_MASK:
                # A block wholly past the sample's last real key has no gradient: skip the query loop.
                q_end = tl.where(tl.program_id(0) * BLOCK_N < _kv_end(mask_row, stride_ms, S_K, SCAN), S_Q, 0)

            q_base = Q + b * stride_qb + h * stride_qh + offs_d[None, :] * stride_qd
            do_base = DO + b * stride_gb + h * stride_gh + offs_d[None, :] * stride_gd
            dk = tl.zeros([BLOCK_N, HEAD_DIM], dtype=tl.float32)
            dv = tl.zeros([BLOCK_N, HEAD_DIM], dtype=tl.float32)
            for start_m in range(0, q_end, BLOCK_M):
                offs_m = start_m + offs_m0
                m_ok = offs_m < S_Q
                q = tl.load(q_base + offs_m[:, None].to(tl.int64) * stride_qs, mask=m_ok[:, None], other=0.0)
                do = tl.load(do_base + offs_m[:, None].to(tl.int64) * stride_gs, mask=m_ok[:, None], other=0.0)
                lse = tl.load(LSE + row_base + offs_m, mask=m_ok, other=float("inf"))
                delta = tl.load(DELTA + row_base + offs_m, mask=m_ok, other=0.0)
                q = _widen(q, DOT_FP32)
                do = _widen(do, DOT_FP32)
                # Transposed scores: rows are keys, columns are queries.
                s_t = tl.dot(k, tl.trans(q), input_precision=INPUT_PRECISION) * qk_scale
                p_t = tl.math.exp2(s_t - lse[None, :])
                p_t = tl.where(valid[:, None], p_t, 0.0)
                dv = tl.dot(_operand(p_t, dtype, DOT_FP32), do, dv, input_precision=INPUT_PRECISION)
                dp_t = tl.dot(v, tl.trans(do), input_precision=INPUT_PRECISION)
                ds_t = p_t * (dp_t - delta[None, :])
                dk = tl.dot(_operand(ds_t, dtype, DOT_FP32), q, dk, input_precision=INPUT_PRECISION)
            dk = dk * sm_scale
            tl.store(_rows(DK, b, h, offs_n, offs_d, stride_dkb, stride_dkh, stride_dks, stride_dkd),
                     dk.to(DK.dtype.element_ty), mask=n_ok)  # fmt: skip
            tl.store(_rows(DV, b, h, offs_n, offs_d, stride_dvb, stride_dvh, stride_dvs, stride_dvd),
                     dv.to(DV.dtype.element_ty), mask=n_ok)  # fmt: skip
        else:
            offs_m = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
            offs_n0 = tl.arange(0, BLOCK_N)
            m_ok = offs_m < S_Q
            q = tl.load(_rows(Q, b, h, offs_m, offs_d, stride_qb, stride_qh, stride_qs, stride_qd),
                        mask=m_ok[:, None], other=0.0)  # fmt: skip
            do = tl.load(_rows(DO, b, h, offs_m, offs_d, stride_gb, stride_gh, stride_gs, stride_gd),
                         mask=m_ok[:, None], other=0.0)  # fmt: skip
            dtype = q.dtype
            q = _widen(q, DOT_FP32)
            do = _widen(do, DOT_FP32)
            lse = tl.load(LSE + row_base + offs_m, mask=m_ok, other=float("inf"))
            delta = tl.load(DELTA + row_base + offs_m, mask=m_ok, other=0.0)
            kv_end = S_K
            if HAS_MASK:
                kv_end = _kv_end(mask_row, stride_ms, S_K, SCAN)
            k_base = K + b * stride_kb + h * stride_kh + offs_d[None, :] * stride_kd
            v_base = V + b * stride_vb + h * stride_vh + offs_d[None, :] * stride_vd
            dq = tl.zeros([BLOCK_M, HEAD_DIM], dtype=tl.float32)
            for start_n in range(0, kv_end, BLOCK_N):
                offs_n = start_n + offs_n0
                n_ok = (offs_n < S_K)[:, None]
                k = tl.load(k_base + offs_n[:, None].to(tl.int64) * stride_ks, mask=n_ok, other=0.0)
                v = tl.load(v_base + offs_n[:, None].to(tl.int64) * stride_vs, mask=n_ok, other=0.0)
                k = _widen(k, DOT_FP32)
                v = _widen(v, DOT_FP32)
                s = tl.dot(q, tl.trans(k), input_precision=INPUT_PRECISION) * qk_scale
                p = tl.math.exp2(s - lse[:, None])
                valid = _key_valid(mask_row, stride_ms, offs_n, S_K, HAS_MASK)
                p = tl.where(valid[None, :], p, 0.0)
                dp = tl.dot(do, tl.trans(v), input_precision=INPUT_PRECISION)
                ds = p * (dp - delta[:, None])
                dq = tl.dot(_operand(ds, dtype, DOT_FP32), k, dq, input_precision=INPUT_PRECISION)
            dq = dq * sm_scale
            tl.store(_rows(DQ, b, h, offs_m, offs_d, stride_dqb, stride_dqh, stride_dqs, stride_dqd),
                     dq.to(DQ.dtype.element_ty), mask=m_ok[:, None])  # fmt: skip

    # One kernel, two launches (tuned apart): KEY_PASS=True over key blocks, KEY_PASS=False over query blocks.
    attn_bwd_dkdv_kernel = autotune(
        configs=_BWD_KV_CONFIGS, key=_TUNE_KEY, interpret_meta=_INTERPRET_META, prune_configs_by=_PRUNE
    )(_attn_bwd_kernel)
    attn_bwd_dq_kernel = autotune(
        configs=_BWD_Q_CONFIGS, key=_TUNE_KEY, interpret_meta=_INTERPRET_META, prune_configs_by=_PRUNE
    )(_attn_bwd_kernel)
