"""DeepGenPipeline keeps diffusers' call contract (issue #22), on the real tiny components.

output_type "np" is float32 in [0, 1]; return_dict=False gives ``(images,)``; ``callback_on_step_end(pipe, step,
timestep, callback_kwargs) -> dict`` sees the tensors named in ``callback_on_step_end_tensor_inputs`` and its
returned latents replace the current ones; ``generator`` may be a list, one per image; the old keyword forms
still work for one release with a DeprecationWarning.
"""

import numpy as np
import pytest
import torch
from _pipelines import call, seeded

from deepgen_components import DeepGenPipeline

STEPS = 3
PROMPT = "a red cat"


def run(pipe, prompt=PROMPT, seed=0, **kwargs):
    return call(pipe, prompt, seed, **{"num_inference_steps": STEPS, "output_type": "latent", **kwargs})


# -- outputs --------------------------------------------------------------------------------------------


def test_np_output_is_float32_in_zero_one(pipe):
    images = run(pipe, seed=1, output_type="np").images
    assert isinstance(images, np.ndarray) and images.dtype == np.float32 and images.shape == (1, 64, 64, 3)
    assert 0.0 <= images.min() and images.max() <= 1.0
    assert images.std() > 0.01  # an image, not a constant
    pixels = run(pipe, seed=1, output_type="pt").images  # [-1, 1]
    np.testing.assert_array_equal(images, (pixels / 2 + 0.5).clamp(0, 1).permute(0, 2, 3, 1).numpy())


@pytest.mark.parametrize("output_type", ["pil", "np", "pt", "latent"])
def test_return_dict_false_returns_a_tuple_of_the_images(pipe, output_type):
    as_tuple = run(pipe, seed=2, output_type=output_type, return_dict=False)
    as_output = run(pipe, seed=2, output_type=output_type)
    assert isinstance(as_tuple, tuple) and len(as_tuple) == 1
    if output_type == "pil":
        assert len(as_tuple[0]) == len(as_output.images) == 1
        assert np.array_equal(np.asarray(as_tuple[0][0]), np.asarray(as_output.images[0]))
    elif output_type == "np":
        np.testing.assert_array_equal(as_tuple[0], as_output.images)
    else:
        assert torch.equal(as_tuple[0], as_output.images)


# -- the step callback ------------------------------------------------------------------------------------


def test_callback_on_step_end_gets_the_pipe_the_step_and_the_named_tensors(pipe):
    seen = []

    def callback(p, step, timestep, callback_kwargs):
        seen.append((p, step, float(timestep), sorted(callback_kwargs), callback_kwargs["latents"].clone()))
        return callback_kwargs

    final = run(pipe, seed=3, callback_on_step_end=callback,
                callback_on_step_end_tensor_inputs=["latents", "velocity_cond"]).images
    assert [s[1] for s in seen] == list(range(STEPS))
    assert all(s[0] is pipe for s in seen)
    assert all(s[3] == ["latents", "velocity_cond"] for s in seen)
    assert seen[0][2] > seen[-1][2] > 0  # the DiT timesteps, falling
    assert torch.equal(seen[-1][4], final)  # the latents after the last step are the result
    assert torch.equal(final, run(pipe, seed=3).images)  # returning callback_kwargs unchanged changes nothing


def test_a_callback_that_modifies_latents_changes_the_result(pipe):
    plain = run(pipe, seed=4).images

    def halve_after_first_step(p, step, timestep, callback_kwargs):
        latents = callback_kwargs["latents"]
        return {"latents": latents / 2 if step == 0 else latents}

    modified = run(pipe, seed=4, callback_on_step_end=halve_after_first_step).images
    assert (modified - plain).abs().max() > 1e-2
    # The returned latents are what the loop goes on with: replaced after the last step, they are the result.
    last = run(pipe, seed=4, callback_on_step_end=lambda p, i, t, kw: {"latents": torch.full_like(kw["latents"], 0.5)}
               if i == STEPS - 1 else kw).images
    assert torch.equal(last, torch.full_like(plain, 0.5))


def test_bad_callback_arguments_name_the_argument(pipe):
    with pytest.raises(ValueError, match="callback_on_step_end_tensor_inputs"):
        run(pipe, callback_on_step_end=lambda p, i, t, kw: kw, callback_on_step_end_tensor_inputs=["prompt_embeds"])
    with pytest.raises(TypeError, match="callback_on_step_end must return a dict"):
        run(pipe, callback_on_step_end=lambda p, i, t, kw: kw["latents"])
    with pytest.raises(ValueError, match="callback_on_step_end returned latents of shape"):
        run(pipe, callback_on_step_end=lambda p, i, t, kw: {"latents": kw["latents"][:, :4]})
    with pytest.raises(TypeError, match="callback_on_step_end must take"):
        run(pipe, callback_on_step_end=lambda step: None)


# -- generators -------------------------------------------------------------------------------------------


def test_a_list_of_generators_gives_each_image_its_own_noise(pipe):
    both = run(pipe, ["a red cat", "a blue cube"], generator=[seeded(5), seeded(6)]).images
    first = run(pipe, ["a red cat"], generator=seeded(5)).images
    second = run(pipe, ["a blue cube"], generator=seeded(6)).images
    # One batch vs separate calls: the same noise per image; only the prompts' common padding and the batch size
    # differ (mask_padding on), float32 rounding (measured max |diff| below 1e-5).
    torch.testing.assert_close(both, torch.cat([first, second]), atol=1e-4, rtol=1e-4)
    per_prompt = run(pipe, PROMPT, num_images_per_prompt=2, generator=[seeded(5), seeded(5)]).images
    torch.testing.assert_close(per_prompt[0], per_prompt[1], atol=1e-5, rtol=1e-5)  # same generator, same image


