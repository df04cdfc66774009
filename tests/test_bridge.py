"""StackedChannelBridge: K VLM hidden states -> (context tokens, pooled vector) for the DiT (reference §4).

stack the K states along channels in selection order -> one Linear -> connector -> zero-initialised heads
(pooled = head(mean over tokens), context = head(every token)). ``mask_padding=False`` is the official
behaviour (pads take part everywhere); ``mask_padding=True`` makes a prompt's outputs independent of the
padding its batch needs. ``tokens="think"`` hands only the N think tokens to the DiT.
"""

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

from deepgen_components import (
    BridgeConfig,
    ConnectorConfig,
    LayerSelection,
    StackedChannelBridge,
    ThinkTokenVLM,
)
from deepgen_components.tiny import tiny_tokenizer, tiny_vlm

K, D = 3, 64  # stacked layers, VLM width (tiny_vlm)
CONNECTOR = ConnectorConfig(hidden_size=32, num_layers=2, num_heads=4, intermediate_size=48)
CONTEXT_DIM, POOLED_DIM = 48, 24
TOL = dict(atol=1e-4, rtol=1e-4)


def make_bridge(*, random_heads: bool = False, seed: int = 0, **overrides) -> StackedChannelBridge:
    torch.manual_seed(seed)
    config = BridgeConfig(
        num_stacked_layers=K,
        vlm_hidden_size=D,
        connector=CONNECTOR,
        context_dim=CONTEXT_DIM,
        pooled_dim=POOLED_DIM,
        **overrides,
    )
    bridge = StackedChannelBridge(config).eval()
    if random_heads:
        randomize_heads(bridge)
    return bridge


