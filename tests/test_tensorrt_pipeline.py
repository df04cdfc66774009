"""The TensorRT path end to end on a CPU, through the fake ``tensorrt`` module (tests/fake_tensorrt).

TensorRT cannot be installed on our machines (not even the GPU one), so ``tensorrt`` here is the test-only fake: it
implements the TensorRT 10/11 Python API surface we call with the real signatures and error behaviour and executes
the serialized network through ONNX Runtime, reading and writing the raw (host) addresses the runner gives it. What it
proves and what only a real GPU can: tests/fake_tensorrt/README.md and docs/export.md.

Specification:
- ``build_engines`` builds every exported stage ahead of time; ``TensorRTDeepGenPipeline`` never builds inside a call
  unless ``build=True``, and its image equals the ONNX Runtime pipeline's (PSNR >= 60 dB in fp32), with and without
  the per-shape graph slots, including when the slot cache must evict;
- an engine is reused only for the inputs it was built for: a changed ONNX file, other profiles, another builder
  optimisation level or another TensorRT version means a rebuild (or a clear refusal when building is off);
- every error path of ``build_engine`` / ``load_engine`` / ``EngineRunner`` says what is wrong;
- the whole of ``export/tensorrt.py`` and ``export/tensorrt_runtime.py`` runs here: the last test measures line
  coverage of both files over this module (>= 95 %; the CUDA-only lines — stream, graph capture, device query —
  are the rest).
"""

import importlib
import json
import os
import shutil

import numpy as np
import pytest
from _fake_trt import install
from deepgen_components.export import tensorrt as trt_export
from deepgen_components.export import tensorrt_runtime as trt_runtime
from deepgen_components.export.onnx_pipeline import OnnxDeepGenPipeline
from deepgen_components.export.specs import ExportRanges
from deepgen_components.export.tensorrt_runtime import EngineRunner, TensorRTDeepGenPipeline

RANGES = ExportRanges(min_size=64, max_size=128, max_batch=1)
FILES = ("export/tensorrt.py", "export/tensorrt_runtime.py")


@pytest.fixture(scope="module")
def coverage_of_engine_code():
    """Line coverage of the TensorRT modules while this module's tests run (read by the last test)."""
    coverage = pytest.importorskip("coverage")
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    cov = coverage.Coverage(include=[os.path.join(root, f) for f in FILES], data_file=None)
    cov.start()
    # The modules were imported before the tracer started: re-execute their top level (imports, definitions) under
    # it. Reloading updates the module objects in place; the functions this file imported by name run the same lines.
    importlib.reload(trt_export)
    importlib.reload(trt_runtime)
    yield cov
    cov.stop()


@pytest.fixture(scope="module")
def exported(tiny_t2i_export, tmp_path_factory, coverage_of_engine_code):
    """A copy of the session's tiny text-to-image export (the tests build engines into it)."""
    out = tmp_path_factory.mktemp("trt") / "exported"
    shutil.copytree(tiny_t2i_export, out)
    return out


@pytest.fixture
def trt(monkeypatch):
    return install(monkeypatch)


def _psnr(a: np.ndarray, b: np.ndarray) -> float:
    mse = float(np.mean((np.clip(a, -1, 1) - np.clip(b, -1, 1)) ** 2))
    return 10 * np.log10(4.0 / max(mse, 1e-30))


def _latents(seed=0, size=8):
    return np.random.default_rng(seed).standard_normal((1, 16, size, size)).astype(np.float32)


def test_engines_built_ahead_of_time_give_the_onnx_runtime_image(exported, trt):
    engines = trt_export.build_engines(exported, progress=True)
    assert set(engines) == {"condition_encoder", "dit", "vae_decoder"}
    sidecar = json.loads(trt_export.engine_sidecar_path(engines["dit"]).read_text())
    assert sidecar["key"]["tensorrt_version"] == "10.15.1" and len(sidecar["key"]["onnx_sha256"]) == 64
    assert (exported / "engines" / "timing.cache").is_file()
    reference = OnnxDeepGenPipeline(exported)
    kwargs = dict(latents=_latents(), num_inference_steps=3, output_type="float", progress=False)
    expected = reference("a red cat", **kwargs).images
    for cuda_graph in (False, True):
        pipe = TensorRTDeepGenPipeline(exported, cuda_graph=cuda_graph)
        got = pipe("a red cat", **kwargs).images
        assert got.shape == expected.shape
        assert _psnr(got, expected) >= 60
    pt = pipe("a red cat", **(kwargs | {"output_type": "pt"})).images
    assert pt.dtype.is_floating_point and np.array_equal(pt.numpy(), got)
    # Nothing was built lazily: the engines are the ones build_engines wrote.
    assert trt_export.build_engines(exported, progress=False) == engines
    assert json.loads(trt_export.engine_sidecar_path(engines["dit"]).read_text())["created"] == sidecar["created"]


