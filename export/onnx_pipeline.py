"""OnnxDeepGenPipeline: the DeepGen sampling loop on ONNX Runtime sessions, with no PyTorch anywhere.

    pipe = OnnxDeepGenPipeline("exported/")                 # a folder written by `deepgen export`
    images = pipe("a red circle", num_inference_steps=28, generator=0).images

The loop is :mod:`deepgen_components.export.staged`, the preprocessing :mod:`deepgen_components.export.preprocessing`
and the manifest reader :mod:`deepgen_components.export.manifest` (numpy); this module only creates the sessions
(lazily, one per stage) and moves numpy arrays in and out of them.
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
    """

    def __init__(
        self,
        path: str | os.PathLike,
        *,
        providers: list | None = None,
        intra_op_num_threads: int | None = None,
        graph_optimization_level: str = "all",
        allow_spinning: bool = True,
    ) -> None:
        super().__init__(ExportedModel.load(path))
        self.providers = list(providers) if providers is not None else ["CPUExecutionProvider"]
        self._options = session_options(intra_op_num_threads, graph_optimization_level, allow_spinning)
        self._sessions: dict[str, object] = {}

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

    # -- backend hooks -----------------------------------------------------------------------------------
    def _run(self, stage: str, feeds: dict) -> dict:
        session = self.session(stage)
        names = [o.name for o in session.get_outputs()]
        wanted = {i.name for i in session.get_inputs()}
        outputs = session.run(names, {k: v for k, v in feeds.items() if k in wanted})
        return dict(zip(names, outputs))

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
