"""TensorRT engines from the exported ONNX files, and the sampling loop on them (optional ``tensorrt`` dependency).

* :func:`profiles_for` — min/opt/max shapes of every input of a stage, from the export's dims or from narrower
  :class:`~deepgen_components.export.specs.ExportRanges` (pure Python);
* :func:`trtexec_command` — the equivalent ``trtexec`` command line (pure Python);
* :func:`build_engine` — TensorRT Python API: ONNX parser, strongly typed network (precision comes from the ONNX
  dtypes; TensorRT 11 is always strongly typed, on 10.x the ``STRONGLY_TYPED`` flag is set), one optimisation
  profile, builder optimisation level, a timing cache file; writes the engine plus a JSON sidecar (TensorRT
  version, GPU name, compute capability) that :func:`load_engine` checks;
* :class:`TensorRTDeepGenPipeline` — ``DeepGenPipeline``'s loop on engines with torch CUDA tensors as I/O, with an
  optional CUDA graph per static input shape (the DiT step repeats one shape every step).

Nothing here imports ``tensorrt`` until an engine is built or loaded.
"""

from __future__ import annotations

import json
import logging
import os
import shlex
import time
from pathlib import Path

import numpy as np
from deepgen_components.export.manifest import ExportedModel
from deepgen_components.export.specs import ExportRanges, ExportSpec, stage_dims
from deepgen_components.export.staged import StagedPipeline

from deepgen_components.conventions import euler_update

