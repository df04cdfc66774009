"""OnnxDeepGenPipeline: the DeepGen sampling loop on ONNX Runtime sessions, with no PyTorch anywhere.

    pipe = OnnxDeepGenPipeline("exported/")                 # a folder written by `deepgen export`
    images = pipe("a red circle", num_inference_steps=28, generator=0).images

The loop is :mod:`deepgen_components.export.staged`, the preprocessing :mod:`deepgen_components.export.preprocessing`
and the manifest reader :mod:`deepgen_components.export.manifest` (numpy); this module only creates the sessions
(lazily, one per stage) and moves numpy arrays in and out of them.

IO binding (``io_binding=True``; the default for non-CPU providers): every stage call binds its inputs as
``OrtValue``s on the provider's device and its outputs to that device (``session.io_binding()``,
``run_with_iobinding``); within one denoising loop the DiT's constant feeds (context, pooled, mask, reference
latents) are bound once and reused, so only the latents and the timestep are bound per step. On the CPU provider
the results are bit-identical to ``session.run`` (tested). bfloat16 stages always go through IO binding, because
``session.run`` cannot take numpy bf16 arrays (ml_dtypes): inputs are bound with the ONNX bf16 element type,
outputs are written into bf16 buffers on the host. Whether a provider can *execute* a stage at its dtype is in the
manifest (``runnable_on_cpu_ep``: fp16 runs on the CPU EP; bf16 does not in ORT 1.32).
"""

from __future__ import annotations

import os

import numpy as np
from deepgen_components.export.manifest import ExportedModel, numpy_dtype
from deepgen_components.export.staged import StagedPipeline, StagedPipelineOutput

from deepgen_components.conventions import euler_update

__all__ = ["OnnxDeepGenPipeline", "StagedPipelineOutput", "session_options"]

_OPT_LEVELS = {"disable": "ORT_DISABLE_ALL", "basic": "ORT_ENABLE_BASIC", "extended": "ORT_ENABLE_EXTENDED", "all": "ORT_ENABLE_ALL"}


def session_options(
    intra_op_num_threads: int | None = None, graph_optimization_level: str = "all", allow_spinning: bool = True
):
    """``onnxruntime.SessionOptions`` with the thread count, graph optimisation level and whether idle intra-op
    threads spin-wait (ORT's default; turn it off on a machine shared with other work)."""
    import onnxruntime as ort

    if graph_optimization_level not in _OPT_LEVELS:
        raise ValueError(f"graph_optimization_level must be one of {', '.join(_OPT_LEVELS)}, got {graph_optimization_level!r}")
    options = ort.SessionOptions()
    options.graph_optimization_level = getattr(ort.GraphOptimizationLevel, _OPT_LEVELS[graph_optimization_level])
    if intra_op_num_threads is not None:
        options.intra_op_num_threads = int(intra_op_num_threads)
    if not allow_spinning:
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    options.log_severity_level = 3  # errors only: ORT's warnings about unused initializers are noise here
    return options


