"""The torch-free runtime's numpy ports and the exported stage wrappers, against the PyTorch originals (no export).

The ONNX Runtime pipeline reproduces the PyTorch pipeline only if every piece it re-implements does:
tokenization with left padding, M-RoPE positions, DeepGen's reference preprocessing (torch's
bilinear coordinate rule), the vision tower's window layout. The wrappers that get exported must compute exactly
what the library's API computes. (The scheduler grid and the sampling loop: tests/test_runtime_mirror.py.)
"""

import numpy as np
import pytest
import torch
from deepgen_components.export import modules, preprocessing
from deepgen_components.export.specs import ExportRanges, build_specs, model_config
from PIL import Image

from deepgen_components import conventions, deepgen_tiny, processing
from deepgen_components.think_tokens import mrope_position_ids


@pytest.fixture(scope="module")
def model():
    return deepgen_tiny(seed=0)


@pytest.fixture(scope="module")
def tokenizer_file(model, tmp_path_factory):
    folder = tmp_path_factory.mktemp("tokenizer")
    model.tokenizer.save_pretrained(str(folder))
    return folder / "tokenizer.json"


@pytest.fixture(scope="module")
def processor(model, tokenizer_file):
    return preprocessing.PromptProcessor(model_config(model), tokenizer_file)


def picture(width: int, height: int, seed: int) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8))


# -- prompts ----------------------------------------------------------------------------------------------------


def test_prompt_processor_tokenizes_pads_and_positions_like_tokenize_prompts(model, processor):
    prompts = ["a red cat on a mat", "", "the sea"]
    references = [[processing.pil_to_pixels(picture(64, 96, 0))], [], [processing.pil_to_pixels(picture(64, 64, 1))]]
    expected = processing.tokenize_prompts(model.tokenizer, prompts, references)
    expected_positions = model.encoder.position_ids(expected.input_ids, expected.attention_mask, expected.image_grid_thw)
    got = processor(prompts, [[r.numpy() for r in refs] for refs in references])
    assert got.texts == expected.texts
    assert np.array_equal(got.input_ids, expected.input_ids.numpy())
    assert np.array_equal(got.attention_mask, expected.attention_mask.numpy())
    assert np.array_equal(got.position_ids, expected_positions.numpy())
    assert [list(g) for g in got.grids] == expected.image_grid_thw.tolist()
    assert np.abs(np.concatenate(got.patches) - expected.pixel_values.numpy()).max() < 1e-5


def test_prompt_processor_truncates_long_prompts_the_official_way(model, processor, tokenizer_file):
    long_prompt = "word " * 400
    short = preprocessing.PromptProcessor(dict(processor.config, max_length=64), tokenizer_file)
    got = short([long_prompt, "short"])
    expected = processing.tokenize_prompts(model.tokenizer, [long_prompt, "short"], max_length=64)
    assert got.input_ids.shape[1] == 64
    assert np.array_equal(got.input_ids, expected.input_ids.numpy())


def test_numpy_mrope_positions_equal_the_torch_routine_with_images_and_padding():
    image = 9
    rng = np.random.default_rng(0)
    ids = rng.integers(10, 50, (3, 30))
    mask = np.ones((3, 30), np.int64)
    mask[1, :7] = 0
    mask[2, :3] = 0
    ids[0, 4:8] = image  # grid (1, 4, 4), merge 2 -> 4 tokens
    ids[2, 10:16] = image  # grid (1, 4, 6) -> 6 tokens
    grids = [(1, 4, 4), (1, 4, 6)]
    expected = mrope_position_ids(
        torch.from_numpy(ids), torch.from_numpy(mask), torch.tensor(grids), image_token_id=image, spatial_merge_size=2
    )
    got = conventions.mrope_positions(ids, mask, grids, image_token_id=image, spatial_merge_size=2)
    assert np.array_equal(got, expected.numpy())


# -- reference preprocessing -------------------------------------------------------------------------------------


@pytest.mark.parametrize("size", [(32, 32), (64, 64), (96, 160), (512, 384)])
def test_numpy_vision_patches_follow_torch_bilinear_resize_and_patch_order(size):
    pixels = torch.rand(3, *size) * 2 - 1
    expected, grid = processing.vision_patches(pixels)
    got, np_grid = preprocessing.vision_patches(pixels.numpy())
    assert list(np_grid) == grid[0].tolist()
    # Same source indices and weights as torch; the blend's float32 rounding differs by at most an ulp or two.
    assert np.abs(got - expected.numpy()).max() < 2e-6


@pytest.mark.parametrize("size", [(300, 200), (64, 64), (1000, 40)])
def test_reference_resize_rule_and_pixels_equal_the_torch_helpers(size):
    image = picture(*size, seed=3)
    target = conventions.limit_long_side_size(image.height, image.width, 64)
    assert target == processing.limit_long_side_size(image.height, image.width, 64)
    assert np.array_equal(conventions.pil_to_array(image, target), processing.pil_to_pixels(image, target).numpy())


@pytest.mark.parametrize("size", [(32, 32), (64, 96), (128, 160)])
def test_vision_encoder_wrapper_on_window_ordered_inputs_equals_the_vision_tower(model, size):
    pixels = torch.rand(3, *size) * 2 - 1
    patches, grid = processing.vision_patches(pixels)
    vision = model.encoder.config.vision_config
    feeds, restore = preprocessing.vision_inputs(
        patches.numpy(), tuple(grid[0].tolist()), merge_size=2, window_size=vision.window_size, patch_size=vision.patch_size
    )
    with torch.no_grad():
        got = modules.VisionEncoder(model)(**{k: torch.from_numpy(v) for k, v in feeds.items()}).numpy()[restore]
        expected = model.encoder.image_features(patches, grid).numpy()
    assert np.abs(got - expected).max() < 1e-5


