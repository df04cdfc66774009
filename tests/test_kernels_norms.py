"""rms_norm / layer_norm_modulate kernels (forward and backward) vs their torch references.

The rms_norm reference is checked against diffusers' own ``RMSNorm`` (when diffusers is installed), so the kernel
is held to diffusers' dtype handling. CPU: Triton interpreter, tiny shapes. Tolerance: FlagAttention's rule.
"""

import pytest
import torch
import torch.nn.functional as F
from deepgen_components.triton_kernels import (
    layer_norm_modulate,
    layer_norm_modulate_reference,
    rms_norm,
    rms_norm_reference,
    triton_available,
)
from deepgen_components.triton_kernels.testing import compare_with_reference, max_abs_err

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
# bf16 only on a GPU: the interpreter converts fp32 -> bf16 by truncation (round toward zero, up to 1 ulp) where
# the GPU rounds to nearest even, so interpreter bf16 outputs are up to 2x torch's rounding error by construction.
DTYPES = [torch.float32, torch.float16] + ([torch.bfloat16] if DEVICE == "cuda" else [])
needs_triton = pytest.mark.skipif(not triton_available(), reason="triton is not installed")


def _rms_kernel(x, weight, eps=1e-6):
    return rms_norm(x, weight, eps, backend="triton")


def _ln_kernel(x, shift, scale, eps=1e-6):
    return layer_norm_modulate(x, shift, scale, eps, backend="triton")


def _randn(*shape, dtype=torch.float32, seed=0, std=1.0, mean=0.0, device=DEVICE):
    gen = torch.Generator().manual_seed(seed)
    return (torch.randn(*shape, generator=gen) * std + mean).to(device=device, dtype=dtype)


# ----------------------------------------------------------------------------------------------------------
# rms_norm
# ------------------------------------------------------------------------------------------------------------


def _rms_input(shape, layout, dtype, seed=0, device=DEVICE):
    if layout == "contiguous":
        return _randn(*shape, dtype=dtype, seed=seed, std=2.0, device=device)
    if layout == "heads":  # qk-norm: (B, S, H, d) projection viewed as (B, H, S, d)
        b, h, s, d = shape
        return _randn(b, s, h, d, dtype=dtype, seed=seed, std=2.0, device=device).transpose(1, 2)
    if layout == "gaps":  # rows with a stride larger than their width
        return _randn(*shape[:-1], 2 * shape[-1], dtype=dtype, seed=seed, device=device)[..., : shape[-1]]
    if layout == "5d":  # more than three leading dims: flattened by the launcher
        return _randn(*shape, dtype=dtype, seed=seed, device=device)
    raise AssertionError(layout)


@needs_triton
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize(
    "shape,layout,affine",
    [
        ((7, 48), "contiguous", True),
        ((2, 5, 100), "contiguous", False),
        ((2, 3, 7, 64), "heads", True),
        ((3, 5, 100), "gaps", True),
        ((2, 2, 2, 3, 16), "5d", True),
        ((1, 1), "contiguous", True),
    ],
)
def test_rms_norm_forward_backward(dtype, shape, layout, affine):
    x = _rms_input(shape, layout, dtype)
    w = _randn(shape[-1], dtype=dtype, seed=1, std=0.2, mean=1.0) if affine else None
    compare_with_reference(
        _rms_kernel, rms_norm_reference, [x, w, 1e-6], grad=True, name=f"rms_norm {layout}"
    )
    out = _rms_kernel(x, w)
    assert out.dtype == dtype and out.shape == x.shape
    if layout == "heads":
        assert out.stride() == x.stride()  # written in the input's layout, no copy


