"""Export a DeepGenModel stage by stage to ONNX, gate each file on parity, write ``manifest.json``.

Per stage: ``torch.onnx.export(dynamo=True, dynamic_shapes=..., opset_version=23, external_data=True)`` -> the
``.onnx`` file plus one ``.onnx.data`` file beside it -> ``onnx.checker`` -> (bf16) fp32 softmax islands -> an
ONNX Runtime CPU run of the traced example -> the parity gate at three other shapes (fp32). A stage whose export,
check or ONNX Runtime run fails at the requested opset is retried once at the fallback opset (20: attention and
norms decomposed into basic ops); the manifest records which exporter and opset produced every file and why a
fallback happened.

Device and precision: the stage modules run where the model's parameters are (cpu or cuda); traced examples and
parity inputs are made in numpy and moved there, outputs come back with ``.cpu()``. ``dtype`` (float32, float16,
bfloat16; default: the model's) exports a cast *copy* of each stage module when it differs from the model's dtype,
so the caller's model is never modified. Half-precision graphs get fp32 islands (attention softmax, norms with
fp32 statistics) and are parity-checked against PyTorch at the same dtype (``parity`` module docstring).
"""

from __future__ import annotations

import copy
import json
import logging
import os
import platform
import time
import traceback
import warnings
from collections import Counter
from pathlib import Path

import numpy as np
from deepgen_components.export import parity as parity_gate
from deepgen_components.export import tensorrt_compat
from deepgen_components.export.manifest import (
    FORMAT_VERSION,
    MANIFEST_NAME,
    SUPPORTED_OPSETS,
    external_data_files,
)
from deepgen_components.export.specs import STAGES, ExportRanges, build_specs, model_config

__all__ = ["DEFAULT_OPSET", "FALLBACK_OPSET", "ExportError", "export_model", "library_versions"]

logger = logging.getLogger(__name__)

DEFAULT_OPSET = 23
FALLBACK_OPSET = 20
EXPORTER = "torch.onnx.export(dynamo=True)"
SUPPORTED_DTYPES = ("float32", "float16", "bfloat16")


class ExportError(RuntimeError):
    """A stage could not be exported at any opset tried."""


def library_versions() -> dict[str, str]:
    from importlib import metadata

    versions = {"python": platform.python_version()}
    for name in ("torch", "onnx", "onnxruntime", "onnxscript", "transformers", "diffusers", "tokenizers", "numpy",
                 "deepgen-components"):
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = None
    return versions


def _model_dtype(model) -> str:
    dtypes = {p.dtype for p in model.parameters()}
    if len(dtypes) != 1:
        raise ValueError(f"dtype: the model mixes parameter dtypes {sorted(map(str, dtypes))}; cast it to one dtype first")
    dtype = str(dtypes.pop()).removeprefix("torch.")
    if dtype not in SUPPORTED_DTYPES:
        raise ValueError(f"dtype: export supports {', '.join(SUPPORTED_DTYPES)} models, got {dtype}")
    return dtype


def _stage_module(spec, dtype: str, model_dtype: str):
    """The stage's ``nn.Module`` in ``dtype``: the model's own submodules when the dtypes agree, else a cast deep
    copy (on the same device), so that exporting at another precision never changes the caller's model."""
    import torch

    module = spec.module_factory().eval()
    if dtype != model_dtype:
        module = copy.deepcopy(module).to(getattr(torch, dtype))
    return module


def _remove_stage_files(path: Path) -> None:
    for file in (path, path.with_name(path.name + ".data")):
        file.unlink(missing_ok=True)


def _fp32_softmax(path: Path) -> int:
    """Softmax in fp32 in a half graph: every ``Attention`` node (opset 23) gets ``softmax_precision = FLOAT``, and
    every half-precision ``Softmax`` node (opset 20, attention decomposed) is wrapped in ``Cast`` to float and back
    (the exporter leaves both in the input precision). Norms already carry ``stash_type = 1`` (fp32 statistics).
    Returns the nodes changed."""
    import onnx

    proto = onnx.load(str(path), load_external_data=False)
    graph = proto.graph
    half = (onnx.TensorProto.FLOAT16, onnx.TensorProto.BFLOAT16)
    types = {v.name: v.type.tensor_type.elem_type
             for v in onnx.shape_inference.infer_shapes(proto).graph.value_info} if any(
        n.op_type == "Softmax" for n in graph.node) else {}
    nodes, changed = [], 0
    for node in graph.node:
        if node.op_type == "Attention" and node.domain in ("", "ai.onnx"):
            attributes = [a for a in node.attribute if a.name != "softmax_precision"]
            del node.attribute[:]
            node.attribute.extend(attributes + [onnx.helper.make_attribute("softmax_precision", onnx.TensorProto.FLOAT)])
            changed += 1
        elif node.op_type == "Softmax" and node.domain in ("", "ai.onnx") and types.get(node.output[0]) in half:
            source, result = node.input[0], node.output[0]
            node.input[0], node.output[0] = f"{source}__fp32", f"{result}__fp32"
            nodes.append(onnx.helper.make_node("Cast", [source], [node.input[0]], to=onnx.TensorProto.FLOAT,
                                               name=f"{node.name}__to_fp32"))
            nodes.append(node)
            nodes.append(onnx.helper.make_node("Cast", [node.output[0]], [result], to=types[result],
                                               name=f"{node.name}__from_fp32"))
            changed += 1
            continue
        nodes.append(node)
    if changed:
        del graph.node[:]
        graph.node.extend(nodes)
        onnx.save_model(proto, str(path))  # initializers keep pointing at the same .data file
    return changed