__all__ = [
    "EngineRunner",
    "TensorRTDeepGenPipeline",
    "build_engine",
    "check_engine_compatibility",
    "engine_sidecar_path",
    "load_engine",
    "profiles_for",
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


# -- engine sidecar ---------------------------------------------------------------------------------------------


def engine_sidecar_path(engine_path: str | os.PathLike) -> Path:
    engine_path = Path(engine_path)
    return engine_path.with_name(engine_path.name + ".json")


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


def _device_facts(device=None) -> tuple[str, str]:
    import torch

    index = torch.device(device or "cuda").index or 0
    major, minor = torch.cuda.get_device_capability(index)
    return torch.cuda.get_device_name(index), f"{major}.{minor}"


# -- build and load ----------------------------------------------------------------------------------------------


def _tensorrt():
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
    optimisation profile; write it and its JSON sidecar; load/extend/save ``timing_cache`` if given."""
    trt = _tensorrt()
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
        profile.set_shape(name, low, opt, high)
    config.add_optimization_profile(profile)
    cache_file = Path(timing_cache) if timing_cache is not None else None
    cache = config.create_timing_cache(cache_file.read_bytes() if cache_file and cache_file.is_file() else b"")
    config.set_timing_cache(cache, ignore_mismatch=False)
    start = time.perf_counter()
    serialized = builder.build_serialized_network(network, config)
    if serialized is None:
        raise RuntimeError(f"TensorRT {trt.__version__} could not build an engine from {onnx_path} (see its log)")
    engine_path.write_bytes(bytes(serialized))
    if cache_file is not None:
        cache_file.write_bytes(bytes(config.get_timing_cache().serialize()))
    gpu_name, capability = _device_facts(device)
    sidecar = {
        "tensorrt_version": trt.__version__,
        "gpu_name": gpu_name,
        "compute_capability": capability,
        "onnx_file": onnx_path.name,
        "profiles": {name: [list(s) for s in shapes] for name, shapes in profiles.items()},
        "optimization_level": optimization_level,
        "strongly_typed": True,
        "build_seconds": round(time.perf_counter() - start, 1),
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }
    engine_sidecar_path(engine_path).write_text(json.dumps(sidecar, indent=2) + "\n")
    return engine_path


def load_engine(engine_path: str | os.PathLike, *, device=None):
    """Deserialize an engine after checking its sidecar against this TensorRT and GPU."""
    trt = _tensorrt()
    engine_path = Path(engine_path)
    sidecar_path = engine_sidecar_path(engine_path)
    if not engine_path.is_file():
        raise FileNotFoundError(f"engine: {engine_path} not found")
    if not sidecar_path.is_file():
        raise FileNotFoundError(
            f"engine: {sidecar_path} (TensorRT version / GPU of the build) is missing; rebuild with build_engine"
        )
    gpu_name, capability = _device_facts(device)
    check_engine_compatibility(
        json.loads(sidecar_path.read_text()), tensorrt_version=trt.__version__, gpu_name=gpu_name,
        compute_capability=capability, engine_path=str(engine_path),
    )
    runtime = trt.Runtime(trt.Logger(trt.Logger.WARNING))
    engine = runtime.deserialize_cuda_engine(engine_path.read_bytes())
    if engine is None:
        raise RuntimeError(f"TensorRT {trt.__version__} could not deserialize {engine_path}")
    return engine


class EngineRunner:
    """Runs one engine on torch CUDA tensors: sets input shapes and addresses, allocates outputs, enqueues on the
    current stream. With ``cuda_graph=True`` each distinct set of input shapes is captured once (after a warm-up
    run) and replayed, with inputs copied into the graph's static buffers."""

    def __init__(self, engine, *, cuda_graph: bool = False) -> None:
        import torch

        trt = _tensorrt()
        self.engine = engine
        self.context = engine.create_execution_context()
        names = [engine.get_tensor_name(i) for i in range(engine.num_io_tensors)]
        self.inputs = [n for n in names if engine.get_tensor_mode(n) == trt.TensorIOMode.INPUT]
        self.outputs = [n for n in names if engine.get_tensor_mode(n) == trt.TensorIOMode.OUTPUT]
        dtypes = {
            trt.DataType.FLOAT: torch.float32, trt.DataType.HALF: torch.float16, trt.DataType.BF16: torch.bfloat16,
            trt.DataType.INT32: torch.int32, trt.DataType.INT64: torch.int64, trt.DataType.BOOL: torch.bool,
            trt.DataType.INT8: torch.int8, trt.DataType.UINT8: torch.uint8,
        }
        self.dtypes = {n: dtypes[engine.get_tensor_dtype(n)] for n in names}
        self.cuda_graph = cuda_graph
        self._graphs: dict[tuple, tuple] = {}

    def _enqueue(self, feeds: dict, outputs: dict) -> None:
        import torch

        for name in self.inputs:
            self.context.set_tensor_address(name, feeds[name].data_ptr())
        for name in self.outputs:
            self.context.set_tensor_address(name, outputs[name].data_ptr())
        if not self.context.execute_async_v3(torch.cuda.current_stream().cuda_stream):
            raise RuntimeError("TensorRT execute_async_v3 failed (see the TensorRT log)")

    def _prepare(self, feeds: dict) -> tuple[dict, dict]:
        import torch

        prepared = {}
        for name in self.inputs:
            if name not in feeds:
                raise ValueError(f"engine input {name!r} missing; got {sorted(feeds)}")
            tensor = feeds[name].to(device="cuda", dtype=self.dtypes[name]).contiguous()
            if not self.context.set_input_shape(name, tuple(tensor.shape)):
                raise ValueError(f"engine input {name!r}: shape {tuple(tensor.shape)} is outside the engine's profile")
            prepared[name] = tensor
        outputs = {
            name: torch.empty(tuple(self.context.get_tensor_shape(name)), dtype=self.dtypes[name], device="cuda")
            for name in self.outputs
        }
        return prepared, outputs

    def __call__(self, feeds: dict) -> dict:
        import torch

        if not self.cuda_graph:
            prepared, outputs = self._prepare(feeds)
            self._enqueue(prepared, outputs)
            return outputs
        key = tuple((name, tuple(feeds[name].shape)) for name in self.inputs)
        if key not in self._graphs:
            static_in, static_out = self._prepare(feeds)
            self._enqueue(static_in, static_out)  # warm-up outside the capture (TensorRT allocates lazily)
            torch.cuda.synchronize()
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph):
                self._enqueue(static_in, static_out)
            self._graphs[key] = (graph, static_in, static_out)
        graph, static_in, static_out = self._graphs[key]
        for name in self.inputs:
            static_in[name].copy_(feeds[name].to(device="cuda", dtype=self.dtypes[name]))
        graph.replay()
        return {name: value.clone() for name, value in static_out.items()}


