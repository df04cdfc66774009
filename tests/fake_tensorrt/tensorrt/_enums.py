"""The enums of the ``tensorrt`` module, with members that exist only in some versions.

pybind11 enums answer ``trt.BuilderFlag.FP16`` on TensorRT 11 with ``AttributeError: type object
'tensorrt.tensorrt.BuilderFlag' has no attribute 'FP16'``; :class:`_VersionedEnumType` does the same, reading the
emulated version at attribute-access time (so ``monkeypatch.setattr(trt, "__version__", ...)`` takes effect at once).

Values are TensorRT 10.x's (``NvInfer.h``; TensorRT 11 renumbered some BuilderFlag members, which no caller should
depend on: they are used by name).
"""

from __future__ import annotations

import enum
from collections.abc import Callable

# Set by the package: returns the emulated (major, minor, patch).
version_of: Callable[[], tuple[int, ...]] = lambda: (10, 15, 1)  # noqa: E731

# enum name -> {member: first major version without it}.
# TensorRT 10.x -> 11.x migration guide, "Removed Python APIs and Replacements"
# (docs.nvidia.com/deeplearning/tensorrt/latest/api/migration/tensorrt-10x-to-11x-python-api-reference.html):
# BuilderFlag.FP16/INT8/FP8/BF16/INT4/FP4/OBEY_PRECISION_CONSTRAINTS/PREFER_PRECISION_CONSTRAINTS are removed.
# DIRECT_IO is listed there too, but the 11.4.1 C++ list says "deprecated, not removed": the fake keeps it.
# EXPLICIT_BATCH ("[DEPRECATED] Ignored because networks are always explicit batch in TensorRT 10.0") is gone in 11.
_REMOVED_IN: dict[str, dict[str, int]] = {
    "BuilderFlag": {name: 11 for name in ("FP16", "INT8", "FP8", "BF16", "INT4", "FP4", "OBEY_PRECISION_CONSTRAINTS",
                                          "PREFER_PRECISION_CONSTRAINTS")},
    "NetworkDefinitionCreationFlag": {"EXPLICIT_BATCH": 11},
}


def _absent(enum_name: str, member: str) -> bool:
    removed = _REMOVED_IN.get(enum_name, {}).get(member)
    return removed is not None and version_of()[0] >= removed


class _VersionedEnumType(enum.EnumMeta):
    def __getattribute__(cls, name: str):
        if not name.startswith("_") and _absent(type.__getattribute__(cls, "__name__"), name):
            raise AttributeError(f"type object 'tensorrt.tensorrt.{cls.__name__}' has no attribute '{name}'")
        return super().__getattribute__(name)

    def __getattr__(cls, name: str):
        # Python 3.11's EnumType.__getattr__ would otherwise find the member after __getattribute__ refused it.
        if _absent(cls.__name__, name):
            raise AttributeError(f"type object 'tensorrt.tensorrt.{cls.__name__}' has no attribute '{name}'")
        getattr_ = getattr(enum.EnumMeta, "__getattr__", None)
        if getattr_ is None:
            raise AttributeError(name)
        return getattr_(cls, name)

    def __getitem__(cls, name: str):
        if _absent(cls.__name__, name):
            raise KeyError(name)
        return super().__getitem__(name)

    def __iter__(cls):
        return (m for m in super().__iter__() if not _absent(cls.__name__, m.name))

    @property
    def __members__(cls):
        return {name: m for name, m in super().__members__.items() if not _absent(cls.__name__, name)}


class _Enum(enum.IntEnum, metaclass=_VersionedEnumType):
    def __repr__(self) -> str:
        return f"<{type(self).__name__}.{self.name}: {int(self)}>"

    def __str__(self) -> str:
        return f"{type(self).__name__}.{self.name}"


class Severity(_Enum):
    INTERNAL_ERROR = 0
    ERROR = 1
    WARNING = 2
    INFO = 3
    VERBOSE = 4


class DataType(_Enum):
    FLOAT = 0
    HALF = 1
    INT8 = 2
    INT32 = 3
    BOOL = 4
    UINT8 = 5
    FP8 = 6
    BF16 = 7
    INT64 = 8
    INT4 = 9
    FP4 = 10
    E8M0 = 11

    @property
    def itemsize(self) -> float:
        return {0: 4, 1: 2, 2: 1, 3: 4, 4: 1, 5: 1, 6: 1, 7: 2, 8: 8, 9: 0.5, 10: 0.5, 11: 1}[int(self)]


class TensorIOMode(_Enum):
    NONE = 0
    INPUT = 1
    OUTPUT = 2


class MemoryPoolType(_Enum):
    WORKSPACE = 0
    DLA_MANAGED_SRAM = 1
    DLA_LOCAL_DRAM = 2
    DLA_GLOBAL_DRAM = 3
    TACTIC_DRAM = 4
    TACTIC_SHARED_MEMORY = 5


class NetworkDefinitionCreationFlag(_Enum):
    EXPLICIT_BATCH = 0
    STRONGLY_TYPED = 1
    PREFER_AOT_PYTHON_PLUGINS = 2
    PREFER_JIT_PYTHON_PLUGINS = 3


class BuilderFlag(_Enum):
    FP16 = 0
    INT8 = 1
    DEBUG = 2
    GPU_FALLBACK = 3
    REFIT = 4
    DISABLE_TIMING_CACHE = 5
    TF32 = 6
    SPARSE_WEIGHTS = 7
    SAFETY_SCOPE = 8
    OBEY_PRECISION_CONSTRAINTS = 9
    PREFER_PRECISION_CONSTRAINTS = 10
    DIRECT_IO = 11
    REJECT_EMPTY_ALGORITHMS = 12
    VERSION_COMPATIBLE = 13
    EXCLUDE_LEAN_RUNTIME = 14
    FP8 = 15
    ERROR_ON_TIMING_CACHE_MISS = 16
    BF16 = 17
    DISABLE_COMPILATION_CACHE = 18
    STRIP_PLAN = 19
    REFIT_IDENTICAL = 20
    WEIGHT_STREAMING = 21
    INT4 = 22
    REFIT_INDIVIDUAL = 23
    STRICT_NANS = 24
    MONITOR_MEMORY = 25
    FP4 = 26
    EDITABLE_TIMING_CACHE = 27
    DISTRIBUTIVE_INDEPENDENCE = 28


# Flags that ask the builder to pick reduced precisions: refused on a strongly typed network (10.x).
PRECISION_FLAGS = ("FP16", "BF16", "INT8", "FP8", "INT4", "FP4")


class ErrorCode(_Enum):
    """nvonnxparser::ErrorCode."""

    SUCCESS = 0
    INTERNAL_ERROR = 1
    MEM_ALLOC_FAILED = 2
    MODEL_DESERIALIZE_FAILED = 3
    INVALID_VALUE = 4
    INVALID_GRAPH = 5
    INVALID_NODE = 6
    UNSUPPORTED_GRAPH = 7
    UNSUPPORTED_NODE = 8
    UNSUPPORTED_NODE_ATTR = 9
    UNSUPPORTED_NODE_INPUT = 10
    UNSUPPORTED_NODE_DATATYPE = 11
    UNSUPPORTED_NODE_DYNAMIC = 12
    UNSUPPORTED_NODE_SHAPE = 13
    REFIT_FAILED = 14

    def __str__(self) -> str:  # the binding prints the bare name
        return self.name
