"""DeepGenPipeline: prompt (+ reference images) -> images (reference §8), on the real tiny components.

Encode the condition once (prompt and negative prompt in one left-padded batch) -> initial noise from the
generator -> FlowMatch Euler with classifier-free guidance as one batched DiT call -> VAE decode. Editing
appends the references' VAE latents to the DiT sequence and their vision tokens to the VLM prompt; a
reference is converted to RGB and resized so its long side is <= image_size with sides rounded up to x32,
and with one reference the output takes its size.
"""

import os

import numpy as np
import pytest
import torch
from _pipelines import call, seeded
from PIL import Image

from deepgen_components import DeepGenConfig, DeepGenPipeline, conventions, deepgen_tiny, processing
from deepgen_components.processing import pixels_to_uint8

STEPS = 2
PROMPT = "a red cat"


def run(pipe, prompt=PROMPT, seed=0, **kwargs):
    return call(pipe, prompt, seed, **{"num_inference_steps": STEPS, "output_type": "pt", **kwargs}).images


def picture(width: int, height: int, seed: int, mode: str = "RGB") -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8)).convert(mode)


# -- determinism -----------------------------------------------------------------------------------------


def test_same_seed_gives_bit_identical_images(pipe):
    first = pipe(PROMPT, num_inference_steps=STEPS, generator=seeded(7)).images[0]
    second = pipe(PROMPT, num_inference_steps=STEPS, generator=seeded(7)).images[0]
    assert np.array_equal(np.asarray(first), np.asarray(second))
    assert torch.equal(run(pipe, seed=7), run(pipe, seed=7))


def test_different_seeds_give_different_images(pipe):
    assert not torch.allclose(run(pipe, seed=1), run(pipe, seed=2))


# -- classifier-free guidance ---------------------------------------------------------------------------


def reference_sigmas(config, steps: int) -> list[float]:
    """The FlowMatch Euler grid for ``steps`` steps, from the scheduler config's numbers alone (float64).

    Training sigmas are k / N (k = 1..N) pushed through the shift map sigma -> s sigma / (1 + (s - 1) sigma);
    inference spaces ``steps`` sigmas evenly from the largest to the smallest shifted training sigma, shifts them
    again, and ends in 0. With N = 1000, s = 3, 3 steps: [1.0, 0.751121, 0.008929, 0.0] (the golden README's
    official values)."""
    assert not config["use_dynamic_shifting"] and config["shift_terminal"] is None
    assert not (config["use_karras_sigmas"] or config["use_exponential_sigmas"] or config["use_beta_sigmas"])
    n, s = config["num_train_timesteps"], config["shift"]

    def shift(sigma: float) -> float:
        return s * sigma / (1 + (s - 1) * sigma)

    high, low = shift(1.0), shift(1.0 / n)
    spaced = [high + (low - high) * i / (steps - 1) for i in range(steps)] if steps > 1 else [high]
    return [shift(sigma) for sigma in spaced] + [0.0]


def reference_loop(model, latents, steps, conditional, unconditional=None, scale=1.0, reference_latents=None):
    """The sampler written out from the formulas with plain tensor arithmetic, independent of the library's
    sampling helpers: DiT timestep t = N sigma, guided velocity v = v_u + s (v_c - v_u) (CFG as two separate
    DiT calls), Euler step x <- x + (sigma_next - sigma) v."""
    sigmas = reference_sigmas(model.scheduler.config, steps)
    n = model.scheduler.config["num_train_timesteps"]
    for sigma, sigma_next in zip(sigmas[:-1], sigmas[1:]):
        t = torch.full((latents.shape[0],), sigma * n, dtype=torch.float32)
        velocity = model.velocity(latents, t, conditional, reference_latents)
        if unconditional is not None:
            v_uncond = model.velocity(latents, t, unconditional, reference_latents)
            velocity = v_uncond + scale * (velocity - v_uncond)
        latents = latents + (sigma_next - sigma) * velocity
    return latents


def test_reference_sigmas_are_the_official_three_step_grid(pipe):
    expected = [1.0, 0.751121, 0.008929, 0.0]  # gen_t2i.scheduler_sigmas of golden set A (official generate())
    assert reference_sigmas(pipe.model.scheduler.config, 3) == pytest.approx(expected, abs=1e-6)