class TensorRTDeepGenPipeline(StagedPipeline):
    """``DeepGenPipeline``'s loop on TensorRT engines (torch CUDA tensors as I/O).

    Engines live in ``engine_dir`` (default: ``<export>/engines``) as ``<stage>.engine`` + sidecar; a missing one is
    built from the stage's ONNX file with :func:`profiles_for` (``ranges`` narrows the exported ranges, e.g. to a
    single resolution for CUDA graphs), ``optimization_level`` and a shared timing cache."""

    output_types = ("pil", "np", "float", "pt", "latent")

    def __init__(
        self,
        path: str | os.PathLike,
        *,
        engine_dir: str | os.PathLike | None = None,
        ranges: ExportRanges | None = None,
        build: bool = True,
        cuda_graph: bool = False,
        optimization_level: int = 3,
    ) -> None:
        super().__init__(ExportedModel.load(path))
        self.engine_dir = Path(engine_dir) if engine_dir is not None else self.exported.path / "engines"
        self.ranges = ranges
        self.build = build
        self.cuda_graph = cuda_graph
        self.optimization_level = optimization_level
        self._runners: dict[str, EngineRunner] = {}

    def runner(self, stage: str) -> EngineRunner:
        if stage in self._runners:
            return self._runners[stage]
        engine_path = self.engine_dir / f"{stage}.engine"
        if not engine_path.is_file():
            if not self.build:
                raise FileNotFoundError(f"engine: {engine_path} not found (build=False)")
            self.engine_dir.mkdir(parents=True, exist_ok=True)
            profiles = profiles_for(self.exported.stage(stage), self.ranges, config=self.config)
            logger.info("building %s: %s", engine_path, trtexec_command(self.exported.stage_file(stage), profiles))
            build_engine(
                self.exported.stage_file(stage), profiles, engine_path=engine_path,
                timing_cache=self.engine_dir / "timing.cache", optimization_level=self.optimization_level,
            )
        self._runners[stage] = EngineRunner(load_engine(engine_path), cuda_graph=self.cuda_graph)
        return self._runners[stage]

    # -- backend hooks -----------------------------------------------------------------------------------
    def _run(self, stage: str, feeds: dict) -> dict:
        return self.runner(stage)(feeds)

    def _asarray(self, array):
        import torch

        if isinstance(array, torch.Tensor):
            return array.cuda()
        if str(array.dtype) == "bfloat16":  # ml_dtypes -> reinterpret the bits
            return torch.from_numpy(np.ascontiguousarray(array).view(np.uint16)).view(torch.bfloat16).cuda()
        return torch.from_numpy(np.ascontiguousarray(array)).cuda()

    def _numpy(self, array) -> np.ndarray:
        import torch

        if array.dtype == torch.bfloat16:
            array = array.float()
        return array.detach().cpu().numpy()

    def _cat(self, arrays: list):
        import torch

        return torch.cat(arrays, dim=0)

    def _take(self, array, index: np.ndarray):
        import torch

        return array[torch.as_tensor(index, device=array.device)].contiguous()

    def _cast(self, array, dtype: str):
        import torch

        return array.to(getattr(torch, dtype))

    def _finite_flag(self, array):
        import torch

        return torch.isfinite(array).all()

    def _first_false(self, flags: list) -> int:
        import torch

        if not flags:
            return -1
        bad = torch.nonzero(~torch.stack(flags)).flatten().tolist()  # one host sync for the whole loop
        return bad[0] if bad else -1

    def _euler(self, latents, velocity, dt: np.float32):
        return euler_update(latents.float(), velocity.float(), float(dt))

    def _synced(self, start: float) -> float:
        import torch

        torch.cuda.synchronize()
        return time.perf_counter() - start

    def _convert_pixels(self, pixels, output_type: str):
        if output_type == "pt":
            return pixels.float()
        return super()._convert_pixels(pixels, output_type)
