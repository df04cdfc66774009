"""A faithful fake of the ``tensorrt`` Python module (TensorRT 10.x / 11.x API surface), for tests only.

The build path (parser, strongly typed network, profiles, builder config, timing cache) validates like TensorRT and
serializes a self-contained "engine" (see ``_plan``); the runtime path deserializes it and executes the network with
ONNX Runtime (CPU) reading inputs from and writing outputs to the raw *host* addresses given to
``set_tensor_address`` (e.g. a CPU torch tensor's ``data_ptr()``). What it proves and what it cannot: README.md beside
this package. Error messages reproduce TensorRT's own where a source was found (cited at each); the others say
"(fake)".

The emulated version is ``__version__``, read at every call: ``monkeypatch.setattr(trt, "__version__", "11.4.0")``
changes the behaviour at once (enum members, strong typing, parser support, engine compatibility).
"""

from __future__ import annotations

import datetime
import hashlib
import numbers
import os
import re
import sys

import numpy as np

from . import _enums, _onnx_support, _plan
from ._enums import (
    BuilderFlag,
    DataType,
    ErrorCode,
    MemoryPoolType,
    NetworkDefinitionCreationFlag,
    TensorIOMode,
)

__version__ = "10.15.1"

__all__ = [
    "Builder", "BuilderFlag", "DataType", "Dims", "ErrorCode", "IBuilderConfig", "ICudaEngine", "IExecutionContext",
    "IHostMemory", "ILogger", "INetworkDefinition", "IOptimizationProfile", "ITensor", "ITimingCache", "Logger",
    "MemoryPoolType", "NetworkDefinitionCreationFlag", "OnnxParser", "ParserError", "Runtime", "TensorIOMode",
    "fake_log", "fake_messages", "nptype",
]


def _version() -> tuple[int, ...]:
    parts = tuple(int(p) for p in re.findall(r"\d+", str(__version__))[:3])
    if len(parts) < 2:
        raise ValueError(f"tensorrt.__version__ must look like '10.15.1', got {__version__!r}")
    return parts


_enums.version_of = _version

# -- logging -----------------------------------------------------------------------------------------------------

# Every message any logger of this module received, as (severity, text): the fake's way to make TensorRT's logged
# errors observable to tests (real TensorRT only hands them to the ILogger).
fake_log: list[tuple[_enums.Severity, str]] = []


def fake_messages(severity: _enums.Severity = _enums.Severity.ERROR) -> list[str]:
    """Logged messages of exactly ``severity`` (fake-only helper)."""
    return [text for level, text in fake_log if level == severity]


class ILogger:
    """Base class of loggers: subclasses call ``ILogger.__init__(self)`` and implement ``log(severity, msg)``."""

    Severity = _enums.Severity

    def __init__(self) -> None:
        pass

    def log(self, severity, msg: str) -> None:
        raise RuntimeError("Tried to call pure virtual function \"ILogger::log\"")


class Logger(ILogger):
    """TensorRT's default logger: prints messages at ``min_severity`` or more severe to stderr, like the real one
    (``[date] [TRT] [E] message``); also keeps them in ``fake_records``."""

    INTERNAL_ERROR = _enums.Severity.INTERNAL_ERROR
    ERROR = _enums.Severity.ERROR
    WARNING = _enums.Severity.WARNING
    INFO = _enums.Severity.INFO
    VERBOSE = _enums.Severity.VERBOSE

    def __init__(self, min_severity=_enums.Severity.WARNING) -> None:
        super().__init__()
        self.min_severity = _enums.Severity(min_severity)
        self.fake_records: list[tuple[_enums.Severity, str]] = []

    def log(self, severity, msg: str) -> None:
        severity = _enums.Severity(severity)
        self.fake_records.append((severity, msg))
        if severity <= self.min_severity:
            stamp = datetime.datetime.now().strftime("%m/%d/%Y-%H:%M:%S")
            print(f"[{stamp}] [TRT] [{'FEWIV'[int(severity)]}] {msg}", file=sys.stderr)


def _emit(logger: ILogger, severity: _enums.Severity, msg: str) -> None:
    fake_log.append((severity, msg))
    logger.log(severity, msg)


def _error(logger: ILogger, msg: str) -> None:
    _emit(logger, _enums.Severity.ERROR, msg)


