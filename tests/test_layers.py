"""LayerSelection: which VLM hidden states the Stacked Channel Bridge stacks, and in which order.

Hidden-state index convention (Hugging Face ``output_hidden_states`` of a decoder with ``num_layers``
layers): 0 = input embeddings, k = output of decoder layer k (1-based, before the final norm),
``num_layers`` = final-norm output. DeepGen 1.0 stacks ``range(num_layers - 1, 0, -6)``, deepest first.
"""

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from deepgen_components import LayerSelection, ThinkTokenVLM
from deepgen_components.tiny import tiny_tokenizer, tiny_vlm

NUM_LAYERS = 4  # tiny_vlm depth


@pytest.fixture(scope="module")
def tokenizer():
    return tiny_tokenizer()


@pytest.fixture(scope="module")
def vlm(tokenizer):
    return tiny_vlm(tokenizer, num_layers=NUM_LAYERS)


# -- constructors ----------------------------------------------------------------------------------------
def test_official_selection_reproduces_deepgen_1_0():
    layers = LayerSelection.official(36)
    assert layers.indices == (35, 29, 23, 17, 11, 5)
    assert layers.num_layers == 36
    assert len(layers) == 6
    assert list(layers) == [35, 29, 23, 17, 11, 5]
    assert layers.deepest == 35


@pytest.mark.parametrize(
    ("num_layers", "expected"),
    [(2, (1,)), (4, (3,)), (8, (7, 1)), (13, (12, 6)), (28, (27, 21, 15, 9, 3))],
)
def test_official_selection_follows_the_stride_6_rule_at_any_depth(num_layers, expected):
    layers = LayerSelection.official(num_layers)
    assert layers.indices == expected
    # Never the embeddings (0) nor the final-norm output (num_layers).
    assert 0 not in layers.indices and num_layers not in layers.indices


def test_official_selection_needs_two_layers():
    with pytest.raises(ValueError, match="num_layers"):
        LayerSelection.official(1)


def test_uniform_selection_spreads_layers_deepest_first():
    assert LayerSelection.uniform(36, 6).indices == (35, 30, 24, 18, 12, 6)
    assert LayerSelection.uniform(4, 3).indices == (3, 2, 1)
    assert LayerSelection.uniform(36, 1).indices == (35,)
    assert LayerSelection.uniform(7, 6).indices == (6, 5, 4, 3, 2, 1)


@pytest.mark.parametrize("k", [0, 4, 10])
def test_uniform_selection_rejects_k_outside_the_decoder(k):
    with pytest.raises(ValueError, match=r"k must be in 1\.\.3"):
        LayerSelection.uniform(4, k)


def test_explicit_selection_keeps_the_given_order():
    layers = LayerSelection.explicit([1, 4, 0, 2], NUM_LAYERS)
    assert layers.indices == (1, 4, 0, 2)  # embeddings (0) and final norm (4) are allowed when asked for


@pytest.mark.parametrize("bad", [[-1], [5], [2, 7]])
def test_out_of_range_index_raises_naming_the_valid_range(bad):
    with pytest.raises(ValueError, match=r"out of range.*hidden states 0\.\.4"):
        LayerSelection.explicit(bad, NUM_LAYERS)


def test_duplicate_indices_raise():
    with pytest.raises(ValueError, match=r"distinct.*\[2\]"):
        LayerSelection.explicit([2, 3, 2], NUM_LAYERS)


def test_empty_selection_raises():
    with pytest.raises(ValueError, match="at least one"):
        LayerSelection.explicit([], NUM_LAYERS)


def test_non_positive_num_layers_raises():
    with pytest.raises(ValueError, match="num_layers"):
        LayerSelection.explicit([0], 0)


def test_selection_rejects_a_decoder_of_another_depth():
    layers = LayerSelection.official(36)
    layers.check_model(36)
    with pytest.raises(ValueError, match=r"36-layer decoder but the model has 4 layers"):
        layers.check_model(4)


def test_wrapper_rejects_a_selection_for_another_depth(vlm):
    with pytest.raises(ValueError, match=r"36-layer decoder but the model has 4 layers"):
        ThinkTokenVLM(vlm, 2, LayerSelection.official(36))


