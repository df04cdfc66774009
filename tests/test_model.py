"""DeepGenModel: VLM + think tokens + SCB bridge + conditioned DiT + VAE + scheduler, composed (reference §1, §6).

``encode_condition`` (prompts + references -> context, pooled, mask), ``velocity`` (the DiT under a
condition), ``encode_images`` / ``decode_latents`` ((z - shift) * scale and back) and the training objective
``flow_matching_loss``: x_sigma = (1 - sigma) x0 + sigma * eps, target eps - x0, per-sample MSE; sigma from a
uniform index into the shift-3 training grid (sigma = 3k / (1 + 2k)) or logit-normal; 10% caption dropout
on text-to-image batches only. Also: the real-size builder on the meta device.
"""

import gc

import pytest
import torch

from deepgen_components import (
    BridgeConfig,
    ConnectorConfig,
    DeepGenConfig,
    DeepGenModel,
    LayerSelection,
    StackedChannelBridge,
    ThinkTokens,
    build_preset,
    deepgen_1_0,
    deepgen_tiny,
)
from deepgen_components.tiny import tiny_scheduler, tiny_tokenizer, tiny_transformer, tiny_vae, tiny_vlm

PROMPTS = ["a red cat", "a blue cube on the sky under the sun"]


@pytest.fixture(scope="module")
def model():
    return deepgen_tiny(seed=0)


@pytest.fixture
def no_dropout(model, monkeypatch):
    monkeypatch.setattr(model, "config", DeepGenConfig(image_size=64, condition_dropout=0.0))
    return model