# -- small types -------------------------------------------------------------------------------------------------


class Dims(tuple):
    """tensorrt.Dims: a shape, -1 for a runtime (dynamic) dimension."""

    MAX_DIMS = 8

    def __new__(cls, shape=()):
        return super().__new__(cls, (int(d) for d in shape))


def _as_dims(value, argument: str) -> Dims:
    if isinstance(value, (str, bytes)) or not hasattr(value, "__iter__"):
        raise TypeError(f"{argument}: expected a shape (Dims, tuple or list of ints), got {type(value).__name__}")
    items = list(value)
    if not all(isinstance(d, numbers.Integral) for d in items):
        raise TypeError(f"{argument}: every dimension must be an int, got {items}")
    if len(items) > Dims.MAX_DIMS:
        raise ValueError(f"{argument}: at most {Dims.MAX_DIMS} dimensions, got {len(items)}")
    return Dims(items)


class IHostMemory(bytes):
    """Host memory returned by the builder / serialize(): supports the buffer protocol (``bytes(mem)``,
    ``memoryview(mem)``), ``nbytes`` and ``dtype``. (Being a ``bytes`` subclass is the fake's shortcut.)"""

    @property
    def nbytes(self) -> int:
        return len(self)

    @property
    def dtype(self) -> DataType:
        return DataType.UINT8


_NUMPY = {DataType.FLOAT: np.float32, DataType.HALF: np.float16, DataType.INT8: np.int8, DataType.INT32: np.int32,
          DataType.INT64: np.int64, DataType.BOOL: np.bool_, DataType.UINT8: np.uint8}


def nptype(trt_type: DataType):
    """The numpy type of a TensorRT DataType (the real helper raises TypeError for types numpy lacks, e.g. BF16)."""
    if DataType(trt_type) not in _NUMPY:
        raise TypeError("Could not resolve TensorRT datatype to an equivalent numpy datatype.")
    return _NUMPY[DataType(trt_type)]


float32, float16, bfloat16 = DataType.FLOAT, DataType.HALF, DataType.BF16
int8, int32, int64, uint8 = DataType.INT8, DataType.INT32, DataType.INT64, DataType.UINT8
fp8, int4, fp4 = DataType.FP8, DataType.INT4, DataType.FP4
bool = DataType.BOOL  # noqa: A001 (the real module exports trt.bool; this module never calls bool())

# ONNX TensorProto element types <-> TensorRT DataType (what TensorRT accepts as network I/O).
_FROM_ONNX = {1: DataType.FLOAT, 2: DataType.UINT8, 3: DataType.INT8, 6: DataType.INT32, 7: DataType.INT64,
              9: DataType.BOOL, 10: DataType.HALF, 16: DataType.BF16, 17: DataType.FP8, 22: DataType.INT4,
              23: DataType.FP4}
_TO_ONNX = {v: k for k, v in _FROM_ONNX.items()}


# -- network and parser ------------------------------------------------------------------------------------------


class ITensor:
    def __init__(self, name: str, shape: Dims, dtype: DataType, is_input: bool) -> None:
        self.name = name
        self.shape = shape
        self.dtype = dtype
        self.is_network_input = is_input
        self.is_network_output = not is_input


class INetworkDefinition:
    """Created by ``Builder.create_network(flags)``; populated by ``OnnxParser``."""

    def __init__(self, flags: int) -> None:
        self.flags = int(flags)
        self.name = "Unnamed Network 0"
        self._inputs: list[ITensor] = []
        self._outputs: list[ITensor] = []
        self._model_bytes = b""
        self._nodes: list[tuple[str, str]] = []  # (op_type, node name), for timing-cache keys

    num_inputs = property(lambda self: len(self._inputs))
    num_outputs = property(lambda self: len(self._outputs))
    num_layers = property(lambda self: len(self._nodes))
    has_implicit_batch_dimension = property(lambda self: False)

    def get_input(self, index: int) -> ITensor | None:
        return self._inputs[index] if 0 <= index < len(self._inputs) else None

    def get_output(self, index: int) -> ITensor | None:
        return self._outputs[index] if 0 <= index < len(self._outputs) else None

    def get_flag(self, flag: NetworkDefinitionCreationFlag) -> bool:
        # TensorRT 11: "STRONGLY_TYPED: Deprecated in 11.0. Strongly typed mode is always enabled" (NvInfer.h).
        if int(flag) == int(NetworkDefinitionCreationFlag.STRONGLY_TYPED) and _version()[0] >= 11:
            return True
        return self.flags & (1 << int(flag)) != 0

    @property
    def fake_strongly_typed(self) -> bool:
        return self.get_flag(NetworkDefinitionCreationFlag.STRONGLY_TYPED)


