"""ONNX Runtime IO binding in ``OnnxDeepGenPipeline`` and stages of mixed precision, on the CPU provider.

Specification: with ``io_binding=True`` every stage call binds OrtValues (the DiT's constant feeds once per
denoising loop) and the images are bit-identical to ``session.run``'s; the default is off on the CPU provider and
on for CUDA; an fp16 DiT runs on the CPU EP inside an fp32 pipeline (fp32 latents, CFG and Euler update) and stays
close to the fp32 image; bf16 arrays become OrtValues of ONNX's bf16 element type (``session.run`` refuses them).
"""

import json
import shutil

import ml_dtypes
import numpy as np
import onnx
import onnxruntime as ort
import pytest
from deepgen_components.export.exporter import export_model
from deepgen_components.export.onnx_pipeline import OnnxDeepGenPipeline
from deepgen_components.export.specs import ExportRanges

from deepgen_components import DeepGenConfig, deepgen_tiny

RANGES = ExportRanges(min_size=64, max_size=128, max_batch=1)
T2I = ("condition_encoder", "dit", "vae_decoder")


def psnr(a: np.ndarray, b: np.ndarray) -> float:
    mse = float(np.mean((np.clip(a, -1, 1).astype(np.float64) - np.clip(b, -1, 1)) ** 2))
    return 10 * np.log10(4.0 / max(mse, 1e-30))


@pytest.fixture(scope="module")
def model():
    return deepgen_tiny(seed=0, config=DeepGenConfig(image_size=64))


@pytest.fixture(scope="module")
def fp32_export(tiny_t2i_export):
    return tiny_t2i_export  # the session's tiny text-to-image export (same model, ranges and stages)


@pytest.fixture(scope="module")
def fp16_dit_export(model, fp32_export, tmp_path_factory):
    """The fp32 export with its DiT replaced by an fp16 export of the same model (the manifest entry too)."""
    half = tmp_path_factory.mktemp("fp16_dit")
    manifest = export_model(model, half, stages=["dit"], ranges=RANGES, parity=False, progress=False, dtype="float16")
    mixed = tmp_path_factory.mktemp("mixed") / "export"
    shutil.copytree(fp32_export, mixed)
    for name in ("dit.onnx", "dit.onnx.data"):
        shutil.copy(half / name, mixed / name)
    mixed_manifest = json.loads((mixed / "manifest.json").read_text())
    mixed_manifest["stages"]["dit"] = manifest["stages"]["dit"]
    (mixed / "manifest.json").write_text(json.dumps(mixed_manifest))
    return mixed


def generate(path, *, io_binding, guidance_scale=4.0):
    pipe = OnnxDeepGenPipeline(path, io_binding=io_binding)
    latents = np.random.default_rng(3).standard_normal((1, 16, 8, 12), dtype=np.float32)
    return pipe("a red cat", latents=latents, height=64, width=96, num_inference_steps=3,
                guidance_scale=guidance_scale, output_type="float", progress=False).images


def test_io_binding_on_the_cpu_gives_bit_identical_images_with_and_without_cfg(fp32_export):
    for guidance_scale in (4.0, 1.0):
        bound = generate(fp32_export, io_binding=True, guidance_scale=guidance_scale)
        plain = generate(fp32_export, io_binding=False, guidance_scale=guidance_scale)
        assert bound.shape == (1, 3, 64, 96) and np.isfinite(bound).all()
        assert np.array_equal(bound, plain)


def test_io_binding_defaults_off_on_the_cpu_and_on_for_cuda(fp32_export):
    assert OnnxDeepGenPipeline(fp32_export).io_binding is False
    cuda = OnnxDeepGenPipeline(fp32_export, providers=[("CUDAExecutionProvider", {"device_id": 1})])
    assert cuda.io_binding is True and (cuda.device_type, cuda.device_id) == ("cuda", 1)
    with pytest.raises(ValueError, match="io_binding must be True, False or None"):
        OnnxDeepGenPipeline(fp32_export, io_binding="yes")


def test_dit_constant_feeds_are_bound_once_per_loop_and_released_after(fp32_export):
    pipe = OnnxDeepGenPipeline(fp32_export, io_binding=True)
    seen = []
    real_run = pipe._run

    def record(stage, feeds):  # observes the real call; the binding state is the pipeline's own
        if stage == "dit":
            seen.append(sorted(pipe._constant[2]) if pipe._constant else None)
        return real_run(stage, feeds)

    pipe._run = record
    pipe("a cat", height=64, width=64, num_inference_steps=2, generator=0, output_type="latent", progress=False)
    assert seen == [["context_mask", "encoder_hidden_states", "pooled"]] * 2
    assert pipe._constant is None


def test_fp16_dit_runs_on_the_cpu_ep_in_an_fp32_pipeline_with_and_without_binding(fp32_export, fp16_dit_export):
    entry = json.loads((fp16_dit_export / "manifest.json").read_text())["stages"]["dit"]
    assert entry["dtype"] == "float16" and entry["runnable_on_cpu_ep"]
    reference = generate(fp32_export, io_binding=False)
    bound = generate(fp16_dit_export, io_binding=True)
    assert np.array_equal(bound, generate(fp16_dit_export, io_binding=False))
    # fp16 DiT vs fp32 DiT over 3 steps, same noise: measured 74.7 dB on this tiny random model.
    assert psnr(bound, reference) >= 60.0


def test_bf16_arrays_become_ortvalues_of_the_onnx_bf16_type(fp32_export):
    pipe = OnnxDeepGenPipeline(fp32_export, io_binding=True)
    array = np.array([[1.5, -2.25, 3.0]], dtype=ml_dtypes.bfloat16)
    value = pipe._ortvalue(array)
    assert value.data_type() == "tensor(bfloat16)" and value.shape() == [1, 3] and value.device_name() == "cpu"
    graph = onnx.helper.make_graph(
        [onnx.helper.make_node("Cast", ["x"], ["y"], to=onnx.TensorProto.FLOAT)], "cast",
        [onnx.helper.make_tensor_value_info("x", onnx.TensorProto.BFLOAT16, [1, 3])],
        [onnx.helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, [1, 3])],
    )
    session = ort.InferenceSession(onnx.helper.make_model(graph, opset_imports=[onnx.helper.make_opsetid("", 21)])
                                   .SerializeToString(), providers=["CPUExecutionProvider"])
    with pytest.raises(RuntimeError, match="can't be converted"):  # why bf16 stages must bind
        session.run(None, {"x": array})
    binding = session.io_binding()
    binding.bind_ortvalue_input("x", value)
    binding.bind_output("y", "cpu")
    session.run_with_iobinding(binding)
    assert np.array_equal(binding.copy_outputs_to_cpu()[0], array.astype(np.float32))