def test_a_generator_list_of_the_wrong_length_or_kind_names_the_argument(pipe):
    with pytest.raises(ValueError, match=r"generator: a list needs one torch.Generator per image .* = 2\), got 1"):
        run(pipe, PROMPT, num_images_per_prompt=2, generator=[seeded(0)])
    with pytest.raises(TypeError, match=r"generator\[1\] must be a torch.Generator"):
        run(pipe, ["a", "b"], generator=[seeded(0), 1])


# -- the old forms, one release -----------------------------------------------------------------------------


def test_the_old_progress_keyword_warns_and_still_works(pipe):
    with pytest.warns(DeprecationWarning, match="progress"):
        old = run(pipe, seed=7, progress=False).images
    assert torch.equal(old, run(pipe, seed=7).images)


def test_the_old_five_argument_callback_warns_and_still_works(pipe):
    steps = []
    with pytest.warns(DeprecationWarning, match="callback_on_step_end"):
        old = run(pipe, seed=8, callback_on_step_end=lambda i, t, x, vu, vc: steps.append((i, vu is None))).images
    assert steps == [(i, False) for i in range(STEPS)]
    assert torch.equal(old, run(pipe, seed=8).images)


def test_the_old_from_pretrained_keywords_warn_and_still_work(pipe, saved):
    with pytest.warns(DeprecationWarning, match="torch_dtype"):
        old = DeepGenPipeline.from_pretrained(saved, device="cpu", dtype=torch.bfloat16)
    assert old.model.dtype == torch.bfloat16 and old.model.device.type == "cpu"


# -- a diffusers DiffusionPipeline ---------------------------------------------------------------------------


def test_the_pipeline_registers_the_models_own_modules(pipe):
    from diffusers import DiffusionPipeline

    model = pipe.model
    assert isinstance(pipe, DiffusionPipeline)
    assert set(pipe.components) == {"vlm", "tokenizer", "think_tokens", "bridge", "transformer", "vae", "scheduler"}
    assert pipe.vlm is model.vlm and pipe.think_tokens is model.think_tokens and pipe.bridge is model.bridge
    assert pipe.transformer is model.dit.transformer and pipe.vae is model.vae and pipe.scheduler is model.scheduler
    assert pipe.tokenizer is model.tokenizer


def test_save_pretrained_writes_diffusers_model_index(saved):
    import json

    index = json.loads((saved / "model_index.json").read_text())
    assert index["_class_name"] == ["pipeline_deepgen", "DeepGenPipeline"]
    assert (saved / "pipeline_deepgen.py").is_file()
    assert index["transformer"] == ["diffusers", "SD3Transformer2DModel"]
    assert index["vae"] == ["diffusers", "AutoencoderKL"]
    assert index["scheduler"] == ["diffusers", "FlowMatchEulerDiscreteScheduler"]
    assert index["vlm"] == ["transformers", "Qwen2_5_VLForConditionalGeneration"]
    assert index["think_tokens"][1] == "ThinkTokens" and index["bridge"][1] == "StackedChannelBridge"
    assert index["layers"] == {"indices": [3, 2, 1], "num_layers": 4}
    assert index["config"]["image_size"] == 64


def test_diffusion_pipeline_from_pretrained_returns_a_working_deepgen_pipeline(pipe, saved):
    from diffusers import DiffusionPipeline

    loaded = DiffusionPipeline.from_pretrained(saved, trust_remote_code=True)  # runs the folder's two-line file
    assert isinstance(loaded, DeepGenPipeline)
    loaded.set_progress_bar_config(disable=True)
    assert loaded.model.think_tokens is loaded.think_tokens and loaded.model.bridge is loaded.bridge
    ours, theirs = pipe.model.state_dict(), loaded.model.state_dict()
    assert set(ours) == set(theirs) and all(torch.equal(ours[k], theirs[k]) for k in ours)
    assert loaded.model.config == pipe.model.config and loaded.model.layers == pipe.model.layers
    for output_type in ("latent", "np"):
        expected = run(pipe, seed=9, output_type=output_type).images
        got = run(loaded, seed=9, output_type=output_type).images
        assert np.array_equal(np.asarray(expected), np.asarray(got))


def test_from_pretrained_takes_torch_dtype(saved):
    loaded = DeepGenPipeline.from_pretrained(saved, torch_dtype=torch.bfloat16)
    assert {p.dtype for p in loaded.model.parameters()} == {torch.bfloat16}
    assert loaded.dtype == torch.bfloat16


def test_a_folder_written_before_the_diffusers_schema_still_loads():
    """tests/data/legacy_v1: format 1, written at 00bbf6b, and the latents it generated there."""
    from pathlib import Path

    from safetensors.torch import load_file

    folder = Path(__file__).parent / "data" / "legacy_v1"
    loaded = DeepGenPipeline.from_pretrained(folder / "pipeline")
    loaded.set_progress_bar_config(disable=True)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        latents = loaded(["a red circle on the left"], num_inference_steps=3, guidance_scale=4.0,
                         output_type="latent", generator=seeded(0)).images
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(latents, next(iter(load_file(str(folder / "expected_latents.safetensors")).values())))