def test_slot_cache_is_bounded_and_each_slot_has_its_own_context(exported, trt):
    trt_export.build_engines(exported, stages=["vae_decoder"], progress=False)
    pipe = TensorRTDeepGenPipeline(exported, cuda_graph=True, max_graphs=1)
    runner = pipe.runner("vae_decoder")
    import torch

    outputs = []
    for size in (8, 16, 8):
        latents = torch.from_numpy(_latents(1, size))
        outputs.append(runner({"latents": latents})["pixels"])
        assert len(runner.slots) == 1  # the least recently used shape was evicted
        (slot,) = runner.slots.values()
        assert slot["context"] is not runner.context
    assert outputs[0].shape == (1, 3, 64, 64) and outputs[1].shape == (1, 3, 128, 128)
    assert torch.equal(outputs[0], outputs[2])  # re-captured after eviction, same result
    with pytest.raises(ValueError, match="max_graphs must be >= 1"):
        EngineRunner(runner.engine, max_graphs=0)


def test_the_pipeline_refuses_to_build_inside_a_call_unless_asked(exported, trt, tmp_path):
    engine_dir = tmp_path / "engines"
    pipe = TensorRTDeepGenPipeline(exported, engine_dir=engine_dir)
    with pytest.raises(FileNotFoundError, match=r"does not exist.*deepgen export \.\.\. --engine"):
        pipe("a cat", latents=_latents(), num_inference_steps=1, output_type="latent", progress=False)
    built = TensorRTDeepGenPipeline(exported, engine_dir=engine_dir, build=True)
    out = built("a cat", latents=_latents(), num_inference_steps=1, output_type="latent", progress=False)
    assert out.images.shape == (1, 16, 8, 8) and (engine_dir / "dit.engine").is_file()


def test_a_changed_onnx_file_other_profiles_or_another_tensorrt_rebuild(exported, trt, monkeypatch, tmp_path):
    import onnx

    folder = tmp_path / "copy"
    folder.mkdir()
    for name in ("manifest.json", "vae_decoder.onnx", "vae_decoder.onnx.data"):
        (folder / name).write_bytes((exported / name).read_bytes())
    (folder / "tokenizer").symlink_to(exported / "tokenizer")
    first = trt_export.ensure_engine(folder, "vae_decoder")
    created = json.loads(trt_export.engine_sidecar_path(first).read_text())["created"]
    assert trt_export.ensure_engine(folder, "vae_decoder", build=False) == first  # up to date: kept

    def stale(**kwargs):
        with pytest.raises(FileNotFoundError) as err:
            trt_export.ensure_engine(folder, "vae_decoder", build=False, **kwargs)
        return str(err.value)

    # Other shape profiles (a single-resolution engine) or another optimisation level.
    assert "other shape profiles" in stale(ranges=ExportRanges(min_size=64, max_size=64, max_batch=1))
    assert "optimisation level" in stale(optimization_level=5)
    # A re-export: same names, other content.
    proto = onnx.load(str(folder / "vae_decoder.onnx"), load_external_data=False)
    proto.doc_string = "re-exported"
    onnx.save_model(proto, str(folder / "vae_decoder.onnx"))
    assert "ONNX file changed" in stale()
    rebuilt = trt_export.ensure_engine(folder, "vae_decoder")
    assert json.loads(trt_export.engine_sidecar_path(rebuilt).read_text())["key"]["onnx_sha256"] == \
        trt_export.onnx_digest(folder / "vae_decoder.onnx")
    # Another TensorRT: stale, and load_engine refuses the old engine outright.
    monkeypatch.setattr(trt, "__version__", "10.16.0")
    assert "another TensorRT version" in stale()
    with pytest.raises(ValueError, match=r"built with TensorRT 10\.15\.1, this is TensorRT 10\.16\.0"):
        trt_export.load_engine(rebuilt)
    trt_export.ensure_engine(folder, "vae_decoder")
    assert json.loads(trt_export.engine_sidecar_path(rebuilt).read_text())["created"] >= created
    # A missing sidecar is stale too.
    trt_export.engine_sidecar_path(rebuilt).unlink()
    assert "what the engine was built from" in stale()


