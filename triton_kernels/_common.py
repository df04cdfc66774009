"""Shared helpers of the kernels package: Triton availability, interpreter detection, backend resolution,
the global kernel switch, launch helpers and argument checks.

Nothing here imports other modules of the project (dependency rule of ``deepgen_components.triton_kernels``).
"""

from __future__ import annotations

import contextlib
import functools
import os
from collections.abc import Iterator, Sequence

import torch

try:  # Triton is optional: everything falls back to the torch references without it.
    import triton
    import triton.language as tl

    HAS_TRITON = True
    _TRITON_IMPORT_ERROR = ""
except Exception as exc:  # ImportError, or a broken install that fails while importing
    triton = None
    tl = None
    HAS_TRITON = False
    _TRITON_IMPORT_ERROR = f"{type(exc).__name__}: {exc}"

#: True when Triton runs kernels in its CPU interpreter. Triton reads ``TRITON_INTERPRET`` when ``@triton.jit``
#: decorates a kernel, i.e. when the op modules are imported, so this is decided once, at import.
INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"

BACKENDS = ("auto", "triton", "torch")

# ``torch.compiler.is_exporting`` appeared in torch 2.6; resolved once so that dynamo sees a plain call.
_is_exporting_fn = getattr(torch.compiler, "is_exporting", None)

# -----------------------------------------------------------------------------------------------------------
# Global switch for model code
# ------------------------------------------------------------------------------------------------------------

_KERNELS_ENABLED = os.environ.get("DEEPGEN_TRITON_KERNELS", "0").strip().lower() in ("1", "true", "yes", "on")


def kernels_enabled() -> bool:
    """Whether model code should route its hot paths through this package's ops.

    Off by default; ``DEEPGEN_TRITON_KERNELS=1`` in the environment turns it on at import. The switch only tells
    model code to call the ops; each op still resolves ``backend="auto"`` on its own (Triton on CUDA tensors,
    torch otherwise), so turning it on is harmless on CPU and during export.
    """
    return _KERNELS_ENABLED


def set_kernels_enabled(enabled: bool) -> bool:
    """Set the global switch; returns the previous value. Process-wide (not thread-local)."""
    global _KERNELS_ENABLED
    previous = _KERNELS_ENABLED
    _KERNELS_ENABLED = bool(enabled)
    return previous


@contextlib.contextmanager
def use_kernels(enabled: bool = True) -> Iterator[None]:
    """Context manager that sets the switch for its body and restores the previous value afterwards."""
    previous = set_kernels_enabled(enabled)
    try:
        yield
    finally:
        set_kernels_enabled(previous)


# ----------------------------------------------------------------------------------------------------------
# Availability and backend resolution
# ------------------------------------------------------------------------------------------------------------


def triton_available() -> bool:
    """True when ``import triton`` succeeded (it says nothing about a GPU being present)."""
    return HAS_TRITON


def is_exporting() -> bool:
    """True while ``torch.onnx.export`` or ``torch.export`` (incl. the dynamo ONNX exporter) traces the model."""
    if torch.onnx.is_in_onnx_export():
        return True
    return bool(_is_exporting_fn()) if _is_exporting_fn is not None else False


def triton_unusable_reason(device: torch.device) -> str | None:
    """Why a Triton kernel cannot run on tensors on ``device`` (``None`` when it can)."""
    if not HAS_TRITON:
        return f"triton is not importable ({_TRITON_IMPORT_ERROR})"
    if device.type == "cuda":
        return None
    if INTERPRET:
        if device.type == "cpu":
            return None
        return f"the Triton interpreter (TRITON_INTERPRET=1) runs CPU tensors only, got tensors on {device}"
    return (
        f"the tensors are on {device.type!r}; Triton kernels need CUDA tensors, or CPU tensors with "
        "TRITON_INTERPRET=1 set before the kernels are imported"
    )


def resolve_backend(backend: str, device: torch.device, op: str, unsupported: str | None = None) -> str:
    """Resolve ``backend`` to ``"triton"`` or ``"torch"``.

    ``unsupported`` is the reason why the kernel cannot handle these particular arguments (e.g. a head dim it was
    not written for), or ``None``. ``"auto"`` picks Triton only for CUDA tensors, when Triton imports, outside of
    export and when the kernel supports the arguments; ``"triton"`` raises when it cannot run.
    """
    if backend not in BACKENDS:
        raise ValueError(f"{op}: backend must be one of {', '.join(map(repr, BACKENDS))}; got {backend!r}")
    if backend == "torch":
        return "torch"
    if backend == "triton":
        reason = triton_unusable_reason(device)
        if reason is not None:
            raise RuntimeError(f"{op}: backend='triton' was requested but {reason}")
        if unsupported is not None:
            raise ValueError(f"{op}: backend='triton' cannot handle these arguments: {unsupported}")
        return "triton"
    if device.type != "cuda" or not HAS_TRITON or unsupported is not None or is_exporting():
        return "torch"
    return "triton"


# ----------------------------------------------------------------------------------------------------------
# Launch helpers
# ------------------------------------------------------------------------------------------------------------