def seeded(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def shifted_sigma(index):
    """The shift-3 FlowMatch training grid: k = (1000 - index) / 1000, sigma = 3k / (1 + 2k)."""
    k = (1000 - torch.as_tensor(index, dtype=torch.float64)) / 1000
    return 3 * k / (1 + 2 * k)


# -- composition ----------------------------------------------------------------------------------------


def test_components_that_do_not_fit_together_are_rejected():
    tokenizer = tiny_tokenizer()
    parts = dict(
        vlm=tiny_vlm(tokenizer),
        think_tokens=ThinkTokens(4, 64),
        layers=LayerSelection.uniform(4, 2),
        dit=tiny_transformer(),
        vae=tiny_vae(),
        scheduler=tiny_scheduler(),
        tokenizer=tokenizer,
    )

    def bridge(**overrides):
        values = dict(
            num_stacked_layers=2,
            vlm_hidden_size=64,
            context_dim=64,
            pooled_dim=32,
            connector=ConnectorConfig(hidden_size=48, num_layers=1, num_heads=4, intermediate_size=96),
        )
        return StackedChannelBridge(BridgeConfig(**{**values, **overrides}))

    DeepGenModel(bridge=bridge(), **parts)  # fits
    with pytest.raises(ValueError, match="layers selects 2 hidden states but the bridge stacks 3"):
        DeepGenModel(bridge=bridge(num_stacked_layers=3), **parts)
    with pytest.raises(ValueError, match="vlm_hidden_size=32 but the VLM is 64 wide"):
        DeepGenModel(bridge=bridge(vlm_hidden_size=32), **parts)
    with pytest.raises(ValueError, match="bridge heads .*joint_attention_dim 64"):
        DeepGenModel(bridge=bridge(context_dim=128), **parts)


@pytest.mark.parametrize(
    "overrides, message",
    [
        (dict(timestep_sampling="cosine"), "timestep_sampling"),
        (dict(reference_latents="mode"), "reference_latents"),
        (dict(condition_dropout=1.5), "condition_dropout"),
        (dict(image_size=500), "multiple of 32"),
    ],
)
def test_config_rejects_bad_values(overrides, message):
    with pytest.raises(ValueError, match=message):
        DeepGenConfig(**overrides)


def test_config_defaults_are_the_official_values():
    config = DeepGenConfig()
    assert (config.max_length, config.image_size, config.condition_dropout) == (1024, 512, 0.1)
    assert config.timestep_sampling == "uniform" and config.reference_latents == "sample"


# -- condition and velocity ----------------------------------------------------------------------------


@torch.no_grad()
def test_encode_condition_gives_context_pooled_and_mask_for_every_token(model):
    condition = model.encode_condition(PROMPTS)
    batch = model.prepare_prompts(PROMPTS)
    length = batch.input_ids.shape[1] + model.think_tokens.num_tokens  # all tokens reach the DiT ("all")
    assert condition.context.shape == (2, length, 64)
    assert condition.pooled.shape == (2, 32)
    # Masked mode (the tiny default): the left pads of the shorter prompt are marked.
    assert torch.equal(condition.mask[:, : batch.input_ids.shape[1]], batch.attention_mask.bool())
    assert bool(condition.mask[:, -model.think_tokens.num_tokens :].all())
    assert torch.equal(
        model.encode_condition("a red cat").context, model.encode_condition(["a red cat"]).context
    )


@torch.no_grad()
def test_a_prompts_velocity_does_not_depend_on_its_batch_in_masked_mode(model):
    latents = torch.randn(2, 16, 8, 8, generator=seeded(0))
    t = torch.tensor([700.0, 300.0])
    together = model.velocity(latents, t, model.encode_condition(PROMPTS))
    alone = model.velocity(latents[:1], t[:1], model.encode_condition(PROMPTS[:1]))
    torch.testing.assert_close(together[:1], alone, atol=1e-5, rtol=1e-5)


@torch.no_grad()
def test_the_edit_condition_and_velocity_depend_on_the_reference(model):
    g = seeded(1)
    first, second = (torch.rand(3, 64, 64, generator=g) * 2 - 1 for _ in range(2))
    a = model.encode_condition(["make it blue"], [[first]])
    b = model.encode_condition(["make it blue"], [[second]])
    assert a.context.shape == b.context.shape
    assert (a.context - b.context).abs().max() > 1e-3  # the vision tokens reach the bridge
    latents = torch.randn(1, 16, 8, 8, generator=g)
    refs = torch.randn(2, 1, 16, 8, 8, generator=g)
    v1 = model.velocity(latents, torch.tensor([500.0]), a, refs[0:1, 0])
    v2 = model.velocity(latents, torch.tensor([500.0]), a, refs[1:2, 0])
    assert (v1 - v2).abs().max() > 1e-4  # the reference latents reach the DiT


def test_reference_pixels_resize_pil_images_and_take_tensors_as_given(model):
    """The model's rules of processing.reference_pixels: one entry per prompt (None, an image or a list); a PIL
    image is resized by the official rule (long side <= image_size, sides up to x32); a tensor is taken as given and
    must already be (3, H, W) with sides multiples of 32; anything else is a ValueError naming [prompt][reference]."""
    from PIL import Image

    big = Image.new("RGB", (1000, 250), (255, 0, 0))
    tensor = torch.rand(3, 64, 32) * 2 - 1
    (pil,), (same,), nothing = model.reference_pixels([big, [tensor], None])
    assert model.config.image_size == 64  # 1000 x 250 -> 64 x 16 -> sides rounded up to 32: 64 x 32 (W x H)
    assert pil.shape == (3, 32, 64) and pil.dtype == torch.float32 and float(pil[0].min()) == 1.0
    assert same is tensor and nothing == []
    assert model.reference_pixels(None) is None
    with pytest.raises(ValueError, match=r"images\[1\]\[0\]: a tensor reference must be \(3, H, W\) .* multiples of 32"):
        model.reference_pixels([None, [torch.rand(3, 40, 32)]])
    with pytest.raises(ValueError, match=r"images\[0\]\[1\]: expected PIL images or \(3, H, W\) tensors, got str"):
        model.reference_pixels([[big, "cat.png"]])


@torch.no_grad()
def test_vae_latents_are_shifted_and_scaled(model):
    pixels = torch.rand(1, 3, 64, 64, generator=seeded(2)) * 2 - 1
    latents = model.encode_images(pixels, mode="mean")
    raw = model.vae.encode(pixels).latent_dist.mean
    torch.testing.assert_close(latents, (raw - 0.0609) * 1.5305)
    assert latents.shape == (1, 16, 8, 8)
    torch.testing.assert_close(model.decode_latents(latents), model.vae.decode(raw).sample)
    # "sample" (official) draws from the posterior with the generator: reproducible, and not the mean.
    first = model.encode_images(pixels, generator=seeded(3), mode="sample")
    assert torch.equal(first, model.encode_images(pixels, generator=seeded(3), mode="sample"))
    assert not torch.allclose(first, latents)


# -- flow matching loss --------------------------------------------------------------------------------


def test_flow_matching_loss_is_the_rectified_flow_mse(no_dropout):
    model = no_dropout
    g = seeded(4)
    x0, noise = torch.randn(2, 16, 8, 8, generator=g), torch.randn(2, 16, 8, 8, generator=g)
    u = torch.tensor([0.25, 0.8])
    out = model.flow_matching_loss({"prompts": PROMPTS, "latents": x0, "noise": noise, "u": u})
    sigmas = shifted_sigma([250, 800]).float()  # index = floor(1000 u)
    torch.testing.assert_close(out.sigmas, sigmas)
    torch.testing.assert_close(out.timesteps, sigmas * 1000)
    with torch.no_grad():
        s = sigmas.view(-1, 1, 1, 1)
        noisy = (1 - s) * x0 + s * noise
        prediction = model.velocity(noisy, out.timesteps, model.encode_condition(PROMPTS))
    torch.testing.assert_close(out.prediction.detach(), prediction)
    per_sample = ((prediction - (noise - x0)) ** 2).mean(dim=(1, 2, 3))
    torch.testing.assert_close(out.per_sample.detach(), per_sample)
    torch.testing.assert_close(out.loss.detach(), per_sample.mean())
    assert out.loss.dtype == torch.float32 and out.loss.requires_grad


def test_flow_matching_loss_with_a_latent_weight_map_is_each_samples_weighted_mean(no_dropout):
    model = no_dropout
    g = seeded(5)
    x0, noise = torch.randn(2, 16, 8, 8, generator=g), torch.randn(2, 16, 8, 8, generator=g)
    batch = {"prompts": PROMPTS, "latents": x0, "noise": noise, "u": torch.tensor([0.3, 0.6])}
    weight = torch.ones(2, 1, 8, 8)
    weight[0, :, 2:4, 2:5] = 5.0  # sample 0: a "shape" weighted up; sample 1: uniform
    with torch.no_grad():
        plain = model.flow_matching_loss(batch)
        weighted = model.flow_matching_loss({**batch, "loss_weight": weight})
    error = (plain.prediction - plain.target) ** 2
    expected0 = (error[0] * weight[0]).mean() / weight[0].mean()
    torch.testing.assert_close(weighted.per_sample[0], expected0)
    torch.testing.assert_close(weighted.per_sample[1], plain.per_sample[1])  # uniform weights change nothing
    assert not torch.allclose(weighted.per_sample[0], plain.per_sample[0])
    with pytest.raises(ValueError, match=r"loss_weight.*\(2, 1, 8, 8\)"):
        model.flow_matching_loss({**batch, "loss_weight": torch.ones(2, 1, 4, 4)})


def test_flow_matching_loss_with_a_teacher_distils_its_velocity(no_dropout):
    """batch["teacher"]: the target is the teacher's velocity at the same noisy latents, timesteps and prompts
    (no gradient through it); the prediction and its gradient path are unchanged."""
    model = no_dropout
    g = seeded(6)
    x0, noise = torch.randn(2, 16, 8, 8, generator=g), torch.randn(2, 16, 8, 8, generator=g)
    batch = {"prompts": PROMPTS, "latents": x0, "noise": noise, "u": torch.tensor([0.2, 0.9])}
    seen = {}

    def teacher(noisy, timesteps, prompts, reference_latents):
        seen.update(noisy=noisy, timesteps=timesteps, prompts=prompts, references=reference_latents)
        return 0.5 * noisy

    out = model.flow_matching_loss({**batch, "teacher": teacher})
    torch.testing.assert_close(seen["noisy"], out.noisy_latents)
    torch.testing.assert_close(seen["timesteps"], out.timesteps)
    assert seen["prompts"] == PROMPTS and seen["references"] is None
    torch.testing.assert_close(out.target, 0.5 * out.noisy_latents)
    expected = ((out.prediction.detach() - 0.5 * out.noisy_latents) ** 2).mean(dim=(1, 2, 3))
    torch.testing.assert_close(out.per_sample.detach(), expected)
    out.loss.backward()
    assert any(p.grad is not None for p in model.bridge.parameters())

    def perfect(noisy, timesteps, prompts, reference_latents):  # the model itself: nothing left to learn
        return model.velocity(noisy, timesteps, model.encode_condition(prompts))

    with torch.no_grad():
        assert model.flow_matching_loss({**batch, "teacher": perfect}).loss < 1e-10
    with pytest.raises(ValueError, match="teacher"):
        model.flow_matching_loss({"prompts": PROMPTS, "latents": list(x0), "teacher": teacher})


def test_flow_matching_loss_takes_latents_of_different_sizes(no_dropout):
    model = no_dropout
    g = seeded(5)
    x0 = [torch.randn(16, 8, 8, generator=g), torch.randn(16, 4, 8, generator=g)]
    noise = [torch.randn_like(x) for x in x0]
    u = torch.tensor([0.5, 0.1])
    out = model.flow_matching_loss({"prompts": PROMPTS, "latents": x0, "noise": noise, "u": u})
    assert [p.shape for p in out.prediction] == [(16, 8, 8), (16, 4, 8)]
    with torch.no_grad():
        for i in range(2):  # each sample's loss is its own: computed alone, it is the same
            s = float(out.sigmas[i])
            noisy = (1 - s) * x0[i] + s * noise[i]
            alone = model.velocity(
                noisy[None], out.timesteps[i : i + 1], model.encode_condition(PROMPTS[i : i + 1])
            )
            expected = ((alone[0] - (noise[i] - x0[i])) ** 2).mean()
            torch.testing.assert_close(out.per_sample[i].detach(), expected, atol=1e-5, rtol=1e-5)


def test_editing_loss_conditions_on_the_reference(no_dropout):
    model = no_dropout
    g = seeded(6)
    reference = torch.rand(3, 64, 32, generator=g) * 2 - 1
    reference_latents = torch.randn(16, 8, 4, generator=g)
    x0, noise = torch.randn(1, 16, 8, 8, generator=g), torch.randn(1, 16, 8, 8, generator=g)
    batch = {
        "prompts": ["make it blue"],
        "latents": x0,
        "noise": noise,
        "u": torch.tensor([0.6]),
        "reference_pixels": [[reference]],
        "reference_latents": [[reference_latents]],
    }
    out = model.flow_matching_loss(batch)
    with torch.no_grad():
        s = out.sigmas.view(-1, 1, 1, 1)
        condition = model.encode_condition(["make it blue"], [[reference]])
        prediction = model.velocity((1 - s) * x0 + s * noise, out.timesteps, condition, [[reference_latents]])
    torch.testing.assert_close(out.prediction.detach(), prediction)


def test_uniform_timestep_sampling_indexes_the_shifted_training_grid(model):
    index = torch.arange(1000)
    u, timesteps, sigmas = model.sample_training_timesteps(1000, u=(index + 0.5) / 1000)
    torch.testing.assert_close(sigmas.double(), shifted_sigma(index), atol=1e-6, rtol=0)
    torch.testing.assert_close(timesteps, sigmas * 1000, atol=1e-3, rtol=0)
    assert sigmas[0] == 1.0 and sigmas[-1] == pytest.approx(0.003 / 1.002)
    _, _, edge = model.sample_training_timesteps(1, u=torch.tensor([1.0]))
    assert edge.item() == pytest.approx(0.003 / 1.002)  # u = 1 stays on the grid
    # Drawn u: uniform, so about 10% of the draws land in the first 100 grid entries.
    _, drawn, _ = model.sample_training_timesteps(4000, seeded(7))
    assert set(drawn.tolist()) <= set(model.train_timesteps.tolist())
    assert 0.08 < (drawn > model.train_timesteps[100]).float().mean() < 0.12


def test_logit_normal_timestep_sampling_is_available(model, monkeypatch):
    monkeypatch.setattr(
        model,
        "config",
        DeepGenConfig(image_size=64, timestep_sampling="logit_normal", logit_mean=0.5, logit_std=1.5),
    )
    u, _, sigmas = model.sample_training_timesteps(4000, seeded(8))
    expected_u = torch.sigmoid(torch.randn(4000, generator=seeded(8)) * 1.5 + 0.5)
    torch.testing.assert_close(u, expected_u)
    index = (expected_u * 1000).long().clamp(max=999)
    torch.testing.assert_close(sigmas.double(), shifted_sigma(index), atol=1e-6, rtol=0)
    # Far fewer draws in the first 10% of the grid than uniform sampling's 10%: P(u < 0.1) = 0.035 here.
    assert (u < 0.1).float().mean() < 0.06


@torch.no_grad()
def classify_dropped(model, out, prompts, x0, noise):
    """Per sample: was its caption replaced by ""? (its prediction is the one made under the empty prompt)"""
    s = out.sigmas.view(-1, 1, 1, 1)
    noisy = (1 - s) * x0 + s * noise
    kept = model.velocity(noisy, out.timesteps, model.encode_condition(prompts))
    dropped = model.velocity(noisy, out.timesteps, model.encode_condition([""] * len(prompts)))
    distance_kept = (out.prediction - kept).flatten(1).abs().amax(1)
    distance_dropped = (out.prediction - dropped).flatten(1).abs().amax(1)
    assert bool((torch.minimum(distance_kept, distance_dropped) < 1e-4).all())
    return distance_dropped < distance_kept


def test_ten_percent_of_text_to_image_captions_are_dropped(model):
    assert model.config.condition_dropout == 0.1
    size = 120
    prompts = [f"prompt number {i}" for i in range(size)]
    g = seeded(9)
    x0, noise = torch.randn(size, 16, 2, 2, generator=g), torch.randn(size, 16, 2, 2, generator=g)
    with torch.no_grad():
        out = model.flow_matching_loss({"prompts": prompts, "latents": x0, "noise": noise}, seeded(10))
    dropped = classify_dropped(model, out, prompts, x0, noise)
    assert 4 <= int(dropped.sum()) <= 24  # Binomial(120, 0.1): mean 12, sd 3.3


def test_all_captions_drop_at_probability_one_but_editing_is_never_dropped(model, monkeypatch):
    monkeypatch.setattr(model, "config", DeepGenConfig(image_size=64, condition_dropout=1.0))
    g = seeded(11)
    x0, noise = torch.randn(2, 16, 8, 8, generator=g), torch.randn(2, 16, 8, 8, generator=g)
    u = torch.tensor([0.3, 0.7])
    with torch.no_grad():
        out = model.flow_matching_loss({"prompts": PROMPTS, "latents": x0, "noise": noise, "u": u})
    assert bool(classify_dropped(model, out, PROMPTS, x0, noise).all())

    reference = torch.rand(3, 64, 64, generator=g) * 2 - 1
    reference_latents = torch.randn(16, 8, 8, generator=g)
    batch = {
        "prompts": ["make it blue", "make it red"],
        "latents": x0,
        "noise": noise,
        "u": u,
        "reference_pixels": [[reference], [reference]],
        "reference_latents": [[reference_latents]] * 2,
    }
    with torch.no_grad():
        out = model.flow_matching_loss(batch)
        s = out.sigmas.view(-1, 1, 1, 1)
        condition = model.encode_condition(batch["prompts"], batch["reference_pixels"])
        kept = model.velocity((1 - s) * x0 + s * noise, out.timesteps, condition, batch["reference_latents"])
    torch.testing.assert_close(out.prediction, kept)


def test_loss_batch_errors_name_the_key(model):
    with pytest.raises(ValueError, match="'latents' or 'pixels'"):
        model.flow_matching_loss({"prompts": ["a"]})
    with pytest.raises(ValueError, match="1 prompts for 2 images"):
        model.flow_matching_loss({"prompts": ["a"], "latents": torch.zeros(2, 16, 8, 8)})


# -- the real size, on the meta device --------------------------------------------------------------------


def count(module) -> int:
    return sum(p.numel() for p in module.parameters())


def test_deepgen_1_0_on_the_meta_device_has_the_official_parameter_counts_and_no_memory(model):
    import psutil

    process = psutil.Process()
    gc.collect()
    before = process.memory_info().rss
    real = deepgen_1_0(device="meta")
    gc.collect()
    grown = process.memory_info().rss - before
    parameters = list(real.parameters())
    assert all(p.is_meta for p in parameters)
    total = sum(p.numel() for p in parameters)
    # Materialised in fp32 this would be ~26 GB (the VAE alone ~335 MB); on meta it is module objects only.
    assert total * 4 > 25e9
    assert grown < 200 * 2**20, f"RSS grew by {grown / 2**20:.0f} MiB"
    expected = {"vlm": 3.755e9, "scb": 0.4324e9, "dit": 2.243e9, "vae": 84e6}
    counts = {
        "vlm": count(real.vlm),
        "scb": count(real.think_tokens) + count(real.bridge),
        "dit": count(real.dit),
        "vae": count(real.vae),
    }
    for name, value in expected.items():
        assert counts[name] == pytest.approx(value, rel=0.01), name
    assert count(real.think_tokens) == 128 * 2048
    assert real.layers.indices == (35, 29, 23, 17, 11, 5)


def test_builders_reject_half_given_paths_and_unknown_presets(tmp_path):
    with pytest.raises(ValueError, match="vlm_path: the official weights hold no base VLM"):
        deepgen_1_0(weights_path=tmp_path)
    with pytest.raises(FileNotFoundError, match="vlm_path: no config.json"):
        deepgen_1_0(vlm_path=tmp_path)  # a fresh SCB on a pretrained VLM needs a real VLM folder
    with pytest.raises(FileNotFoundError, match="transformer_path: no config.json"):
        deepgen_1_0(transformer_path=tmp_path)
    with pytest.raises(ValueError, match="device='meta' builds shapes only"):
        deepgen_1_0(tmp_path, tmp_path, device="meta")
    with pytest.raises(ValueError, match="device='meta' builds shapes only"):
        deepgen_1_0(transformer_path=tmp_path, device="meta")
    with pytest.raises(ValueError, match="unknown preset 'nope'; presets: deepgen-1.0, deepgen-shapes, small, tiny"):
        build_preset("nope")
