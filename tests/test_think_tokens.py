"""ThinkTokens and ThinkTokenVLM: learnable tokens appended after the prompt of a causal VLM / LM.

Specification (reference §3): N learnable embeddings, init N(0, 1/sqrt(D)), identical for every sample, are
appended as input embeddings after the left-padded prompt; positions come from the VLM's own routine
(M-RoPE for Qwen2.5-VL, counted over real tokens, pads = 1); the causal LM never lets a prompt token see a
think token, so the prompt's hidden states are those of the plain prompt.
"""

import math

import pytest
import torch
from torch import nn

from deepgen_components import LayerSelection, ThinkTokens, ThinkTokenVLM
from deepgen_components.think_tokens import mrope_position_ids, text_position_ids
from deepgen_components.tiny import tiny_tokenizer, tiny_vlm

PATCH_DIM = 3 * 2 * 14 * 14  # channels * temporal_patch * patch * patch = 1176
MERGE = 2  # spatial_merge_size of the tiny VLM
ATOL = 1e-5


@pytest.fixture(scope="module")
def tokenizer():
    return tiny_tokenizer()


@pytest.fixture(scope="module")
def vlm(tokenizer):
    return tiny_vlm(tokenizer)


@pytest.fixture(scope="module")
def causal_lm():
    from transformers import Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(0)
    config = Qwen2Config(
        vocab_size=300,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=3,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
    )
    return Qwen2ForCausalLM(config).eval()