@torch.no_grad()
def test_guidance_scale_one_is_the_conditional_only_euler_loop(pipe):
    out = run(pipe, seed=3, guidance_scale=1.0, num_inference_steps=3, output_type="latent")
    model = pipe.model
    noise = torch.randn((1, 16, 8, 8), generator=seeded(3))
    expected = reference_loop(model, noise, 3, model.encode_condition([PROMPT]))
    # float32 vs float64 sigmas and step sizes only: measured max |diff| 4.8e-7 on latents of magnitude 3.9.
    torch.testing.assert_close(out, expected, atol=1e-6, rtol=1e-6)


@torch.no_grad()
def test_batched_cfg_equals_separate_conditional_and_unconditional_passes(pipe):
    prompts, negatives = ["a red cat", "a blue cube on the sky under the sun"], ["", "blurry"]
    out = run(pipe, prompts, seed=4, negative_prompt=negatives, guidance_scale=4.0, output_type="latent")
    model = pipe.model
    assert model.bridge.config.mask_padding  # a prompt's condition does not depend on its batch
    noise = torch.randn((2, 16, 8, 8), generator=seeded(4))
    conditional, unconditional = model.encode_condition(prompts), model.encode_condition(negatives)
    expected = reference_loop(model, noise, STEPS, conditional, unconditional, scale=4.0)
    # Only the padding differs (one 4-prompt batch vs two 2-prompt batches): float32 rounding, nothing more
    # (measured max |diff| 2.7e-6).
    torch.testing.assert_close(out, expected, atol=1e-5, rtol=1e-5)
    swapped = reference_loop(model, noise, STEPS, unconditional, conditional, scale=4.0)
    assert (out - swapped).abs().max() > 1e-2


def test_default_negative_prompt_is_the_empty_t2i_template(pipe):
    assert torch.equal(run(pipe, seed=5), run(pipe, seed=5, negative_prompt=""))
    assert not torch.allclose(run(pipe, seed=5), run(pipe, seed=5, negative_prompt="blurry"))


def test_default_guidance_is_the_models_per_task_scale():
    """guidance_scale=None takes config.guidance_scale for text-to-image and config.edit_guidance_scale for edits
    (4.0 and 4.0 unless a model ships its own); an explicit scale always wins."""
    model = deepgen_tiny(seed=0)
    assert (model.config.guidance_scale, model.config.edit_guidance_scale) == (4.0, 4.0)
    pipeline = DeepGenPipeline(model)
    pipeline.set_progress_bar_config(disable=True)
    source = picture(64, 64, seed=1)
    assert torch.equal(run(pipeline, seed=6), run(pipeline, seed=6, guidance_scale=4.0))
    model.config.guidance_scale, model.config.edit_guidance_scale = 2.0, 1.0
    assert torch.equal(run(pipeline, seed=6), run(pipeline, seed=6, guidance_scale=2.0))
    edit_default = run(pipeline, "make it blue", seed=6, image=source)
    assert torch.equal(edit_default, run(pipeline, "make it blue", seed=6, image=source, guidance_scale=1.0))
    assert (edit_default - run(pipeline, "make it blue", seed=6, image=source, guidance_scale=4.0)).abs().max() > 1e-3


@pytest.mark.parametrize("field", ["guidance_scale", "edit_guidance_scale"])
@pytest.mark.parametrize("value", [-1.0, float("nan"), "4", True])
def test_bad_default_guidance_names_the_field(field, value):
    with pytest.raises(ValueError, match=field):
        DeepGenConfig(**{field: value})


# -- editing --------------------------------------------------------------------------------------------


def test_edit_output_depends_on_the_reference(pipe):
    a = run(pipe, "make it blue", seed=0, image=picture(64, 64, seed=1))
    b = run(pipe, "make it blue", seed=0, image=picture(64, 64, seed=2))
    assert a.shape == b.shape == (1, 3, 64, 64)
    assert (a - b).abs().max() > 1e-3


def test_several_references_per_prompt(pipe):
    ref_a, ref_b = picture(64, 64, seed=1), picture(64, 32, seed=2)
    single = run(pipe, "combine them", image=ref_a)
    both = run(pipe, "combine them", image=[ref_a, ref_b])
    # Two references: no single reference size to follow, so the output is image_size square.
    assert both.shape == (1, 3, 64, 64)
    assert (single - both).abs().max() > 1e-3
    # A batch: one entry per prompt, each an image or a list of images.
    batch = run(pipe, ["combine them", "make it blue"], image=[[ref_a, ref_b], [ref_a]], height=64, width=64)
    assert batch.shape == (2, 3, 64, 64)