class ParserError:
    """nvonnxparser::IParserError; ``str()`` is the binding's format."""

    def __init__(self, code: ErrorCode, desc: str, node: int = -1, node_name: str = "", node_operator: str = "",
                 func: str = "parse") -> None:
        self._code, self._desc, self._node = code, desc, node
        self._node_name, self._node_operator, self._func = node_name, node_operator, func

    def code(self) -> ErrorCode:
        return self._code

    def desc(self) -> str:
        return self._desc

    def node(self) -> int:
        return self._node

    def node_name(self) -> str:
        return self._node_name

    def node_operator(self) -> str:
        return self._node_operator

    def func(self) -> str:
        return self._func

    def file(self) -> str:
        return "ModelImporter.cpp"

    def line(self) -> int:
        return 0

    def local_function_stack(self) -> list[str]:
        return []

    def __str__(self) -> str:
        # Format as printed by TensorRT 10's parser, e.g. Polygraphy's `inspect capability` docs: "In node 0 with
        # name: Fake1 and operator: FAKE! (checkFallbackPluginImporter): INVALID_NODE: creator && ..."
        return (f"In node {self._node} with name: {self._node_name} and operator: {self._node_operator} "
                f"({self._func}): {self._code}: {self._desc}")

    __repr__ = __str__


IParserError = ParserError

# The parser's answer to an operator it has no importer for (it then looks for a plugin of that name), as quoted in
# Polygraphy's docs (tools/Polygraphy/examples/cli/inspect/08_inspecting_tensorrt_onnx_support).
_NO_IMPORTER = 'creator && "Plugin not found, are the plugin name, version, and namespace correct?"'


