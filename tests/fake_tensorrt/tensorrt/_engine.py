"""The runtime half of the fake: ``ICudaEngine`` (tensor-name API over the plan's header) and ``IExecutionContext``
(shapes, addresses, ``execute_async_v3``), executing the embedded ONNX model with ONNX Runtime on the CPU.

Addresses are HOST addresses (a CPU torch tensor's ``data_ptr()``, a numpy array's ``ctypes.data``): ONNX Runtime's
I/O binding reads the inputs from and writes the outputs to that memory directly, without copying a Python object.
A device pointer or a dangling address crashes the process, as a bad pointer would crash real TensorRT.
"""

from __future__ import annotations

import numbers

import numpy as np

from . import _TO_ONNX, Dims, IHostMemory, ILogger, _as_dims, _error
from ._enums import DataType, TensorIOMode


class ICudaEngine:
    """A deserialized engine: its I/O tensors by name, its optimisation profiles, and (lazily, once) an ONNX Runtime
    session on the embedded model."""

    def __init__(self, header: dict, model_bytes: bytes, blob: bytes, logger: ILogger) -> None:
        self._header, self._model_bytes, self._blob, self._logger = header, model_bytes, blob, logger
        self._io = {t["name"]: t for t in header["io"]}
        self._names = [t["name"] for t in header["io"]]
        self._ort = None
        self._ort_error: str | None = None
        self._shape_cache: dict[tuple, dict[str, tuple[int, ...]] | None] = {}
        self.name = "Unnamed Network 0"

    fake_header = property(lambda self: dict(self._header))
    num_io_tensors = property(lambda self: len(self._names))
    num_layers = property(lambda self: self._header["num_layers"])
    num_optimization_profiles = property(lambda self: len(self._header["profiles"]))
    device_memory_size_v2 = property(lambda self: 0)
    refittable = property(lambda self: False)

    def get_tensor_name(self, index: int) -> str | None:
        return self._names[index] if 0 <= index < len(self._names) else None

    def get_tensor_mode(self, name: str) -> TensorIOMode:
        tensor = self._io.get(name)
        return TensorIOMode[tensor["mode"]] if tensor else TensorIOMode.NONE

    def get_tensor_dtype(self, name: str) -> DataType:
        tensor = self._io.get(name)
        if tensor is None:
            _error(self._logger, f"ICudaEngine::getTensorDataType: Error Code 3: API Usage Error (fake: {name!r} is "
                   "not an input or output tensor)")
            return DataType.FLOAT
        return DataType[tensor["dtype"]]

    def get_tensor_shape(self, name: str) -> Dims:
        """The build-time shape, -1 for runtime dimensions ("Return Dims{-1, {}} if the provided name does not map to
        an input or output tensor", ICudaEngine::getTensorShape docs; the fake returns an empty Dims then)."""
        tensor = self._io.get(name)
        return Dims(tensor["shape"]) if tensor else Dims()

    def get_tensor_profile_shape(self, name: str, profile_index: int) -> list[Dims]:
        """[min, opt, max] of an input under a profile."""
        tensor = self._io.get(name)
        if tensor is None or tensor["mode"] != "INPUT" or not 0 <= profile_index < self.num_optimization_profiles:
            _error(self._logger, f"ICudaEngine::getProfileShape: Error Code 3: API Usage Error (fake: {name!r} is not "
                   f"an input or profile {profile_index} does not exist)")
            return []
        return [Dims(s) for s in self._header["profiles"][profile_index][name]]

    def is_shape_inference_io(self, name: str) -> bool:
        return False

    def create_execution_context(self, strategy=None) -> IExecutionContext:
        return IExecutionContext(self)

    def serialize(self) -> IHostMemory:
        return IHostMemory(self._blob)

    # -- ONNX Runtime (the fake's "kernels") --------------------------------------------------------------------
    def _session(self):
        if self._ort is None and self._ort_error is None:
            import onnxruntime as ort

            options = ort.SessionOptions()
            options.intra_op_num_threads = 1  # deterministic, and polite to the test machine
            options.log_severity_level = 3
            try:
                self._ort = ort.InferenceSession(self._model_bytes, options, providers=["CPUExecutionProvider"])
            except Exception as err:  # noqa: BLE001 (e.g. bf16 kernels missing on the CPU)
                self._ort_error = f"{type(err).__name__}: {err}"
        return self._ort

    def _bind(self, binding, name: str, shape: tuple[int, ...], address: int) -> None:
        element_type = _TO_ONNX[DataType[self._io[name]["dtype"]]]
        bind = binding.bind_input if self._io[name]["mode"] == "INPUT" else binding.bind_output
        bind(name, "cpu", 0, element_type, list(shape), address)

    def _output_shapes(self, input_shapes: dict[str, tuple[int, ...]]) -> dict[str, tuple[int, ...]] | None:
        """Output shapes for these input shapes: TensorRT derives them from the network; the fake runs the model once
        on zeros of these shapes (cached per shape set). None when ONNX Runtime cannot run the model."""
        key = tuple(sorted(input_shapes.items()))
        if key not in self._shape_cache:
            session = self._session()
            if session is None:
                return None
            binding = session.io_binding()
            buffers = []
            for name, shape in input_shapes.items():
                itemsize = DataType[self._io[name]["dtype"]].itemsize
                buffers.append(np.zeros(max(1, int(np.ceil(np.prod(shape, dtype=np.int64) * itemsize))), np.uint8))
                self._bind(binding, name, shape, buffers[-1].ctypes.data)
            outputs = [n for n in self._names if self._io[n]["mode"] == "OUTPUT"]
            for name in outputs:
                binding.bind_output(name, "cpu")
            try:
                session.run_with_iobinding(binding)
                values = binding.get_outputs()
                self._shape_cache[key] = {name: tuple(v.shape()) for name, v in zip(outputs, values)}
            except Exception as err:  # noqa: BLE001
                self._ort_error = f"{type(err).__name__}: {err}"
                self._shape_cache[key] = None
        return self._shape_cache[key]