class OnnxDeepGenPipeline(StagedPipeline):
    """Text-to-image and single-reference editing from an export folder, on ONNX Runtime.

    Args:
        path: the export folder (``manifest.json``, ``*.onnx`` + ``*.onnx.data``, ``tokenizer/``).
        providers: ONNX Runtime execution providers (default CPU). Stages exported in bfloat16 do not run on
            the CPU provider (the manifest says so per stage); they need e.g. the CUDA provider.
        intra_op_num_threads / graph_optimization_level / allow_spinning: session options (:func:`session_options`).
        io_binding: bind inputs and outputs as ``OrtValue``s on the provider's device (module docstring); default
            on for non-CPU providers, off on the CPU provider (where it gives bit-identical results). bfloat16
            stages use it whatever this says.
    """

    def __init__(
        self,
        path: str | os.PathLike,
        *,
        providers: list | None = None,
        intra_op_num_threads: int | None = None,
        graph_optimization_level: str = "all",
        allow_spinning: bool = True,
        io_binding: bool | None = None,
    ) -> None:
        super().__init__(ExportedModel.load(path))
        self.providers = list(providers) if providers is not None else ["CPUExecutionProvider"]
        if io_binding is not None and not isinstance(io_binding, bool):
            raise ValueError(f"io_binding must be True, False or None (automatic), got {io_binding!r}")
        self.device_type, self.device_id = _binding_device(self.providers[0])
        self.io_binding = io_binding if io_binding is not None else self.device_type != "cpu"
        self._options = session_options(intra_op_num_threads, graph_optimization_level, allow_spinning)
        self._sessions: dict[str, object] = {}
        self._constant: tuple[str, object, dict] | None = None  # (stage, binding, bound OrtValues) inside a loop

    @property
    def path(self):
        return self.exported.path

    def session(self, stage: str):
        """The (cached) ``InferenceSession`` of ``stage``, after checking its files, opset and dtype."""
        if stage in self._sessions:
            return self._sessions[stage]
        import onnxruntime as ort

        file = self.exported.stage_file(stage)
        entry = self.exported.stage(stage)
        cpu_only = all(_provider_name(p) == "CPUExecutionProvider" for p in self.providers)
        if cpu_only and not entry.get("runnable_on_cpu_ep", True):
            raise ValueError(
                f"stage {stage!r} was exported in {entry['dtype']}, which ONNX Runtime's CPU execution provider "
                f"cannot run ({entry.get('cpu_ep_error', 'see the manifest')}); use providers=['CUDAExecutionProvider'] "
                "or TensorRT, or re-export with --dtype float32"
            )
        try:
            session = ort.InferenceSession(str(file), sess_options=self._options, providers=self.providers)
        except Exception as err:  # ORT raises its own Fail/InvalidGraph/NotImplemented types
            raise RuntimeError(
                f"stage {stage!r}: ONNX Runtime {ort.__version__} could not load {file} (opset {entry['opset']}, "
                f"{entry['dtype']}): {err}"
            ) from err
        self._sessions[stage] = session
        return session

    def binds(self, stage: str) -> bool:
        """Whether ``stage`` runs through IO binding: when ``io_binding`` is on, and always for bfloat16 stages."""
        return self.io_binding or self.exported.stage(stage)["dtype"] == "bfloat16"

    def denoise(self, latents, stage, feeds, *args, **kwargs):
        """:meth:`StagedPipeline.denoise` with the DiT's constant ``feeds`` bound once for the whole loop (when
        the stage binds): each step then binds only ``hidden_states`` and ``timestep``."""
        if not self.binds(stage):
            return super().denoise(latents, stage, feeds, *args, **kwargs)
        session = self.session(stage)
        wanted = {i.name for i in session.get_inputs()}
        binding = session.io_binding()
        values = {name: self._ortvalue(value) for name, value in self._declared(stage, feeds).items() if name in wanted}
        for name, value in values.items():
            binding.bind_ortvalue_input(name, value)
        # The OrtValues stay referenced while the binding is used: on the CPU they wrap the numpy memory.
        self._constant = (stage, binding, values)
        try:
            return super().denoise(latents, stage, feeds, *args, **kwargs)
        finally:
            self._constant = None

    def _ortvalue(self, array: np.ndarray):
        """``array`` as an ``OrtValue`` on the provider's device; bf16 (ml_dtypes) with ONNX's bf16 element type."""
        import onnx
        import onnxruntime as ort

        array = np.ascontiguousarray(array)
        if str(array.dtype) != "bfloat16":
            return ort.OrtValue.ortvalue_from_numpy(array, self.device_type, self.device_id)
        bits = array.view(np.uint16)
        if self.device_type == "cpu":
            return ort.OrtValue.ortvalue_from_numpy_with_onnx_type(bits, onnx.TensorProto.BFLOAT16)
        value = ort.OrtValue.ortvalue_from_shape_and_type(
            list(array.shape), onnx.TensorProto.BFLOAT16, self.device_type, self.device_id
        )
        value.update_inplace(bits)
        return value

    # -- backend hooks -----------------------------------------------------------------------------------
    def _run(self, stage: str, feeds: dict) -> dict:
        session = self.session(stage)
        names = [o.name for o in session.get_outputs()]
        wanted = {i.name for i in session.get_inputs()}
        feeds = self._declared(stage, {k: v for k, v in feeds.items() if k in wanted})
        if not self.binds(stage):
            return dict(zip(names, session.run(names, feeds)))
        import onnx
        import onnxruntime as ort

        if self._constant is not None and self._constant[0] == stage:
            _, binding, bound = self._constant
        else:
            binding, bound = session.io_binding(), {}
        keep = {name: self._ortvalue(value) for name, value in feeds.items() if name not in bound}
        for name, value in keep.items():
            binding.bind_ortvalue_input(name, value)
        # bf16 outputs: ORT cannot hand them to numpy, so each is written into a host buffer of its shape.
        buffers, keep_out = {}, []
        for spec in self.exported.stage(stage)["outputs"]:
            if spec["dtype"] == "bfloat16":
                buffers[spec["name"]] = np.empty(self._output_shape(stage, spec, feeds), dtype=np.uint16)
                value = ort.OrtValue.ortvalue_from_numpy_with_onnx_type(buffers[spec["name"]], onnx.TensorProto.BFLOAT16)
                binding.bind_ortvalue_output(spec["name"], value)
                keep_out.append(value)
            else:
                binding.bind_output(spec["name"], self.device_type, self.device_id)
        session.run_with_iobinding(binding)
        if not buffers:
            return dict(zip(names, binding.copy_outputs_to_cpu()))
        values = binding.get_outputs()
        return {name: buffers[name].view(numpy_dtype("bfloat16")) if name in buffers else value.numpy()
                for name, value in zip(names, values)}

    def _declared(self, stage: str, feeds: dict) -> dict:
        """Float feeds in the dtype the stage declares (another stage's fp32 outputs into an fp16 DiT)."""
        declared = {spec["name"]: numpy_dtype(spec["dtype"]) for spec in self.exported.stage(stage)["inputs"]}
        return {name: value.astype(declared[name]) if name in declared and value.dtype != declared[name]
                and declared[name].kind in "fV" and value.dtype.kind in "fV" else value for name, value in feeds.items()}

    def _output_shape(self, stage: str, output: dict, feeds: dict) -> tuple[int, ...]:
        """An output's concrete shape from the input shapes and the manifest's axis declarations."""
        values = {}
        for spec in self.exported.stage(stage)["inputs"]:
            if spec["name"] in feeds:
                for axis, size in zip(spec["shape"], feeds[spec["name"]].shape):
                    if not isinstance(axis, int):
                        values[axis["dim"]] = (size - axis["offset"]) // axis["scale"]
        return tuple(a if isinstance(a, int) else a["scale"] * values[a["dim"]] + a["offset"] for a in output["shape"])

    def _asarray(self, array: np.ndarray) -> np.ndarray:
        return np.ascontiguousarray(array)

    def _numpy(self, array) -> np.ndarray:
        return np.asarray(array)

    def _cat(self, arrays: list) -> np.ndarray:
        return np.concatenate(arrays, axis=0)

    def _take(self, array: np.ndarray, index: np.ndarray) -> np.ndarray:
        return np.ascontiguousarray(array[index])

    def _cast(self, array: np.ndarray, dtype: str) -> np.ndarray:
        return array.astype(numpy_dtype(dtype), copy=False)

    def _finite_flag(self, array: np.ndarray) -> bool:
        return bool(np.isfinite(array.astype(np.float32)).all())

    def _first_false(self, flags: list) -> int:
        bad = [i for i, flag in enumerate(flags) if not flag]
        return bad[0] if bad else -1

    def _euler(self, latents: np.ndarray, velocity: np.ndarray, dt: np.float32) -> np.ndarray:
        return euler_update(latents.astype(np.float32), velocity.astype(np.float32), dt)


def _provider_name(provider) -> str:
    return provider[0] if isinstance(provider, (tuple, list)) else provider


# Where each execution provider keeps its tensors (OrtValue device types); anything else binds on the host.
_DEVICE_TYPES = {"CUDAExecutionProvider": "cuda", "TensorrtExecutionProvider": "cuda", "DmlExecutionProvider": "dml"}


def _binding_device(provider) -> tuple[str, int]:
    """(device type, device id) of the first provider: ``("cuda", options["device_id"])`` for CUDA / TensorRT."""
    options = provider[1] if isinstance(provider, (tuple, list)) and len(provider) > 1 else {}
    return _DEVICE_TYPES.get(_provider_name(provider), "cpu"), int(options.get("device_id", 0))