class OnnxParser:
    """ONNX -> network. ``parse_from_file`` reads external data beside the file, like the real parser."""

    def __init__(self, network: INetworkDefinition, logger: ILogger) -> None:
        if not isinstance(network, INetworkDefinition) or not isinstance(logger, ILogger):
            raise TypeError("__init__(): incompatible constructor arguments: expected (network: "
                            "tensorrt.INetworkDefinition, logger: tensorrt.ILogger)")
        self._network, self._logger = network, logger
        self._errors: list[ParserError] = []

    num_errors = property(lambda self: len(self._errors))

    def get_error(self, index: int) -> ParserError | None:
        return self._errors[index] if 0 <= index < len(self._errors) else None

    def clear_errors(self) -> None:
        self._errors.clear()

    def supports_operator(self, op_name: str) -> bool:
        return _onnx_support.op_supported(op_name, "", _version())

    def _fail(self, error: ParserError) -> bool:
        self._errors.append(error)
        _error(self._logger, str(error))
        return False

    def parse_from_file(self, model: str) -> bool:
        import onnx

        path = os.fspath(model)
        if not os.path.isfile(path):
            return self._fail(ParserError(ErrorCode.MODEL_DESERIALIZE_FAILED, f"Failed to open file: {path}",
                                          func="parseFromFile"))
        try:
            proto = onnx.load(path, load_external_data=True)  # external data is resolved beside the file
        except Exception as err:  # noqa: BLE001 (any failure is a parse failure)
            return self._fail(ParserError(ErrorCode.MODEL_DESERIALIZE_FAILED, f"Failed to parse ONNX model ({err})",
                                          func="parseFromFile"))
        return self._import(proto)

    def parse(self, model, path: str | None = None) -> bool:
        import onnx
        from onnx.external_data_helper import load_external_data_for_model, uses_external_data

        try:
            proto = onnx.load_from_string(bytes(memoryview(model)))
        except Exception as err:  # noqa: BLE001
            return self._fail(ParserError(ErrorCode.MODEL_DESERIALIZE_FAILED, f"Failed to parse ONNX model ({err})"))
        if any(uses_external_data(t) for t in proto.graph.initializer):
            if path is None:  # "path: The path to the model file. Only required if the model has externally stored
                # weights." (OnnxParser.parse docs)
                return self._fail(ParserError(ErrorCode.INVALID_GRAPH, "(fake) the model has external weights but "
                                              "no path was given to find them"))
            load_external_data_for_model(proto, os.path.dirname(os.fspath(path)))
        return self._import(proto)

    def _import(self, proto) -> bool:
        version = _version()
        local_functions = {(f.domain, f.name) for f in proto.functions}
        for index, node in enumerate(proto.graph.node):
            if (node.domain, node.op_type) in local_functions:
                continue  # model-local functions are inlined by the parser
            if not _onnx_support.op_supported(node.op_type, node.domain, version):
                return self._fail(ParserError(ErrorCode.INVALID_NODE, _NO_IMPORTER, index, node.name, node.op_type,
                                              func="checkFallbackPluginImporter"))
        # After the node check, so that an operator too new for this version is named rather than its opset.
        opset = next((o.version for o in proto.opset_import if o.domain in ("", "ai.onnx")), None)
        highest = _onnx_support.max_opset(version)
        if opset is not None and not _onnx_support.MIN_OPSET <= opset <= highest:
            return self._fail(ParserError(
                ErrorCode.UNSUPPORTED_GRAPH, f"(fake) ONNX opset {opset} is outside the opsets "
                f"{_onnx_support.MIN_OPSET}..{highest} that the parser of TensorRT {__version__} reads"))
        initializers = {t.name for t in proto.graph.initializer}
        tensors = []
        for value, is_input in [(v, True) for v in proto.graph.input if v.name not in initializers] + [
                (v, False) for v in proto.graph.output]:
            tensor_type = value.type.tensor_type
            dtype = _FROM_ONNX.get(tensor_type.elem_type)
            if dtype is None:
                return self._fail(ParserError(ErrorCode.UNSUPPORTED_GRAPH, f"(fake) network I/O {value.name!r} has "
                                              f"ONNX element type {tensor_type.elem_type}, which TensorRT has no type for"))
            shape = Dims(d.dim_value if d.HasField("dim_value") else -1 for d in tensor_type.shape.dim)
            tensors.append(ITensor(value.name, shape, dtype, is_input))
        network = self._network
        network._inputs = [t for t in tensors if t.is_network_input]
        network._outputs = [t for t in tensors if t.is_network_output]
        network._nodes = [(n.op_type, n.name) for n in proto.graph.node]
        network._model_bytes = proto.SerializeToString()  # weights embedded: the engine is self-contained
        return True


# -- builder -----------------------------------------------------------------------------------------------------


class IOptimizationProfile:
    """Min/opt/max shapes per dynamic input. ``set_shape`` raises like the binding (python/src/infer/pyCore.cpp:
    "Shape provided for min is inconsistent with other shapes.") when ``setDimensions`` refuses: a rank differing from
    the shapes already set, a negative dimension, or min <= opt <= max broken."""

    def __init__(self) -> None:
        self._shapes: dict[str, list[Dims | None]] = {}

    def set_shape(self, input: str, min, opt, max) -> None:  # noqa: A002 (the binding's parameter names)
        slots = self._shapes.setdefault(str(input), [None, None, None])
        for index, (which, value) in enumerate((("min", min), ("opt", opt), ("max", max))):
            dims = _as_dims(value, which)
            others = [s for i, s in enumerate(slots) if s is not None and i != index]
            consistent = all(d >= 0 for d in dims) and all(len(s) == len(dims) for s in others)
            lower, upper = (slots[index - 1] if index > 0 else None), (slots[index + 1] if index < 2 else None)
            if consistent and lower is not None and len(lower) == len(dims):
                consistent = all(a <= b for a, b in zip(lower, dims))
            if consistent and upper is not None and len(upper) == len(dims):
                consistent = all(a <= b for a, b in zip(dims, upper))
            if not consistent:
                raise RuntimeError(f"Shape provided for {which} is inconsistent with other shapes.")
            slots[index] = dims

    def get_shape(self, input: str) -> list[Dims]:  # noqa: A002
        slots = self._shapes.get(str(input))
        return list(slots) if slots and all(s is not None for s in slots) else []

    def _valid(self) -> bool:
        return all(all(s is not None for s in slots) for slots in self._shapes.values())


