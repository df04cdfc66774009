"""stack_project kernel vs ``F.linear(torch.cat(...))``, plus the dispatch rules and the kernel switch.

On CPU the kernel runs in the Triton interpreter (conftest sets TRITON_INTERPRET=1), so the shapes are tiny; the
GPU-marked tests use the real shapes. Tolerance: FlagAttention's rule, see ``triton_kernels/testing.py``.
"""

import importlib

import deepgen_components.triton_kernels as tk
import pytest
import torch
from deepgen_components.triton_kernels import (
    _common,
    stack_project,
    stack_project_reference,
    triton_available,
)
from deepgen_components.triton_kernels.testing import compare_with_reference, max_abs_err

# The package re-exports the function under the module's name, so fetch the module itself.
sp_mod = importlib.import_module("deepgen_components.triton_kernels.stack_project")

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
needs_triton = pytest.mark.skipif(not triton_available(), reason="triton is not installed")


def _kernel(hidden_states, weight, bias=None):
    return stack_project(hidden_states, weight, bias, backend="triton")


def _sources(b, seq, k, d, dtype, layout="contiguous", seed=0, device=DEVICE):
    gen = torch.Generator().manual_seed(seed)
    if layout == "contiguous":
        xs = [torch.randn(b, seq, d, generator=gen) for _ in range(k)]
    elif layout == "strided":  # every source a (B, L, D) view with gaps: last dim stride 2
        xs = [torch.randn(b, seq, 2 * d, generator=gen)[..., ::2] for _ in range(k)]
    elif layout == "transposed":  # (L, B, D) memory viewed as (B, L, D)
        xs = [torch.randn(seq, b, d, generator=gen).transpose(0, 1) for _ in range(k)]
    elif layout == "mixed":  # sources with different strides (the launcher copies them contiguous)
        xs = [torch.randn(b, seq, d, generator=gen) if i % 2 else torch.randn(seq, b, d, generator=gen).transpose(0, 1)
              for i in range(k)]  # fmt: skip
    else:
        raise AssertionError(layout)
    return [x.to(device=device, dtype=dtype) for x in xs]


def _params(n, k, d, dtype, bias=True, seed=1, device=DEVICE):
    gen = torch.Generator().manual_seed(seed)
    w = (torch.randn(n, k * d, generator=gen) / (k * d) ** 0.5).to(device=device, dtype=dtype)
    b = torch.randn(n, generator=gen).to(device=device, dtype=dtype) if bias else None
    return w, b


# ----------------------------------------------------------------------------------------------------------
# Kernel vs reference (interpreter on CPU)
# ------------------------------------------------------------------------------------------------------------


@needs_triton
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize(
    "b,seq,k,d,n,bias,layout",
    [
        (2, 7, 3, 40, 33, True, "contiguous"),  # D, N not multiples of the blocks
        (1, 1, 6, 48, 20, False, "contiguous"),  # a single row, K = 6 as in DeepGen
        (2, 5, 2, 16, 64, True, "strided"),
        (2, 9, 4, 32, 24, True, "transposed"),
        (1, 6, 8, 16, 16, False, "mixed"),  # K = 8, the most the kernel takes
        (1, 4, 1, 24, 8, True, "contiguous"),  # K = 1 degenerates to a plain linear
    ],
)
def test_forward_backward_match_reference(dtype, b, seq, k, d, n, bias, layout):
    xs = _sources(b, seq, k, d, dtype, layout)
    w, bb = _params(n, k, d, dtype, bias)
    args = [xs, w] + ([bb] if bias else [])
    errors = compare_with_reference(_kernel, stack_project_reference, args, grad=True, name="stack_project")
    assert set(errors) >= {"out", "grad0", f"grad{k}"}


@needs_triton
@pytest.mark.parametrize("split", [2, 3])
def test_split_k_matches_reference(split):
    """The split-K path (partial fp32 GEMMs over slices of D, summed afterwards) used for small B·L."""
    xs = _sources(1, 5, 3, 80, torch.float16, seed=3)
    w, bb = _params(40, 3, 80, torch.float16, seed=4)
    out = sp_mod._stack_project_triton(xs, w, bb, split=split)
    ref32 = stack_project_reference([x.float() for x in xs], w.float(), bb.float())
    lowp = stack_project_reference(xs, w, bb)
    assert out.dtype == torch.float16
    assert max_abs_err(out, ref32) <= 2 * max_abs_err(lowp, ref32) + 1e-5 * ref32.abs().max().item()


@needs_triton
def test_gradients_only_for_inputs_that_need_them():
    xs = _sources(1, 3, 2, 16, torch.float32)
    w, bb = _params(8, 2, 16, torch.float32)
    xs[1].requires_grad_(True)
    w.requires_grad_(True)
    out = stack_project(xs, w, bb, backend="triton")
    out.sum().backward()
    assert xs[0].grad is None and bb.grad is None
    ref = torch.ones(1, 3, 8) @ w.detach()[:, 16:]
    assert max_abs_err(xs[1].grad, ref) < 1e-5
    assert w.grad.shape == w.shape