def test_reference_of_any_mode_and_size_is_converted_to_rgb_and_resized_by_the_official_rule(pipe):
    rgba = picture(40, 100, seed=3, mode="RGBA")  # 40 x 100 (W x H), image_size 64
    out = pipe("make it blue", image=rgba, num_inference_steps=STEPS, generator=seeded(0)).images[0]
    # long side 100 -> 64, short side 40 * 0.64 = 25.6 -> rounded up to 32; the output takes that size.
    assert out.size == (32, 64) and out.mode == "RGB"
    processed = rgba.convert("RGB").resize((32, 64), Image.BICUBIC)
    same = pipe("make it blue", image=processed, num_inference_steps=STEPS, generator=seeded(0)).images[0]
    assert np.array_equal(np.asarray(out), np.asarray(same))

    gray = picture(20, 30, seed=4, mode="L")  # never enlarged: 20 x 30 -> rounded up to 32 x 32
    out = run(pipe, "make it blue", image=gray)
    assert out.shape == (1, 3, 32, 32)
    rgb = gray.convert("RGB").resize((32, 32), Image.BICUBIC)
    assert torch.equal(out, run(pipe, "make it blue", image=rgb))


def test_explicit_height_and_width_override_the_reference_size(pipe):
    out = pipe(
        "make it blue",
        image=picture(40, 100, seed=3),
        height=32,
        width=96,
        num_inference_steps=STEPS,
        generator=seeded(0),
    ).images[0]
    assert out.size == (96, 32)


# -- outputs --------------------------------------------------------------------------------------------


def test_num_images_per_prompt_gives_distinct_images_per_prompt(pipe):
    out = run(pipe, ["a red cat", "a blue cube"], num_images_per_prompt=3)
    assert out.shape == (6, 3, 64, 64)
    flat = out.flatten(1)
    distances = torch.cdist(flat, flat) + torch.eye(6) * 1e9
    assert distances.min() > 1e-2  # every image has its own noise


def test_output_types_are_views_of_the_same_result(pipe):
    latents = run(pipe, seed=9, output_type="latent")
    pixels = run(pipe, seed=9, output_type="pt")
    arrays = run(pipe, seed=9, output_type="np")
    images = run(pipe, seed=9, output_type="pil")
    assert latents.shape == (1, 16, 8, 8)
    assert pixels.shape == (1, 3, 64, 64) and pixels.dtype == torch.float32
    # "np" as diffusers returns it: float32 (B, H, W, 3) in [0, 1], the "pt" pixels / 2 + 0.5
    assert isinstance(arrays, np.ndarray) and arrays.shape == (1, 64, 64, 3) and arrays.dtype == np.float32
    assert arrays.min() >= 0.0 and arrays.max() <= 1.0
    assert isinstance(images, list) and images[0].size == (64, 64) and images[0].mode == "RGB"
    with torch.no_grad():
        assert torch.equal(pipe.model.decode_latents(latents).float(), pixels)
    assert np.array_equal((pixels / 2 + 0.5).clamp(0, 1).permute(0, 2, 3, 1).numpy(), arrays)
    # PIL takes the official uint8 rule, clamp(127.5 x + 128): the np floats rounded to 255 levels, within one
    # level of float32 rounding of the two formulas.
    assert np.array_equal(np.asarray(images[0]), pixels_to_uint8(pixels).numpy()[0])
    assert np.abs(np.asarray(images[0]).astype(np.float32) - arrays[0] * 255).max() <= 1.0
    with pytest.raises(ValueError, match="output_type"):
        run(pipe, output_type="jpeg")


def test_timings_cover_every_stage(pipe):
    timings = pipe(PROMPT, num_inference_steps=STEPS, generator=seeded(0)).timings
    assert set(timings) == {"condition", "denoise", "decode", "total"}
    assert all(v > 0 for v in timings.values()), timings  # each stage does work and is timed
    assert timings["total"] == pytest.approx(timings["condition"] + timings["denoise"] + timings["decode"])


def test_progress_bar_can_be_turned_off(pipe, capfd):
    fresh = DeepGenPipeline(pipe.model)
    fresh(PROMPT, num_inference_steps=STEPS, generator=seeded(0))
    assert f"{STEPS}/{STEPS}" in capfd.readouterr().err  # on by default (tqdm, stderr)
    with pytest.warns(DeprecationWarning, match="set_progress_bar_config"):  # the old per-call switch, one release
        fresh(PROMPT, num_inference_steps=STEPS, generator=seeded(0), progress=False)
    assert capfd.readouterr().err == ""
    fresh.set_progress_bar_config(disable=True)
    fresh(PROMPT, num_inference_steps=STEPS, generator=seeded(0))
    assert capfd.readouterr().err == ""


