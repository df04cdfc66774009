"""Memory modes: diffusers' ``enable_model_cpu_offload`` / ``enable_sequential_cpu_offload`` (accelerate's hooks) on
DeepGenPipeline, and the VAE's tiling / slicing passed through.

What is simulated, as diffusers' own tests do on machines without an accelerator: the offload methods are given
``device="cpu"``, so accelerate's hooks are installed exactly as on a GPU (model offload: one ``CpuOffload`` hook
per component chained by ``model_cpu_offload_seq``; sequential offload: the weights on the meta device, loaded
into each layer from a CPU copy only for its forward) but the "accelerator" is the CPU. What it cannot show: bytes
leaving a GPU. So the model-offload test checks the order in which the components' hooks fire (each hook, firing,
sends the previous component of the chain back to the CPU on a real accelerator): the bridge's hook, which sends
the VLM away, fires before the DiT's first step and the VLM's never again. The images must be bit-identical to the
resident pipeline's: the same weights run the same ops on the same device.

diffusers names the CPU ``cpu:0``; on torch 2.13 moving a ``Parameter`` to ``cpu:0`` copies it into a plain tensor,
which accelerate's sequential offload cannot put back on the meta device (TypeError). The pipeline's
``enable_sequential_cpu_offload`` therefore runs a CPU "accelerator"'s hooks on ``cpu`` (tested below).
"""

import pytest
import torch
from accelerate.hooks import CpuOffload

from deepgen_components import DeepGenPipeline, deepgen_tiny

STEPS = 2
CHAIN = ["think_tokens", "vlm", "bridge", "transformer", "vae"]


