"""Helpers for testing kernels against their torch references (used by the tests and ``benchmarks/``).

The tolerance rule is FlagAttention's: compute the reference in fp32 from the same (low-precision) inputs
(``ref32``), run the torch reference at the low precision too (``ref_lowp``), and require

    max|out − ref32|  ≤  2 · max|ref_lowp − ref32|  +  eps,   eps = 1e-5 · max(1, max|ref32|).

So a kernel may be at most twice as far from the exact answer as torch itself is at that precision. ``eps`` is
the floor for the cases where torch's low-precision error is (near) zero, above all fp32 inputs, where
``ref_lowp`` *is* ``ref32`` and only reduction-order differences remain: 1e-5 relative to the magnitude of the
values is ~100 fp32 ulps, far below any fp16/bf16 rounding step (~1e-3 / 8e-3 relative), so it cannot hide a
real low-precision error.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch

__all__ = ["EPS_REL", "assert_flag_close", "compare_with_reference", "flag_tolerance", "max_abs_err"]

EPS_REL = 1e-5


def max_abs_err(a: torch.Tensor, b: torch.Tensor) -> float:
    """``max|a − b|`` computed in fp64 (0 for empty tensors)."""
    if a.shape != b.shape:
        raise ValueError(f"shape mismatch: {tuple(a.shape)} vs {tuple(b.shape)}")
    if a.numel() == 0:
        return 0.0
    return (a.detach().double() - b.detach().double()).abs().max().item()


def flag_tolerance(ref32: torch.Tensor, ref_lowp: torch.Tensor, eps_rel: float = EPS_REL) -> float:
    """The allowed ``max|out − ref32|``: ``2·max|ref_lowp − ref32| + eps_rel·max(1, max|ref32|)``."""
    scale = max(1.0, ref32.detach().abs().max().item()) if ref32.numel() else 1.0
    return 2.0 * max_abs_err(ref_lowp, ref32) + eps_rel * scale


def assert_flag_close(
    out: torch.Tensor,
    ref32: torch.Tensor,
    ref_lowp: torch.Tensor,
    name: str = "output",
    eps_rel: float = EPS_REL,
) -> None:
    """Assert the FlagAttention rule for ``out`` (any dtype) against ``ref32`` / ``ref_lowp``; NaNs fail."""
    if out.shape != ref32.shape:
        raise AssertionError(f"{name}: shape {tuple(out.shape)} != reference shape {tuple(ref32.shape)}")
    if not bool(torch.isfinite(out).all()):
        raise AssertionError(f"{name}: non-finite values in the kernel output")
    err = max_abs_err(out, ref32)
    tol = flag_tolerance(ref32, ref_lowp, eps_rel)
    if not err <= tol:
        raise AssertionError(
            f"{name}: max|out - ref32| = {err:.3e} > 2*max|torch_lowp - ref32| + eps = {tol:.3e} "
            f"(torch_lowp error {max_abs_err(ref_lowp, ref32):.3e})"
        )


def _map_floats(args, fn):
    """Apply ``fn`` to every floating-point tensor in ``args`` (one level of lists/tuples included)."""

    def one(a):
        if isinstance(a, torch.Tensor) and a.is_floating_point():
            return fn(a)
        if isinstance(a, (list, tuple)):
            return type(a)(one(x) for x in a)
        return a

    return [one(a) for a in args]


def _float_leaves(args) -> list[torch.Tensor]:
    leaves = []
    for a in args:
        items = a if isinstance(a, (list, tuple)) else [a]
        leaves += [t for t in items if isinstance(t, torch.Tensor) and t.is_floating_point()]
    return leaves


def compare_with_reference(
    kernel_fn: Callable,
    reference_fn: Callable,
    args: Sequence,
    *,
    grad: bool = False,
    name: str = "op",
    eps_rel: float = EPS_REL,
    seed: int = 0,
) -> dict[str, float]:
    """Check ``kernel_fn(*args)`` against ``reference_fn`` with :func:`assert_flag_close`.

    ``reference_fn`` runs twice: on the inputs as given (torch at the low precision) and on fp32 copies (ref32).
    Float tensors keep their strides in the kernel run (``detach()`` aliases), so strided inputs stay strided.
    With ``grad=True`` the gradients of every float input under a fixed random output gradient are checked the
    same way. Returns the measured errors (``{"out": ..., "grad0": ...}``) for reporting.
    """
    kernel_args = _map_floats(args, lambda t: t.detach().requires_grad_(grad))
    lowp_args = _map_floats(args, lambda t: t.detach().requires_grad_(grad))
    ref_args = _map_floats(args, lambda t: t.detach().float().requires_grad_(grad))
    out = kernel_fn(*kernel_args)
    lowp = reference_fn(*lowp_args)
    ref32 = reference_fn(*ref_args)
    errors = {"out": max_abs_err(out, ref32), "out_torch_lowp": max_abs_err(lowp, ref32)}
    assert_flag_close(out, ref32, lowp, f"{name} output", eps_rel)
    if not grad:
        return errors
    gen = torch.Generator(device=out.device).manual_seed(seed)
    # One output gradient, in the kernel's output dtype (ref32 sees the same values in fp32).
    grad_out = torch.randn(out.shape, generator=gen, device=out.device, dtype=torch.float32).to(out.dtype)
    leaves = [_float_leaves(a) for a in (kernel_args, lowp_args, ref_args)]
    grads = [
        torch.autograd.grad(o, lv, grad_out.to(o.dtype), allow_unused=True)
        for o, lv in zip((out, lowp, ref32), leaves)
    ]
    for i, (g_k, g_l, g_r) in enumerate(zip(*grads)):
        if g_r is None:
            continue
        if g_k is None:
            raise AssertionError(f"{name}: no gradient for float input {i}")
        errors[f"grad{i}"] = max_abs_err(g_k, g_r)
        assert_flag_close(g_k, g_r, g_l, f"{name} grad of float input {i}", eps_rel)
    return errors