# -- stage wrappers vs the library API ----------------------------------------------------------------------------


@pytest.mark.parametrize("mask_padding, tokens", [(True, "all"), (False, "all"), (True, "think"), (False, "think")])
def test_condition_encoder_wrapper_equals_encode_tokens_in_every_bridge_mode(mask_padding, tokens, tmp_path):
    model = deepgen_tiny(seed=1, mask_padding=mask_padding, tokens=tokens)
    model.tokenizer.save_pretrained(str(tmp_path))
    processor = preprocessing.PromptProcessor(model_config(model), tmp_path / "tokenizer.json")
    prompts = ["a red cat", "a much longer prompt about the deep blue sea"]
    references = [[processing.pil_to_pixels(picture(64, 64, 0))], [processing.pil_to_pixels(picture(96, 64, 1))]]
    batch = processing.tokenize_prompts(model.tokenizer, prompts, references)
    with torch.no_grad():
        expected, _ = model.encode_tokens(batch)
        features = torch.zeros(*batch.input_ids.shape, model.encoder.hidden_size)
        slots = batch.input_ids == model.encoder.image_token_id()
        features[slots] = model.encoder.image_features(batch.pixel_values, batch.image_grid_thw)
        tokens_np = processor(prompts, [[r.numpy() for r in refs] for refs in references])
        context, pooled, mask = modules.ConditionEncoder(model)(
            batch.input_ids, batch.attention_mask, torch.from_numpy(tokens_np.position_ids), features
        )
    valid = expected.mask if tokens == "think" else torch.cat(
        [batch.attention_mask.bool(), torch.ones(2, model.encoder.num_think_tokens, dtype=torch.bool)], 1
    )
    assert torch.equal(mask, expected.mask)
    assert (context - expected.context)[valid].abs().max() < 1e-6
    assert (pooled - expected.pooled).abs().max() < 1e-6


@pytest.mark.parametrize("mask_padding", [True, False])
@pytest.mark.parametrize("with_reference", [False, True])
def test_dit_wrapper_equals_model_velocity(mask_padding, with_reference):
    model = deepgen_tiny(seed=2, mask_padding=mask_padding)
    generator = torch.Generator().manual_seed(0)
    latents = torch.randn(4, 16, 8, 12, generator=generator)
    context = torch.randn(4, 11, 64, generator=generator)
    pooled = torch.randn(4, 32, generator=generator)
    mask = torch.ones(4, 11, dtype=torch.bool)
    mask[1, :4] = False
    mask[3, :2] = False
    timestep = torch.tensor([999.0, 500.0, 20.0, 0.5])
    reference = torch.randn(4, 16, 8, 8, generator=generator) if with_reference else None
    condition = type("Condition", (), {"context": context, "pooled": pooled, "mask": mask})
    kwargs = {"context_mask": mask} if mask_padding else {}
    if with_reference:
        kwargs["reference_latents"] = reference
    with torch.no_grad():
        expected = model.velocity(latents, timestep, condition, reference)
        got = modules.DiTVelocity(model, with_reference=with_reference)(latents, context, pooled, timestep, **kwargs)
    assert (got - expected).abs().max() < 1e-5


@pytest.mark.parametrize("size", [(8, 8), (10, 14), (128, 128), (126, 4)])
def test_position_table_crop_by_index_equals_the_diffusers_crop(model, size):
    patch_embed = model.dit.transformer.pos_embed
    expected = patch_embed.cropped_pos_embed(*size)
    assert torch.equal(modules._cropped_pos_embed_by_index(patch_embed, *size), expected)


def test_export_friendly_patches_are_restored(model):
    patch_embed = model.dit.transformer.pos_embed
    wrapper = modules.DiTVelocity(model, with_reference=False)
    with modules.export_friendly(wrapper):
        assert "cropped_pos_embed" in vars(patch_embed)
        assert modules.ops.attention is modules._attention_with_full_mask
    assert "cropped_pos_embed" not in vars(patch_embed)
    assert modules.ops.attention is not modules._attention_with_full_mask


def test_vae_wrappers_equal_decode_latents_and_the_posterior_mean(model):
    latents = torch.randn(2, 16, 8, 4)
    pixels = torch.rand(2, 3, 64, 32) * 2 - 1
    with torch.no_grad():
        assert torch.equal(modules.VAEDecoder(model)(latents), model.decode_latents(latents))
        mean, std = modules.VAEEncoder(model)(pixels)
        assert torch.equal(mean, model.encode_images(pixels, mode="mean"))
        posterior = model.vae.encode(pixels).latent_dist
        assert torch.allclose(std, posterior.std * model.vae.config.scaling_factor)


# -- specs ------------------------------------------------------------------------------------------------------


def test_parity_shapes_differ_from_the_traced_example_in_every_dynamic_dim(model):
    specs = build_specs(model, ExportRanges(min_size=64, max_size=256, max_batch=2))
    for spec in specs.values():
        example = spec.example_values()
        points = spec.parity_values(3)
        assert len(points) == 3
        dynamic = [name for name, dim in spec.dims.items() if len(dim.candidates()) > 1]
        assert dynamic, spec.stage  # every stage has a dynamic dim, so the check below is never empty
        for name in dynamic:
            assert all(p[name] != example[name] for p in points), (spec.stage, name)
        assert example.get("batch", 2) >= 2  # no 0/1 specialisation of the batch


def test_ranges_reject_sizes_that_are_not_multiples_of_32_or_exceed_the_position_table(model):
    with pytest.raises(ValueError, match="multiple of 32"):
        ExportRanges(min_size=100)
    with pytest.raises(ValueError, match="position table"):
        build_specs(model, ExportRanges(min_size=64, max_size=2048))