@needs_triton
@pytest.mark.parametrize("x_dtype,w_dtype", [(torch.float16, torch.float32), (torch.float32, torch.float16)])
def test_rms_norm_mixed_dtypes_follow_diffusers(x_dtype, w_dtype):
    x = _randn(4, 40, dtype=x_dtype, seed=2)
    w = _randn(40, dtype=w_dtype, seed=3, std=0.2, mean=1.0)
    out = _rms_kernel(x, w)
    ref = rms_norm_reference(x, w, 1e-6)
    assert out.dtype == ref.dtype == (torch.float32 if w_dtype == torch.float32 else w_dtype)
    ref32 = rms_norm_reference(x.float(), w.float(), 1e-6)
    assert max_abs_err(out, ref32) <= 2 * max_abs_err(ref, ref32) + 1e-5 * ref32.abs().max().item()


def test_rms_norm_reference_is_diffusers_rmsnorm():
    normalization = pytest.importorskip("diffusers.models.normalization")
    for dtype in (torch.float32, torch.bfloat16):
        for affine in (True, False):
            mod = normalization.RMSNorm(24, eps=1e-6, elementwise_affine=affine).to(dtype)
            if affine:
                with torch.no_grad():
                    mod.weight.copy_(_randn(24, seed=4, std=0.3, mean=1.0, device="cpu"))
            x = _randn(2, 3, 5, 24, dtype=dtype, seed=5, device="cpu")
            expected = mod(x)
            got = rms_norm_reference(x, mod.weight if affine else None, 1e-6)
            assert got.dtype == expected.dtype
            assert torch.equal(got, expected)


# ----------------------------------------------------------------------------------------------------------
# layer_norm_modulate
# ------------------------------------------------------------------------------------------------------------


def _ln_inputs(b, s, c, dtype, layout="contiguous", seed=0, device=DEVICE):
    if layout == "contiguous":
        x = _randn(b, s, c, dtype=dtype, seed=seed, std=3.0, mean=0.5, device=device)
    else:  # (B, C, S) memory viewed as (B, S, C): strided rows
        x = _randn(b, c, s, dtype=dtype, seed=seed, std=3.0, mean=0.5, device=device).transpose(1, 2)
    # shift / scale as chunks of one adaLN embedding (B, 6C), the way SD3 produces them: strided rows.
    emb = _randn(b, 6 * c, dtype=dtype, seed=seed + 1, std=0.5, device=device)
    shift, scale = emb[:, :c], emb[:, c : 2 * c]
    return x, shift, scale


@needs_triton
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize(
    "b,s,c,layout",
    [
        (2, 33, 100, "contiguous"),
        (1, 1, 48, "contiguous"),
        (2, 7, 64, "transposed"),
        (3, 50, 24, "contiguous"),
    ],
)
def test_layer_norm_modulate_forward_backward(dtype, b, s, c, layout):
    x, shift, scale = _ln_inputs(b, s, c, dtype, layout)
    compare_with_reference(_ln_kernel, layer_norm_modulate_reference, [x, shift, scale, 1e-6], grad=True,
                           name=f"layer_norm_modulate {layout}")  # fmt: skip
    out = _ln_kernel(x, shift, scale)
    assert out.dtype == dtype and out.shape == x.shape


def test_layer_norm_modulate_reference_is_sd3_adaln():
    x, shift, scale = _ln_inputs(2, 6, 32, torch.float32, device="cpu")
    norm = torch.nn.LayerNorm(32, elementwise_affine=False, eps=1e-6)
    expected = norm(x) * (1 + scale[:, None]) + shift[:, None]
    assert torch.equal(layer_norm_modulate_reference(x, shift, scale, 1e-6), expected)


# ----------------------------------------------------------------------------------------------------------
# Dispatch and errors
# ------------------------------------------------------------------------------------------------------------


def test_auto_on_cpu_uses_torch():
    x = _randn(2, 3, 16, device="cpu")
    w = _randn(16, seed=1, device="cpu")
    assert torch.equal(rms_norm(x, w, 1e-6), rms_norm_reference(x, w, 1e-6))
    _, shift, scale = _ln_inputs(2, 3, 16, torch.float32, device="cpu")
    assert torch.equal(
        layer_norm_modulate(x, shift, scale, 1e-6), layer_norm_modulate_reference(x, shift, scale, 1e-6)
    )


