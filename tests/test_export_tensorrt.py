"""TensorRT side of the export: optimisation profiles, the trtexec command line and the engine sidecar check run
on a CPU; engine builds and the TensorRT pipeline need ``tensorrt`` and a GPU (skipped otherwise).

Specification: profiles are min/opt/max shapes of every input, derived from the export's dims (batch x2 for CFG,
latent = image / 8 in steps of the patch, context = prompt + think tokens) or from narrower user ranges inside
them; an engine built for another TensorRT version or GPU architecture is refused with a clear error.
"""

import shlex

import numpy as np
import pytest
import torch
from deepgen_components.export.specs import ExportRanges, build_specs, model_config
from deepgen_components.export.tensorrt import (
    build_engine,
    check_engine_compatibility,
    profiles_for,
    trtexec_command,
)

from deepgen_components import DeepGenConfig, DeepGenPipeline, deepgen_tiny

RANGES = ExportRanges(min_size=256, max_size=1024, max_batch=4)


@pytest.fixture(scope="module")
def model():
    return deepgen_tiny(seed=0)


@pytest.fixture(scope="module")
def specs(model):
    return build_specs(model, RANGES)


def test_dit_profile_covers_the_cfg_batch_resolution_and_context_ranges(specs):
    profiles = profiles_for(specs["dit"])
    assert set(profiles) == {"hidden_states", "encoder_hidden_states", "pooled", "timestep", "context_mask"}
    low, opt, high = profiles["hidden_states"]
    assert low == (1, 16, 32, 32)  # 256 px -> 32 latents
    assert high == (8, 16, 128, 128)  # batch 4 x2 for CFG, 1024 px
    assert opt == (2, 16, 32, 32)  # batch 1 with CFG at the tiny preset's image_size (64, clamped to 256)
    # context = prompt tokens + 8 think tokens; max prompt = max_length 1024 + one 64 px reference's 4 tokens
    assert [s[1] for s in profiles["encoder_hidden_states"]] == [9, 72, 1036]
    assert profiles["timestep"] == ((1,), (2,), (8,))


def test_profiles_from_the_manifest_entry_equal_those_from_the_spec(specs):
    for spec in specs.values():
        assert profiles_for(spec.to_dict()) == profiles_for(spec)


def test_narrower_ranges_give_a_single_resolution_engine(specs, model):
    static = ExportRanges(min_size=512, max_size=512, max_batch=1, max_prompt_tokens=128)
    profiles = profiles_for(specs["dit"], static, config=model_config(model))
    low, opt, high = profiles["hidden_states"]
    assert low[2:] == opt[2:] == high[2:] == (64, 64)
    assert (low[0], high[0]) == (1, 2)
    with pytest.raises(ValueError, match="outside the exported range"):
        profiles_for(specs["dit"], ExportRanges(min_size=128, max_size=512), config=model_config(model))
    with pytest.raises(ValueError, match="config"):
        profiles_for(specs["dit"], static)


def test_trtexec_command_lists_min_opt_max_shapes_of_every_input(specs, tmp_path):
    command = trtexec_command(tmp_path / "vae_decoder.onnx", profiles_for(specs["vae_decoder"]),
                              timing_cache=tmp_path / "timing.cache", optimization_level=4)
    args = shlex.split(command)
    assert args[0] == "trtexec"
    assert f"--onnx={tmp_path}/vae_decoder.onnx" in args
    assert f"--saveEngine={tmp_path}/vae_decoder.engine" in args
    assert "--minShapes=latents:1x16x32x32" in args
    assert "--optShapes=latents:1x16x32x32" in args
    assert "--maxShapes=latents:4x16x128x128" in args
    assert "--builderOptimizationLevel=4" in args and "--stronglyTyped" in args
    assert f"--timingCacheFile={tmp_path}/timing.cache" in args


def test_an_engine_from_another_tensorrt_version_or_gpu_architecture_is_refused():
    sidecar = {"tensorrt_version": "10.14.1", "gpu_name": "NVIDIA H100 80GB HBM3", "compute_capability": "9.0"}
    check_engine_compatibility(sidecar, tensorrt_version="10.14.1", gpu_name="NVIDIA H100 80GB HBM3", compute_capability="9.0")
    with pytest.raises(ValueError, match=r"built with TensorRT 10\.14\.1, this is TensorRT 11\.4\.0"):
        check_engine_compatibility(sidecar, tensorrt_version="11.4.0", gpu_name="NVIDIA H100 80GB HBM3",
                                   compute_capability="9.0")
    with pytest.raises(ValueError, match=r"compute capability 9\.0\), this GPU is NVIDIA L4 \(compute capability 8\.9\)"):
        check_engine_compatibility(sidecar, tensorrt_version="10.14.1", gpu_name="NVIDIA L4", compute_capability="8.9")


def test_building_without_tensorrt_says_how_to_get_it(tmp_path):
    try:
        import tensorrt  # noqa: F401
    except ImportError:
        pass
    else:
        pytest.skip("tensorrt is installed")
    with pytest.raises(ImportError, match="TensorRT is not installed"):
        build_engine(tmp_path / "dit.onnx", {})


# -- on a GPU with TensorRT ---------------------------------------------------------------------------------------


@pytest.mark.gpu
def test_tensorrt_pipeline_matches_pytorch_and_reuses_engines(tmp_path):
    pytest.importorskip("tensorrt")
    from deepgen_components.export.exporter import export_model
    from deepgen_components.export.tensorrt_runtime import TensorRTDeepGenPipeline

    model = deepgen_tiny(seed=0, config=DeepGenConfig(image_size=64))
    export_model(model, tmp_path, stages=["condition_encoder", "dit", "vae_decoder"],
                 ranges=ExportRanges(min_size=64, max_size=128, max_batch=1), progress=False)
    reference = DeepGenPipeline(model)
    reference.set_progress_bar_config(disable=True)
    latents = torch.randn(1, 16, 8, 8, generator=torch.Generator().manual_seed(0))
    expected = reference("a red cat", latents=latents, num_inference_steps=3, output_type="pt").images.numpy()
    for cuda_graph in (False, True):
        pipe = TensorRTDeepGenPipeline(tmp_path, cuda_graph=cuda_graph, build=True)
        got = pipe("a red cat", latents=latents.numpy(), num_inference_steps=3, output_type="float", progress=False)
        mse = float(np.mean((np.clip(got.images, -1, 1) - np.clip(expected, -1, 1)) ** 2))
        assert 10 * np.log10(4.0 / max(mse, 1e-30)) >= 40
    assert (tmp_path / "engines" / "dit.engine.json").is_file()