def precision_summary(path: Path) -> dict:
    """What runs in which precision: node counts by output dtype, norms with fp32 statistics, attention softmax
    precision, op types (for the docs' precision notes and the bf16 review)."""
    import onnx

    proto = onnx.load(str(path), load_external_data=False)
    inferred = onnx.shape_inference.infer_shapes(proto)
    types = {v.name: v.type.tensor_type.elem_type for v in [*inferred.graph.value_info, *inferred.graph.input, *inferred.graph.output]}
    by_dtype: Counter = Counter()
    for node in inferred.graph.node:
        elem = types.get(node.output[0]) if node.output else None
        by_dtype[onnx.TensorProto.DataType.Name(elem) if elem else "unknown"] += 1
    norms_fp32 = attention_fp32 = attention = 0
    for node in proto.graph.node:
        attrs = {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}
        if node.op_type in ("LayerNormalization", "RMSNormalization", "GroupNormalization"):
            norms_fp32 += int(attrs.get("stash_type", 1) == onnx.TensorProto.FLOAT)
        if node.op_type == "Attention":
            attention += 1
            attention_fp32 += int(attrs.get("softmax_precision", 0) == onnx.TensorProto.FLOAT)
    softmax = [n for n in inferred.graph.node if n.op_type == "Softmax"]
    ops = Counter(node.op_type for node in proto.graph.node)
    return {
        "nodes_by_output_dtype": dict(sorted(by_dtype.items())),
        "norms_with_fp32_statistics": norms_fp32,
        "attention_nodes": attention,
        "attention_with_fp32_softmax": attention_fp32,
        "softmax_nodes": len(softmax),
        "softmax_in_fp32": sum(types.get(n.output[0]) == onnx.TensorProto.FLOAT for n in softmax),
        "op_types": dict(ops.most_common()),
    }


def _export_once(spec, module, example: dict[str, np.ndarray], path: Path, opset: int) -> None:
    import onnx
    import torch
    from deepgen_components.export.modules import export_friendly

    device = parity_gate.module_device(module)  # the traced example goes where the module is (cpu or cuda)
    kwargs = {name: parity_gate.to_torch(example[name], device=device) for name in spec.input_names}
    with torch.no_grad(), export_friendly(module), warnings.catch_warnings():
        # Derived dims (2*h, L+N) make the exporter note that it names an axis once; the LeafSpec notice comes
        # from torch's own pytree code. Neither is actionable.
        warnings.filterwarnings("ignore", message="# The axis name", category=UserWarning)
        warnings.filterwarnings("ignore", message=".*LeafSpec", category=FutureWarning)
        program = torch.onnx.export(
            module,
            args=(),
            kwargs=kwargs,
            input_names=spec.input_names,
            output_names=spec.output_names,
            dynamic_shapes=spec.torch_dynamic_shapes(),
            opset_version=opset,
            dynamo=True,
            external_data=True,
            verbose=False,
        )
    program.save(str(path), external_data=True)
    onnx.checker.check_model(str(path), full_check=False)


def _ort_run(path: Path, example: dict[str, np.ndarray]) -> str | None:
    """Run the file once on ONNX Runtime's CPU EP; None on success, else the error text."""
    import onnxruntime as ort

    try:
        session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
        session.run(None, example)
    except Exception as err:  # ORT's own exception types
        return f"{type(err).__name__}: {str(err).strip().splitlines()[0][:300]}"
    return None