class ITimingCache:
    """Layer timings, keyed by layer; reused across builds (the fake records one entry per ONNX node)."""

    def __init__(self, version: str, entries: dict[str, str] | None = None) -> None:
        self._version, self._entries = version, dict(entries or {})

    def serialize(self) -> IHostMemory:
        return IHostMemory(_plan.dump_cache(self._version, self._entries))

    def combine(self, input_cache: ITimingCache, ignore_mismatch: bool) -> bool:
        # "The input cache must be generated by a TensorRT build of exact same version, otherwise combine will be
        # skipped and return false." (ITimingCache.combine docs)
        if input_cache._version != self._version:
            return False
        for key, value in input_cache._entries.items():
            self._entries.setdefault(key, value)
        return True

    def reset(self) -> bool:
        self._entries.clear()
        return True


_FAKE_DEVICE_MEMORY = 80 * 2**30  # the default WORKSPACE limit is the device's memory; the fake has no device


class IBuilderConfig:
    def __init__(self, logger: ILogger) -> None:
        self._logger = logger
        self._flags = 1 << int(BuilderFlag.TF32)  # TF32 "Enabled by default." (BuilderFlag docs)
        self._level = 3
        self._pools: dict[MemoryPoolType, int] = {}
        self._profiles: list[IOptimizationProfile] = []
        self._cache: ITimingCache | None = None

    @property
    def builder_optimization_level(self) -> int:
        return self._level

    @builder_optimization_level.setter
    def builder_optimization_level(self, level: int) -> None:
        if not isinstance(level, numbers.Integral) or not 0 <= level <= 5:
            _error(self._logger, f"IBuilderConfig::setBuilderOptimizationLevel: Error Code 3: API Usage Error "
                   f"(fake: level must be in 0..5, got {level!r})")
            return
        self._level = int(level)

    @property
    def flags(self) -> int:
        return self._flags

    @flags.setter
    def flags(self, value: int) -> None:
        self._flags = int(value)

    def set_flag(self, flag: BuilderFlag) -> None:
        self._flags |= 1 << int(BuilderFlag(flag))

    def clear_flag(self, flag: BuilderFlag) -> None:
        self._flags &= ~(1 << int(BuilderFlag(flag)))

    def get_flag(self, flag: BuilderFlag) -> bool:
        return self._flags & (1 << int(BuilderFlag(flag))) != 0

    def set_memory_pool_limit(self, pool: MemoryPoolType, pool_size: int) -> None:
        if not isinstance(pool_size, numbers.Integral) or pool_size < 0:
            raise TypeError(f"set_memory_pool_limit(): pool_size must be a non-negative int, got {pool_size!r}")
        self._pools[MemoryPoolType(pool)] = int(pool_size)

    def get_memory_pool_limit(self, pool: MemoryPoolType) -> int:
        default = _FAKE_DEVICE_MEMORY if MemoryPoolType(pool) == MemoryPoolType.WORKSPACE else 0
        return self._pools.get(MemoryPoolType(pool), default)

    def add_optimization_profile(self, profile: IOptimizationProfile) -> int:
        """The profile's index, or -1 if it is not valid (IBuilderConfig::addOptimizationProfile docs)."""
        if not isinstance(profile, IOptimizationProfile) or not profile._valid():
            return -1
        self._profiles.append(profile)
        return len(self._profiles) - 1

    num_optimization_profiles = property(lambda self: len(self._profiles))

    def create_timing_cache(self, serialized_timing_cache) -> ITimingCache:
        """An empty cache from ``b""``; a cache that cannot be read (bad magic, another TensorRT version) is reported
        and replaced by an empty one, as real TensorRT does (NVIDIA/TensorRT#3566: "Serialization assertion
        magicTagRead == kMAGIC_TAG failed.Magic tag does not match" then "The timing cache will not be used!")."""
        blob = bytes(memoryview(serialized_timing_cache))
        if not blob:
            return ITimingCache(__version__)
        try:
            version, entries = _plan.load_cache(blob)
        except _plan.SerializationError as err:
            _error(self._logger, f"Error Code 1: Serialization (Serialization assertion magicTagRead == kMAGIC_TAG "
                   f"failed.{err})")
            _error(self._logger, "Error Code 4: The timing cache will not be used!")
            return ITimingCache(__version__)
        if version != __version__:
            _error(self._logger, f"Error Code 1: Serialization (Serialization assertion stdVersionRead == "
                   f"kSERIALIZATION_VERSION failed.Version tag does not match. Note: Current Version: {__version__}, "
                   f"Serialized Engine Version: {version})")
            _error(self._logger, "Error Code 4: The timing cache will not be used!")
            return ITimingCache(__version__)
        return ITimingCache(version, entries)

    def set_timing_cache(self, cache: ITimingCache, ignore_mismatch: bool) -> bool:
        if not isinstance(cache, ITimingCache):
            raise TypeError(f"set_timing_cache(): cache must be a tensorrt.ITimingCache, got {type(cache).__name__}")
        self._cache = cache
        return True

    def get_timing_cache(self) -> ITimingCache | None:
        return self._cache