@pytest.mark.parametrize(
    "call,match",
    [
        (lambda x, w, sh, sc: rms_norm(x, w[:-1], 1e-6), r"weight must have shape \(16,\)"),
        (lambda x, w, sh, sc: rms_norm(x, w[None], 1e-6), "weight must have 1 dims"),
        (lambda x, w, sh, sc: rms_norm(x.long(), w, 1e-6), "x must be float16"),
        (lambda x, w, sh, sc: rms_norm(x, w, -1.0), "eps must be a non-negative float"),
        (lambda x, w, sh, sc: rms_norm(x, w, 1e-6, backend="cuda"), "backend must be one of"),
        (lambda x, w, sh, sc: layer_norm_modulate(x[0], sh, sc, 1e-6), "x must have 3 dims"),
        (lambda x, w, sh, sc: layer_norm_modulate(x, sh[:1], sc, 1e-6), r"shift must have shape \(B, C\)"),
        (lambda x, w, sh, sc: layer_norm_modulate(x, sh, sc[:, :8], 1e-6), r"scale must have shape \(B, C\)"),
        (lambda x, w, sh, sc: layer_norm_modulate(x, sh, sc.half(), 1e-6), "scale must have the same dtype"),
        (lambda x, w, sh, sc: layer_norm_modulate(x, sh, sc, None), "eps must be a non-negative float"),
        (lambda x, w, sh, sc: layer_norm_modulate(x, sh, sc, 1e-6, backend=None), "backend must be one of"),
    ],
)
def test_bad_inputs_raise_value_error(call, match):
    x, shift, scale = _ln_inputs(2, 3, 16, torch.float32, device="cpu")
    w = _randn(16, seed=1, device="cpu")
    with pytest.raises(ValueError, match=match):
        call(x, w, shift, scale)


@needs_triton
def test_too_wide_rows_fall_back_under_auto_and_raise_under_triton():
    x = _randn(1, 16385, device="cpu")
    assert torch.equal(rms_norm(x, None, 1e-6), rms_norm_reference(x, None, 1e-6))
    with pytest.raises(ValueError, match="wider than 16384"):
        rms_norm(x, None, 1e-6, backend="triton")


# ----------------------------------------------------------------------------------------------------------
# torch.compile / torch.export
# ------------------------------------------------------------------------------------------------------------


@needs_triton
@pytest.mark.slow
def test_torch_compile_fullgraph_forward_backward():
    x = _rms_input((2, 2, 5, 16), "heads", torch.float32)
    w = _randn(16, seed=1, std=0.2, mean=1.0)
    xl, shift, scale = _ln_inputs(2, 5, 32, torch.float32)

    def both(x, w, xl, emb):
        shift, scale = emb.chunk(2, dim=1)
        return rms_norm(x, w, 1e-6, backend="triton"), layer_norm_modulate(
            xl, shift, scale, 1e-6, backend="triton"
        )

    emb = torch.cat([shift, scale], dim=1)
    leaves = [t.detach().requires_grad_() for t in (x, w, xl, emb)]
    ref_leaves = [t.detach().requires_grad_() for t in (x, w, xl, emb)]
    out = torch.compile(both, fullgraph=True)(*leaves)
    sh, sc = ref_leaves[3].chunk(2, dim=1)
    ref = (rms_norm_reference(ref_leaves[0], ref_leaves[1], 1e-6),
           layer_norm_modulate_reference(ref_leaves[2], sh, sc, 1e-6))  # fmt: skip
    (out[0].sum() + out[1].square().sum()).backward()
    (ref[0].sum() + ref[1].square().sum()).backward()
    for got, exp in zip(out, ref):
        assert max_abs_err(got, exp) < 1e-5
    for got, exp in zip(leaves, ref_leaves):
        assert max_abs_err(got.grad, exp.grad) < 1e-4


