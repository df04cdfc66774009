"""TensorRT engines from the exported ONNX files, and the sampling loop on them (optional ``tensorrt`` dependency).

* :func:`profiles_for` — min/opt/max shapes of every input of a stage, from the export's dims or from narrower
  :class:`~deepgen_components.export.specs.ExportRanges` (pure Python);
* :func:`trtexec_command` — the equivalent ``trtexec`` command line (pure Python);
* :func:`build_engine` — TensorRT Python API: ONNX parser, strongly typed network (precision comes from the ONNX
  dtypes; TensorRT 11 is always strongly typed, on 10.x the ``STRONGLY_TYPED`` flag is set), one optimisation
  profile, builder optimisation level, a timing cache file; writes the engine plus a JSON sidecar (TensorRT
  version, GPU name, compute capability, cache key) that :func:`load_engine` checks;
* :func:`engine_key`, :func:`stale_reason`, :func:`ensure_engine`, :func:`build_engines` — the engine cache: an
  engine is reused only when the ONNX content, profiles, precision, optimisation level, TensorRT version and GPU
  architecture it was built for all match (``deepgen export --engine`` builds ahead of time);
* :mod:`~deepgen_components.export.tensorrt_runtime` — :class:`EngineRunner` and ``TensorRTDeepGenPipeline``.

Nothing here imports ``tensorrt`` until an engine is built or loaded.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shlex
import time
from pathlib import Path

from deepgen_components.export.manifest import ExportedModel, external_data_files
from deepgen_components.export.specs import ExportRanges, ExportSpec, stage_dims

__all__ = [
    "build_engine",
    "build_engines",
    "check_engine_compatibility",
    "device_facts",
    "engine_key",
    "engine_sidecar_path",
    "ensure_engine",
    "import_tensorrt",
    "load_engine",
    "onnx_digest",
    "profiles_for",
    "stale_reason",
    "trtexec_command",
]

logger = logging.getLogger(__name__)

Profiles = dict[str, tuple[tuple[int, ...], tuple[int, ...], tuple[int, ...]]]


# -- profiles and the trtexec command line (pure Python) -----------------------------------------------------------


def _as_spec(spec) -> ExportSpec:
    return spec if isinstance(spec, ExportSpec) else ExportSpec.from_dict(spec)


def profiles_for(spec, ranges: ExportRanges | None = None, *, config: dict | None = None) -> Profiles:
    """{input name: (min shape, opt shape, max shape)} of a stage.

    ``spec``: an :class:`ExportSpec` or a stage entry of ``manifest.json``. ``ranges``: build the engine for these
    user ranges (batch, resolution, prompt length; e.g. ``min_size == max_size`` for a static engine) instead of
    the ranges the ONNX file was exported for; needs the manifest ``config``. The engine's ranges must lie inside
    the exported ones (the graph was traced for those)."""
    spec = _as_spec(spec)
    dims = spec.dims
    if ranges is not None:
        if config is None:
            raise ValueError("config: pass the manifest's config to derive profiles from ranges")
        narrowed = stage_dims(spec.stage, ranges, config)
        for name, dim in narrowed.items():
            exported = dims[name]
            if dim.min < exported.min or dim.max > exported.max:
                raise ValueError(
                    f"{spec.stage}: {name} range {dim.min}..{dim.max} ({dim.meaning}) is outside the exported range "
                    f"{exported.min}..{exported.max}; re-export with a wider range first"
                )
        dims = narrowed
    profiles = {}
    for tensor in spec.inputs:
        shapes = tuple(tensor.concrete({name: getattr(dim, which) for name, dim in dims.items()})
                       for which in ("min", "opt", "max"))
        profiles[tensor.name] = shapes
    return profiles


def _shape_text(shape: tuple[int, ...]) -> str:
    return "x".join(str(s) for s in shape) if shape else "1"


def trtexec_command(
    onnx_path: str | os.PathLike,
    profiles: Profiles,
    *,
    engine_path: str | os.PathLike | None = None,
    timing_cache: str | os.PathLike | None = None,
    optimization_level: int = 3,
    strongly_typed: bool = True,
    extra: tuple[str, ...] = (),
) -> str:
    """The ``trtexec`` command that builds the same engine as :func:`build_engine` (``--stronglyTyped`` is required
    on TensorRT 10.x and a no-op on 11.x, where every network is strongly typed)."""
    onnx_path = Path(onnx_path)
    engine_path = Path(engine_path) if engine_path is not None else onnx_path.with_suffix(".engine")
    args = ["trtexec", f"--onnx={onnx_path}", f"--saveEngine={engine_path}"]
    for flag, index in (("--minShapes", 0), ("--optShapes", 1), ("--maxShapes", 2)):
        args.append(flag + "=" + ",".join(f"{name}:{_shape_text(shapes[index])}" for name, shapes in profiles.items()))
    args.append(f"--builderOptimizationLevel={optimization_level}")
    if timing_cache is not None:
        args.append(f"--timingCacheFile={timing_cache}")
    if strongly_typed:
        args.append("--stronglyTyped")
    args.extend(extra)
    return " ".join(shlex.quote(a) for a in args)


# -- the engine cache key and sidecar ----------------------------------------------------------------------------


def engine_sidecar_path(engine_path: str | os.PathLike) -> Path:
    engine_path = Path(engine_path)
    return engine_path.with_name(engine_path.name + ".json")


_DIGESTS: dict[tuple, str] = {}


def onnx_digest(onnx_path: str | os.PathLike) -> str:
    """sha256 over the ONNX file and its external-data files (in name order), cached per (path, size, mtime)."""
    onnx_path = Path(onnx_path)
    files = [onnx_path] + [onnx_path.parent / name for name in external_data_files(onnx_path)]
    stamp = tuple((str(f), f.stat().st_size, f.stat().st_mtime_ns) for f in files)
    if stamp not in _DIGESTS:
        digest = hashlib.sha256()
        for file in files:
            digest.update(file.name.encode() + b"\0")
            with open(file, "rb") as handle:
                for block in iter(lambda h=handle: h.read(1 << 24), b""):
                    digest.update(block)
        _DIGESTS[stamp] = digest.hexdigest()
    return _DIGESTS[stamp]


def engine_key(
    onnx_path: str | os.PathLike, profiles: Profiles, *, optimization_level: int = 3, tensorrt_version: str,
    compute_capability: str,
) -> dict:
    """Everything an engine depends on: the ONNX content, the profiles, the precision mode (strongly typed: the
    ONNX dtypes decide; no precision flags), the builder optimisation level, the TensorRT version and the GPU
    architecture. Two builds with equal keys are interchangeable; any difference means a rebuild."""
    return {
        "onnx_sha256": onnx_digest(onnx_path),
        "profiles": {name: [list(s) for s in shapes] for name, shapes in sorted(profiles.items())},
        "precision": {"strongly_typed": True, "builder_flags": []},
        "optimization_level": int(optimization_level),
        "tensorrt_version": tensorrt_version,
        "compute_capability": compute_capability,
    }


def check_engine_compatibility(
    sidecar: dict, *, tensorrt_version: str, gpu_name: str, compute_capability: str, engine_path: str = "engine"
) -> None:
    """Raise a clear error when an engine was built for another TensorRT version or GPU architecture (TensorRT
    engines are not portable across either); a different GPU model of the same architecture only warns."""
    built_trt = sidecar.get("tensorrt_version")
    if built_trt != tensorrt_version:
        raise ValueError(
            f"{engine_path} was built with TensorRT {built_trt}, this is TensorRT {tensorrt_version}: engines are not "
            "portable across TensorRT versions; rebuild it (build_engine or the trtexec command in the docs)"
        )
    built_cc = sidecar.get("compute_capability")
    if built_cc != compute_capability:
        raise ValueError(
            f"{engine_path} was built for {sidecar.get('gpu_name')} (compute capability {built_cc}), this GPU is "
            f"{gpu_name} (compute capability {compute_capability}): rebuild the engine on this GPU"
        )
    if sidecar.get("gpu_name") != gpu_name:
        logger.warning("%s was built on %s and runs on %s (same compute capability %s): performance may differ",
                       engine_path, sidecar.get("gpu_name"), gpu_name, compute_capability)


def stale_reason(engine_path: str | os.PathLike, key: dict) -> str | None:
    """Why the engine at ``engine_path`` cannot serve ``key`` (missing, no sidecar, another ONNX file, other
    profiles, ...), or None when it can."""
    engine_path = Path(engine_path)
    sidecar_path = engine_sidecar_path(engine_path)
    if not engine_path.is_file():
        return f"{engine_path} does not exist"
    if not sidecar_path.is_file():
        return f"{sidecar_path} (what the engine was built from) is missing"
    built = json.loads(sidecar_path.read_text()).get("key", {})
    what = {"onnx_sha256": "the ONNX file changed since the build (re-exported?)",
            "profiles": "it was built for other shape profiles", "precision": "it was built with other precision flags",
            "optimization_level": "it was built at another builder optimisation level",
            "tensorrt_version": "it was built by another TensorRT version",
            "compute_capability": "it was built for another GPU architecture"}
    for field, why in what.items():
        if built.get(field) != key[field]:
            detail = "" if field in ("onnx_sha256", "profiles") else f" ({built.get(field)!r} != {key[field]!r})"
            return f"{engine_path}: {why}{detail}"
    return None


def device_facts(device=None) -> tuple[str, str]:
    """(GPU name, compute capability "major.minor") of ``device``; ("no CUDA device", "none") without CUDA, where only
    a host-memory TensorRT (the test suite's fake) can run."""
    import torch

    if not torch.cuda.is_available():
        return "no CUDA device", "none"
    index = torch.device(device or "cuda").index or 0
    major, minor = torch.cuda.get_device_capability(index)
    return torch.cuda.get_device_name(index), f"{major}.{minor}"


# -- build and load ----------------------------------------------------------------------------------------------


def import_tensorrt():
    """``import tensorrt`` with a clear error naming the optional dependency when it is missing."""
    try:
        import tensorrt
    except ImportError as err:  # optional dependency
        raise ImportError(
            "TensorRT is not installed: install the `tensorrt` package from NVIDIA (pip install "
            "'deepgen-components[tensorrt]' where NVIDIA's index is reachable); the ONNX Runtime pipeline needs none"
        ) from err
    return tensorrt


def build_engine(
    onnx_path: str | os.PathLike,
    profiles: Profiles,
    *,
    engine_path: str | os.PathLike | None = None,
    timing_cache: str | os.PathLike | None = None,
    optimization_level: int = 3,
    workspace_bytes: int | None = None,
    device=None,
) -> Path:
    """Build a serialized engine from ``onnx_path`` (external data beside it is read by the parser) for one
    optimisation profile; write it atomically with its JSON sidecar (the :func:`engine_key` it was built for plus
    the GPU name); load/extend/save ``timing_cache`` if given."""
    trt = import_tensorrt()
    onnx_path = Path(onnx_path)
    if not onnx_path.is_file():
        raise FileNotFoundError(f"onnx_path: {onnx_path} not found")
    engine_path = Path(engine_path) if engine_path is not None else onnx_path.with_suffix(".engine")
    if not 0 <= optimization_level <= 5:
        raise ValueError(f"optimization_level must be in 0..5, got {optimization_level}")
    trt_logger = trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(trt_logger)
    major = int(trt.__version__.split(".")[0])
    # Strong typing: the ONNX dtypes decide the precision. Always on (and the flag deprecated) in TensorRT 11.
    flags = 0 if major >= 11 else 1 << int(trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED)
    network = builder.create_network(flags)
    parser = trt.OnnxParser(network, trt_logger)
    if not parser.parse_from_file(str(onnx_path)):
        errors = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
        raise RuntimeError(f"TensorRT {trt.__version__} could not parse {onnx_path}: {errors}")
    inputs = [network.get_input(i) for i in range(network.num_inputs)]
    missing = [t.name for t in inputs if t.name not in profiles and any(d < 0 for d in t.shape)]
    if missing:
        raise ValueError(f"profiles: no shapes for the dynamic inputs {missing} of {onnx_path}")
    config = builder.create_builder_config()
    config.builder_optimization_level = optimization_level
    if workspace_bytes is not None:
        config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, int(workspace_bytes))
    profile = builder.create_optimization_profile()
    for name, (low, opt, high) in profiles.items():
        try:
            profile.set_shape(name, low, opt, high)
        except RuntimeError as err:  # TensorRT validates min <= opt <= max here
            raise ValueError(f"profiles: {name} min {low} / opt {opt} / max {high} refused by TensorRT: {err}") from err
    config.add_optimization_profile(profile)
    cache_file = Path(timing_cache) if timing_cache is not None else None
    cache = config.create_timing_cache(cache_file.read_bytes() if cache_file and cache_file.is_file() else b"")
    config.set_timing_cache(cache, ignore_mismatch=False)
    start = time.perf_counter()
    serialized = builder.build_serialized_network(network, config)
    if serialized is None:
        raise RuntimeError(f"TensorRT {trt.__version__} could not build an engine from {onnx_path} (see its log)")
    gpu_name, capability = device_facts(device)
    key = engine_key(onnx_path, profiles, optimization_level=optimization_level, tensorrt_version=trt.__version__,
                     compute_capability=capability)
    sidecar = {
        "tensorrt_version": trt.__version__,
        "gpu_name": gpu_name,
        "compute_capability": capability,
        "onnx_file": onnx_path.name,
        "key": key,
        "build_seconds": round(time.perf_counter() - start, 1),
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }
    _write_atomic(engine_path, bytes(serialized))
    _write_atomic(engine_sidecar_path(engine_path), (json.dumps(sidecar, indent=2) + "\n").encode())
    if cache_file is not None:
        _write_atomic(cache_file, bytes(config.get_timing_cache().serialize()))
    return engine_path