# ----------------------------------------------------------------------------------------------------------
# Dispatch, errors, switch
# ------------------------------------------------------------------------------------------------------------


def test_auto_on_cpu_uses_the_torch_reference(monkeypatch):
    calls = []
    monkeypatch.setattr(sp_mod, "_stack_project_triton", lambda *a, **k: calls.append(1) or _kernel_never())
    xs = _sources(2, 3, 3, 8, torch.float32, device="cpu")
    w, bb = _params(5, 3, 8, torch.float32, device="cpu")
    out = stack_project(xs, w, bb)  # backend="auto"
    assert calls == []
    assert torch.equal(out, stack_project_reference(xs, w, bb))
    if triton_available():  # the patched launcher *is* what backend="triton" would run
        with pytest.raises(RuntimeError, match="never"):
            stack_project(xs, w, bb, backend="triton")
        assert calls == [1]


def _kernel_never():
    raise RuntimeError("the Triton launcher must never run here")


def test_resolve_backend_rules(monkeypatch):
    cuda, cpu = torch.device("cuda"), torch.device("cpu")
    assert _common.resolve_backend("torch", cuda, "op") == "torch"
    assert _common.resolve_backend("auto", cpu, "op") == "torch"
    assert _common.resolve_backend("auto", cuda, "op", "head dim 8 unsupported") == "torch"
    assert _common.resolve_backend("auto", cuda, "op") == ("triton" if triton_available() else "torch")
    with pytest.raises(ValueError, match="backend must be one of"):
        _common.resolve_backend("cuda", cpu, "op")
    monkeypatch.setattr(_common, "HAS_TRITON", False)
    assert _common.resolve_backend("auto", cuda, "op") == "torch"
    with pytest.raises(RuntimeError, match="triton is not importable"):
        _common.resolve_backend("triton", cuda, "op")
    monkeypatch.setattr(_common, "HAS_TRITON", True)
    monkeypatch.setattr(_common, "INTERPRET", False)
    with pytest.raises(RuntimeError, match="TRITON_INTERPRET"):
        _common.resolve_backend("triton", cpu, "op")
    with pytest.raises(ValueError, match="head dim"):
        _common.resolve_backend("triton", cuda, "op", "head dim 8 unsupported")


def test_auto_picks_torch_while_exporting():
    seen = []

    class Probe(torch.nn.Module):
        def forward(self, x):
            seen.append(_common.resolve_backend("auto", torch.device("cuda"), "probe"))
            return x + 1

    torch.export.export(Probe(), (torch.zeros(2),))
    assert seen and set(seen) == {"torch"}


def test_triton_backend_without_interpreter_raises_clearly(monkeypatch):
    monkeypatch.setattr(_common, "INTERPRET", False)
    xs = _sources(1, 2, 2, 8, torch.float32, device="cpu")
    w, _ = _params(4, 2, 8, torch.float32, device="cpu")
    with pytest.raises(RuntimeError, match="stack_project: backend='triton'"):
        stack_project(xs, w, backend="triton")
    assert torch.equal(stack_project(xs, w), stack_project_reference(xs, w))


@pytest.mark.parametrize(
    "mutate,match",
    [
        (lambda xs, w, b: (xs, w[:, :-8], b), "weight must have K·D"),
        (lambda xs, w, b: (xs[:2], w, b), "weight must have K·D"),
        (lambda xs, w, b: ([xs[0], xs[1][:, :2], xs[2]], w, b), r"hidden_states\[1\] must have the shape"),
        (lambda xs, w, b: ([xs[0], xs[1].double(), xs[2]], w, b), r"hidden_states\[1\] must be float16"),
        (
            lambda xs, w, b: ([xs[0], xs[1].half(), xs[2]], w, b),
            r"hidden_states\[1\] must have the same dtype",
        ),
        (lambda xs, w, b: (xs, w.half(), b), "weight must have the same dtype"),
        (lambda xs, w, b: (xs, w, b[:-1]), "bias must have shape"),
        (lambda xs, w, b: (xs, w, b[None]), "bias must have 1 dims"),
        (lambda xs, w, b: ([x[0] for x in xs], w, b), r"hidden_states\[0\] must have 3 dims"),
        (lambda xs, w, b: (torch.stack(xs), w, b), "hidden_states must be a list or tuple"),
        (lambda xs, w, b: ([], w, b), "at least one tensor"),
    ],
)
def test_bad_inputs_raise_value_error(mutate, match):
    xs = _sources(2, 3, 3, 8, torch.float32, device="cpu")
    w, bb = _params(5, 3, 8, torch.float32, device="cpu")
    args = mutate(xs, w, bb)
    with pytest.raises(ValueError, match=match):
        stack_project(*args)


def test_unknown_backend_and_too_many_sources():
    xs = _sources(1, 2, 9, 4, torch.float32, device="cpu")
    w, _ = _params(3, 9, 4, torch.float32, device="cpu")
    with pytest.raises(ValueError, match="backend must be one of"):
        stack_project(xs, w, backend="cuda")
    assert torch.equal(stack_project(xs, w), stack_project_reference(xs, w))  # auto: torch for K = 9
    if triton_available():
        with pytest.raises(ValueError, match="at most 8 hidden states"):
            stack_project(xs, w, backend="triton")