def image_block(grid) -> str:
    t, h, w = grid
    return "<|vision_start|>" + "<|image_pad|>" * (t * h * w // MERGE**2) + "<|vision_end|>"


def edit_prompt(grids, instruction: str) -> str:
    """The official editing template with one vision block per reference."""
    blocks = "".join(image_block(g) for g in grids)
    return f"<|im_start|>user\n{blocks}\n{instruction}<|im_end|>\n<|im_start|>assistant\n"


def t2i_prompt(prompt: str) -> str:
    return f"<|im_start|>user\nGenerate an image: {prompt}<|im_end|>\n<|im_start|>assistant\n"


def pixel_values_for(grids, seed: int = 0) -> torch.Tensor:
    """Random ViT input: one 1176-wide row per (t, h, w) patch of every image."""
    g = torch.Generator().manual_seed(seed)
    return torch.randn(sum(t * h * w for t, h, w in grids), PATCH_DIM, generator=g)


def assert_prompt_states_equal_plain_run(out, plain_hidden, length):
    """Every hidden state of the wrapper, restricted to the prompt's real positions, equals the plain run."""
    real = out.attention_mask[:, :length]
    assert len(out.all_hidden_states) == len(plain_hidden)
    for with_think, alone in zip(out.all_hidden_states, plain_hidden, strict=True):
        torch.testing.assert_close(with_think[:, :length][real], alone[real], atol=ATOL, rtol=1e-4)


# -- ThinkTokens ------------------------------------------------------------------------------------------
def test_think_tokens_init_std_is_one_over_sqrt_hidden_size():
    torch.manual_seed(0)
    hidden = 1024
    tokens = ThinkTokens(256, hidden)  # 262,144 samples: the std estimate is good to ~0.2 %
    assert tokens.weight.shape == (256, hidden)
    std = 1 / math.sqrt(hidden)
    assert tokens.weight.std().item() == pytest.approx(std, rel=0.03)
    assert abs(tokens.weight.mean().item()) < 5 * std / math.sqrt(tokens.weight.numel())  # 5 standard errors
    official = ThinkTokens(128, 2048)
    assert official.weight.std().item() == pytest.approx(1 / math.sqrt(2048), rel=0.05)  # ≈ 0.0221


def test_think_tokens_init_std_can_be_overridden():
    torch.manual_seed(0)
    assert ThinkTokens(64, 256, init_std=0.5).weight.std().item() == pytest.approx(0.5, rel=0.05)


def test_think_tokens_are_identical_across_samples():
    tokens = ThinkTokens(5, 8)
    batch = tokens(3)
    assert batch.shape == (3, 5, 8)
    for sample in batch:
        assert torch.equal(sample, tokens.weight)


@pytest.mark.parametrize(
    ("num_tokens", "hidden_size", "name"), [(-1, 8, "num_tokens"), (4, 0, "hidden_size")]
)
def test_think_tokens_reject_bad_sizes(num_tokens, hidden_size, name):
    with pytest.raises(ValueError, match=name):
        ThinkTokens(num_tokens, hidden_size)


def test_wrapper_appends_the_same_think_tokens_to_every_sample(tokenizer, vlm):
    wrapper = ThinkTokenVLM(vlm, 4)
    enc = tokenizer(
        [t2i_prompt("a cat"), t2i_prompt("a long prompt about the harbour")],
        padding=True,
        return_tensors="pt",
    )
    with torch.no_grad():
        out = wrapper(enc.input_ids, enc.attention_mask)
    length = enc.input_ids.shape[1]
    assert out.inputs_embeds.shape == (2, length + 4, wrapper.hidden_size)
    for sample in out.inputs_embeds:
        assert torch.equal(sample[length:], wrapper.think_tokens.weight)
    assert out.think_mask[:, length:].all() and not out.think_mask[:, :length].any()
    assert torch.equal(out.attention_mask[:, :length], enc.attention_mask.bool())
    assert out.attention_mask[:, length:].all()


def test_forward_is_embed_append_think_tokens_and_decode(tokenizer, vlm):
    """The public pieces (the exported condition encoder composes them) give exactly the wrapper's states."""
    wrapper = ThinkTokenVLM(vlm, 3, LayerSelection.uniform(4, 2))
    enc = tokenizer([t2i_prompt("a cat"), t2i_prompt("a red boat at sea")], padding=True, return_tensors="pt")
    with torch.no_grad():
        out = wrapper(enc.input_ids, enc.attention_mask, output_all_hidden_states=True)
        embeds, mask = wrapper.append_think_tokens(wrapper.embed(enc.input_ids), enc.attention_mask)
        every = wrapper.decode(embeds, mask, out.position_ids)
    assert torch.equal(embeds, out.inputs_embeds) and torch.equal(mask, out.attention_mask)
    assert len(every) == wrapper.num_layers + 1
    assert all(torch.equal(a, b) for a, b in zip(every, out.all_hidden_states))
    assert wrapper.vision_tower is wrapper.vlm.model.visual


# -- the prompt's hidden states are untouched ------------------------------------------------------------
def check_prompt_states_untouched(vlm, enc, pixel_values=None, grid_thw=None):
    """The wrapper's prompt positions hold exactly the hidden states of a plain VLM run on the prompt alone."""
    wrapper = ThinkTokenVLM(vlm, 6, LayerSelection.uniform(4, 3))
    images = {} if pixel_values is None else {"pixel_values": pixel_values, "image_grid_thw": grid_thw}
    length = enc.input_ids.shape[1]
    with torch.no_grad():
        out = wrapper(enc.input_ids, enc.attention_mask, output_all_hidden_states=True, **images)
        plain = vlm.model(
            input_ids=enc.input_ids,
            attention_mask=enc.attention_mask,
            position_ids=out.position_ids[..., :length],
            output_hidden_states=True,
            **images,
        )
    assert_prompt_states_equal_plain_run(out, plain.hidden_states, length)


def test_think_tokens_do_not_change_prompt_hidden_states_text_only(tokenizer, vlm):
    check_prompt_states_untouched(vlm, tokenizer([t2i_prompt("a red cat")], return_tensors="pt"))


def test_think_tokens_do_not_change_prompt_hidden_states_in_a_left_padded_batch(tokenizer, vlm):
    enc = tokenizer(
        [t2i_prompt("a cat"), t2i_prompt("a lighthouse on a cliff at dusk")],
        padding=True,
        return_tensors="pt",
    )
    assert not enc.attention_mask.bool().all()  # the first prompt is left-padded
    check_prompt_states_untouched(vlm, enc)


def test_think_tokens_do_not_change_prompt_hidden_states_with_images(tokenizer, vlm):
    grids = [(1, 4, 6), (1, 4, 4)]  # two references: 6 and 4 image tokens
    enc = tokenizer([edit_prompt(grids, "make the sky red")], return_tensors="pt")
    assert int((enc.input_ids == vlm.config.image_token_id).sum()) == 10
    check_prompt_states_untouched(vlm, enc, pixel_values_for(grids), torch.tensor(grids))


def test_think_tokens_do_not_change_prompt_hidden_states_of_a_plain_causal_lm(causal_lm):
    wrapper = ThinkTokenVLM(causal_lm, 5, LayerSelection.uniform(3, 2))
    assert wrapper.kind == "causal_lm" and wrapper.vision_tower is None
    input_ids = torch.tensor([[0, 0, 11, 12, 13, 14], [21, 22, 23, 24, 25, 26]])
    attention_mask = torch.tensor([[0, 0, 1, 1, 1, 1], [1, 1, 1, 1, 1, 1]])
    with torch.no_grad():
        out = wrapper(input_ids, attention_mask, output_all_hidden_states=True)
        plain = causal_lm.model(
            input_ids=input_ids,
            attention_mask=attention_mask,
            position_ids=out.position_ids[:, :6],
            output_hidden_states=True,
        )
    assert out.position_ids.shape == (2, 6 + 5)  # 1-D positions for a plain LM
    assert_prompt_states_equal_plain_run(out, plain.hidden_states, 6)


def test_think_tokens_see_the_whole_prompt(tokenizer, vlm):
    wrapper = ThinkTokenVLM(vlm, 3, LayerSelection.uniform(4, 3))
    enc = tokenizer([t2i_prompt("a red cat")], return_tensors="pt")
    edited = enc.input_ids.clone()
    edited[0, 3] += 1  # one early prompt token differs
    with torch.no_grad():
        a = wrapper(enc.input_ids, enc.attention_mask)
        b = wrapper(edited, enc.attention_mask)
    for ha, hb in zip(a.hidden_states, b.hidden_states):
        for i in range(3):  # every think token, the first one included, depends on the prompt
            assert not torch.allclose(ha[0, -3 + i], hb[0, -3 + i], atol=1e-4)


def test_think_tokens_attend_causally_to_each_other(tokenizer, vlm):
    wrapper = ThinkTokenVLM(vlm, 4, LayerSelection.uniform(4, 3))
    enc = tokenizer([t2i_prompt("a red cat")], return_tensors="pt")
    with torch.no_grad():
        before = wrapper(enc.input_ids, enc.attention_mask)
        wrapper.think_tokens.weight[2] += torch.randn(64, generator=torch.Generator().manual_seed(0))
        after = wrapper(enc.input_ids, enc.attention_mask)  # think token 2 perturbed
    length = enc.input_ids.shape[1]
    for hb, ha in zip(before.hidden_states, after.hidden_states):
        torch.testing.assert_close(ha[:, : length + 2], hb[:, : length + 2], atol=ATOL, rtol=1e-4)
        assert not torch.allclose(ha[:, length + 2 :], hb[:, length + 2 :], atol=1e-4)


# -- positions --------------------------------------------------------------------------------------------
def test_text_positions_count_real_tokens_only_with_pads_at_one():
    mask = torch.tensor([[0, 0, 1, 1, 1], [1, 1, 1, 1, 1], [0, 0, 0, 0, 1]])
    expected = torch.tensor([[1, 1, 0, 1, 2], [0, 1, 2, 3, 4], [1, 1, 1, 1, 0]])
    assert torch.equal(text_position_ids(mask), expected)
    assert torch.equal(text_position_ids(mask), (mask.cumsum(-1) - 1).masked_fill(mask == 0, 1))


def test_text_only_mrope_positions_are_1d_on_all_axes(tokenizer, vlm):
    wrapper = ThinkTokenVLM(vlm, 3)
    enc = tokenizer(
        [t2i_prompt("a cat"), t2i_prompt("a lighthouse at dusk")], padding=True, return_tensors="pt"
    )
    positions = wrapper.position_ids(enc.input_ids, enc.attention_mask, None)
    length = enc.input_ids.shape[1]
    ext_mask = torch.cat([enc.attention_mask, torch.ones(2, 3, dtype=torch.long)], dim=1)
    expected = (ext_mask.cumsum(-1) - 1).masked_fill(ext_mask == 0, 1)
    assert positions.shape == (3, 2, length + 3)
    for axis in range(3):
        assert torch.equal(positions[axis], expected)


def test_mrope_positions_of_an_image_follow_its_grid(vlm):
    cfg = vlm.config
    image, start, end = cfg.image_token_id, cfg.vision_start_token_id, cfg.vision_end_token_id
    text = 40
    # grid (t=1, h=4, w=6) patches -> 2 x 3 merged image tokens
    ids = torch.tensor([[text, text, text, start] + [image] * 6 + [end, text, text]])
    positions = mrope_position_ids(
        ids, torch.ones_like(ids), torch.tensor([[1, 4, 6]]), image_token_id=image, spatial_merge_size=MERGE
    )[:, 0]
    assert positions[:, :4].tolist() == [[0, 1, 2, 3]] * 3  # text: same 1-D position on all axes
    first = 4  # the image starts where the text stopped
    assert positions[0, 4:10].tolist() == [first] * 6  # temporal axis
    assert positions[1, 4:10].tolist() == [first + r for r in (0, 0, 0, 1, 1, 1)]  # rows
    assert positions[2, 4:10].tolist() == [first + c for c in (0, 1, 2, 0, 1, 2)]  # cols
    resume = first + max(4, 6) // MERGE  # text resumes at start + max(h, w) / merge
    assert positions[:, 10:].tolist() == [[resume, resume + 1, resume + 2]] * 3


def test_mrope_temporal_axis_is_constant_for_a_multi_frame_image(vlm):
    """Official (transformers 4.x Qwen2.5-VL) behaviour: still images have no temporal spacing."""
    cfg = vlm.config
    image = cfg.image_token_id
    ids = torch.tensor([[40, 40] + [image] * 8 + [40]])  # grid (2, 4, 4) -> 2 * 2 * 2 tokens
    positions = mrope_position_ids(
        ids, torch.ones_like(ids), torch.tensor([[2, 4, 4]]), image_token_id=image, spatial_merge_size=MERGE
    )[:, 0]
    assert positions[0, 2:10].tolist() == [2] * 8
    assert positions[1, 2:10].tolist() == [2, 2, 3, 3, 2, 2, 3, 3]
    assert positions[2, 2:10].tolist() == [2, 3, 2, 3, 2, 3, 2, 3]
    assert positions[:, 10].tolist() == [4, 4, 4]


def test_mrope_positions_match_transformers_get_rope_index(tokenizer, vlm):
    grids = [(1, 4, 6), (1, 6, 4), (1, 4, 4)]
    prompts = [edit_prompt(grids[:2], "swap the two"), t2i_prompt("a cat"), edit_prompt(grids[2:], "blue")]
    enc = tokenizer(prompts, padding=True, return_tensors="pt")
    image = vlm.config.image_token_id
    ours = mrope_position_ids(
        enc.input_ids, enc.attention_mask, torch.tensor(grids), image_token_id=image, spatial_merge_size=MERGE
    )
    # transformers 5.x needs the modality of every token (0 text, 1 image) and fills pads with 0 (we use 1).
    mm_token_type_ids = (enc.input_ids == image).int()
    theirs, _ = vlm.model.get_rope_index(
        enc.input_ids, mm_token_type_ids, torch.tensor(grids), attention_mask=enc.attention_mask
    )
    real = enc.attention_mask.bool()
    assert not real.all()
    assert torch.equal(ours[:, real], theirs[:, real])
    assert (ours[:, ~real] == 1).all()


def test_wrapper_positions_put_think_tokens_right_after_the_prompt(tokenizer, vlm):
    grids = [(1, 4, 6)]
    wrapper = ThinkTokenVLM(vlm, 4)
    enc = tokenizer(
        [edit_prompt(grids, "red"), t2i_prompt("a lighthouse on a cliff")], padding=True, return_tensors="pt"
    )
    positions = wrapper.position_ids(enc.input_ids, enc.attention_mask, torch.tensor(grids))
    length = enc.input_ids.shape[1]
    prompt_only = mrope_position_ids(
        enc.input_ids,
        enc.attention_mask,
        torch.tensor(grids),
        image_token_id=vlm.config.image_token_id,
        spatial_merge_size=MERGE,
    )
    assert torch.equal(positions[..., :length], prompt_only)
    last = prompt_only[:, :, -1:]  # the prompts end with text, so all three axes agree
    assert torch.equal(positions[..., length:], last + torch.arange(1, 5))


def test_mrope_rejects_a_grid_count_that_does_not_match_the_image_blocks(vlm):
    image = vlm.config.image_token_id
    ids = torch.tensor([[40] + [image] * 4 + [40]])
    with pytest.raises(ValueError, match="image_grid_thw"):
        mrope_position_ids(
            ids,
            torch.ones_like(ids),
            torch.tensor([[1, 4, 4], [1, 4, 4]]),
            image_token_id=image,
            spatial_merge_size=2,
        )
    with pytest.raises(ValueError, match="image_grid_thw"):
        mrope_position_ids(ids, torch.ones_like(ids), None, image_token_id=image, spatial_merge_size=2)


# -- bad input ----------------------------------------------------------------------------------------------
def _tiny_bert():
    from transformers import BertConfig, BertModel

    config = BertConfig(
        vocab_size=50, hidden_size=16, num_hidden_layers=2, num_attention_heads=2, intermediate_size=32
    )
    return BertModel(config)


@pytest.mark.parametrize("build", [_tiny_bert, lambda: nn.Linear(8, 8)], ids=["bert_encoder", "linear"])
def test_wrapper_rejects_models_it_does_not_support(build):
    with pytest.raises(
        ValueError, match=r"vlm: .* is not supported; supported are Qwen2_5_VLForConditionalGeneration"
    ):
        ThinkTokenVLM(build(), 4)


def _tiny_text_lm(name: str):
    import transformers

    config_class, model_class = {
        "Qwen2Model": ("Qwen2Config", "Qwen2Model"),
        "LlamaForCausalLM": ("LlamaConfig", "LlamaForCausalLM"),
    }[name]
    config = getattr(transformers, config_class)(
        vocab_size=50,
        hidden_size=16,
        intermediate_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=1,
    )
    return getattr(transformers, model_class)(config).eval()


@pytest.mark.parametrize("name", ["Qwen2Model", "LlamaForCausalLM"])
def test_wrapper_accepts_plain_causal_lms_with_1d_positions(name):
    wrapper = ThinkTokenVLM(_tiny_text_lm(name), 3)
    assert wrapper.kind == "causal_lm"
    with torch.no_grad():
        out = wrapper(torch.tensor([[0, 7, 8]]), torch.tensor([[0, 1, 1]]))
    assert out.position_ids.tolist() == [[1, 0, 1, 2, 3, 4]]
    assert out.hidden_states[0].shape == (1, 6, 16)


def test_wrapper_accepts_the_qwen_vl_base_model(vlm):
    wrapper = ThinkTokenVLM(vlm.model, 2)
    assert wrapper.kind == "qwen_vl"
    assert wrapper.num_layers == 4 and wrapper.hidden_size == 64


def test_wrapper_rejects_think_tokens_of_another_width(vlm):
    with pytest.raises(ValueError, match=r"think_tokens: width 32 does not match the VLM hidden size 64"):
        ThinkTokenVLM(vlm, think_tokens=ThinkTokens(4, 32))


def test_wrapper_rejects_a_wrong_number_of_image_tokens(tokenizer, vlm):
    wrapper = ThinkTokenVLM(vlm, 2)
    enc = tokenizer([edit_prompt([(1, 4, 4)], "red")], return_tensors="pt")  # 4 image tokens
    with pytest.raises(ValueError, match=r"image"):
        wrapper(enc.input_ids, enc.attention_mask, pixel_values_for([(1, 4, 6)]), torch.tensor([[1, 4, 6]]))


def test_wrapper_rejects_image_tokens_without_pixel_values(tokenizer, vlm):
    wrapper = ThinkTokenVLM(vlm, 2)
    enc = tokenizer([edit_prompt([(1, 4, 4)], "red")], return_tensors="pt")
    with pytest.raises(ValueError, match="pixel_values"):
        wrapper(enc.input_ids, enc.attention_mask)
    with pytest.raises(ValueError, match="pixel_values and image_grid_thw"):
        wrapper(enc.input_ids, enc.attention_mask, pixel_values_for([(1, 4, 4)]), None)


def test_wrapper_rejects_images_for_a_text_only_lm(causal_lm):
    wrapper = ThinkTokenVLM(causal_lm, 2)
    ids = torch.tensor([[5, 6, 7]])
    with pytest.raises(ValueError, match="pixel_values"):
        wrapper(ids, None, pixel_values_for([(1, 4, 4)]), torch.tensor([[1, 4, 4]]))


def test_wrapper_rejects_a_mask_of_another_shape(causal_lm):
    wrapper = ThinkTokenVLM(causal_lm, 2)
    with pytest.raises(ValueError, match="attention_mask shape"):
        wrapper(torch.tensor([[5, 6, 7]]), torch.ones(1, 4))
