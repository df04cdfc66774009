"""Running TensorRT engines: :class:`EngineRunner` (one engine on torch tensors, its own CUDA stream, CUDA graphs per
input shape in a bounded cache) and :class:`TensorRTDeepGenPipeline` (``DeepGenPipeline``'s loop on engines).

Engines come from :mod:`deepgen_components.export.tensorrt` (built ahead of time, checked against their cache key).
Nothing here imports ``tensorrt`` until an engine is loaded.
"""

from __future__ import annotations

import os
import time
from collections import OrderedDict
from pathlib import Path

import numpy as np
from deepgen_components.export.manifest import ExportedModel
from deepgen_components.export.specs import ExportRanges
from deepgen_components.export.staged import StagedPipeline
from deepgen_components.export.tensorrt import ensure_engine, import_tensorrt, load_engine

from deepgen_components.conventions import euler_update

__all__ = ["EngineRunner", "TensorRTDeepGenPipeline"]


class EngineRunner:
    """Runs one engine on torch tensors on its own CUDA stream (ordered after the caller's stream and back, so no
    host sync is needed between calls).

    Without ``cuda_graph`` one execution context serves every call. With it, each distinct set of input shapes gets
    a slot — its own execution context, static input/output buffers and a CUDA graph captured after a warm-up
    run — kept in an LRU cache of at most ``max_graphs`` slots (the DiT repeats one shape per step; a new prompt
    length is a new shape). Without CUDA (only a host-memory TensorRT, i.e. the test suite's fake) tensors live on
    the CPU, the stream handle is 0 and a slot replays by enqueueing its context on its static buffers."""

    def __init__(self, engine, *, cuda_graph: bool = False, max_graphs: int = 4, device=None) -> None:
        import torch

        trt = import_tensorrt()
        if max_graphs < 1:
            raise ValueError(f"max_graphs must be >= 1, got {max_graphs}")
        self.engine = engine
        self.device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        self.stream = torch.cuda.Stream(self.device) if self.device.type == "cuda" else None
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
        self.max_graphs = max_graphs
        self.slots: OrderedDict[tuple, dict] = OrderedDict()

    @property
    def stream_handle(self) -> int:
        return self.stream.cuda_stream if self.stream is not None else 0

    def _enqueue(self, context, feeds: dict, outputs: dict) -> None:
        for name in self.inputs:
            context.set_tensor_address(name, feeds[name].data_ptr())
        for name in self.outputs:
            context.set_tensor_address(name, outputs[name].data_ptr())
        if not context.execute_async_v3(self.stream_handle):
            raise RuntimeError("TensorRT execute_async_v3 failed (see the TensorRT log)")

    def _prepare(self, context, feeds: dict) -> tuple[dict, dict]:
        import torch

        prepared = {}
        for name in self.inputs:
            if name not in feeds:
                raise ValueError(f"engine input {name!r} missing; got {sorted(feeds)}")
            tensor = feeds[name].to(device=self.device, dtype=self.dtypes[name]).contiguous()
            if not context.set_input_shape(name, tuple(tensor.shape)):
                raise ValueError(f"engine input {name!r}: shape {tuple(tensor.shape)} is outside the engine's profile")
            prepared[name] = tensor
        outputs = {
            name: torch.empty(tuple(context.get_tensor_shape(name)), dtype=self.dtypes[name], device=self.device)
            for name in self.outputs
        }
        return prepared, outputs

    def _on_stream(self, run) -> None:
        """Run ``run`` with the engine's stream ordered after the caller's stream, and the caller's after it."""
        import torch

        if self.stream is None:
            run()
            return
        caller = torch.cuda.current_stream(self.device)
        self.stream.wait_stream(caller)
        with torch.cuda.stream(self.stream):
            run()
        caller.wait_stream(self.stream)

    def __call__(self, feeds: dict) -> dict:
        if not self.cuda_graph:
            prepared, outputs = self._prepare(self.context, feeds)
            self._on_stream(lambda: self._enqueue(self.context, prepared, outputs))
            return outputs
        key = tuple((name, tuple(feeds[name].shape)) for name in self.inputs)
        slot = self.slots.get(key)
        if slot is None:
            slot = self._new_slot(feeds)
            self.slots[key] = slot
            while len(self.slots) > self.max_graphs:
                self.slots.popitem(last=False)  # the least recently used shape: its graph, context and buffers go
        self.slots.move_to_end(key)
        static_in, static_out = slot["inputs"], slot["outputs"]

        def replay() -> None:
            for name in self.inputs:
                static_in[name].copy_(feeds[name].to(device=self.device, dtype=self.dtypes[name]), non_blocking=True)
            if slot["graph"] is not None:
                slot["graph"].replay()
            else:
                self._enqueue(slot["context"], static_in, static_out)

        self._on_stream(replay)
        return {name: value.clone() for name, value in static_out.items()}

    def _new_slot(self, feeds: dict) -> dict:
        import torch

        context = self.engine.create_execution_context()
        static_in, static_out = self._prepare(context, feeds)
        self._on_stream(lambda: self._enqueue(context, static_in, static_out))  # warm-up: TensorRT allocates lazily
        graph = None
        if self.stream is not None:
            self.stream.synchronize()
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, stream=self.stream):
                self._enqueue(context, static_in, static_out)
        return {"context": context, "inputs": static_in, "outputs": static_out, "graph": graph}