def export_model(
    model,
    out_dir: str | os.PathLike,
    *,
    stages=STAGES,
    ranges: ExportRanges | None = None,
    opset: int = DEFAULT_OPSET,
    fallback_opset: int | None = FALLBACK_OPSET,
    parity: bool = True,
    parity_points: int = 3,
    progress: bool = True,
    source: dict | None = None,
    seed: int = 0,
    dtype: str | None = None,
    tensorrt_version: str | None = None,
) -> dict:
    """Export ``stages`` of ``model`` into ``out_dir``; return the manifest.

    ``dtype``: float32, float16 or bfloat16 (default: the dtype of the model's parameters). A dtype other than the
    model's exports a cast copy of each stage (the model is left as it is). The model may live on any device; the
    traced examples and the PyTorch side of the parity gate run there.

    Every graph is checked against the TensorRT ONNX-parser support table (``tensorrt_compat``); each stage's
    entry records ``tensorrt`` (the minimum TensorRT version that parses it, and why) and the manifest the
    maximum over stages (``min_tensorrt``). ``tensorrt_version``: the TensorRT the engines will be built with; a
    stage that version cannot parse at ``opset`` is retried at ``fallback_opset`` (decomposed attention and
    norms), and fails when the fallback does not parse either.

    Raises :class:`ExportError` when a stage fails at every opset tried and
    :class:`~deepgen_components.export.parity.ParityError` when a stage does not match PyTorch (fp32: relative
    error 1e-4; fp16 / bf16: :data:`~deepgen_components.export.parity.HALF_RULE`).
    """
    if opset not in SUPPORTED_OPSETS:
        raise ValueError(f"opset must be in {SUPPORTED_OPSETS.start}..{SUPPORTED_OPSETS.stop - 1}, got {opset}")
    if fallback_opset is not None and fallback_opset not in SUPPORTED_OPSETS:
        raise ValueError(f"fallback_opset must be in {SUPPORTED_OPSETS.start}..{SUPPORTED_OPSETS.stop - 1}, got {fallback_opset}")
    stages = list(dict.fromkeys(stages))
    if not stages:
        raise ValueError("stages: give at least one stage")
    ranges = ranges or ExportRanges()
    if tensorrt_version is not None:
        tensorrt_compat.version_tuple(tensorrt_version)  # a clear error for a malformed version
    if dtype is not None and dtype not in SUPPORTED_DTYPES:
        raise ValueError(f"dtype: export supports {', '.join(SUPPORTED_DTYPES)}, got {dtype!r}")
    model_dtype = _model_dtype(model)
    dtype = dtype or model_dtype
    model = model.eval()
    config = model_config(model)
    specs = build_specs(model, ranges, stages, dtype)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)

    tokenizer_dir = out / "tokenizer"
    model.tokenizer.save_pretrained(str(tokenizer_dir))
    if not (tokenizer_dir / "tokenizer.json").is_file():
        raise ValueError("tokenizer: the model's tokenizer did not write tokenizer.json (a fast tokenizer is needed)")

    manifest = {
        "format_version": FORMAT_VERSION,
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "source": source or {},
        "dtype": dtype,
        "model_dtype": model_dtype,
        "device": str(parity_gate.module_device(model)),
        "opset_requested": opset,
        "fallback_opset": fallback_opset,
        "exporter": EXPORTER,
        "versions": library_versions(),
        "ranges": ranges.to_dict() | {"max_prompt_tokens_resolved": None},
        "config": config,
        "tokenizer": "tokenizer/tokenizer.json",
        "parity_metric": parity_gate.RELATIVE_ERROR,
        "stages": {},
        "not_exported": {s: "not requested (--stages)" for s in STAGES if s not in stages},
    }
    if "condition_encoder" in specs:
        manifest["ranges"]["max_prompt_tokens_resolved"] = specs["condition_encoder"].dims["prompt_length"].max

    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=len(stages), desc="export", unit="stage")
    try:
        for stage in stages:
            spec = specs[stage]
            if bar is not None:
                bar.set_description(f"export {stage}")
            start = time.perf_counter()
            module = _stage_module(spec, dtype, model_dtype)
            example_values = spec.example_values()
            example = spec.make_inputs(example_values, np.random.default_rng(seed))
            path = out / f"{stage}.onnx"
            attempts = [opset] + ([fallback_opset] if fallback_opset not in (None, opset) else [])
            errors: dict[int, str] = {}
            used = None
            cpu_error = None
            for attempt in attempts:
                _remove_stage_files(path)
                try:
                    _export_once(spec, module, example, path, attempt)
                    softmax_fp32 = _fp32_softmax(path) if dtype != "float32" else 0
                    cpu_error = _ort_run(path, example)
                    if cpu_error is not None and dtype == "float32":
                        raise RuntimeError(f"ONNX Runtime CPU run failed: {cpu_error}")
                    if tensorrt_version is not None:
                        problems = tensorrt_compat.parse_problems(path, tensorrt_version)
                        if problems:
                            raise RuntimeError(f"TensorRT {tensorrt_version} cannot parse it: " + "; ".join(problems))
                except Exception as err:  # exporter, checker and ORT errors all lead to the fallback
                    errors[attempt] = f"{type(err).__name__}: {str(err).strip()[:2000]}"
                    logger.warning("stage %s failed at opset %d: %s", stage, attempt, errors[attempt].splitlines()[0])
                    logger.debug("%s", traceback.format_exc())
                    continue
                used = attempt
                break
            if used is None:
                _remove_stage_files(path)
                details = "; ".join(f"opset {k}: {v.splitlines()[0]}" for k, v in errors.items())
                raise ExportError(f"stage {stage!r} could not be exported ({details})")
            export_seconds = time.perf_counter() - start
            entry = spec.to_dict() | {
                "file": path.name,
                "external_data": external_data_files(path),
                "exporter": EXPORTER,
                "opset": used,
                "fallback": None if used == opset else {"requested_opset": opset, "error": errors[opset]},
                "runnable_on_cpu_ep": cpu_error is None,
                "example_dims": example_values,
                "export_seconds": round(export_seconds, 2),
                "precision": precision_summary(path) | {"attention_softmax_set_to_fp32": softmax_fp32},
                "tensorrt": tensorrt_compat.graph_requirements(path),
            }
            if cpu_error is not None:
                entry["cpu_ep_error"] = cpu_error
            if not parity:
                entry["parity"] = {"skipped": "disabled (--no-parity)"}
            else:
                if bar is not None:
                    bar.set_description(f"parity {stage}")
                entry["parity"] = _parity(spec, path, module, model_dtype, parity_points, seed + 1, cpu_error is None)
            manifest["stages"][stage] = entry
            manifest["min_tensorrt"] = _max_version(e["tensorrt"]["min_tensorrt"] for e in manifest["stages"].values())
            _write_manifest(out, manifest)  # after every stage: a failure later leaves a valid partial export
            if bar is not None:
                bar.update(1)
            del module
    finally:
        if bar is not None:
            bar.close()
    return manifest