class _AdaLNBlock(torch.nn.Module):
    def __init__(self, backend, c=32, head_dim=16):
        super().__init__()
        self.backend, self.head_dim = backend, head_dim
        self.norm_q = torch.nn.Parameter(torch.ones(head_dim))
        self.to_q = torch.nn.Linear(c, c)

    def forward(self, x, emb):
        shift, scale = emb.chunk(2, dim=1)
        h = layer_norm_modulate(x, shift, scale, 1e-6, backend=self.backend)
        b, s, c = h.shape
        q = self.to_q(h).view(b, s, -1, self.head_dim).transpose(1, 2)
        return rms_norm(q, self.norm_q, 1e-6, backend=self.backend)


def test_torch_export_auto_emits_plain_torch_ops():
    x, emb = torch.randn(2, 5, 32), torch.randn(2, 64)
    model = _AdaLNBlock("auto")
    ep = torch.export.export(model, (x, emb))
    targets = {str(n.target) for n in ep.graph.nodes if n.op == "call_function"}
    assert "aten.layer_norm.default" in targets and "aten.rsqrt.default" in targets
    assert not any("deepgen" in t for t in targets)
    assert max_abs_err(ep.module()(x, emb), model(x, emb)) < 1e-6


@needs_triton
def test_torch_export_triton_backend_traces_the_custom_ops():
    x, emb = torch.randn(2, 5, 32, device=DEVICE), torch.randn(2, 64, device=DEVICE)
    model = _AdaLNBlock("triton").to(DEVICE)
    ep = torch.export.export(model, (x, emb))
    targets = {str(n.target) for n in ep.graph.nodes if n.op == "call_function"}
    assert {"deepgen.layer_norm_modulate.default", "deepgen.rms_norm.default"} <= targets
    assert max_abs_err(ep.module()(x, emb), model(x, emb)) < 1e-5


# ----------------------------------------------------------------------------------------------------------
# GPU: real shapes with the Triton compiler
# ------------------------------------------------------------------------------------------------------------


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_gpu_layer_norm_modulate_dit_shape(dtype):
    x, shift, scale = _ln_inputs(2, 4096, 1536, dtype, device="cuda")
    compare_with_reference(_ln_kernel, layer_norm_modulate_reference, [x, shift, scale, 1e-6], grad=True,
                           name=f"layer_norm_modulate {dtype}")  # fmt: skip


@pytest.mark.gpu
@pytest.mark.parametrize("shape", [(2, 24, 4096, 64), (2, 24, 333, 64), (2, 32, 430, 64)])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_gpu_rms_norm_qk_shapes(shape, dtype):
    x = _rms_input(shape, "heads", dtype, device="cuda")
    w = _randn(shape[-1], dtype=dtype, seed=1, std=0.2, mean=1.0, device="cuda")
    compare_with_reference(
        _rms_kernel, rms_norm_reference, [x, w, 1e-6], grad=True, name=f"rms_norm {shape} {dtype}"
    )


@pytest.mark.gpu
def test_gpu_rms_norm_wide_rows():
    x = _randn(2, 430, 2048, dtype=torch.bfloat16, device="cuda")
    compare_with_reference(
        _rms_kernel, rms_norm_reference, [x, None, 1e-6], grad=True, name="rms_norm 2048 no affine"
    )


def test_reference_matches_functional_layer_norm_in_fp32():
    x, shift, scale = _ln_inputs(2, 4, 16, torch.float32, device="cpu")
    manual = (x - x.mean(-1, keepdim=True)) / torch.sqrt(x.var(-1, unbiased=False, keepdim=True) + 1e-6)
    expected = F.layer_norm(x, (16,), eps=1e-6) * (1 + scale[:, None]) + shift[:, None]
    assert max_abs_err(manual * (1 + scale[:, None]) + shift[:, None], expected) < 1e-5