class TensorRTDeepGenPipeline(StagedPipeline):
    """``DeepGenPipeline``'s loop on TensorRT engines (torch tensors as I/O, on CUDA).

    Engines live in ``engine_dir`` (default: ``<export>/engines``) as ``<stage>.engine`` + sidecar. Build them ahead
    of time (``deepgen export --engine`` or :func:`build_engines`); a missing or stale engine (see
    :func:`ensure_engine`) is refused with the reason unless ``build=True``, which builds it inside the first call
    that needs it. ``ranges`` narrows the exported ranges (e.g. one resolution for CUDA graphs); ``cuda_graph`` and
    ``max_graphs`` configure each stage's :class:`EngineRunner`."""

    output_types = ("pil", "np", "uint8", "float", "pt", "latent")

    def __init__(
        self,
        path: str | os.PathLike,
        *,
        engine_dir: str | os.PathLike | None = None,
        ranges: ExportRanges | None = None,
        build: bool = False,
        cuda_graph: bool = False,
        max_graphs: int = 4,
        optimization_level: int = 3,
        device=None,
    ) -> None:
        import torch

        super().__init__(ExportedModel.load(path))
        self.engine_dir = Path(engine_dir) if engine_dir is not None else self.exported.path / "engines"
        self.ranges = ranges
        self.build = build
        self.cuda_graph = cuda_graph
        self.max_graphs = max_graphs
        self.optimization_level = optimization_level
        self.device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        self._runners: dict[str, EngineRunner] = {}

    def runner(self, stage: str) -> EngineRunner:
        """The stage's :class:`EngineRunner` (engine checked by :func:`ensure_engine`, loaded once)."""
        if stage not in self._runners:
            engine_path = ensure_engine(
                self.exported, stage, engine_dir=self.engine_dir, ranges=self.ranges, build=self.build,
                optimization_level=self.optimization_level, device=self.device,
            )
            self._runners[stage] = EngineRunner(load_engine(engine_path, device=self.device), cuda_graph=self.cuda_graph,
                                                max_graphs=self.max_graphs, device=self.device)
        return self._runners[stage]

    # -- backend hooks -----------------------------------------------------------------------------------
    def _run(self, stage: str, feeds: dict) -> dict:
        return self.runner(stage)(feeds)

    def _asarray(self, array):
        import torch

        if str(array.dtype) == "bfloat16":  # ml_dtypes -> reinterpret the bits
            return torch.from_numpy(np.ascontiguousarray(array).view(np.uint16)).view(torch.bfloat16).to(self.device)
        return torch.from_numpy(np.ascontiguousarray(array)).to(self.device)

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

        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        return time.perf_counter() - start

    def _convert_pixels(self, pixels, output_type: str):
        if output_type == "pt":
            return pixels.float()
        return super()._convert_pixels(pixels, output_type)