class IExecutionContext:
    """Per-inference state: the active profile, input shapes, tensor addresses."""

    def __init__(self, engine: ICudaEngine) -> None:
        self.engine = engine
        self.name = ""
        self._logger = engine._logger
        self._profile = 0
        self._shapes: dict[str, Dims] = {}
        self._addresses: dict[str, int] = {}
        self._reset_shapes()

    def _reset_shapes(self) -> None:
        self._shapes = {name: Dims(t["shape"]) for name, t in self.engine._io.items()
                        if t["mode"] == "INPUT" and all(d >= 0 for d in t["shape"])}

    def _inputs(self) -> list[str]:
        return [n for n in self.engine._names if self.engine._io[n]["mode"] == "INPUT"]

    @property
    def active_optimization_profile(self) -> int:
        return self._profile

    def set_optimization_profile_async(self, profile_index: int, stream_handle: int) -> bool:
        if not 0 <= profile_index < self.engine.num_optimization_profiles:
            _error(self._logger, "IExecutionContext::setOptimizationProfileAsync: Error Code 3: API Usage Error "
                   f"(fake: profile {profile_index} does not exist; the engine has "
                   f"{self.engine.num_optimization_profiles})")
            return False
        self._profile = profile_index
        self._reset_shapes()  # a profile change invalidates the input shapes
        return True

    def _usage_error(self, method: str, condition: str) -> bool:
        _error(self._logger, f"IExecutionContext::{method}: Error Code 3: API Usage Error (Parameter check failed, "
               f"condition: {condition})")
        return False

    def set_input_shape(self, name: str, shape) -> bool:
        """False with TensorRT's logged error for a non-input name, a wrong rank, a static dimension changed, or a
        shape outside the active profile (messages as in NVIDIA/TensorRT-LLM#818 and abdur75648/AI-Camera#1)."""
        dims = _as_dims(shape, "shape")
        tensor = self.engine._io.get(name)
        if tensor is None or tensor["mode"] != "INPUT":
            return self._usage_error("setInputShape", f"fake: {name!r} is not an input tensor of the engine")
        if len(dims) != len(tensor["shape"]):
            return self._usage_error("setInputShape", f"engineDims.nbDims == dims.nbDims. {name}: rank "
                                     f"{len(dims)} given, the engine's is {len(tensor['shape'])}.")
        if any(fixed >= 0 and fixed != given for fixed, given in zip(tensor["shape"], dims)):
            return self._usage_error("setInputShape", "engineDims.d[i] == dims.d[i]. Static dimension mismatch while "
                                     "setting input shape.")
        low, _, high = self.engine._header["profiles"][self._profile][name]
        if not all(a <= d <= b for a, d, b in zip(low, dims, high)):
            return self._usage_error("setInputShape", "satisfyProfile Runtime dimension does not satisfy any "
                                     "optimization profile.")
        self._shapes[name] = dims
        return True

    @property
    def all_input_dimensions_specified(self) -> bool:
        return all(name in self._shapes for name in self._inputs())

    all_shape_inputs_specified = property(lambda self: True)

    def infer_shapes(self) -> list[str]:
        """Names of the inputs whose shapes are still missing."""
        return [name for name in self._inputs() if name not in self._shapes]

    def get_tensor_shape(self, name: str) -> Dims:
        """An input's shape once set (else -1 for its runtime dimensions); an output's shape once every input shape
        is known, -1 for its runtime dimensions before (IExecutionContext::getTensorShape docs)."""
        tensor = self.engine._io.get(name)
        if tensor is None:
            return Dims()
        if tensor["mode"] == "INPUT":
            return self._shapes.get(name, Dims(tensor["shape"]))
        if all(d >= 0 for d in tensor["shape"]) or not self.all_input_dimensions_specified:
            return Dims(tensor["shape"])
        shapes = self.engine._output_shapes({n: tuple(self._shapes[n]) for n in self._inputs()})
        return Dims(shapes[name]) if shapes else Dims(tensor["shape"])

    def set_tensor_address(self, name: str, memory: int) -> bool:
        if not isinstance(memory, numbers.Integral):
            raise TypeError(f"set_tensor_address(): memory must be an int address, got {type(memory).__name__}")
        if name not in self.engine._io:
            return self._usage_error("setTensorAddress", f"fake: {name!r} is not an input or output tensor")
        self._addresses[name] = int(memory)
        return True

    def get_tensor_address(self, name: str) -> int:
        return self._addresses.get(name, 0)

    def execute_async_v3(self, stream_handle: int) -> bool:
        """Run the engine. The fake is synchronous: when it returns, the outputs are written. False with TensorRT's
        logged error when an input shape or an address is missing (hamdiboukamcha/Yolo-V11-cpp-TensorRT#6: "Address
        is not set for input tensor images. Call setInputTensorAddress or setTensorAddress before
        enqueue/execute.") or when ONNX Runtime cannot run the model."""
        if not isinstance(stream_handle, numbers.Integral):
            raise TypeError(f"execute_async_v3(): stream_handle must be an int, got {type(stream_handle).__name__}")
        missing = self.infer_shapes()
        if missing:
            return self._usage_error("enqueueV3", "mContext.inputShapesSpecified(). Not all shapes are specified. "
                                     f"Following input tensors' dimensions are not specified: {', '.join(missing)}.")
        for name in self.engine._names:
            if self._addresses.get(name, 0) == 0:
                if self.engine._io[name]["mode"] == "INPUT":
                    return self._usage_error(
                        "enqueueV3", "mContext.profileObliviousBindings.at(profileObliviousIndex) != nullptr. Address "
                        f"is not set for input tensor {name}. Call setInputTensorAddress or setTensorAddress before "
                        "enqueue/execute.")
                return self._usage_error(
                    "enqueueV3", "mContext.profileObliviousBindings.at(profileObliviousIndex) || getPtrOrNull("
                    f"mOutputAllocators, profileObliviousIndex). Neither address or allocator is set for output tensor "
                    f"{name}. Call setOutputTensorAddress, setTensorAddress or setOutputAllocator before "
                    "enqueue/execute.")
        engine = self.engine
        shapes = engine._output_shapes({n: tuple(self._shapes[n]) for n in self._inputs()})
        session = engine._session()
        if session is None or shapes is None:
            _error(self._logger, f"IExecutionContext::enqueueV3: Error Code 1: (fake) ONNX Runtime cannot run this "
                   f"engine on the CPU: {engine._ort_error}")
            return False
        binding = session.io_binding()
        for name in engine._names:
            shape = self._shapes[name] if name in self._shapes else shapes[name]
            engine._bind(binding, name, tuple(shape), self._addresses[name])
        try:
            session.run_with_iobinding(binding)
        except Exception as err:  # noqa: BLE001
            _error(self._logger, f"IExecutionContext::enqueueV3: Error Code 1: (fake) ONNX Runtime failed: "
                   f"{type(err).__name__}: {err}")
            return False
        return True