def _write_atomic(path: Path, data: bytes) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_bytes(data)
    os.replace(tmp, path)


def load_engine(engine_path: str | os.PathLike, *, device=None):
    """Deserialize an engine after checking its sidecar against this TensorRT and GPU."""
    trt = import_tensorrt()
    engine_path = Path(engine_path)
    sidecar_path = engine_sidecar_path(engine_path)
    if not engine_path.is_file():
        raise FileNotFoundError(f"engine: {engine_path} not found")
    if not sidecar_path.is_file():
        raise FileNotFoundError(
            f"engine: {sidecar_path} (TensorRT version / GPU of the build) is missing; rebuild with build_engine"
        )
    gpu_name, capability = device_facts(device)
    check_engine_compatibility(
        json.loads(sidecar_path.read_text()), tensorrt_version=trt.__version__, gpu_name=gpu_name,
        compute_capability=capability, engine_path=str(engine_path),
    )
    runtime = trt.Runtime(trt.Logger(trt.Logger.WARNING))
    engine = runtime.deserialize_cuda_engine(engine_path.read_bytes())
    if engine is None:
        raise RuntimeError(f"TensorRT {trt.__version__} could not deserialize {engine_path}")
    return engine


def ensure_engine(
    exported: ExportedModel | str | os.PathLike,
    stage: str,
    *,
    engine_dir: str | os.PathLike | None = None,
    ranges: ExportRanges | None = None,
    build: bool = True,
    optimization_level: int = 3,
    workspace_bytes: int | None = None,
    device=None,
) -> Path:
    """The engine of ``stage`` for these profiles, built only when no up-to-date one exists: a missing engine, or
    one whose sidecar key differs (ONNX content, profiles, precision, optimisation level, TensorRT version, GPU
    architecture), is built when ``build`` is true and refused with the reason otherwise."""
    trt = import_tensorrt()
    exported = exported if isinstance(exported, ExportedModel) else ExportedModel.load(exported)
    engine_dir = Path(engine_dir) if engine_dir is not None else exported.path / "engines"
    onnx_path = exported.stage_file(stage)
    profiles = profiles_for(exported.stage(stage), ranges, config=exported.config)
    key = engine_key(onnx_path, profiles, optimization_level=optimization_level, tensorrt_version=trt.__version__,
                     compute_capability=device_facts(device)[1])
    engine_path = engine_dir / f"{stage}.engine"
    reason = stale_reason(engine_path, key)
    if reason is None:
        return engine_path
    if not build:
        raise FileNotFoundError(
            f"engine for stage {stage!r}: {reason}. Build it ahead of time with `deepgen export ... --engine` or "
            "tensorrt.build_engines(export_dir), or pass build=True"
        )
    logger.info("building %s (%s): %s", engine_path, reason, trtexec_command(onnx_path, profiles))
    engine_dir.mkdir(parents=True, exist_ok=True)
    return build_engine(onnx_path, profiles, engine_path=engine_path, timing_cache=engine_dir / "timing.cache",
                        optimization_level=optimization_level, workspace_bytes=workspace_bytes, device=device)


def build_engines(
    export_dir: str | os.PathLike,
    *,
    stages=None,
    engine_dir: str | os.PathLike | None = None,
    ranges: ExportRanges | None = None,
    optimization_level: int = 3,
    workspace_bytes: int | None = None,
    progress: bool = True,
) -> dict[str, Path]:
    """Build (or keep, when up to date) the engine of every exported stage ahead of time: ``deepgen export
    --engine``. Returns {stage: engine path}."""
    exported = ExportedModel.load(export_dir)
    stages = list(exported.stages) if stages is None else list(stages)
    iterator = stages
    if progress:
        from tqdm.auto import tqdm

        iterator = tqdm(stages, desc="engines", unit="stage")
    return {stage: ensure_engine(exported, stage, engine_dir=engine_dir, ranges=ranges, build=True,
                                 optimization_level=optimization_level, workspace_bytes=workspace_bytes)
            for stage in iterator}