def seeded(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def reference_image() -> torch.Tensor:
    return torch.rand(3, 64, 64, generator=seeded(11)) * 2 - 1


def t2i(pipe, **kwargs):
    return pipe("a red circle", num_inference_steps=STEPS, generator=seeded(3), output_type="np", **kwargs).images


def edit(pipe, **kwargs):
    return pipe("make it blue", image=reference_image(), num_inference_steps=STEPS, generator=seeded(4),
                output_type="np", **kwargs).images


def fresh() -> DeepGenPipeline:
    pipe = DeepGenPipeline(deepgen_tiny(seed=0))
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.fixture(scope="module")
def resident():
    pipe = fresh()
    return {"t2i": t2i(pipe), "edit": edit(pipe)}


def record_hook_firing(pipe, fired: list) -> None:
    """Log each component's CpuOffload hook as it fires (accelerate's hook objects, wrapped on the instance)."""
    for name in CHAIN:
        hook = getattr(pipe, name)._hf_hook
        original = hook.pre_forward

        def pre_forward(module, *args, _name=name, _original=original, **kwargs):
            fired.append(_name)
            return _original(module, *args, **kwargs)

        hook.pre_forward = pre_forward


# -- model offload -----------------------------------------------------------------------------------------


def test_model_offload_installs_accelerates_chain():
    pipe = fresh()
    pipe.enable_model_cpu_offload(device="cpu")
    hooks = {name: getattr(pipe, name)._hf_hook for name in CHAIN}
    assert all(isinstance(hook, CpuOffload) for hook in hooks.values())
    previous = {name: hook.prev_module_hook and hook.prev_module_hook.model for name, hook in hooks.items()}
    assert previous["think_tokens"] is None
    assert previous["vlm"] is pipe.think_tokens
    assert previous["bridge"] is pipe.vlm  # the bridge's hook sends the VLM away
    assert previous["transformer"] is pipe.bridge
    assert previous["vae"] is pipe.transformer
    assert pipe._execution_device == torch.device("cpu", 0)
    assert pipe.model.device == torch.device("cpu", 0)  # where inputs and latents are created


@pytest.mark.parametrize("task", ["t2i", "edit"])
def test_model_offload_images_identical_and_vlm_gone_before_denoising(resident, task):
    pipe = fresh()
    pipe.enable_model_cpu_offload(device="cpu")
    fired: list[str] = []
    record_hook_firing(pipe, fired)
    at_first_step: list[str] = []

    def on_step(pipeline, step, timestep, kwargs):
        if step == 0:
            at_first_step.extend(fired)
        return kwargs

    images = (t2i if task == "t2i" else edit)(pipe, callback_on_step_end=on_step)
    assert (images == resident[task]).all()
    assert "vlm" in at_first_step and "transformer" in at_first_step
    last_vlm = max(i for i, name in enumerate(at_first_step) if name == "vlm")
    assert "bridge" in at_first_step[last_vlm:]  # the VLM was sent back before the DiT's first step
    assert at_first_step.index("transformer") > last_vlm
    assert "vlm" not in fired[len(at_first_step):]  # and never came back
    assert fired[-1] == "vae"  # decode: the VAE's hook sends the DiT away
    assert isinstance(pipe.vlm._hf_hook, CpuOffload)  # maybe_free_model_hooks re-armed the chain for the next call


# -- sequential offload -------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def sequential():
    pipe = fresh()
    pipe.enable_sequential_cpu_offload(device="cpu")
    return pipe


def test_sequential_offload_keeps_weights_on_meta(sequential):
    for name in ("vlm", "think_tokens", "bridge", "transformer", "vae"):
        assert {p.device.type for p in getattr(sequential, name).parameters()} == {"meta"}, name
    assert sequential.model.device == torch.device("cpu")
    assert sequential._execution_device == torch.device("cpu")


@pytest.mark.parametrize("task", ["t2i", "edit"])
def test_sequential_offload_images_identical(resident, sequential, task):
    images = (t2i if task == "t2i" else edit)(sequential)
    assert (images == resident[task]).all()
    assert {p.device.type for p in sequential.transformer.parameters()} == {"meta"}  # loaded per layer only


def test_sequential_offload_refuses_optimized_steps(sequential):
    sequential.optimize("kernels")
    try:
        with pytest.raises(ValueError, match="optimize\\('kernels'\\) cannot run under enable_sequential_cpu_offload"):
            t2i(sequential)
    finally:
        sequential.optimize("eager")


# -- VAE tiling and slicing -----------------------------------------------------------------------------------


def decoder_batches(pipe) -> list:
    """The (batch, height, width) of every latent the VAE's decoder receives (a torch forward pre-hook)."""
    shapes: list = []
    def record(module, args):
        shapes.append((args[0].shape[0], *args[0].shape[2:]))

    pipe.vae.decoder.register_forward_pre_hook(record)
    return shapes


def test_vae_slicing_decodes_one_image_at_a_time():
    pipe = fresh()
    two = dict(prompt=["a red circle", "a blue square"], num_inference_steps=STEPS, generator=seeded(5),
               output_type="np")
    whole = pipe(**two).images
    pipe.enable_vae_slicing()
    assert pipe.vae.use_slicing
    shapes = decoder_batches(pipe)
    sliced = pipe(**{**two, "generator": seeded(5)}).images
    assert [s[0] for s in shapes] == [1, 1]
    assert abs(sliced - whole).max() < 1e-5  # the same convolutions on batch 1 instead of 2 (float rounding)
    pipe.disable_vae_slicing()
    assert not pipe.vae.use_slicing


def test_vae_tiling_decodes_in_tiles():
    pipe = fresh()
    size = dict(height=128, width=128, num_inference_steps=STEPS, output_type="np")
    whole = pipe("a red circle", generator=seeded(6), **size).images
    pipe.enable_vae_tiling()
    assert pipe.vae.use_tiling
    shapes = decoder_batches(pipe)
    tiled = pipe("a red circle", generator=seeded(6), **size).images
    latent_tile = pipe.vae.tile_latent_min_size  # 8 latents (64 px) for the tiny VAE; the image is 16 latents
    assert len(shapes) > 1 and all(h <= latent_tile and w <= latent_tile for _, h, w in shapes)
    # the tiled decode is what the pipeline returned: it differs from the untiled one (each tile's group norms see
    # only that tile; with the random tiny VAE the mean difference is 0.09 of the [0, 1] range, no quality claim)
    assert abs(tiled - whole).max() > 0
    pipe.disable_vae_tiling()
    assert not pipe.vae.use_tiling
