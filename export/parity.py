"""The parity gate: the exported graph against PyTorch at shapes other than the traced one.

Metric, per output: ``relative = max|onnx - torch| / max(max|torch|, 1e-12)`` over the compared elements, i.e. the
worst absolute error scaled by the output's largest magnitude (one number per output, insensitive to elements
near zero). Rows that are left padding (``ExportSpec.compare_rows``) are excluded: their values are garbage by
design (unmasked padding in the official mode, unused rows in the masked mode). Boolean outputs must match
exactly. Above the tolerance :func:`check_parity` raises :class:`ParityError`.

Tolerances:

* **float32**: a fixed ``1e-4`` (measured errors are <= 3e-6 on every stage).
* **float16 / bfloat16**: derived from PyTorch's own low-precision error (FlagAttention's rule, STYLE.md). The
  gate also runs the module in float32 on the same inputs (the half inputs upcast exactly) and requires, per
  output, ``relative(onnx_half, torch_half) <= max(2 * relative(torch_half, torch_fp32), floor)``: the exported
  graph may differ from PyTorch at the same dtype by at most twice what the half precision itself costs PyTorch.
  ``floor`` is two units in the last place at the output's largest magnitude (fp16 ``2**-9``, bf16 ``2**-6``):
  two correct half implementations round differently, so the bound never asks for less than that when PyTorch's
  own error happens to be small. Measured on the tiny preset (3 shapes per stage): fp16 on the CPU
  EP within 0.5-1.9x PyTorch's error; bf16 on ``ReferenceEvaluator`` (which rounds to bf16 after every numpy op,
  so it is itself less exact than PyTorch) within 0.6-3.8x, the worst (condition encoder pooled, 1.2e-2 against
  PyTorch's 3.2e-3) under the bf16 floor. A wrong graph (a missing op, a wrong cast) errs by O(1).

The graph runs on ONNX Runtime's CPU EP, or, for a half graph that the CPU EP cannot run (ORT 1.32 has no bf16
``Conv``/``Where``/``Div`` kernels), on ``onnx.reference.ReferenceEvaluator`` (numpy, bf16 through ml_dtypes; it
honours ``Attention``'s ``softmax_precision``). The PyTorch modules run on their own device; outputs come back with
``.cpu()``.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

__all__ = [
    "HALF_FACTOR",
    "HALF_FLOORS",
    "HALF_RULE",
    "RELATIVE_ERROR",
    "TOLERANCES",
    "ParityError",
    "check_parity",
    "compare_outputs",
    "graph_runner",
    "module_device",
    "to_torch",
]

RELATIVE_ERROR = "max|onnx - torch| / max(max|torch|, 1e-12) over the compared (non-pad) elements"
TOLERANCES = {"float32": 1e-4}
HALF_FACTOR = 2.0
HALF_FLOORS = {"float16": 2.0**-9, "bfloat16": 2.0**-6}
HALF_RULE = "relative(onnx, torch) <= max(2 * relative(torch, torch_fp32), floor) per output, same inputs"
_TINY = 1e-12


class ParityError(AssertionError):
    """ONNX Runtime and PyTorch disagree above the tolerance."""


def compare_outputs(ort_value: np.ndarray, torch_value: np.ndarray, rows: np.ndarray | None = None) -> dict:
    """max_abs, relative (see the module docstring) and how many elements were compared."""
    ort_value, torch_value = np.asarray(ort_value), np.asarray(torch_value)
    if ort_value.shape != torch_value.shape:
        return {"max_abs": float("inf"), "relative": float("inf"), "compared": 0,
                "error": f"shape {ort_value.shape} != torch {torch_value.shape}"}
    if rows is not None:
        ort_value, torch_value = ort_value[rows], torch_value[rows]
    if torch_value.dtype == bool:
        mismatches = int((ort_value != torch_value).sum())
        return {"mismatches": mismatches, "relative": 0.0 if mismatches == 0 else float("inf"), "compared": int(torch_value.size)}
    diff = np.abs(ort_value.astype(np.float64) - torch_value.astype(np.float64))
    max_abs = float(diff.max()) if diff.size else 0.0
    scale = max(float(np.abs(torch_value.astype(np.float64)).max()) if diff.size else 0.0, _TINY)
    relative = max_abs / scale
    if not np.isfinite(ort_value.astype(np.float64)).all():
        relative = float("inf")
    return {"max_abs": max_abs, "relative": relative, "compared": int(torch_value.size)}


def to_torch(array: np.ndarray, dtype: str | None = None, device=None):
    """A numpy input as the torch tensor the PyTorch module takes, on ``device`` (default cpu): float32 and
    float16 arrays as they are, bfloat16 (ml_dtypes) through float32 (exact) to ``torch.bfloat16``, other dtypes
    (int64, bool) as they are. ``dtype`` is accepted for older callers and ignored: the array's dtype decides."""
    import torch

    if str(array.dtype) == "bfloat16":
        tensor = torch.from_numpy(np.ascontiguousarray(array.astype(np.float32))).to(torch.bfloat16)
    else:
        tensor = torch.from_numpy(np.ascontiguousarray(array))
    return tensor if device is None else tensor.to(device)