def test_selection_round_trips_through_a_dict():
    layers = LayerSelection.explicit([3, 1, 2], NUM_LAYERS)
    assert LayerSelection.from_dict(layers.to_dict()) == layers
    assert layers.to_dict() == {"indices": [3, 1, 2], "num_layers": 4}


# -- properties ------------------------------------------------------------------------------------------
@settings(max_examples=20, deadline=None)
@given(data=st.data(), num_layers=st.integers(2, 80))
def test_uniform_gives_k_distinct_decoder_layers_deepest_first(data, num_layers):
    k = data.draw(st.integers(1, num_layers - 1), label="k")
    indices = LayerSelection.uniform(num_layers, k).indices
    assert len(indices) == k
    assert len(set(indices)) == k
    assert all(1 <= i <= num_layers - 1 for i in indices)
    assert list(indices) == sorted(indices, reverse=True)
    assert indices[0] == num_layers - 1


@settings(max_examples=20, deadline=None)
@given(
    num_layers=st.integers(1, 40),
    indices=st.lists(st.integers(-3, 45), min_size=1, max_size=8),
)
def test_explicit_accepts_exactly_distinct_in_range_indices(num_layers, indices):
    valid = all(0 <= i <= num_layers for i in indices) and len(set(indices)) == len(indices)
    if valid:
        assert LayerSelection.explicit(indices, num_layers).indices == tuple(indices)
    else:
        with pytest.raises(ValueError, match="indices"):
            LayerSelection.explicit(indices, num_layers)


# -- against a real decoder ------------------------------------------------------------------------------
def _prompt(tokenizer, texts):
    return tokenizer(texts, padding=True, return_tensors="pt")


def test_hidden_state_indexing_follows_the_official_convention(tokenizer, vlm):
    """0 = embeddings, k = decoder layer k's output, num_layers = final-norm output (transformers 5.x)."""
    enc = _prompt(tokenizer, ["<|im_start|>user\na red cat<|im_end|>"])
    decoder = vlm.model.language_model
    layer_outputs = {}

    def keep(k):
        def hook(module, args, output):
            layer_outputs[k] = output[0] if isinstance(output, tuple) else output

        return hook

    handles = [layer.register_forward_hook(keep(k)) for k, layer in enumerate(decoder.layers, start=1)]
    try:
        with torch.no_grad():
            out = vlm.model(**enc, output_hidden_states=True)
    finally:
        for handle in handles:
            handle.remove()
    hidden = out.hidden_states
    assert len(hidden) == NUM_LAYERS + 1
    torch.testing.assert_close(hidden[0], decoder.embed_tokens(enc.input_ids))
    for k in range(1, NUM_LAYERS):
        torch.testing.assert_close(hidden[k], layer_outputs[k])
    torch.testing.assert_close(hidden[NUM_LAYERS], decoder.norm(layer_outputs[NUM_LAYERS]))
    torch.testing.assert_close(hidden[NUM_LAYERS], out.last_hidden_state)


@pytest.mark.parametrize(
    "layers",
    [LayerSelection.official(NUM_LAYERS), LayerSelection.explicit([2, 4, 0, 3], NUM_LAYERS)],
    ids=["official", "explicit_shuffled"],
)
def test_wrapper_returns_the_selected_hidden_states_in_selection_order(tokenizer, vlm, layers):
    enc = _prompt(tokenizer, ["a red cat on a mat", "the sea"])
    wrapper = ThinkTokenVLM(vlm, 3, layers)
    with torch.no_grad():
        out = wrapper(enc.input_ids, enc.attention_mask)
        plain = vlm.model(
            inputs_embeds=out.inputs_embeds,
            attention_mask=out.attention_mask.long(),
            position_ids=out.position_ids,
            output_hidden_states=True,
        )
    assert len(out.hidden_states) == len(layers)
    for selected, index in zip(out.hidden_states, layers.indices, strict=True):
        assert torch.equal(selected, plain.hidden_states[index])
