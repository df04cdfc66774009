"""attention kernel (forward and backward) vs ``F.scaled_dot_product_attention`` with a (B,1,1,S) bool mask.

CPU: Triton interpreter, tiny shapes (a few dozen programs per call). GPU-marked: S = 1357 / 4429, d = 64 / 128.
Tolerance: FlagAttention's rule (``triton_kernels/testing.py``).
"""

import importlib

import pytest
import torch
from deepgen_components.triton_kernels import attention, attention_reference, triton_available
from deepgen_components.triton_kernels.testing import compare_with_reference, max_abs_err

attn_mod = importlib.import_module("deepgen_components.triton_kernels.attention")

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
needs_triton = pytest.mark.skipif(not triton_available(), reason="triton is not installed")


def _kernel(q, k, v, mask=None, scale=None):
    return attention(q, k, v, mask, scale, backend="triton")


def _reference_exact_fp32(q, k, v, mask=None, scale=None):
    """SDPA, pinned to the math backend for fp32 inputs on a GPU (fused fp32 kernels may use TF32)."""
    if q.dtype == torch.float32 and q.is_cuda:
        from torch.nn.attention import SDPBackend, sdpa_kernel

        with sdpa_kernel([SDPBackend.MATH]):
            return attention_reference(q, k, v, mask, scale)
    return attention_reference(q, k, v, mask, scale)


def _qkv(b, h, s_q, s_k, d, dtype, layout="bhsd", std=1.0, seed=0, device=DEVICE):
    gen = torch.Generator().manual_seed(seed)

    def make(s):
        if layout == "bhsd":
            t = torch.randn(b, h, s, d, generator=gen)
        elif layout == "bshd":  # the usual projection output viewed as heads, then transposed
            t = torch.randn(b, s, h, d, generator=gen).transpose(1, 2)
        elif layout == "packed":  # q, k, v as slices of one packed (B, S, 3, H, d) buffer
            t = torch.randn(b, s, 3, h, d, generator=gen)[:, :, 1].transpose(1, 2)
        else:
            raise AssertionError(layout)
        return (t * std).to(dtype=dtype, device=device)

    return make(s_q), make(s_k), make(s_k)