def test_tensorrt_11_builds_without_the_deprecated_strongly_typed_flag(exported, monkeypatch, tmp_path):
    trt = install(monkeypatch, version="11.4.0")
    path = trt_export.build_engine(
        exported / "vae_decoder.onnx", trt_export.profiles_for(json.loads((exported / "manifest.json").read_text())
                                                               ["stages"]["vae_decoder"]),
        engine_path=tmp_path / "vae.engine", workspace_bytes=1 << 28, optimization_level=0,
    )
    engine = trt_export.load_engine(path)
    assert engine.num_io_tensors == 2 and trt.__version__ == "11.4.0"


def test_build_and_load_errors_name_the_problem(exported, trt, monkeypatch, tmp_path):
    entry = json.loads((exported / "manifest.json").read_text())["stages"]["vae_decoder"]
    profiles = trt_export.profiles_for(entry)
    onnx_file = exported / "vae_decoder.onnx"
    with pytest.raises(FileNotFoundError, match="onnx_path"):
        trt_export.build_engine(tmp_path / "missing.onnx", profiles)
    with pytest.raises(ValueError, match="optimization_level must be in 0..5"):
        trt_export.build_engine(onnx_file, profiles, optimization_level=7)
    with pytest.raises(ValueError, match=r"no shapes for the dynamic inputs \['latents'\]"):
        trt_export.build_engine(onnx_file, {}, engine_path=tmp_path / "x.engine")
    low, opt, high = profiles["latents"]
    with pytest.raises(ValueError, match="profiles: latents min .* refused by TensorRT"):  # min > max
        trt_export.build_engine(onnx_file, {"latents": (high, opt, low)}, engine_path=tmp_path / "x.engine")
    wrong = tuple((1, 15, *s[2:]) for s in (low, opt, high))  # 15 channels where the graph has 16
    with pytest.raises(RuntimeError, match="could not build an engine"):
        trt_export.build_engine(onnx_file, {"latents": wrong}, engine_path=tmp_path / "x.engine")
    # Attention parses from 10.14, RMSNormalization from 10.15: the default opset-23 DiT does not parse on 10.14.
    monkeypatch.setattr(trt, "__version__", "10.14.1")
    dit_profiles = trt_export.profiles_for(json.loads((exported / "manifest.json").read_text())["stages"]["dit"])
    with pytest.raises(RuntimeError, match=r"TensorRT 10\.14\.1 could not parse .*RMSNormalization"):
        trt_export.build_engine(exported / "dit.onnx", dit_profiles, engine_path=tmp_path / "dit.engine")
    monkeypatch.setattr(trt, "__version__", "10.15.1")
    engine_path = trt_export.build_engine(onnx_file, profiles, engine_path=tmp_path / "vae.engine")
    with pytest.raises(FileNotFoundError, match="engine: .* not found"):
        trt_export.load_engine(tmp_path / "none.engine")
    sidecar = trt_export.engine_sidecar_path(engine_path)
    saved = sidecar.read_text()
    sidecar.unlink()
    with pytest.raises(FileNotFoundError, match="is missing; rebuild"):
        trt_export.load_engine(engine_path)
    sidecar.write_text(saved)
    engine_path.write_bytes(b"not an engine")
    with pytest.raises(RuntimeError, match="could not deserialize"):
        trt_export.load_engine(engine_path)


def test_runner_errors_name_the_input(exported, trt):
    import torch

    trt_export.build_engines(exported, stages=["vae_decoder"], progress=False)
    runner = TensorRTDeepGenPipeline(exported).runner("vae_decoder")
    with pytest.raises(ValueError, match="engine input 'latents' missing"):
        runner({"pixels": torch.zeros(1)})
    with pytest.raises(ValueError, match=r"outside the engine's profile"):
        runner({"latents": torch.zeros(1, 16, 40, 40)})
    runner.context.set_input_shape("latents", (1, 16, 8, 8))
    with pytest.raises(RuntimeError, match="execute_async_v3 failed"):
        runner._enqueue(runner.context, {"latents": torch.zeros(1, 16, 8, 8)}, {"pixels": torch.zeros(0)})