class Builder:
    def __init__(self, logger: ILogger) -> None:
        if not isinstance(logger, ILogger):
            raise TypeError("__init__(): incompatible constructor arguments: expected (logger: tensorrt.ILogger)")
        self.logger = logger
        self.max_threads = os.cpu_count() or 1

    platform_has_tf32 = property(lambda self: True)
    num_DLA_cores = property(lambda self: 0)

    def create_network(self, flags: int = 0) -> INetworkDefinition:
        return INetworkDefinition(flags)

    def create_builder_config(self) -> IBuilderConfig:
        return IBuilderConfig(self.logger)

    def create_optimization_profile(self) -> IOptimizationProfile:
        return IOptimizationProfile()

    def _fail(self, message: str) -> None:
        _error(self.logger, f"IBuilder::buildSerializedNetwork: {message}")

    def build_serialized_network(self, network: INetworkDefinition, config: IBuilderConfig) -> IHostMemory | None:
        """The serialized engine, or None with the reason logged (like TensorRT)."""
        if not isinstance(network, INetworkDefinition) or not isinstance(config, IBuilderConfig):
            raise TypeError("build_serialized_network(): incompatible function arguments: expected (network: "
                            "tensorrt.INetworkDefinition, config: tensorrt.IBuilderConfig)")
        if network.num_outputs == 0:
            return self._fail("Error Code 4: API Usage Error (Network must have at least one output)")
        if _version()[0] < 11 and network.fake_strongly_typed:
            for name in _enums.PRECISION_FLAGS:
                if config.get_flag(BuilderFlag[name]):
                    # TensorRT 10.6 (NVIDIA/TensorRT#4253): "IBuilder::buildSerializedNetwork: Error Code 3: API
                    # Usage Error (Parameter check failed, condition: !config.getFlag(BuilderFlag::kFP16). )"
                    return self._fail("Error Code 3: API Usage Error (Parameter check failed, condition: "
                                      f"!config.getFlag(BuilderFlag::k{name}). )")
        dynamic = [t for t in network._inputs if any(d < 0 for d in t.shape)]
        if dynamic and not config._profiles:
            return self._fail("Error Code 4: API Usage Error (Network has dynamic or shape inputs, but no "
                              "optimization profile has been defined.)")
        profiles = []
        inputs = {t.name: t for t in network._inputs}
        for index, profile in enumerate(config._profiles or [IOptimizationProfile()]):
            for name in profile._shapes:
                if name not in inputs:
                    return self._fail(f"Error Code 4: API Usage Error (fake: profile {index} sets shapes for "
                                      f"{name!r}, which is not a network input; inputs: {sorted(inputs)})")
            shapes = {}
            for tensor in network._inputs:
                if tensor.name not in profile._shapes:
                    if tensor in dynamic:
                        return self._fail(f"Error Code 4: API Usage Error ({tensor.name}: dynamic input is missing "
                                          f"dimensions in profile {index}.)")
                    shapes[tensor.name] = [list(tensor.shape)] * 3
                    continue
                low, opt, high = profile.get_shape(tensor.name)
                if len(low) != len(tensor.shape):
                    return self._fail(f"Error Code 4: API Usage Error ({tensor.name}: number of dimensions is "
                                      f"{len(low)} in profile {index} but {len(tensor.shape)} in network definition.)")
                for axis, fixed in enumerate(tensor.shape):
                    if fixed >= 0 and not low[axis] == opt[axis] == high[axis] == fixed:
                        return self._fail(
                            f"Error Code 4: API Usage Error ({tensor.name}: for dimension number {axis} in profile "
                            f"{index} does not match network definition (got min={low[axis]}, opt={opt[axis]}, "
                            f"max={high[axis]}), expected min=opt=max={fixed}).)")
                shapes[tensor.name] = [list(low), list(opt), list(high)]
            profiles.append(shapes)
        if not self._time_layers(network, config, profiles):
            return None
        header = {
            "tensorrt_version": __version__,
            "io": [{"name": t.name, "mode": "INPUT" if t.is_network_input else "OUTPUT", "dtype": t.dtype.name,
                    "shape": list(t.shape)} for t in network._inputs + network._outputs],
            "profiles": profiles,
            "strongly_typed": network.fake_strongly_typed,
            "builder_flags": sorted(f.name for f in BuilderFlag if config.get_flag(f)),
            "optimization_level": config.builder_optimization_level,
            "workspace": config.get_memory_pool_limit(MemoryPoolType.WORKSPACE),
            "num_layers": network.num_layers,
        }
        return IHostMemory(_plan.dump_plan(header, network._model_bytes))

    def _time_layers(self, network: INetworkDefinition, config: IBuilderConfig, profiles: list) -> bool:
        """Stand-in for tactic timing: one timing-cache entry per layer and profile; honours DISABLE_TIMING_CACHE
        and ERROR_ON_TIMING_CACHE_MISS ("Set to make the builder fail if a layer misses the timing cache")."""
        cache = config._cache
        if cache is None or config.get_flag(BuilderFlag.DISABLE_TIMING_CACHE):
            return True
        for shapes in profiles:
            digest = hashlib.sha1(repr(sorted(shapes.items())).encode()).hexdigest()[:12]
            for op_type, name in network._nodes:
                key = f"{op_type}:{name}:{digest}"
                if key not in cache._entries:
                    if config.get_flag(BuilderFlag.ERROR_ON_TIMING_CACHE_MISS):
                        self._fail(f"Error Code 2: Internal Error (fake: timing cache miss for layer {name} "
                                   f"({op_type}) with ERROR_ON_TIMING_CACHE_MISS set)")
                        return False
                    cache._entries[key] = "fake-tactic"
        return True