def _parity(spec, path: Path, module, model_dtype: str, points: int, seed: int, cpu_ep: bool) -> dict:
    """The parity record of one stage (raises ParityError): fp32 against a fixed tolerance; fp16 / bf16 against
    the bound derived from the same stage in fp32 (``parity.HALF_RULE``), on the CPU EP when it has the kernels,
    else on ``onnx.reference``."""
    start = time.perf_counter()
    reference = _stage_module(spec, "float32", model_dtype) if spec.dtype != "float32" else None
    runner = parity_gate.graph_runner(path, cpu_ep=cpu_ep)
    records = parity_gate.check_parity(
        spec, path, module, spec.parity_values(points), seed=seed, session=runner, reference_module=reference
    )
    del reference
    outputs = [o for r in records for o in r["outputs"].values()]
    record = {
        "metric": parity_gate.RELATIVE_ERROR,
        "runtime": "onnxruntime CPUExecutionProvider" if cpu_ep else "onnx.reference.ReferenceEvaluator",
        "passed": True,
        "max_relative": max(o["relative"] for o in outputs),
        "shapes": records,
        "seconds": round(time.perf_counter() - start, 2),
    }
    if spec.dtype == "float32":
        return {"tolerance": parity_gate.TOLERANCES["float32"]} | record
    return {
        "tolerance": parity_gate.HALF_RULE,
        "factor": parity_gate.HALF_FACTOR,
        "floor": parity_gate.HALF_FLOORS[spec.dtype],
        "max_torch_vs_fp32": max(o.get("torch_vs_fp32", 0.0) for o in outputs),
        "min_bound": min(o["bound"] for o in outputs if "torch_vs_fp32" in o),
    } | record


def _max_version(versions) -> str | None:
    """The highest of dotted versions; None when any is None (a stage no known TensorRT parses)."""
    versions = list(versions)
    if any(v is None for v in versions):
        return None
    return max(versions, key=tensorrt_compat.version_tuple)


def _write_manifest(out: Path, manifest: dict) -> None:
    tmp = out / f".{MANIFEST_NAME}.tmp"
    tmp.write_text(json.dumps(manifest, indent=2, default=_json_default) + "\n")
    os.replace(tmp, out / MANIFEST_NAME)


def _json_default(value):
    if isinstance(value, (np.integer,)):
        return int(value)
    if isinstance(value, (np.floating,)):
        return float(value)
    raise TypeError(f"not JSON serialisable: {type(value).__name__}")