def test_auto_sends_fp32_to_torch(monkeypatch):
    seen = []
    real = sp_mod.resolve_backend
    monkeypatch.setattr(
        sp_mod, "resolve_backend", lambda backend, *a: seen.append(backend) or real(backend, *a)
    )
    xs = _sources(1, 2, 2, 8, torch.float32, device="cpu")
    w, _ = _params(4, 2, 8, torch.float32, device="cpu")
    stack_project(xs, w)
    stack_project([x.half() for x in xs], w.half())
    assert seen == ["torch", "auto"]


def test_kernel_switch():
    assert tk.kernels_enabled() is False  # off by default (DEEPGEN_TRITON_KERNELS unset in the tests)
    with tk.use_kernels():
        assert tk.kernels_enabled() is True
        with tk.use_kernels(False):
            assert tk.kernels_enabled() is False
        assert tk.kernels_enabled() is True
    assert tk.kernels_enabled() is False
    with pytest.raises(KeyError):
        with tk.use_kernels(True):
            raise KeyError("restored even on error")
    assert tk.kernels_enabled() is False
    assert tk.set_kernels_enabled(True) is False
    assert tk.set_kernels_enabled(False) is True


def test_public_api():
    for name in tk.__all__:
        assert hasattr(tk, name), name
    assert tk.triton_available() == _common.HAS_TRITON


# ----------------------------------------------------------------------------------------------------------
# torch.compile / torch.export
# ------------------------------------------------------------------------------------------------------------


@needs_triton
@pytest.mark.slow
def test_torch_compile_fullgraph_forward_backward():
    xs = _sources(2, 5, 3, 16, torch.float32)
    w, bb = _params(24, 3, 16, torch.float32)
    leaves = [t.detach().requires_grad_() for t in (*xs, w, bb)]
    compiled = torch.compile(lambda a, b, c, w, bias: stack_project([a, b, c], w, bias, backend="triton"),
                             fullgraph=True)  # fmt: skip
    out = compiled(*leaves)
    out.backward(torch.ones_like(out))
    ref_leaves = [t.detach().requires_grad_() for t in (*xs, w, bb)]
    ref = stack_project_reference(ref_leaves[:3], ref_leaves[3], ref_leaves[4])
    ref.backward(torch.ones_like(ref))
    assert max_abs_err(out, ref) < 1e-4
    for got, exp in zip(leaves, ref_leaves):
        assert max_abs_err(got.grad, exp.grad) < 1e-4


class _Bridge(torch.nn.Module):
    def __init__(self, backend):
        super().__init__()
        self.backend = backend
        self.proj = torch.nn.Linear(3 * 8, 6)

    def forward(self, a, b, c):
        return stack_project([a, b, c], self.proj.weight, self.proj.bias, backend=self.backend)


def test_torch_export_auto_emits_plain_torch_ops():
    xs = _sources(1, 4, 3, 8, torch.float32, device="cpu")
    model = _Bridge("auto")
    ep = torch.export.export(model, tuple(xs))
    targets = {str(n.target) for n in ep.graph.nodes if n.op == "call_function"}
    assert "aten.cat.default" in targets and not any("deepgen" in t for t in targets)
    assert max_abs_err(ep.module()(*xs), model(*xs)) < 1e-6


@needs_triton
def test_torch_export_triton_backend_traces_the_custom_op():
    xs = _sources(1, 4, 3, 8, torch.float32)
    model = _Bridge("triton").to(DEVICE)
    ep = torch.export.export(model, tuple(xs))
    targets = [str(n.target) for n in ep.graph.nodes if n.op == "call_function"]
    assert targets == ["deepgen.stack_project.default"]
    out = ep.module()(*xs)
    assert out.shape == (1, 4, 6)
    assert max_abs_err(out, model(*xs)) < 1e-5


# ----------------------------------------------------------------------------------------------------------
# GPU: real shapes with the Triton compiler
# ------------------------------------------------------------------------------------------------------------


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_gpu_deepgen_shape(dtype):
    b, seq, k, d, n = 2, 430, 6, 2048, 2048
    xs = _sources(b, seq, k, d, dtype, device="cuda")
    w, bb = _params(n, k, d, dtype, device="cuda")
    compare_with_reference(
        _kernel, stack_project_reference, [xs, w, bb], grad=True, name=f"stack_project {dtype}"
    )


@pytest.mark.gpu
def test_gpu_small_batch_uses_split_k_correctly():
    xs = _sources(1, 97, 6, 2048, torch.bfloat16, device="cuda")
    w, bb = _params(2048, 6, 2048, torch.bfloat16, device="cuda")
    assert sp_mod._choose_split(97, 2048, 2048, torch.device("cuda")) > 1
    compare_with_reference(_kernel, stack_project_reference, [xs, w, bb], name="stack_project split-K")