class _FixedConfigKernel:
    """Stands in for ``triton.autotune(...)(kernel)`` under the interpreter, where autotuning needs a GPU driver.

    ``kernel[grid](*args, **kwargs)`` launches the kernel with the fixed meta-parameters merged into the kwargs;
    a callable grid receives them, like an autotuned grid receives the chosen config.
    """

    def __init__(self, fn, meta: dict):
        self.fn = fn
        self.meta = dict(meta)

    def __getitem__(self, grid):
        def launch(*args, _tune_key=None, **kwargs):
            meta = {**self.meta, **kwargs}
            g = grid(meta) if callable(grid) else grid
            return self.fn[g](*args, **meta)

        return launch


class _CachedAutotuneKernel:
    """``triton.autotune`` with a cheaper warm path.

    ``Autotuner.run`` rebuilds its cache key from every argument on every call (tens of µs for kernels with ~40
    arguments). Callers pass ``_tune_key`` (a hashable that determines the best config: dtypes, shape buckets,
    constexprs); the first call per key goes through the autotuner, later calls launch the tuned config on the
    underlying ``JITFunction`` directly, exactly as ``Autotuner.run`` does after a cache hit.
    """

    def __init__(self, autotuner):
        self.autotuner = autotuner
        self.best: dict = {}

    def __getitem__(self, grid):
        def launch(*args, _tune_key=None, **kwargs):
            cfg = self.best.get(_tune_key) if _tune_key is not None else None
            if cfg is None:
                ret = self.autotuner[grid](*args, **kwargs)
                best = getattr(self.autotuner, "best_config", None)
                if (
                    _tune_key is not None
                    and best is not None
                    and best.pre_hook is None
                    and hasattr(best, "all_kwargs")
                ):
                    self.best[_tune_key] = best
                return ret
            return self.autotuner.fn[grid](*args, **kwargs, **cfg.all_kwargs())

        return launch


def autotune(configs: list, key: list[str], interpret_meta: dict, **autotune_kwargs):
    """``triton.autotune`` on a GPU (with a cached warm path, see :class:`_CachedAutotuneKernel`); a fixed config
    (``interpret_meta``, constexprs only) under the interpreter, where autotuning needs a GPU driver."""

    def decorate(fn):
        if INTERPRET:
            return _FixedConfigKernel(fn, interpret_meta)
        return _CachedAutotuneKernel(triton.autotune(configs=configs, key=key, **autotune_kwargs)(fn))

    return decorate


def prune_fp32_configs(tensor_arg: str, keep: int = 1) -> dict:
    """``prune_configs_by`` for matmul kernels: with fp32 inputs keep only the last ``keep`` configs (list the
    smallest tiles last). fp32 ``tl.dot`` in IEEE precision compiles slowly (10+ s per config) and needs twice the
    shared memory, so fp32 is autotuned over a minimal set."""

    def prune(configs, named_args, **kwargs):
        t = named_args.get(tensor_arg)
        if getattr(t, "dtype", None) == torch.float32:
            return configs[-keep:]
        return configs

    return {"early_config_prune": prune}


def dot_in_fp32(dtype: torch.dtype) -> bool:
    """Whether ``tl.dot`` operands must be upcast to fp32: always under the interpreter (its bf16 dot returns
    garbage), and for fp32 inputs (which then use IEEE fp32 rather than TF32, to match the fp32 reference)."""
    return INTERPRET or dtype == torch.float32


@functools.cache
def num_sms(device: torch.device) -> int:
    """Streaming multiprocessors of a CUDA device (a small stand-in under the interpreter)."""
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).multi_processor_count
    return 4


def leading_strides(t: torch.Tensor, ndim: int = 3) -> list[int]:
    """Strides of the leading (all but the last) dims of ``t``, left-padded with zeros to ``ndim`` entries."""
    lead = list(t.stride()[:-1])
    if len(lead) > ndim:
        raise ValueError(f"at most {ndim} leading dims supported, got shape {tuple(t.shape)}")
    return [0] * (ndim - len(lead)) + lead


def leading_sizes(shape: Sequence[int], ndim: int = 3) -> list[int]:
    """Sizes of the leading dims of ``shape``, left-padded with ones to ``ndim`` entries."""
    lead = list(shape[:-1])
    return [1] * (ndim - len(lead)) + lead


# ----------------------------------------------------------------------------------------------------------
# Argument checks (raise ValueError naming the argument)
# ------------------------------------------------------------------------------------------------------------

FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


def check_tensor(op: str, name: str, t, *, ndim: int | None = None, min_ndim: int | None = None) -> None:
    if not isinstance(t, torch.Tensor):
        raise ValueError(f"{op}: {name} must be a torch.Tensor, got {type(t).__name__}")
    if t.dtype not in FLOAT_DTYPES:
        raise ValueError(f"{op}: {name} must be float16, bfloat16 or float32, got {t.dtype}")
    if ndim is not None and t.dim() != ndim:
        raise ValueError(f"{op}: {name} must have {ndim} dims, got shape {tuple(t.shape)}")
    if min_ndim is not None and t.dim() < min_ndim:
        raise ValueError(f"{op}: {name} must have at least {min_ndim} dims, got shape {tuple(t.shape)}")


def check_same(
    op: str, name: str, t: torch.Tensor, ref_name: str, ref: torch.Tensor, *, dtype: bool = True
) -> None:
    if t.device != ref.device:
        raise ValueError(
            f"{op}: {name} must be on the same device as {ref_name} ({ref.device}), got {t.device}"
        )
    if dtype and t.dtype != ref.dtype:
        raise ValueError(f"{op}: {name} must have the same dtype as {ref_name} ({ref.dtype}), got {t.dtype}")
