"""ConditionedDiT: SD3 MMDiT velocity with reference latents, per-sample sizes and a context mask (reference §5).

Reference latents go through the same PatchEmbed (same sin-cos positions) and are appended after the target
tokens; samples of different sizes are right-padded with a key-padding mask; only the target is
unpatchified. With no references and no masks the forward is exactly diffusers' SD3Transformer2DModel.
"""

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from deepgen_components import ConditionedDiT
from deepgen_components.tiny import tiny_transformer

CONTEXT_DIM, POOLED_DIM, CHANNELS = 64, 32, 16  # tiny_transformer defaults
TOL = dict(atol=1e-5, rtol=1e-4)


@pytest.fixture(scope="module")
def dit():
    return ConditionedDiT(tiny_transformer(seed=0))


@pytest.fixture(scope="module")
def plain_sd3():
    """The same weights with diffusers' own attention processors (ConditionedDiT replaces them)."""
    return tiny_transformer(seed=0)


def randn(*shape, seed=0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


def condition(batch: int, length: int = 5, seed: int = 100):
    """(timestep, context, pooled) for a batch."""
    timestep = torch.linspace(900.0, 100.0, batch)
    return timestep, randn(batch, length, CONTEXT_DIM, seed=seed), randn(batch, POOLED_DIM, seed=seed + 1)


def call_per_sample(dit, latents, timestep, context, pooled, references=None):
    """The reference semantics of a batched call: every sample on its own."""
    outputs = []
    for i, x in enumerate(latents):
        refs = None if references is None else [references[i]]
        out = dit(x[None], timestep[i : i + 1], context[i : i + 1], pooled[i : i + 1], reference_latents=refs)
        outputs.append(out[0])
    return outputs


# -- exactness and shapes ---------------------------------------------------------------------------------
def test_dit_without_references_equals_the_plain_sd3_forward(dit, plain_sd3):
    latents = randn(2, CHANNELS, 8, 12)
    timestep, context, pooled = condition(2)
    with torch.no_grad():
        ours = dit(latents, timestep, context, pooled)
        expected = plain_sd3(
            hidden_states=latents, encoder_hidden_states=context, pooled_projections=pooled, timestep=timestep
        ).sample
    assert torch.equal(ours, expected)


def test_dit_with_an_all_true_context_mask_equals_the_plain_sd3_forward(dit, plain_sd3):
    latents = randn(2, CHANNELS, 8, 8)
    timestep, context, pooled = condition(2)
    with torch.no_grad():
        ours = dit(latents, timestep, context, pooled, context_mask=torch.ones(2, 5, dtype=torch.bool))
        expected = plain_sd3(
            hidden_states=latents, encoder_hidden_states=context, pooled_projections=pooled, timestep=timestep
        ).sample
    assert torch.equal(ours, expected)


def test_dit_output_has_the_target_shape(dit):
    timestep, context, pooled = condition(2)
    with torch.no_grad():
        out = dit(
            randn(2, CHANNELS, 8, 12), timestep, context, pooled, reference_latents=randn(2, CHANNELS, 16, 4)
        )
        assert out.shape == (2, CHANNELS, 8, 12)
        listed = dit([randn(CHANNELS, 8, 8), randn(CHANNELS, 4, 10)], timestep, context, pooled)
    assert isinstance(listed, list)
    assert [tuple(v.shape) for v in listed] == [(CHANNELS, 8, 8), (CHANNELS, 4, 10)]


def test_dit_accepts_a_scalar_timestep(dit):
    latents = randn(2, CHANNELS, 8, 8)
    _, context, pooled = condition(2)
    with torch.no_grad():
        scalar = dit(latents, 500.0, context, pooled)
        vector = dit(latents, torch.tensor([500.0, 500.0]), context, pooled)
    assert torch.equal(scalar, vector)


# -- reference latents ------------------------------------------------------------------------------------
def test_reference_latents_change_the_target_velocity(dit):
    latents = randn(2, CHANNELS, 8, 8)
    timestep, context, pooled = condition(2)
    with torch.no_grad():
        without = dit(latents, timestep, context, pooled)
        with_ref = dit(latents, timestep, context, pooled, reference_latents=randn(2, CHANNELS, 8, 8, seed=1))
        other_ref = dit(
            latents, timestep, context, pooled, reference_latents=randn(2, CHANNELS, 8, 8, seed=2)
        )
    assert with_ref.shape == without.shape
    assert not torch.allclose(with_ref, without, atol=1e-4)
    assert not torch.allclose(with_ref, other_ref, atol=1e-4)


def test_reference_layouts_agree(dit):
    """(B, C, h, w), (B, R, C, h, w) and per-sample lists describe the same references."""
    latents = randn(2, CHANNELS, 8, 8)
    timestep, context, pooled = condition(2)
    refs = randn(2, 2, CHANNELS, 6, 6, seed=3)
    with torch.no_grad():
        stacked = dit(latents, timestep, context, pooled, reference_latents=refs)
        listed = dit(latents, timestep, context, pooled, reference_latents=[list(r) for r in refs])
        one = dit(latents, timestep, context, pooled, reference_latents=refs[:, 0])
        one_listed = dit(latents, timestep, context, pooled, reference_latents=[r[0] for r in refs])
    torch.testing.assert_close(listed, stacked, **TOL)
    torch.testing.assert_close(one_listed, one, **TOL)


def test_several_references_per_sample_equal_per_sample_calls(dit):
    latents = [randn(CHANNELS, 8, 8), randn(CHANNELS, 8, 8, seed=1), randn(CHANNELS, 8, 8, seed=2)]
    references = [
        [randn(CHANNELS, 8, 8, seed=10), randn(CHANNELS, 4, 12, seed=11)],  # two references of other sizes
        [],  # text-to-image sample in the same batch
        [randn(CHANNELS, 6, 6, seed=12)],
    ]
    timestep, context, pooled = condition(3)
    with torch.no_grad():
        batched = dit(torch.stack(latents), timestep, context, pooled, reference_latents=references)
        expected = call_per_sample(dit, latents, timestep, context, pooled, references)
    for i in range(3):
        torch.testing.assert_close(batched[i], expected[i], **TOL)


def test_reference_order_does_not_matter(dit):
    """No sequence-index positions: references are told apart by content only (official Kontext style)."""
    latents = randn(1, CHANNELS, 8, 8)
    timestep, context, pooled = condition(1)
    first, second = randn(CHANNELS, 8, 8, seed=20), randn(CHANNELS, 4, 6, seed=21)
    with torch.no_grad():
        forward = dit(latents, timestep, context, pooled, reference_latents=[[first, second]])
        backward = dit(latents, timestep, context, pooled, reference_latents=[[second, first]])
    torch.testing.assert_close(forward, backward, **TOL)


# -- padding masks ----------------------------------------------------------------------------------------
def test_mixed_latent_sizes_in_one_batch_equal_per_sample_calls(dit):
    latents = [randn(CHANNELS, 8, 8), randn(CHANNELS, 12, 6, seed=1), randn(CHANNELS, 4, 4, seed=2)]
    timestep, context, pooled = condition(3)
    with torch.no_grad():
        batched = dit(latents, timestep, context, pooled)
        expected = call_per_sample(dit, latents, timestep, context, pooled)
    for got, want in zip(batched, expected, strict=True):
        assert got.shape == want.shape
        torch.testing.assert_close(got, want, **TOL)


@settings(max_examples=12, deadline=None)
@given(
    sizes=st.lists(st.tuples(st.integers(1, 6), st.integers(1, 6)), min_size=1, max_size=3),
    seed=st.integers(0, 2**16),
)
def test_batched_call_equals_per_sample_calls_for_any_latent_sizes(dit, sizes, seed):
    latents = [randn(CHANNELS, 2 * h, 2 * w, seed=seed + i) for i, (h, w) in enumerate(sizes)]
    timestep, context, pooled = condition(len(sizes), seed=seed)
    with torch.no_grad():
        batched = dit(latents, timestep, context, pooled)
        expected = call_per_sample(dit, latents, timestep, context, pooled)
    for got, want in zip(batched, expected, strict=True):
        torch.testing.assert_close(got, want, **TOL)


def test_context_mask_equals_dropping_the_masked_context_tokens(dit):
    latents = randn(2, CHANNELS, 8, 8)
    timestep, context, pooled = condition(2, length=6)
    context_mask = torch.tensor(
        [[False, False, True, True, True, True], [True, False, True, False, True, True]]
    )
    with torch.no_grad():
        masked = dit(latents, timestep, context, pooled, context_mask=context_mask)
        for i in range(2):
            kept = context[i : i + 1, context_mask[i]]
            dropped = dit(latents[i : i + 1], timestep[i : i + 1], kept, pooled[i : i + 1])
            torch.testing.assert_close(masked[i : i + 1], dropped, **TOL)
        unmasked = dit(latents, timestep, context, pooled)
    assert not torch.allclose(masked, unmasked, atol=1e-4)


# -- bad input --------------------------------------------------------------------------------------------
def test_dit_rejects_latents_not_divisible_by_the_patch_size(dit):
    timestep, context, pooled = condition(1)
    with pytest.raises(
        ValueError, match=r"latents\[0\]: latent size 9x8 is not divisible by the patch size 2"
    ):
        dit(randn(1, CHANNELS, 9, 8), timestep, context, pooled)
    with pytest.raises(ValueError, match=r"reference_latents\[0\]\[0\]: latent size 8x5"):
        dit(randn(1, CHANNELS, 8, 8), timestep, context, pooled, reference_latents=randn(1, CHANNELS, 8, 5))


def test_dit_rejects_reference_latents_with_the_wrong_channel_count(dit):
    timestep, context, pooled = condition(1)
    with pytest.raises(ValueError, match=r"reference_latents\[0\]\[0\]: has 4 channels, the DiT takes 16"):
        dit(randn(1, CHANNELS, 8, 8), timestep, context, pooled, reference_latents=randn(1, 4, 8, 8))


def test_dit_rejects_latents_with_the_wrong_channel_count(dit):
    timestep, context, pooled = condition(1)
    with pytest.raises(ValueError, match=r"latents\[0\]: has 3 channels"):
        dit(randn(1, 3, 8, 8), timestep, context, pooled)


def test_dit_rejects_latents_larger_than_the_position_table(dit):
    timestep, context, pooled = condition(1)
    with pytest.raises(ValueError, match=r"latents\[0\].*pos_embed_max_size=64"):
        dit([randn(CHANNELS, 130, 8)], timestep, context, pooled)


def test_dit_rejects_a_reference_list_of_another_batch_size(dit):
    timestep, context, pooled = condition(2)
    with pytest.raises(ValueError, match=r"reference_latents: got 1 entries for a batch of 2"):
        dit(randn(2, CHANNELS, 8, 8), timestep, context, pooled, reference_latents=[randn(CHANNELS, 8, 8)])


@pytest.mark.parametrize(
    ("context", "pooled", "match"),
    [
        (randn(1, 5, 32), randn(1, POOLED_DIM), r"context: width 32 does not match joint_attention_dim 64"),
        (randn(1, 5, CONTEXT_DIM), randn(1, 8), r"pooled: expected \(1, 32\)"),
    ],
    ids=["context_width", "pooled_width"],
)
def test_dit_rejects_conditions_of_the_wrong_width(dit, context, pooled, match):
    with pytest.raises(ValueError, match=match):
        dit(randn(1, CHANNELS, 8, 8), torch.tensor([500.0]), context, pooled)


def test_dit_rejects_a_context_mask_of_another_shape(dit):
    timestep, context, pooled = condition(1)
    with pytest.raises(ValueError, match="context_mask shape"):
        dit(
            randn(1, CHANNELS, 8, 8),
            timestep,
            context,
            pooled,
            context_mask=torch.ones(1, 4, dtype=torch.bool),
        )


def test_dit_rejects_a_timestep_of_another_batch_size(dit):
    _, context, pooled = condition(2)
    with pytest.raises(ValueError, match=r"timestep: expected a scalar or shape \(2,\)"):
        dit(randn(2, CHANNELS, 8, 8), torch.tensor([1.0, 2.0, 3.0]), context, pooled)


def test_dit_wraps_only_sd3_transformers():
    with pytest.raises(
        ValueError, match="transformer: expected a diffusers SD3Transformer2DModel, got Linear"
    ):
        ConditionedDiT(nn.Linear(4, 4))
