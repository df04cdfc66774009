"""The export folder as the runtimes read it: ``manifest.json`` (format, stages, dims), the ONNX files beside it.

Torch-free (numpy only): the ONNX Runtime and TensorRT pipelines load an export through :class:`ExportedModel`,
which checks the format version, each stage's opset, dtype and files, and every input's shape against the
exported dynamic ranges before a stage runs.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

__all__ = [
    "FLOAT_DTYPES",
    "FORMAT_VERSION",
    "MANIFEST_NAME",
    "SUPPORTED_OPSETS",
    "ExportedModel",
    "axis_text",
    "external_data_files",
    "numpy_dtype",
]

MANIFEST_NAME = "manifest.json"
FORMAT_VERSION = 1
# Opsets our exporter writes (the dynamo exporter starts at 18) and that the runtimes accept.
SUPPORTED_OPSETS = range(18, 24)
FLOAT_DTYPES = ("float32", "bfloat16", "float16")


def numpy_dtype(name: str) -> np.dtype:
    """The numpy dtype of a manifest dtype name ("float32", "bfloat16" through ml_dtypes, "int64", "bool", ...)."""
    if name == "bfloat16":
        import ml_dtypes

        return np.dtype(ml_dtypes.bfloat16)
    return np.dtype(name)


def external_data_files(onnx_path: str | os.PathLike) -> list[str]:
    """The external-data file names an ONNX file's initializers point to (sorted; the graph only is read)."""
    import onnx

    proto = onnx.load(str(onnx_path), load_external_data=False)
    return sorted({e.value for t in proto.graph.initializer for e in t.external_data if e.key == "location"})


def axis_text(axis) -> str:
    """An axis of a tensor declaration (an int, or ``{"dim", "scale", "offset"}``) as text, e.g. ``2*latent_height``."""
    if isinstance(axis, int):
        return str(axis)
    text = axis["dim"] if axis["scale"] == 1 else f"{axis['scale']}*{axis['dim']}"
    return text + (f"+{axis['offset']}" if axis["offset"] else "")


@dataclass
class ExportedModel:
    """An export folder: ``manifest.json`` + the ONNX files + ``tokenizer/``. Loading checks the files exist."""

    path: Path
    manifest: dict

    @classmethod
    def load(cls, path: str | os.PathLike) -> ExportedModel:
        path = Path(path)
        manifest_file = path / MANIFEST_NAME
        if not manifest_file.is_file():
            raise FileNotFoundError(f"path: {manifest_file} not found (not a folder written by `deepgen export`)")
        manifest = json.loads(manifest_file.read_text())
        if manifest.get("format_version") != FORMAT_VERSION:
            raise ValueError(
                f"path: {manifest_file} has format_version {manifest.get('format_version')!r}; this runtime reads "
                f"version {FORMAT_VERSION}: re-export with this version of deepgen-components"
            )
        return cls(path, manifest)

    @property
    def config(self) -> dict:
        return self.manifest["config"]

    @property
    def stages(self) -> dict:
        return self.manifest["stages"]

    def has_stage(self, stage: str) -> bool:
        return stage in self.stages

    def stage(self, stage: str) -> dict:
        if stage not in self.stages:
            reason = self.manifest.get("not_exported", {}).get(stage)
            raise ValueError(
                f"stage {stage!r} is not in this export ({self.path}); exported stages: {', '.join(self.stages)}"
                + (f". Not exported because: {reason}" if reason else "")
            )
        return self.stages[stage]

    def stage_file(self, stage: str) -> Path:
        """The stage's ONNX file, after checking that it and its external-data files are all present."""
        entry = self.stage(stage)
        opset = entry.get("opset")
        if opset not in SUPPORTED_OPSETS:
            raise ValueError(
                f"stage {stage!r}: opset {opset} is not supported by this runtime (supported: "
                f"{SUPPORTED_OPSETS.start}..{SUPPORTED_OPSETS.stop - 1}); re-export with --opset 23 or 20"
            )
        dtype = entry.get("dtype")
        if dtype not in FLOAT_DTYPES:
            raise ValueError(f"stage {stage!r}: unsupported dtype {dtype!r} (supported: {', '.join(FLOAT_DTYPES)})")
        for name in [entry["file"], *entry.get("external_data", [])]:
            if not (self.path / name).is_file():
                kind = "ONNX file" if name == entry["file"] else "external-data file"
                raise FileNotFoundError(
                    f"stage {stage!r}: {kind} {self.path / name} is missing; copy the whole export folder "
                    "(the .onnx files need their .data files beside them) or re-export"
                )
        return self.path / entry["file"]

    def check_shapes(self, stage: str, shapes: dict[str, tuple[int, ...]]) -> None:
        """Raise a clear error when an input does not fit the exported dynamic ranges of ``stage``."""
        entry = self.stage(stage)
        dims = entry["dims"]
        values: dict[str, int] = {}
        for spec in entry["inputs"]:
            name = spec["name"]
            if name not in shapes:
                continue
            shape = tuple(shapes[name])
            if len(shape) != len(spec["shape"]):
                raise ValueError(f"stage {stage!r}: input {name!r} has shape {shape}, expected rank {len(spec['shape'])}")
            for axis, size in zip(spec["shape"], shape):
                if isinstance(axis, int):
                    if size != axis:
                        raise ValueError(
                            f"stage {stage!r}: input {name!r} has shape {shape}; axis of size {size} must be {axis}"
                        )
                    continue
                dim = dims[axis["dim"]]
                value, rest = divmod(size - axis["offset"], axis["scale"])
                low, high = (axis["scale"] * dim[k] + axis["offset"] for k in ("min", "max"))
                if rest or not dim["min"] <= value <= dim["max"]:
                    step = f" in steps of {axis['scale']}" if axis["scale"] > 1 else ""
                    raise ValueError(
                        f"stage {stage!r}: input {name!r} axis {axis_text(axis)} = {size} is outside the exported "
                        f"range {low}..{high}{step} ({dim.get('meaning', axis['dim'])}); re-export with a wider "
                        "range (--min-size/--max-size/--max-batch/--max-prompt-tokens)"
                    )
                if values.setdefault(axis["dim"], value) != value:
                    raise ValueError(f"stage {stage!r}: inputs disagree on dimension {axis['dim']!r}")