# -- bad input ------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "size, nearest",
    [(dict(height=100), "96 or 128"), (dict(width=200), "192 or 224"), (dict(height=20), "32")],
)
def test_sizes_that_are_not_multiples_of_32_name_the_nearest_valid_sizes(pipe, size, nearest):
    name = next(iter(size))
    with pytest.raises(
        ValueError, match=rf"{name} must be a positive multiple of 32.*nearest valid: {nearest}$"
    ):
        run(pipe, **size)


def test_unknown_preset_lists_the_presets():
    with pytest.raises(ValueError, match="presets: deepgen-1.0, deepgen-shapes, small, tiny"):
        DeepGenPipeline.from_preset("nope")


def test_long_prompts_are_truncated_the_official_way_with_a_warning(pipe, monkeypatch, caplog):
    model = pipe.model
    monkeypatch.setattr(model, "config", DeepGenConfig(max_length=48, image_size=64))
    monkeypatch.setattr(conventions, "_warned_truncation", False)
    prompt = "a cat sitting on a red chair " * 8
    full = model.tokenizer(processing.t2i_prompt(prompt))["input_ids"]
    assert len(full) > 48
    batch = model.prepare_prompts([prompt])
    assert batch.input_ids[0].tolist() == full[-48:]  # the last tokens (the chat suffix survives)
    monkeypatch.setattr(conventions, "_warned_truncation", False)  # the warning is logged once per process
    caplog.clear()
    with caplog.at_level("WARNING"):
        out = run(pipe, prompt)
    assert out.shape == (1, 3, 64, 64)
    assert any("keeping its last 48 tokens" in r.getMessage() for r in caplog.records)


def test_nan_latents_raise_naming_the_step(pipe):
    latents = torch.randn(1, 16, 8, 8)
    latents[0, 0, 0, 0] = float("nan")
    with pytest.raises(FloatingPointError, match=f"step 0 of {STEPS}"):
        run(pipe, latents=latents)


def test_nan_appearing_mid_sampling_names_the_first_bad_step(pipe):
    calls = []

    def poison_second_call(module, inputs, output):
        calls.append(1)
        return output * float("nan") if len(calls) == 2 else output

    handle = pipe.model.dit.transformer.proj_out.register_forward_hook(poison_second_call)
    try:
        with pytest.raises(FloatingPointError, match="step 1 of 3"):
            run(pipe, num_inference_steps=3)
    finally:
        handle.remove()


def test_nan_in_a_dit_weight_raises_instead_of_returning_garbage(pipe):
    weight = pipe.model.dit.transformer.proj_out.weight
    saved = weight.detach().clone()
    with torch.no_grad():
        weight[0, 0] = float("nan")
    try:
        with pytest.raises(FloatingPointError, match="step 0"):
            run(pipe)
    finally:
        with torch.no_grad():
            weight.copy_(saved)


def test_bad_latents_shape_and_reference_type_are_rejected(pipe):
    with pytest.raises(ValueError, match=r"latents: expected shape \(1, 16, 8, 8\)"):
        run(pipe, latents=torch.randn(1, 16, 4, 4))
    with pytest.raises(ValueError, match="PIL images or"):
        run(pipe, image="not an image")
    with pytest.raises(ValueError, match="list of 2 entries"):
        run(pipe, ["a", "b"], image=[picture(32, 32, seed=0)])


# -- save / load ----------------------------------------------------------------------------------------


def test_save_layout_is_one_folder_per_component_with_config_and_safetensors(saved):
    assert (saved / "model_index.json").is_file()
    components = {p.name for p in saved.iterdir() if p.is_dir()}
    assert components == {"vlm", "think_tokens", "bridge", "transformer", "vae", "scheduler", "tokenizer"}
    for name in ("vlm", "think_tokens", "bridge", "transformer", "vae"):
        files = {p.name for p in (saved / name).iterdir()}
        assert "config.json" in files, name
        assert any(f.endswith(".safetensors") for f in files), name
        assert not any(f.endswith((".bin", ".pt", ".pth")) for f in files), name  # no pickles
    assert (saved / "scheduler" / "scheduler_config.json").is_file()
    assert (saved / "tokenizer" / "tokenizer_config.json").is_file()