def randomize_heads(bridge: StackedChannelBridge, seed: int = 1) -> None:
    """The heads are zero at init, which would hide everything the bridge does: give them weights."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for head in (bridge.pooled_head, bridge.context_head):
            head.weight.copy_(torch.randn(head.weight.shape, generator=g) / head.in_features**0.5)
            head.bias.copy_(torch.randn(head.bias.shape, generator=g) * 0.1)


def random_states(batch: int, length: int, seed: int = 0, scale: float = 1.0) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(batch, length, D, generator=g) * scale for _ in range(K)]


def left_pad(
    samples: list[list[torch.Tensor]], length: int, seed: int
) -> tuple[list[torch.Tensor], torch.Tensor]:
    """Batch per-sample states (each K tensors of (1, n_i, D)) with left padding of arbitrary content."""
    garbage = random_states(len(samples), length, seed=seed, scale=5.0)
    mask = torch.zeros(len(samples), length, dtype=torch.bool)
    for i, states in enumerate(samples):
        n = states[0].shape[1]
        for k in range(K):
            garbage[k][i, length - n :] = states[k][0]
        mask[i, length - n :] = True
    return garbage, mask


@pytest.fixture(scope="module")
def masked_bridge():
    return make_bridge(random_heads=True, mask_padding=True)


@pytest.fixture(scope="module")
def tokenizer():
    return tiny_tokenizer()


@pytest.fixture(scope="module")
def frozen_vlm(tokenizer):
    return tiny_vlm(tokenizer).requires_grad_(False)


def t2i_prompt(prompt: str) -> str:
    return f"<|im_start|>user\nGenerate an image: {prompt}<|im_end|>\n<|im_start|>assistant\n"


# -- shapes and init --------------------------------------------------------------------------------------
def test_bridge_heads_are_zero_at_init_so_the_condition_is_zero():
    bridge = make_bridge()
    for head in (bridge.pooled_head, bridge.context_head):
        assert not head.weight.any() and not head.bias.any()
    with torch.no_grad():
        out = bridge(random_states(2, 7), torch.ones(2, 7, dtype=torch.bool))
    assert out.context.shape == (2, 7, CONTEXT_DIM)
    assert out.pooled.shape == (2, POOLED_DIM)
    assert not out.context.any() and not out.pooled.any()


def test_bridge_projection_is_one_linear_map_of_the_channel_stack():
    bridge = make_bridge()
    states = random_states(2, 5)
    with torch.no_grad():
        out = bridge(states, torch.ones(2, 5, dtype=torch.bool), return_intermediates=True)
        expected = F.linear(torch.cat(states, dim=-1), bridge.projector.weight, bridge.projector.bias)
    assert bridge.projector.weight.shape == (CONNECTOR.hidden_size, K * D)
    torch.testing.assert_close(out.intermediates["projector_out"], expected, atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("block", range(K))
def test_bridge_stacks_hidden_states_along_channels_in_the_given_order(block):
    bridge = make_bridge()
    width = CONNECTOR.hidden_size
    with torch.no_grad():  # a projector that copies the first `width` channels of one block
        bridge.projector.weight.zero_()
        bridge.projector.bias.zero_()
        bridge.projector.weight[:, block * D : block * D + width] = torch.eye(width)
        states = random_states(1, 4)
        out = bridge(states, torch.ones(1, 4, dtype=torch.bool), return_intermediates=True)
    assert torch.equal(out.intermediates["projector_out"], states[block][..., :width])


def test_bridge_stacks_the_wrappers_layers_in_selection_order(tokenizer, frozen_vlm):
    layers = LayerSelection.explicit([4, 1, 2], 4)
    wrapper = ThinkTokenVLM(frozen_vlm, 3, layers)
    enc = tokenizer([t2i_prompt("a red cat")], return_tensors="pt")
    bridge = make_bridge()
    width = CONNECTOR.hidden_size
    with torch.no_grad():
        states = wrapper(enc.input_ids, enc.attention_mask, output_all_hidden_states=True)
        for block, index in enumerate(layers.indices):
            bridge.projector.weight.zero_()
            bridge.projector.bias.zero_()
            bridge.projector.weight[:, block * D : block * D + width] = torch.eye(width)
            out = bridge(states.hidden_states, states.attention_mask, return_intermediates=True)
            picked = states.all_hidden_states[index][..., :width]
            assert torch.equal(out.intermediates["projector_out"], picked), (
                f"block {block} is not layer {index}"
            )


# -- padding ----------------------------------------------------------------------------------------------
@settings(max_examples=15, deadline=None)
@given(
    lengths=st.lists(st.integers(1, 6), min_size=1, max_size=3),
    extra=st.integers(0, 4),
    seed=st.integers(0, 2**16),
)
def test_bridge_masks_padding_tokens(masked_bridge, lengths, extra, seed):
    samples = [random_states(1, n, seed=seed + i) for i, n in enumerate(lengths)]
    states, mask = left_pad(samples, max(lengths) + extra, seed=seed + 99)
    with torch.no_grad():
        batched = masked_bridge(states, mask)
        for i, alone_states in enumerate(samples):
            n = lengths[i]
            alone = masked_bridge(alone_states, torch.ones(1, n, dtype=torch.bool))
            torch.testing.assert_close(batched.context[i][mask[i]], alone.context[0], **TOL)
            torch.testing.assert_close(batched.pooled[i], alone.pooled[0], **TOL)
    assert torch.equal(batched.mask, mask)


def test_official_bridge_outputs_depend_on_padding():
    """Documents the official behaviour (mask_padding=False): pads are attended to and pooled."""
    bridge = make_bridge(random_heads=True, mask_padding=False)
    real = random_states(1, 5)
    states, mask = left_pad([real], 8, seed=7)
    with torch.no_grad():
        padded = bridge(states, mask)
        alone = bridge(real, torch.ones(1, 5, dtype=torch.bool))
    assert padded.mask.all()  # every token, pads included, goes to the DiT
    assert not torch.allclose(padded.context[0, 3:], alone.context[0], atol=1e-3)
    assert not torch.allclose(padded.pooled, alone.pooled, atol=1e-3)


def test_official_bridge_pools_a_plain_mean_over_every_token():
    bridge = make_bridge(random_heads=True, mask_padding=False)
    states, mask = left_pad([random_states(1, 4)], 7, seed=3)
    with torch.no_grad():
        out = bridge(states, mask, return_intermediates=True)
        encoded = out.intermediates["connector_out"]
        torch.testing.assert_close(out.intermediates["connector_mean"], encoded.mean(1))
        torch.testing.assert_close(out.pooled, bridge.pooled_head(encoded.mean(1)))
        torch.testing.assert_close(out.context, bridge.context_head(encoded))


def test_masked_bridge_pools_the_mean_over_real_tokens_only(masked_bridge):
    states, mask = left_pad([random_states(1, 4), random_states(1, 6, seed=1)], 7, seed=3)
    with torch.no_grad():
        out = masked_bridge(states, mask, return_intermediates=True)
    encoded = out.intermediates["connector_out"]
    for i in range(2):
        torch.testing.assert_close(out.intermediates["connector_mean"][i], encoded[i][mask[i]].mean(0))


def _bridge_on_prompts(wrapper, bridge, tokenizer, prompts, images=None):
    """images: None or (pixel_values, image_grid_thw) for the vision blocks of the prompts."""
    enc = tokenizer(prompts, padding=True, return_tensors="pt")
    with torch.no_grad():
        states = wrapper(enc.input_ids, enc.attention_mask, *(images or ()))
        return bridge(states.hidden_states, states.attention_mask, states.think_mask), states


def edit_prompt(grid, instruction: str) -> str:
    t, h, w = grid
    block = "<|vision_start|>" + "<|image_pad|>" * (t * h * w // 4) + "<|vision_end|>"
    return f"<|im_start|>user\n{block}\n{instruction}<|im_end|>\n<|im_start|>assistant\n"


LONG_PROMPT = t2i_prompt("a lighthouse on a cliff above a stormy sea at dusk, with gulls and rain")
GRID = (1, 4, 6)


def _short_prompt_and_images(with_image: bool):
    if not with_image:
        return t2i_prompt("a cat"), None
    pixel_values = torch.randn(24, 3 * 2 * 14 * 14, generator=torch.Generator().manual_seed(0))
    return edit_prompt(GRID, "make it red"), (pixel_values, torch.tensor([GRID]))


@pytest.mark.parametrize("with_image", [False, True], ids=["text", "image"])
def test_bridge_output_is_independent_of_batch_padding_end_to_end(
    tokenizer, frozen_vlm, masked_bridge, with_image
):
    wrapper = ThinkTokenVLM(frozen_vlm, 4, LayerSelection.uniform(4, K))
    short, images = _short_prompt_and_images(with_image)
    alone, alone_states = _bridge_on_prompts(wrapper, masked_bridge, tokenizer, [short], images)
    batched, batched_states = _bridge_on_prompts(
        wrapper, masked_bridge, tokenizer, [short, LONG_PROMPT], images
    )
    n = alone_states.attention_mask.shape[1]
    assert batched_states.attention_mask.shape[1] > n  # the short prompt is left-padded in the batch
    torch.testing.assert_close(batched.context[0, -n:], alone.context[0], **TOL)
    torch.testing.assert_close(batched.pooled[0], alone.pooled[0], **TOL)
    assert torch.equal(batched.mask, batched_states.attention_mask)


@pytest.mark.parametrize("with_image", [False, True], ids=["text", "image"])
def test_official_bridge_output_changes_with_batch_padding_end_to_end(tokenizer, frozen_vlm, with_image):
    bridge = make_bridge(random_heads=True, mask_padding=False)
    wrapper = ThinkTokenVLM(frozen_vlm, 4, LayerSelection.uniform(4, K))
    short, images = _short_prompt_and_images(with_image)
    alone, alone_states = _bridge_on_prompts(wrapper, bridge, tokenizer, [short], images)
    batched, _ = _bridge_on_prompts(wrapper, bridge, tokenizer, [short, LONG_PROMPT], images)
    n = alone_states.attention_mask.shape[1]
    assert not torch.allclose(batched.context[0, -n:], alone.context[0], atol=1e-3)
    assert not torch.allclose(batched.pooled[0], alone.pooled[0], atol=1e-3)


# -- think tokens only ------------------------------------------------------------------------------------
def test_think_token_bridge_yields_exactly_n_context_tokens(tokenizer, frozen_vlm):
    n = 5
    wrapper = ThinkTokenVLM(frozen_vlm, n, LayerSelection.uniform(4, K))
    think_bridge = make_bridge(random_heads=True, tokens="think")
    prompts = [t2i_prompt("a cat"), t2i_prompt("a lighthouse on a cliff at dusk")]
    out, states = _bridge_on_prompts(wrapper, think_bridge, tokenizer, prompts)
    assert out.context.shape == (2, n, CONTEXT_DIM)
    assert out.mask.shape == (2, n) and out.mask.all()
    # The same as an all-token bridge that is only shown the think tokens.
    all_bridge = make_bridge(tokens="all")
    all_bridge.load_state_dict(think_bridge.state_dict())
    with torch.no_grad():
        only_think = all_bridge([h[:, -n:] for h in states.hidden_states], torch.ones(2, n, dtype=torch.bool))
    torch.testing.assert_close(out.context, only_think.context, **TOL)
    torch.testing.assert_close(out.pooled, only_think.pooled, **TOL)


@pytest.mark.parametrize("tokens", ["all", "think"])
@pytest.mark.parametrize("mask_padding", [True, False])
def test_encode_step_is_the_forward_after_token_selection(tokens, mask_padding):
    """``encode`` on the selected tokens is exactly what ``forward`` computes (the exported condition encoder
    runs it on the think tokens it slices itself)."""
    bridge = make_bridge(random_heads=True, tokens=tokens, mask_padding=mask_padding)
    states, mask = left_pad([random_states(1, 4, seed=2), random_states(1, 7, seed=3)], 9, seed=4)
    think_mask = torch.zeros(2, 9, dtype=torch.bool)
    think_mask[:, -3:] = True
    selected = [h[:, -3:] for h in states] if tokens == "think" else states
    selected_mask = mask[:, -3:] if tokens == "think" else mask
    with torch.no_grad():
        expected = bridge(states, mask, think_mask, return_intermediates=True)
        got = bridge.encode(selected, selected_mask, return_intermediates=True)
    for name in ("context", "pooled", "mask"):
        assert torch.equal(getattr(got, name), getattr(expected, name)), name
    assert all(torch.equal(got.intermediates[k], v) for k, v in expected.intermediates.items())


def test_think_token_bridge_needs_a_consistent_think_mask():
    bridge = make_bridge(tokens="think")
    states, mask = random_states(2, 6), torch.ones(2, 6, dtype=torch.bool)
    with pytest.raises(ValueError, match="think_mask is required"):
        bridge(states, mask)
    ragged = torch.zeros(2, 6, dtype=torch.bool)
    ragged[0, -2:] = True
    ragged[1, -3:] = True
    with pytest.raises(ValueError, match="think_mask must mark the same"):
        bridge(states, mask, ragged)


# -- gradients --------------------------------------------------------------------------------------------
def _condition_loss(out, seed=5):
    """MSE against fixed random targets (nonzero gradient even where the output is zero)."""
    g = torch.Generator().manual_seed(seed)
    context_target = torch.randn(out.context.shape, generator=g)
    pooled_target = torch.randn(out.pooled.shape, generator=g)
    context_error = (out.context - context_target)[out.mask]
    return context_error.square().mean() + (out.pooled - pooled_target).square().mean()


def _train_step_grads(tokenizer, frozen_vlm, bridge):
    wrapper = ThinkTokenVLM(frozen_vlm, 4, LayerSelection.uniform(4, K))
    enc = tokenizer([t2i_prompt("a cat"), t2i_prompt("a red boat at sea")], padding=True, return_tensors="pt")
    states = wrapper(enc.input_ids, enc.attention_mask)
    _condition_loss(bridge(states.hidden_states, states.attention_mask, states.think_mask)).backward()
    return wrapper


def test_frozen_vlm_passes_gradients_to_think_tokens_and_bridge_only(tokenizer, frozen_vlm):
    bridge = make_bridge(random_heads=True)
    wrapper = _train_step_grads(tokenizer, frozen_vlm, bridge)
    think_grad = wrapper.think_tokens.weight.grad
    assert think_grad is not None and think_grad.abs().sum() > 0
    assert all(p.grad is None for p in frozen_vlm.parameters())
    for name, param in bridge.named_parameters():
        assert param.grad is not None, name
        assert torch.isfinite(param.grad).all(), name
        if not name.endswith("k_proj.bias"):  # softmax is invariant to a key bias: its gradient is 0
            assert param.grad.abs().sum() > 0, name


def test_zero_heads_give_a_gradient_to_the_heads_only(tokenizer, frozen_vlm):
    """Official note: at step 0 only the two heads move; everything upstream learns once they are nonzero."""
    bridge = make_bridge()
    wrapper = _train_step_grads(tokenizer, frozen_vlm, bridge)
    for name, param in bridge.named_parameters():
        if name.startswith(("pooled_head", "context_head")):
            assert param.grad.abs().sum() > 0, name
        else:
            assert param.grad is None or not param.grad.any(), name
    assert not wrapper.think_tokens.weight.grad.any()


# -- bad input --------------------------------------------------------------------------------------------
def test_bridge_rejects_a_wrong_number_of_hidden_states(masked_bridge):
    with pytest.raises(ValueError, match=r"hidden_states: got 2 tensors.*num_stacked_layers=3"):
        masked_bridge(random_states(1, 4)[:2], torch.ones(1, 4, dtype=torch.bool))


def test_bridge_rejects_hidden_states_of_another_width(masked_bridge):
    states = [torch.zeros(1, 4, 32) for _ in range(K)]
    with pytest.raises(ValueError, match=r"hidden_states: width 32 does not match vlm_hidden_size=64"):
        masked_bridge(states, torch.ones(1, 4, dtype=torch.bool))


def test_bridge_rejects_hidden_states_of_different_shapes(masked_bridge):
    states = random_states(1, 4)
    states[1] = states[1][:, :3]
    with pytest.raises(ValueError, match=r"hidden_states\[1\]"):
        masked_bridge(states, torch.ones(1, 4, dtype=torch.bool))


def test_bridge_rejects_a_mask_of_another_shape(masked_bridge):
    with pytest.raises(ValueError, match="attention_mask shape"):
        masked_bridge(random_states(1, 4), torch.ones(1, 5, dtype=torch.bool))


# -- config -----------------------------------------------------------------------------------------------
def test_bridge_config_defaults_to_masking_and_official_config_does_not():
    assert BridgeConfig().mask_padding is True
    official = BridgeConfig.deepgen_1_0()
    assert (official.tokens, official.mask_padding) == ("all", False)
    assert official.stacked_dim == 6 * 2048
    assert (official.context_dim, official.pooled_dim) == (4096, 2048)
    assert BridgeConfig.deepgen_1_0(mask_padding=True).mask_padding is True


def test_official_bridge_has_the_reference_parameter_counts():
    with torch.device("meta"):
        bridge = StackedChannelBridge(BridgeConfig.deepgen_1_0())

    def count(module):
        return sum(p.numel() for p in module.parameters())

    assert count(bridge.projector) == 12288 * 2048 + 2048  # 25.17M
    assert count(bridge.pooled_head) == 2048 * 2048 + 2048  # 4.20M
    assert count(bridge.context_head) == 2048 * 4096 + 4096  # 8.39M
    assert count(bridge.connector) == 6 * 65_738_410  # 65.74M per layer
    assert count(bridge) + 128 * 2048 == pytest.approx(432.4e6, rel=1e-3)  # + think tokens


def test_bridge_config_round_trips_through_a_dict():
    config = make_bridge(tokens="think", mask_padding=False).config
    assert BridgeConfig.from_dict(config.to_dict()) == config
    with pytest.raises(ValueError, match=r"unknown BridgeConfig keys \['layers'\]"):
        BridgeConfig.from_dict({**config.to_dict(), "layers": 3})


def test_bridge_config_rejects_unknown_token_choice():
    with pytest.raises(ValueError, match="tokens must be 'all' or 'think'"):
        BridgeConfig(tokens="prompt")
