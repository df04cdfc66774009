"""ONNX export per stage, the parity gate, and the ONNX Runtime pipeline, on the tiny preset (real ORT sessions).

Specification: every stage exports with the dynamo exporter at opset 23 with dynamic batch / resolution / context
length and external data; the parity gate compares ONNX Runtime with PyTorch at three shapes other than the
traced one and records the errors in manifest.json; ``OnnxDeepGenPipeline`` reproduces ``DeepGenPipeline``
with the same initial noise without importing torch (fp32: measured 127-130 dB PSNR, max |diff| 1e-5 on [-1, 1]
pixels; asked >= 100 dB); bad input gets a clear error.

The export runs once for the module (about a minute on a 2-core CPU).
"""

import json
import os
import shutil
import subprocess
import sys

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from deepgen_components.export import exporter
from deepgen_components.export.exporter import export_model
from deepgen_components.export.onnx_pipeline import OnnxDeepGenPipeline
from deepgen_components.export.specs import STAGES, ExportRanges
from PIL import Image

from deepgen_components import DeepGenConfig, DeepGenPipeline, deepgen_tiny

# Up to the tiny DiT's whole position table (128 latents = 1024 px): the table crop must stay right at the top.
RANGES = ExportRanges(min_size=64, max_size=1024, max_batch=2)
STEPS = 3


def psnr(a: np.ndarray, b: np.ndarray) -> float:
    """PSNR in dB of two [-1, 1] images (peak-to-peak 2)."""
    a, b = np.clip(a, -1, 1), np.clip(b, -1, 1)
    mse = float(np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2))
    return 10 * np.log10(4.0 / max(mse, 1e-30))


# fp32 ONNX Runtime vs PyTorch, same noise: measured 127.1 dB (t2i), 129.5 dB (edit), 128.7 dB (unmasked mode).
PIPELINE_PSNR_DB = 100.0


def picture(width: int, height: int, seed: int) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8))


@pytest.fixture(scope="module")
def model():
    # Reference latents from the posterior mean on both sides (the runtimes' noise differs from torch's).
    return deepgen_tiny(seed=0, config=DeepGenConfig(image_size=64, reference_latents="mean"))


@pytest.fixture(scope="module")
def torch_pipe(model):
    pipe = DeepGenPipeline(model)
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.fixture(scope="module")
def exported(model, tmp_path_factory):
    out = tmp_path_factory.mktemp("onnx")
    manifest = export_model(model, out, ranges=RANGES, progress=False, source={"preset": "tiny"})
    return out, manifest


@pytest.fixture(scope="module")
def onnx_pipe(exported):
    pipe = OnnxDeepGenPipeline(exported[0])
    pipe.set_progress_bar_config(disable=True)
    return pipe


def noise(*shape, seed=0) -> torch.Tensor:
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed))


# -- manifest and parity ---------------------------------------------------------------------------------------------


def test_manifest_records_files_exporter_opset_versions_ranges_and_runtime_config(exported):
    out, manifest = exported
    assert manifest == json.loads((out / "manifest.json").read_text())
    assert set(manifest["stages"]) == set(STAGES)
    for stage, entry in manifest["stages"].items():
        assert entry["exporter"] == "torch.onnx.export(dynamo=True)"
        assert entry["opset"] == 23 and entry["fallback"] is None
        assert entry["dtype"] == "float32" and entry["runnable_on_cpu_ep"]
        proto = onnx.load(str(out / entry["file"]), load_external_data=False)
        assert {o.domain: o.version for o in proto.opset_import}[""] == 23
        assert entry["external_data"] == [f"{stage}.onnx.data"] and (out / f"{stage}.onnx.data").is_file()
        assert [i.name for i in proto.graph.input] == [t["name"] for t in entry["inputs"]]
    for package in ("torch", "onnx", "onnxruntime", "onnxscript", "transformers", "diffusers"):
        assert manifest["versions"][package]
    assert manifest["ranges"]["min_size"] == 64 and manifest["ranges"]["max_size"] == 1024
    config = manifest["config"]
    for key in ("image_token_id", "pad_token_id", "num_think_tokens", "mask_padding", "image_size", "latent_channels",
                "vae_scale_factor", "scheduler", "chat_template"):
        assert key in config
    assert config["scheduler"]["shift"] == 3.0
    assert (out / manifest["tokenizer"]).is_file()