def test_without_cuda_engines_are_keyed_to_no_gpu_and_run_on_host_memory(exported, trt):
    import torch

    if torch.cuda.is_available():
        pytest.skip("a CUDA device is present")
    assert trt_export.device_facts() == ("no CUDA device", "none")
    runner = TensorRTDeepGenPipeline(exported, build=True).runner("vae_decoder")
    assert runner.device.type == "cpu" and runner.stream is None and runner.stream_handle == 0


def test_pure_python_helpers_and_their_errors(exported, trt, monkeypatch, tmp_path):
    import ml_dtypes
    import torch

    manifest = json.loads((exported / "manifest.json").read_text())
    entry = manifest["stages"]["dit"]
    with pytest.raises(ValueError, match="config: pass the manifest's config"):
        trt_export.profiles_for(entry, ExportRanges(min_size=64, max_size=64))
    with pytest.raises(ValueError, match="outside the exported range"):
        trt_export.profiles_for(entry, ExportRanges(min_size=64, max_size=256), config=manifest["config"])
    command = trt_export.trtexec_command(exported / "dit.onnx", trt_export.profiles_for(entry), timing_cache="t.cache")
    assert "--timingCacheFile=t.cache" in command and "--stronglyTyped" in command
    sidecar = {"tensorrt_version": "10.15.1", "gpu_name": "NVIDIA H100", "compute_capability": "9.0"}
    with pytest.raises(ValueError, match=r"compute capability 9\.0\), this GPU is NVIDIA L4"):
        trt_export.check_engine_compatibility(sidecar, tensorrt_version="10.15.1", gpu_name="NVIDIA L4",
                                              compute_capability="8.9")
    with monkeypatch.context() as patch:  # same architecture, another model: a warning only
        warnings = []
        patch.setattr(trt_export.logger, "warning", lambda *args: warnings.append(args))
        trt_export.check_engine_compatibility(sidecar, tensorrt_version="10.15.1", gpu_name="NVIDIA H200",
                                              compute_capability="9.0")
        assert warnings and "performance may differ" in warnings[0][0]
    # bf16 arrays cross the numpy/torch boundary bit for bit (ml_dtypes on the numpy side).
    pipe = TensorRTDeepGenPipeline(exported)
    values = np.array([1.5, -2.25, 3e38], dtype=ml_dtypes.bfloat16)
    tensor = pipe._asarray(values)
    assert tensor.dtype == torch.bfloat16 and np.array_equal(pipe._numpy(tensor), values.astype(np.float32))
    assert pipe._first_false([]) == -1
    assert pipe._first_false([torch.tensor(True), torch.tensor(False), torch.tensor(False)]) == 1
    with monkeypatch.context() as patch:  # no tensorrt at all: the error says how to get it
        patch.setitem(__import__("sys").modules, "tensorrt", None)
        with pytest.raises(ImportError, match="TensorRT is not installed"):
            trt_export.import_tensorrt()


def test_every_line_of_the_engine_code_ran(coverage_of_engine_code, request):
    """Line coverage of export/tensorrt.py and export/tensorrt_runtime.py over this module's tests (>= 95 %).

    Only meaningful when the whole module ran: skipped when tests were deselected."""
    ran = [item for item in request.session.items if item.module is request.module]
    if len(ran) != len([name for name in dir(request.module) if name.startswith("test_")]):
        pytest.skip("not every test of this module was selected")
    cov = coverage_of_engine_code
    cov.stop()
    try:
        percents = {}
        for path in cov.get_data().measured_files():
            _, statements, _, missing, _ = cov.analysis2(path)
            percents[os.path.basename(path)] = (len(statements), missing)
        total = sum(n for n, _ in percents.values())
        missed = sum(len(m) for _, m in percents.values())
        assert set(percents) == {"tensorrt.py", "tensorrt_runtime.py"}
        print(f"line coverage of the engine code: {total - missed}/{total} = {(total - missed) / total:.1%}; "
              f"not run: { {k: m for k, (_, m) in percents.items()} }")
        assert (total - missed) / total >= 0.95, {k: str(m) for k, (_, m) in percents.items()}
    finally:
        cov.start()