# -- runtime -----------------------------------------------------------------------------------------------------


class Runtime:
    def __init__(self, logger: ILogger) -> None:
        if not isinstance(logger, ILogger):
            raise TypeError("__init__(): incompatible constructor arguments: expected (logger: tensorrt.ILogger)")
        self.logger = logger

    def deserialize_cuda_engine(self, serialized_engine) -> ICudaEngine | None:
        """The engine, or None with the reason logged: bytes that are no engine, or an engine serialized by another
        TensorRT version, in TensorRT's words (NVIDIA/TensorRT#1596, #2072; yuvraj108c/ComfyUI-Dwpose-Tensorrt#5:
        "IRuntime::deserializeCudaEngine: Error Code 1: Serialization (Serialization assertion stdVersionRead ==
        kSERIALIZATION_VERSION failed.Version tag does not match. Note: Current Version: 237, Serialized Engine
        Version: 239)"). The fake's version tag is the TensorRT version string."""
        blob = bytes(memoryview(serialized_engine))
        try:
            header, model_bytes = _plan.load_plan(blob)
        except _plan.SerializationError as err:
            _error(self.logger, "IRuntime::deserializeCudaEngine: Error Code 1: Serialization (Serialization "
                   f"assertion magicTagRead == kMAGIC_TAG failed.{err})")
            return None
        if header["tensorrt_version"] != __version__:
            _error(self.logger, "IRuntime::deserializeCudaEngine: Error Code 1: Serialization (Serialization "
                   "assertion stdVersionRead == kSERIALIZATION_VERSION failed.Version tag does not match. Note: "
                   f"Current Version: {__version__}, Serialized Engine Version: {header['tensorrt_version']})")
            return None
        from ._engine import ICudaEngine

        return ICudaEngine(header, model_bytes, blob, self.logger)


from ._engine import ICudaEngine, IExecutionContext  # noqa: E402 (the runtime half, which needs the types above)