def test_save_load_round_trip_gives_identical_parameters_and_images(pipe, saved):
    loaded = DeepGenPipeline.from_pretrained(saved)
    loaded.set_progress_bar_config(disable=True)
    ours, theirs = pipe.model.state_dict(), loaded.model.state_dict()
    assert set(ours) == set(theirs)
    different = [k for k in ours if not torch.equal(ours[k], theirs[k])]
    assert different == []
    assert loaded.model.config == pipe.model.config
    assert loaded.model.layers == pipe.model.layers
    assert loaded.model.bridge.config == pipe.model.bridge.config
    # SDPA, as built: eager attention would change every left-pad row of the VLM (tests/test_golden_parity.py).
    assert loaded.model.vlm.config.text_config._attn_implementation == "sdpa"
    assert torch.equal(run(loaded, seed=11), run(pipe, seed=11))
    edit = dict(image=picture(64, 32, seed=5))
    assert torch.equal(
        run(loaded, "make it blue", seed=11, **edit), run(pipe, "make it blue", seed=11, **edit)
    )


def test_saving_over_an_existing_folder_replaces_it(saved, tmp_path):
    path = tmp_path / "pipe"
    DeepGenPipeline(deepgen_tiny(seed=0)).save_pretrained(path)
    (path / "stale.txt").write_text("from the first save")
    other = DeepGenPipeline(deepgen_tiny(seed=1))
    other.save_pretrained(path)
    assert not (path / "stale.txt").exists()
    assert sorted(os.listdir(tmp_path)) == ["pipe"]  # no temporary or backup folders left behind
    loaded = DeepGenPipeline.from_pretrained(path)
    assert torch.equal(loaded.model.bridge.projector.weight, other.model.bridge.projector.weight)


def test_a_failed_save_leaves_the_existing_folder_untouched(pipe, tmp_path, monkeypatch):
    path = tmp_path / "pipe"
    pipe.save_pretrained(path)
    before = sorted(str(p.relative_to(path)) for p in path.rglob("*"))

    def disk_full(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(pipe.model.vae, "save_pretrained", disk_full)
    with pytest.raises(OSError, match="disk full"):
        pipe.save_pretrained(path)
    assert sorted(str(p.relative_to(path)) for p in path.rglob("*")) == before
    assert sorted(os.listdir(tmp_path)) == ["pipe"]


@pytest.mark.filterwarnings("ignore:Model has `tie_word_embeddings=True`:UserWarning")
def test_a_vlm_with_unmerged_lora_layers_is_saved_merged(tmp_path):
    from peft import LoraConfig, inject_adapter_in_model
    from peft.tuners.tuners_utils import BaseTunerLayer
    from safetensors import safe_open

    model = deepgen_tiny(seed=0)
    targets = ["model.language_model.layers.0.self_attn.q_proj", "model.language_model.embed_tokens"]
    inject_adapter_in_model(
        LoraConfig(r=2, lora_alpha=4, target_modules=targets, init_lora_weights=False), model.vlm
    )
    DeepGenPipeline(model).save_pretrained(tmp_path / "lora")
    with safe_open(str(tmp_path / "lora" / "vlm" / "model.safetensors"), "pt") as f:
        assert not [k for k in f.keys() if "lora_" in k or "base_layer" in k]  # a plain Qwen2.5-VL folder
    assert any(
        isinstance(m, BaseTunerLayer) for m in model.vlm.modules()
    )  # the live model keeps its adapters
    loaded = DeepGenPipeline.from_pretrained(tmp_path / "lora").model
    with torch.no_grad():
        expected, reloaded = model.encode_condition(PROMPT), loaded.encode_condition(PROMPT)
    # Merged W + (alpha / r) B A instead of W x + (alpha / r) B A x: equal up to float32 rounding.
    torch.testing.assert_close(reloaded.context, expected.context, atol=1e-5, rtol=1e-5)


def test_loading_a_missing_folder_or_component_names_the_path(saved, tmp_path):
    with pytest.raises(FileNotFoundError, match=str(tmp_path / "nowhere")):
        DeepGenPipeline.from_pretrained(tmp_path / "nowhere")
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "model_index.json").write_text((saved / "model_index.json").read_text())
    with pytest.raises(FileNotFoundError, match=str(broken / "vlm")):
        DeepGenPipeline.from_pretrained(broken)
