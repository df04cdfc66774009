"""The parity gate: ONNX Runtime (CPU) against PyTorch at shapes other than the traced one.

Metric, per output: ``relative = max|ort - torch| / max(max|torch|, 1e-12)`` over the compared elements, i.e. the
worst absolute error scaled by the output's largest magnitude (one number per output, insensitive to elements
near zero). Rows that are left padding (``ExportSpec.compare_rows``) are excluded: their values are garbage by
design (unmasked padding in the official mode, unused rows in the masked mode). Boolean outputs must match
exactly. Above the tolerance (fp32: 1e-4) :func:`check_parity` raises :class:`ParityError`.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

__all__ = ["RELATIVE_ERROR", "TOLERANCES", "ParityError", "check_parity", "compare_outputs", "to_torch"]

RELATIVE_ERROR = "max|ort - torch| / max(max|torch|, 1e-12) over the compared (non-pad) elements"
TOLERANCES = {"float32": 1e-4}
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


def to_torch(array: np.ndarray, dtype: str):
    """A numpy input as the torch tensor the PyTorch module takes: floats (bf16 through ml_dtypes) as float32, or
    bfloat16 for a bfloat16 array; other dtypes as they are."""
    import torch

    if array.dtype.kind == "f" or str(array.dtype) == "bfloat16":
        tensor = torch.from_numpy(np.ascontiguousarray(array.astype(np.float32)))
        return tensor.to(torch.bfloat16) if str(array.dtype) == "bfloat16" else tensor
    return torch.from_numpy(np.ascontiguousarray(array))


def check_parity(
    spec,
    onnx_path,
    module,
    points: Sequence[dict[str, int]],
    *,
    tolerance: float,
    seed: int = 0,
    session=None,
) -> list[dict]:
    """Run ``module`` (PyTorch, eager) and the ONNX file on the same random inputs at each dim assignment in
    ``points``; return one record per point and raise :class:`ParityError` if any output exceeds ``tolerance``."""
    import onnxruntime as ort
    import torch

    if session is None:
        session = ort.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])
    rng = np.random.default_rng(seed)
    records, failures = [], []
    for values in points:
        inputs = spec.make_inputs(values, rng)
        with torch.no_grad():
            expected = module(**{name: to_torch(inputs[name], spec.dtype) for name in spec.input_names})
        expected = expected if isinstance(expected, tuple) else (expected,)
        got = session.run(spec.output_names, inputs)
        rows = spec.compare_rows(inputs) if spec.compare_rows is not None else {}
        outputs = {}
        for name, ort_value, torch_value in zip(spec.output_names, got, expected):
            reference = torch_value.float().numpy() if torch_value.is_floating_point() else torch_value.numpy()
            result = compare_outputs(ort_value, reference, rows.get(name))
            result["rows"] = "non-pad" if name in rows else "all"
            outputs[name] = result
            if not result["relative"] <= tolerance:
                failures.append(f"{name} at {values}: relative error {result['relative']:.3g} > {tolerance:g}")
        records.append({"dims": dict(values), "inputs": {k: list(v.shape) for k, v in inputs.items()}, "outputs": outputs})
    if failures:
        raise ParityError(f"{spec.stage}: ONNX Runtime does not match PyTorch ({RELATIVE_ERROR}): " + "; ".join(failures))
    return records