def module_device(module):
    """The device of ``module``'s parameters (cpu for a module without any): where its inputs must go."""
    import torch

    parameter = next(iter(module.parameters()), None)
    return parameter.device if parameter is not None else torch.device("cpu")


def graph_runner(onnx_path, *, cpu_ep: bool = True):
    """Something with ``run(output_names, feeds)`` that executes the ONNX file on numpy arrays: an ONNX Runtime
    CPU-EP session, or (``cpu_ep=False``, for half graphs the CPU EP lacks kernels for) ``ReferenceEvaluator``."""
    if cpu_ep:
        import onnxruntime as ort

        return ort.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])
    import onnx
    from onnx.reference import ReferenceEvaluator

    return ReferenceEvaluator(onnx.load(str(onnx_path)))


def _run_torch(module, inputs: dict[str, np.ndarray], names: list[str], device, cast=None) -> list[np.ndarray]:
    """``module`` on ``inputs`` (on ``device``; float arrays cast to ``cast`` first), outputs back on the cpu as
    numpy (floats as float32)."""
    import torch

    feeds = {}
    for name in names:
        array = inputs[name]
        if cast is not None and (array.dtype.kind == "f" or str(array.dtype) == "bfloat16"):
            array = array.astype(cast)
        feeds[name] = to_torch(array, device=device)
    with torch.no_grad():
        outputs = module(**feeds)
    outputs = outputs if isinstance(outputs, tuple) else (outputs,)
    return [o.detach().cpu().float().numpy() if o.is_floating_point() else o.detach().cpu().numpy() for o in outputs]


def check_parity(
    spec,
    onnx_path,
    module,
    points: Sequence[dict[str, int]],
    *,
    tolerance: float | None = None,
    seed: int = 0,
    session=None,
    reference_module=None,
    device=None,
) -> list[dict]:
    """Run ``module`` (PyTorch, eager) and the ONNX file on the same random inputs at each dim assignment in
    ``points``; return one record per point and raise :class:`ParityError` if any output exceeds its bound.

    float32 (``spec.dtype``): the bound is ``tolerance`` (default ``TOLERANCES["float32"]``). float16 / bfloat16:
    ``reference_module`` (the same stage in float32) is required and the bound is :data:`HALF_RULE` (see the module
    docstring). ``session``: anything with ``run(names, feeds)`` (default: the CPU EP, :func:`graph_runner`).
    ``device``: where the PyTorch inputs go (default: the device of ``module``'s parameters)."""
    half = spec.dtype != "float32"
    if half and reference_module is None:
        raise ValueError(f"reference_module: a {spec.dtype} stage is checked against its float32 module; pass it")
    if not half and tolerance is None:
        tolerance = TOLERANCES["float32"]
    if session is None:
        session = graph_runner(onnx_path)
    device = module_device(module) if device is None else device
    rng = np.random.default_rng(seed)
    records, failures = [], []
    for values in points:
        inputs = spec.make_inputs(values, rng)
        expected = _run_torch(module, inputs, spec.input_names, device)
        fp32 = _run_torch(reference_module, inputs, spec.input_names, device, np.float32) if half else None
        got = session.run(spec.output_names, inputs)
        rows = spec.compare_rows(inputs) if spec.compare_rows is not None else {}
        outputs = {}
        for index, (name, graph_value, torch_value) in enumerate(zip(spec.output_names, got, expected)):
            result = compare_outputs(graph_value, torch_value, rows.get(name))
            result["rows"] = "non-pad" if name in rows else "all"
            bound = tolerance
            if half and torch_value.dtype != bool:
                own = compare_outputs(torch_value, fp32[index], rows.get(name))["relative"]
                bound = max(HALF_FACTOR * own, HALF_FLOORS[spec.dtype])
                result["torch_vs_fp32"] = own
            elif half:
                bound = 0.0
            result["bound"] = bound
            outputs[name] = result
            if not result["relative"] <= bound:
                failures.append(f"{name} at {values}: relative error {result['relative']:.3g} > {bound:.3g}")
        records.append({"dims": dict(values), "inputs": {k: list(v.shape) for k, v in inputs.items()}, "outputs": outputs})
    if failures:
        rule = HALF_RULE if half else RELATIVE_ERROR
        raise ParityError(f"{spec.stage}: the ONNX graph does not match PyTorch ({rule}): " + "; ".join(failures))
    return records