def test_every_stage_passed_parity_at_three_shapes_other_than_the_traced_one(exported):
    _, manifest = exported
    for stage, entry in manifest["stages"].items():
        parity = entry["parity"]
        assert parity["passed"] and parity["tolerance"] == 1e-4
        assert len(parity["shapes"]) >= 3
        example = entry["example_dims"]
        dynamic = [name for name, dim in entry["dims"].items() if dim["max"] - dim["min"] >= 2]
        assert dynamic, stage  # every stage has a dynamic batch or size, so the check below is never empty
        for name in dynamic:
            assert all(shape["dims"][name] != example[name] for shape in parity["shapes"]), (stage, name)
        for shape in parity["shapes"]:
            for output in shape["outputs"].values():
                assert output["relative"] <= 1e-4 and output["compared"] > 0
    rows = manifest["stages"]["condition_encoder"]["parity"]["shapes"][1]["outputs"]["context"]["rows"]
    assert rows == "non-pad"


def test_dit_file_serves_other_batches_resolutions_and_context_lengths(exported, model):
    out, _ = exported
    session = ort.InferenceSession(str(out / "dit.onnx"), providers=["CPUExecutionProvider"])
    for batch, height, width, length in [(2, 8, 16, 20), (4, 32, 8, 9), (1, 24, 24, 40), (1, 128, 120, 12)]:
        latents, context = noise(batch, 16, height, width), noise(batch, length, 64, seed=1)
        pooled, timestep = noise(batch, 32, seed=2), torch.linspace(999, 1, batch)
        mask = torch.ones(batch, length, dtype=torch.bool)
        mask[-1, : length // 3] = False
        condition = type("Condition", (), {"context": context, "pooled": pooled, "mask": mask})
        with torch.no_grad():
            expected = model.velocity(latents, timestep, condition).numpy()
        feeds = {"hidden_states": latents.numpy(), "encoder_hidden_states": context.numpy(), "pooled": pooled.numpy(),
                 "timestep": timestep.numpy(), "context_mask": mask.numpy()}
        got = session.run(None, feeds)[0]
        assert np.abs(got - expected).max() / np.abs(expected).max() < 1e-4


# -- the ONNX Runtime pipeline ----------------------------------------------------------------------------------------


def test_onnx_pipeline_matches_pytorch_text_to_image_with_cfg(torch_pipe, onnx_pipe):
    prompts = ["a red cat", "a much longer prompt about the deep blue sea"]
    latents = noise(2, 16, 8, 12)
    kwargs = dict(num_inference_steps=STEPS, guidance_scale=4.0, height=64, width=96)
    expected = torch_pipe(prompts, latents=latents, output_type="pt", **kwargs).images.numpy()
    got = onnx_pipe(prompts, latents=latents.numpy(), output_type="float", **kwargs)
    assert got.images.shape == expected.shape == (2, 3, 64, 96)
    assert psnr(got.images, expected) >= PIPELINE_PSNR_DB
    assert set(got.timings) == {"condition", "denoise", "decode", "total"}


def test_onnx_pipeline_matches_pytorch_editing_with_the_posterior_mean(torch_pipe, onnx_pipe):
    reference = picture(80, 60, seed=1)  # resized by the official rule to 64x64
    latents = noise(1, 16, 8, 8, seed=3)
    kwargs = dict(num_inference_steps=STEPS, guidance_scale=4.0)
    expected = torch_pipe("make it green", image=reference, latents=latents, output_type="pt", **kwargs).images.numpy()
    got = onnx_pipe("make it green", image=reference, latents=latents.numpy(), output_type="float", **kwargs).images
    assert got.shape == expected.shape == (1, 3, 64, 64)
    assert psnr(got, expected) >= PIPELINE_PSNR_DB


def test_onnx_pipeline_pil_output_and_numpy_generator(onnx_pipe):
    images = onnx_pipe("a cat", num_inference_steps=2, generator=0).images
    again = onnx_pipe("a cat", num_inference_steps=2, generator=0).images
    assert images[0].size == (64, 64) and np.array_equal(np.asarray(images[0]), np.asarray(again[0]))


def test_onnx_pipeline_np_output_is_diffusers_floats_as_pytorch_and_uint8_is_the_pil_bytes(torch_pipe, onnx_pipe):
    latents = noise(1, 16, 8, 8, seed=5)
    kwargs = dict(num_inference_steps=STEPS, guidance_scale=4.0)
    expected = torch_pipe("a cat", latents=latents, output_type="np", **kwargs).images
    got = onnx_pipe("a cat", latents=latents.numpy(), output_type="np", **kwargs).images
    assert got.dtype == np.float32 and got.shape == expected.shape == (1, 64, 64, 3)
    assert 0.0 <= got.min() and got.max() <= 1.0
    assert np.abs(got - expected).max() < 1e-3
    as_bytes = onnx_pipe("a cat", latents=latents.numpy(), output_type="uint8", **kwargs).images
    pil = onnx_pipe("a cat", latents=latents.numpy(), output_type="pil", **kwargs).images
    assert as_bytes.dtype == np.uint8 and np.array_equal(as_bytes[0], np.asarray(pil[0]))


# -- bad input ---------------------------------------------------------------------------------------------------


def test_resolution_or_batch_outside_the_exported_range_is_refused_naming_the_range(onnx_pipe):
    with pytest.raises(ValueError, match=r"height=2048 is outside the exported resolution range 64\.\.1024"):
        onnx_pipe("a cat", height=2048, width=64, num_inference_steps=1)
    with pytest.raises(ValueError, match="multiple of 32"):
        onnx_pipe("a cat", height=80, width=64, num_inference_steps=1)
    with pytest.raises(ValueError, match=r"outside the exported range 1\.\.4"):
        onnx_pipe(["a", "b", "c"], num_inference_steps=1)  # 6 rows with CFG


@pytest.fixture
def copied(exported, tmp_path):
    target = tmp_path / "copy"
    shutil.copytree(exported[0], target)
    return target


def test_missing_external_data_file_is_named(copied):
    (copied / "dit.onnx.data").unlink()
    pipe = OnnxDeepGenPipeline(copied)
    with pytest.raises(FileNotFoundError, match=r"external-data file .*dit\.onnx\.data is missing"):
        pipe("a cat", num_inference_steps=1, progress=False)


@pytest.mark.parametrize(
    "change, error",
    [
        ({"opset": 30}, r"opset 30 is not supported by this runtime \(supported: 18\.\.23\)"),
        ({"dtype": "float64"}, r"unsupported dtype 'float64'"),
        ({"dtype": "bfloat16", "runnable_on_cpu_ep": False}, "CPU execution provider cannot run"),
    ],
)
def test_unsupported_opset_or_dtype_is_refused(copied, change, error):
    manifest = json.loads((copied / "manifest.json").read_text())
    manifest["stages"]["dit"].update(change)
    (copied / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(ValueError, match=error):
        OnnxDeepGenPipeline(copied)("a cat", num_inference_steps=1, progress=False)


def test_export_refuses_unsupported_dtype_and_opset(model, tmp_path):
    with pytest.raises(ValueError, match="export supports float32, float16, bfloat16 models, got float64"):
        export_model(deepgen_tiny().to(torch.float64), tmp_path, progress=False)
    with pytest.raises(ValueError, match=r"opset must be in 18\.\.23"):
        export_model(model, tmp_path, opset=30, progress=False)


def test_editing_without_the_vision_encoder_is_refused_with_the_reason(copied):
    manifest = json.loads((copied / "manifest.json").read_text())
    del manifest["stages"]["vision_encoder"]
    manifest["not_exported"]["vision_encoder"] = "not requested (--stages)"
    (copied / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(ValueError, match="vision_encoder.*not requested"):
        OnnxDeepGenPipeline(copied)("edit", image=picture(64, 64, 0), num_inference_steps=1, progress=False)


# -- fallback opset, CLI ------------------------------------------------------------------------------------------


def test_a_stage_failing_at_opset_23_falls_back_to_20_and_the_manifest_says_why(model, tmp_path, monkeypatch):
    real = exporter._export_once

    def fail_at_23(spec, module, example, path, opset):
        if opset == 23:
            raise RuntimeError("simulated exporter failure at opset 23")
        return real(spec, module, example, path, opset)

    monkeypatch.setattr(exporter, "_export_once", fail_at_23)
    manifest = export_model(model, tmp_path, stages=["vision_encoder"], ranges=RANGES, progress=False)
    entry = manifest["stages"]["vision_encoder"]
    assert entry["opset"] == 20 and entry["fallback"]["requested_opset"] == 23
    assert "simulated exporter failure" in entry["fallback"]["error"]
    assert entry["parity"]["passed"]
    assert manifest["not_exported"]["dit"] == "not requested (--stages)"


def test_cli_export_writes_the_manifest_and_prints_parity_and_trtexec(tmp_path, capsys):
    from deepgen_components.cli import main

    out = tmp_path / "cli"
    code = main(["export", "--preset", "tiny", "--out", str(out), "--stages", "vision_encoder", "--max-size", "256",
                 "--quiet", "--trtexec"])
    printed = capsys.readouterr().out
    assert code == 0
    assert (out / "manifest.json").is_file() and (out / "vision_encoder.onnx").is_file()
    assert "vision_encoder" in printed and "<= 0.0001" in printed
    assert f"trtexec --onnx={out}/vision_encoder.onnx" in printed
    with pytest.raises(SystemExit) as exit_info:
        main(["export", "--preset", "tiny", "--out", str(out), "--dtype", "float64"])
    assert exit_info.value.code == 2 and "invalid choice: 'float64'" in capsys.readouterr().err


# -- no torch in the runtime ------------------------------------------------------------------------------------

_BLOCK_TORCH = r"""
import importlib.abc, importlib.util, sys, types

class BlockTorch(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] == "torch":
            raise ImportError(f"{name} is blocked in this test")
        return None

sys.meta_path.insert(0, BlockTorch())
"""

_STUB_PARENT = r"""
# deepgen_components/__init__.py imports the torch-based core eagerly, so register the package object without
# running it: the export runtime and everything it imports must then load without torch.
spec = importlib.util.find_spec("deepgen_components")
package = types.ModuleType("deepgen_components")
package.__path__ = list(spec.submodule_search_locations)
package.__spec__ = spec
sys.modules["deepgen_components"] = package
"""

_RUN = r"""
from deepgen_components.export.onnx_pipeline import OnnxDeepGenPipeline
pipe = OnnxDeepGenPipeline(sys.argv[1])
out = pipe("a red cat", num_inference_steps=2, generator=0, output_type="np", progress=False)
assert out.images.shape == (1, 64, 64, 3), out.images.shape
assert out.images.dtype == "float32" and 0 <= out.images.min() and out.images.max() <= 1  # diffusers' "np"
heavy = sorted(m for m in sys.modules if m.split(".")[0] in ("torch", "transformers", "diffusers"))
assert not heavy, heavy
print("ok")
"""


def _run_python(code: str, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True, timeout=300,
                          env={**os.environ, "PYTHONWARNINGS": "ignore"})


def test_onnx_runtime_pipeline_runs_with_torch_unimportable(exported):
    result = _run_python(_BLOCK_TORCH + _STUB_PARENT + _RUN, str(exported[0]))
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.strip().endswith("ok")


def test_onnx_runtime_pipeline_imports_through_the_package_without_torch(exported):
    result = _run_python(_BLOCK_TORCH + _RUN, str(exported[0]))
    assert result.returncode == 0, result.stderr[-1500:]


# -- slower variants -----------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_bfloat16_export_is_parity_checked_gets_fp32_softmax_and_is_recorded_as_not_runnable_on_the_cpu_ep(tmp_path):
    model = deepgen_tiny(seed=0).to(torch.bfloat16)
    manifest = export_model(model, tmp_path, stages=["dit"], ranges=RANGES, progress=False)
    entry = manifest["stages"]["dit"]
    assert entry["dtype"] == "bfloat16" and manifest["dtype"] == "bfloat16"
    onnx.checker.check_model(str(tmp_path / "dit.onnx"))
    precision = entry["precision"]
    assert precision["attention_nodes"] > 0
    assert precision["attention_with_fp32_softmax"] == precision["attention_nodes"]
    assert precision["norms_with_fp32_statistics"] > 0
    assert precision["nodes_by_output_dtype"]["BFLOAT16"] > precision["nodes_by_output_dtype"].get("FLOAT", 0)
    inputs = {t["name"]: t["dtype"] for t in entry["inputs"]}
    assert inputs["hidden_states"] == "bfloat16" and inputs["timestep"] == "float32"
    try:  # ask this ONNX Runtime's CPU EP directly (1.32 has no bf16 Conv: NOT_IMPLEMENTED at session creation)
        ort.InferenceSession(str(tmp_path / "dit.onnx"), providers=["CPUExecutionProvider"])
        cpu_error = None
    except Exception as err:  # noqa: BLE001 - whatever ORT raises means "not runnable"
        cpu_error = str(err)
    assert entry["runnable_on_cpu_ep"] is (cpu_error is None), cpu_error
    assert entry["parity"]["passed"]  # bf16 is parity-checked (tests/test_export_precision.py)
    if cpu_error is None:
        assert OnnxDeepGenPipeline(tmp_path).session("dit") is not None
    else:
        assert entry["parity"]["runtime"] == "onnx.reference.ReferenceEvaluator"
        assert entry["cpu_ep_error"] and entry["cpu_ep_error"].split(": ", 1)[-1] in cpu_error
        with pytest.raises(ValueError, match="CPU execution provider cannot run"):
            OnnxDeepGenPipeline(tmp_path).session("dit")


@pytest.mark.slow
def test_official_unmasked_mode_pipeline_matches_pytorch_with_left_padding(tmp_path):
    model = deepgen_tiny(seed=4, mask_padding=False)
    manifest = export_model(model, tmp_path, stages=["condition_encoder", "dit", "vae_decoder"], ranges=RANGES,
                            progress=False)
    assert "context_mask" not in [t["name"] for t in manifest["stages"]["dit"]["inputs"]]
    torch_pipe = DeepGenPipeline(model)
    torch_pipe.set_progress_bar_config(disable=True)
    onnx_pipe = OnnxDeepGenPipeline(tmp_path)
    prompts = ["a cat", "a far longer prompt that pads the other one on the left"]  # plus "" negatives: padding
    latents = noise(2, 16, 8, 8, seed=5)
    expected = torch_pipe(prompts, latents=latents, output_type="pt", num_inference_steps=STEPS).images.numpy()
    got = onnx_pipe(prompts, latents=latents.numpy(), output_type="float", num_inference_steps=STEPS, progress=False)
    assert psnr(got.images, expected) >= PIPELINE_PSNR_DB


def test_bench_exported_modes_time_onnx_runtime_and_record_tensorrt_availability(exported, tmp_path):
    """``deepgen bench --modes eager,onnxruntime,tensorrt``: a real ONNX Runtime session per stage and end to end,
    each row a ratio against the eager row of the same run. The bench reuses an export found in ``export_dir``;
    here that is this module's export of the same tiny architecture (latency does not depend on weight values),
    which saves a second 20-second export. TensorRT cannot be installed here, so it must get its "not available"
    row (where it is installed, the row is a real timing instead)."""
    from deepgen_components.cli.bench import BenchConfig, run_suite
    from deepgen_components.cli.bench_report import markdown_table

    (tmp_path / "tiny_64px_b1_float32").symlink_to(exported[0], target_is_directory=True)
    cfg = BenchConfig(preset="tiny", device="cpu", dtype="float32", modes=("eager", "onnxruntime", "tensorrt"),
                      resolution=64, batch=1, steps=2, repeats=2, warmup=1, threads=1, prompt_tokens=4,
                      export_dir=str(tmp_path))
    result = run_suite(cfg, progress=False)
    ort_rows = {r.stage: r for r in result.rows if r.mode == "onnxruntime"}
    assert set(ort_rows) == {"condition", "dit_step", "vae_decode", "end_to_end"}
    for row in ort_rows.values():
        assert row.ms > 0 and row.ratio_vs_eager is not None and row.ratio_vs_eager > 0
        assert row.note == "CPUExecutionProvider"
    assert "export_seconds" not in result.environment  # reused, not re-exported
    try:  # whether TensorRT imports here, asked directly
        import tensorrt  # noqa: F401

        trt_imports = True
    except ImportError:
        trt_imports = False
    assert result.environment["tensorrt"]["import"] is trt_imports
    # On a CPU run TensorRT gets one "not available" row either way; the note says why.
    why = "TensorRT needs a CUDA device" if trt_imports else "import tensorrt failed"
    (trt,) = [r for r in result.rows if r.mode == "tensorrt"]
    assert trt.note.startswith(f"not available: {why}") and np.isnan(trt.ms)
    assert f"not available: {why}" in markdown_table(result)
    with pytest.raises(ValueError, match="modes: 'onnx' is not one of"):
        run_suite(BenchConfig(modes=("eager", "onnx")), progress=False)


def test_bench_export_ranges_cover_the_benchmarked_prompt_resolution_and_batch(model):
    """What the bench exports when it finds no export (the export itself is ``export_model``, tested above): one
    resolution and batch, and a prompt range that holds the benchmark's chat text as this tokenizer encodes it."""
    from deepgen_components.cli.bench import BenchConfig, _prompt, export_ranges

    for tokens, batch in ((4, 1), (32, 2)):
        cfg = BenchConfig(resolution=128, batch=batch, prompt_tokens=tokens)
        ranges = export_ranges(cfg, model, do_cfg=True)
        length = model.prepare_prompts([_prompt(tokens)] * batch + [""] * batch).input_ids.shape[1]
        assert (ranges.min_size, ranges.max_size, ranges.max_batch) == (128, 128, batch)
        assert ranges.opt_prompt_tokens == length <= ranges.max_prompt_tokens


def test_deepgen_eval_generates_on_the_onnx_runtime_export_as_on_pytorch(exported, torch_pipe, tmp_path):
    """``deepgen eval --onnx EXPORT_DIR`` (docs/eval.md): the harness drives the exported ONNX Runtime pipeline and
    writes the same images, prompt for prompt and seed for seed, as ``--pipeline`` on the PyTorch model it came
    from (PNG pixels within 1/255)."""
    from deepgen_components.cli import main

    torch_pipe.save_pretrained(tmp_path / "saved")
    (tmp_path / "prompts.txt").write_text("a red cat\na blue cube on a table\n")
    common = ["eval", "--benchmark", "custom", "--prompts", str(tmp_path / "prompts.txt"), "--samples", "1",
              "--batch-size", "1", "--guidance", "1", "--steps", "2", "--height", "64", "--width", "64", "--quiet",
              "--evaluators", "none", "--contact-sheet", "0"]
    assert main([*common, "--onnx", str(exported[0]), "--out", str(tmp_path / "onnx")]) == 0
    assert main([*common, "--pipeline", str(tmp_path / "saved"), "--device", "cpu",
                 "--out", str(tmp_path / "torch")]) == 0
    onnx_images = sorted((tmp_path / "onnx" / "images").glob("*.png"))
    assert len(onnx_images) == 2
    assert [p.name for p in onnx_images] == sorted(p.name for p in (tmp_path / "torch" / "images").glob("*.png"))
    for path in onnx_images:
        ours = np.asarray(Image.open(path).convert("RGB"), dtype=np.int16)
        theirs = np.asarray(Image.open(tmp_path / "torch" / "images" / path.name).convert("RGB"), dtype=np.int16)
        assert ours.shape == (64, 64, 3)
        assert np.abs(ours - theirs).max() <= 1, path.name
    first, second = (np.asarray(Image.open(p).convert("RGB")) for p in onnx_images)
    assert not np.array_equal(first, second)  # two prompts, two seeds: the comparison is not of blanks
    run = json.loads((tmp_path / "onnx" / "run.json").read_text())
    assert run["model"]["pipeline"] == "OnnxDeepGenPipeline" and run["model"]["mode"] == "onnxruntime"