def _mask(b, s, kind, seed=0, device=DEVICE):
    gen = torch.Generator().manual_seed(seed)
    if kind is None:
        return None
    m = torch.ones(b, s, dtype=torch.bool)
    if kind == "right_pad":  # sample 1 keeps about half its keys, the last sample exactly one
        m[1 % b, max(1, s // 2) :] = False
        m[-1, 1:] = False
    elif kind == "random":  # arbitrary holes, not just right padding; every sample keeps key 0
        m = torch.rand(b, s, generator=gen) > 0.4
        m[:, 0] = True
    elif kind == "one_token":
        m[:, 1:] = False
    else:
        raise AssertionError(kind)
    return m.to(device)


# ----------------------------------------------------------------------------------------------------------
# Kernel vs reference (interpreter on CPU)
# ------------------------------------------------------------------------------------------------------------


@needs_triton
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize(
    "b,h,s,d,mask,layout",
    [
        (1, 2, 1, 16, None, "bhsd"),
        (2, 2, 7, 32, "right_pad", "bhsd"),
        (2, 1, 33, 16, "random", "bshd"),
        (1, 1, 50, 64, None, "packed"),
        (3, 1, 17, 16, "one_token", "bshd"),
    ],
)
def test_forward_backward_match_reference(dtype, b, h, s, d, mask, layout):
    q, k, v = _qkv(b, h, s, s, d, dtype, layout)
    m = _mask(b, s, mask)
    compare_with_reference(_kernel, attention_reference, [q, k, v, m], grad=True, name=f"attention {layout}")


@needs_triton
@pytest.mark.parametrize("std", [1.0, 4.0])
def test_cross_attention_lengths_and_scale(std):
    """S_q != S_k, a custom scale and large logits (std 4) for the online softmax."""
    q, k, v = _qkv(2, 2, 19, 40, 32, torch.float16, std=std, seed=2)
    m = _mask(2, 40, "random", seed=3)
    compare_with_reference(
        lambda q, k, v, m: _kernel(q, k, v, m, 0.3),
        lambda q, k, v, m: attention_reference(q, k, v, m, 0.3),
        [q, k, v, m],
        grad=True,
        name="cross attention",
    )


@needs_triton
def test_fully_masked_sample_gives_zero_rows_and_zero_grads():
    q, k, v = _qkv(2, 2, 9, 9, 16, torch.float32, seed=5)
    m = torch.ones(2, 9, dtype=torch.bool, device=DEVICE)
    m[0] = False
    q, k, v = (t.requires_grad_() for t in (q, k, v))
    out = _kernel(q, k, v, m)
    assert torch.equal(out[0], torch.zeros_like(out[0]))
    if DEVICE == "cpu":  # torch >= 2.5's math SDPA returns 0 for such rows as well
        assert max_abs_err(out, attention_reference(q, k, v, m)) < 1e-5
    out.sum().backward()
    assert torch.equal(q.grad[0], torch.zeros_like(q.grad[0]))
    assert torch.equal(k.grad[0], torch.zeros_like(k.grad[0]))
    assert torch.isfinite(q.grad).all() and torch.isfinite(v.grad).all()


@needs_triton
def test_output_is_laid_out_like_q():
    q, k, v = _qkv(1, 2, 5, 5, 16, torch.float32, layout="bshd")
    out = _kernel(q, k, v)
    assert out.stride() == q.stride()  # (B, S, H, d) memory: the caller's transpose back is free
    assert max_abs_err(out, attention_reference(q, k, v)) < 1e-5


# ----------------------------------------------------------------------------------------------------------
# Dispatch and errors
# ------------------------------------------------------------------------------------------------------------


def test_auto_on_cpu_and_unsupported_head_dim_use_torch(monkeypatch):
    monkeypatch.setattr(attn_mod, "_attention_fwd_triton", lambda *a: pytest.fail("Triton path taken"))
    q, k, v = _qkv(1, 2, 6, 6, 16, torch.float32, device="cpu")
    assert torch.equal(attention(q, k, v), attention_reference(q, k, v))
    q8, k8, v8 = _qkv(1, 2, 6, 6, 8, torch.float32, device="cpu")
    assert torch.equal(attention(q8, k8, v8, backend="auto"), attention_reference(q8, k8, v8))
    if triton_available():
        with pytest.raises(ValueError, match="head dim 8 is not one of"):
            attention(q8, k8, v8, backend="triton")


def test_auto_sends_fp32_to_torch(monkeypatch):
    """fp32 is left to SDPA under "auto" (the kernel targets fp16/bf16); "triton" still runs the kernel."""
    seen = []
    real = attn_mod.resolve_backend
    monkeypatch.setattr(
        attn_mod, "resolve_backend", lambda backend, *a: seen.append(backend) or real(backend, *a)
    )
    q, k, v = _qkv(1, 1, 4, 4, 16, torch.float32, device="cpu")
    attention(q, k, v)
    attention(q.half(), k.half(), v.half())
    assert seen == ["torch", "auto"]


def test_torch_backend_matches_sdpa_with_mask():
    q, k, v = _qkv(2, 2, 6, 6, 16, torch.float32, device="cpu")
    m = _mask(2, 6, "right_pad", device="cpu")
    expected = torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=m[:, None, None, :])
    assert torch.equal(attention(q, k, v, m, backend="torch"), expected)


@pytest.mark.parametrize(
    "mutate,match",
    [
        (lambda q, k, v, m: (q[0], k, v, m), "q must have 4 dims"),
        (lambda q, k, v, m: (q, k[:, :1], v, m), "k must have the batch and head dims of q"),
        (lambda q, k, v, m: (q, k, v[:, :, :3], m), "v must have the sequence length of k"),
        (lambda q, k, v, m: (q, k[..., :8], v, m), "k must have the head dim of q"),
        (lambda q, k, v, m: (q, k.half(), v, m), "k must have the same dtype as q"),
        (lambda q, k, v, m: (q, k, v, m.float()), "key_padding_mask must be a bool tensor"),
        (lambda q, k, v, m: (q, k, v, m[:, :4]), "key_padding_mask must have shape"),
        (lambda q, k, v, m: (q.int(), k, v, m), "q must be float16, bfloat16 or float32"),
    ],
)
def test_bad_inputs_raise_value_error(mutate, match):
    q, k, v = _qkv(2, 2, 6, 6, 16, torch.float32, device="cpu")
    m = _mask(2, 6, "right_pad", device="cpu")
    with pytest.raises(ValueError, match=match):
        attention(*mutate(q, k, v, m))
    with pytest.raises(ValueError, match="backend must be one of"):
        attention(q, k, v, backend="flash")
    with pytest.raises(ValueError, match="scale must be a float"):
        attention(q, k, v, scale="0.1")


# ----------------------------------------------------------------------------------------------------------
# torch.compile / torch.export
# ------------------------------------------------------------------------------------------------------------


@needs_triton
@pytest.mark.slow
def test_torch_compile_fullgraph_forward_backward():
    q, k, v = _qkv(1, 2, 9, 9, 16, torch.float32, layout="bshd")
    m = _mask(1, 9, "random")
    leaves = [t.detach().requires_grad_() for t in (q, k, v)]
    compiled = torch.compile(lambda q, k, v, m: attention(q, k, v, m, backend="triton"), fullgraph=True)
    out = compiled(*leaves, m)
    out.backward(torch.ones_like(out))
    ref_leaves = [t.detach().requires_grad_() for t in (q, k, v)]
    ref = attention_reference(*ref_leaves, m)
    ref.backward(torch.ones_like(ref))
    assert max_abs_err(out, ref) < 1e-5
    for got, exp in zip(leaves, ref_leaves):
        assert max_abs_err(got.grad, exp.grad) < 1e-5


class _SelfAttention(torch.nn.Module):
    def __init__(self, backend, heads=2, dim=32):
        super().__init__()
        self.backend, self.heads = backend, heads
        self.qkv = torch.nn.Linear(dim, 3 * dim)

    def forward(self, x, mask):
        b, s, c = x.shape
        q, k, v = self.qkv(x).view(b, s, 3, self.heads, c // self.heads).permute(2, 0, 3, 1, 4)
        out = attention(q, k, v, mask, backend=self.backend)
        return out.transpose(1, 2).reshape(b, s, c)


def test_torch_export_auto_emits_sdpa():
    x = torch.randn(2, 5, 32)
    m = _mask(2, 5, "right_pad", device="cpu")
    model = _SelfAttention("auto")
    ep = torch.export.export(model, (x, m))
    targets = {str(n.target) for n in ep.graph.nodes if n.op == "call_function"}
    assert any("scaled_dot_product_attention" in t for t in targets)
    assert not any("deepgen" in t for t in targets)
    assert max_abs_err(ep.module()(x, m), model(x, m)) < 1e-6


@needs_triton
def test_torch_export_triton_backend_traces_the_custom_op():
    x = torch.randn(2, 5, 32, device=DEVICE)
    m = _mask(2, 5, "right_pad")
    model = _SelfAttention("triton").to(DEVICE)
    ep = torch.export.export(model, (x, m))
    targets = {str(n.target) for n in ep.graph.nodes if n.op == "call_function"}
    assert "deepgen.attention.default" in targets
    assert max_abs_err(ep.module()(x, m), model(x, m)) < 1e-5


# ----------------------------------------------------------------------------------------------------------
# GPU: real shapes with the Triton compiler
# ------------------------------------------------------------------------------------------------------------


@pytest.mark.gpu
@pytest.mark.parametrize(
    "s,d,dtype",
    [
        (1357, 64, torch.bfloat16),
        (4429, 64, torch.bfloat16),
        (1357, 128, torch.bfloat16),
        (4429, 128, torch.bfloat16),
        (4429, 64, torch.float16),
    ],
)
def test_gpu_forward_real_shapes(s, d, dtype):
    q, k, v = _qkv(2, 4, s, s, d, dtype, layout="bshd", device="cuda")
    m = _mask(2, s, "right_pad", device="cuda")
    m[-1, : s // 3] = True  # the last sample: a third of the keys real
    ref = _reference_exact_fp32
    compare_with_reference(_kernel, ref, [q, k, v, m], name=f"attention S={s} d={d} {dtype}")
    compare_with_reference(_kernel, ref, [q, k, v, None], name=f"attention S={s} d={d} no mask")


@pytest.mark.gpu
@pytest.mark.parametrize("d", [64, 128])
def test_gpu_backward_real_shape(d):
    q, k, v = _qkv(2, 4, 1357, 1357, d, torch.bfloat16, device="cuda")
    m = _mask(2, 1357, "random", device="cuda")
    compare_with_reference(
        _kernel, _reference_exact_fp32, [q, k, v, m], grad=True, name=f"attention bwd d={d}"
    )
