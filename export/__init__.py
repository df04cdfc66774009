"""ONNX export, ONNX Runtime / TensorRT runtimes and parity checks (``deepgen_components.export``).

* :func:`export_model` — each stage to ONNX (dynamo exporter, dynamic shapes, opset 23 with a recorded fallback
  to 20, external data), the parity gate against PyTorch, ``manifest.json``; the CLI is ``deepgen export``.
* :class:`ExportSpec`, :class:`ExportRanges`, :func:`build_specs` — the per-stage declarations.
* :class:`OnnxDeepGenPipeline` — the sampling loop on ONNX Runtime; needs neither PyTorch nor this package's
  PyTorch modules.
* :mod:`~deepgen_components.export.tensorrt` — engines (optional ``tensorrt`` dependency):
  :func:`~deepgen_components.export.tensorrt.build_engine`, ``profiles_for``, ``trtexec_command``,
  ``TensorRTDeepGenPipeline``.

Names are imported on first use, so ``import deepgen_components.export`` loads neither torch nor onnxruntime.
"""

from importlib import import_module

__all__ = [
    "ExportError",
    "ExportRanges",
    "ExportSpec",
    "OnnxDeepGenPipeline",
    "ParityError",
    "build_specs",
    "export_model",
    "profiles_for",
    "trtexec_command",
]

_LOCATIONS = {
    "ExportError": "exporter",
    "export_model": "exporter",
    "ExportRanges": "specs",
    "ExportSpec": "specs",
    "build_specs": "specs",
    "OnnxDeepGenPipeline": "onnx_pipeline",
    "ParityError": "parity",
    "profiles_for": "tensorrt",
    "trtexec_command": "tensorrt",
}


def __getattr__(name: str):
    if name in _LOCATIONS:
        return getattr(import_module(f"{__name__}.{_LOCATIONS[name]}"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(__all__)
