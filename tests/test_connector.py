"""ConnectorEncoder: the SCB connector, a SigLIP-style pre-LN bidirectional encoder (reference §4).

Official layer: ``x = x + Attn(LN1(x))``, ``x = x + FC2(gelu_tanh(FC1(LN2(x))))``; biased q/k/v/out; no
positional encoding; bidirectional; no final LayerNorm; xavier-uniform weights, zero attention biases,
MLP biases N(0, 1e-6), LayerNorm 1 / 0.
"""

import pytest
import torch

from deepgen_components import ConnectorConfig, ConnectorEncoder

CONFIG = ConnectorConfig(hidden_size=32, num_layers=2, num_heads=4, intermediate_size=48)


@pytest.fixture(scope="module")
def connector():
    torch.manual_seed(0)
    return ConnectorEncoder(CONFIG).eval()


def random_tokens(*shape, seed=0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


def test_connector_matches_the_siglip_encoder_it_is_based_on(connector):
    """Same module names and math as transformers' SiglipEncoder (the official connector's layer code)."""
    from transformers import SiglipVisionConfig
    from transformers.models.siglip.modeling_siglip import SiglipEncoder

    siglip_config = SiglipVisionConfig(
        hidden_size=CONFIG.hidden_size,
        num_hidden_layers=CONFIG.num_layers,
        num_attention_heads=CONFIG.num_heads,
        intermediate_size=CONFIG.intermediate_size,
        layer_norm_eps=CONFIG.layer_norm_eps,
        hidden_act="gelu_pytorch_tanh",
        attn_implementation="eager",
    )
    siglip = SiglipEncoder(siglip_config).eval()
    siglip.load_state_dict(connector.state_dict(), strict=True)  # identical checkpoint layout
    x = random_tokens(2, 7, CONFIG.hidden_size)
    with torch.no_grad():
        expected = siglip(inputs_embeds=x).last_hidden_state
        torch.testing.assert_close(connector(x), expected, atol=1e-5, rtol=1e-4)


def test_connector_init_follows_the_official_recipe():
    torch.manual_seed(0)
    config = ConnectorConfig(hidden_size=64, num_layers=2, num_heads=4, intermediate_size=128)
    connector = ConnectorEncoder(config)
    for layer in connector.layers:
        attn = layer.self_attn
        for proj in (attn.q_proj, attn.k_proj, attn.v_proj, attn.out_proj):
            bound = (6 / (64 + 64)) ** 0.5  # xavier-uniform
            assert proj.weight.abs().max() <= bound
            assert proj.weight.std().item() == pytest.approx(bound / 3**0.5, rel=0.1)
            assert not proj.bias.any()
        for fc in (layer.mlp.fc1, layer.mlp.fc2):
            bound = (6 / (64 + 128)) ** 0.5
            assert fc.weight.abs().max() <= bound
            assert fc.bias.abs().max() < 1e-5 and fc.bias.any()  # N(0, 1e-6)
        for norm in (layer.layer_norm1, layer.layer_norm2):
            assert (norm.weight == 1).all() and not norm.bias.any()
            assert norm.eps == 1e-6


def test_connector_has_no_final_layer_norm(connector):
    names = {name.split(".")[0] for name, _ in connector.named_parameters()}
    assert names == {"layers"}


def test_connector_is_bidirectional(connector):
    x = random_tokens(1, 6, CONFIG.hidden_size)
    changed = x.clone()
    changed[:, -1] = random_tokens(CONFIG.hidden_size, seed=1)  # (a constant shift would vanish in LN)
    with torch.no_grad():
        assert not torch.allclose(connector(x)[:, 0], connector(changed)[:, 0], atol=1e-4)


def test_connector_has_no_positional_encoding(connector):
    x = random_tokens(2, 6, CONFIG.hidden_size)
    order = torch.tensor([3, 0, 5, 1, 4, 2])
    with torch.no_grad():
        torch.testing.assert_close(connector(x[:, order]), connector(x)[:, order], atol=1e-5, rtol=1e-4)


def test_connector_mask_hides_padded_tokens(connector):
    real = random_tokens(1, 5, CONFIG.hidden_size)
    pads = random_tokens(1, 3, CONFIG.hidden_size, seed=1) * 10
    padded = torch.cat([pads, real], dim=1)
    mask = torch.tensor([[False] * 3 + [True] * 5])
    with torch.no_grad():
        alone = connector(real)
        masked = connector(padded, mask)
        unmasked = connector(padded)
    torch.testing.assert_close(masked[:, 3:], alone, atol=1e-5, rtol=1e-4)
    assert not torch.allclose(unmasked[:, 3:], alone, atol=1e-3)  # without a mask, pads leak in


def test_connector_rejects_inputs_of_another_width(connector):
    with pytest.raises(ValueError, match=r"x: width 16 does not match hidden_size 32"):
        connector(torch.zeros(1, 4, 16))


def test_connector_rejects_a_mask_of_another_shape(connector):
    with pytest.raises(ValueError, match="key_padding_mask shape"):
        connector(torch.zeros(1, 4, 32), torch.ones(1, 5, dtype=torch.bool))


@pytest.mark.parametrize(
    ("kwargs", "name"),
    [(dict(hidden_size=30, num_heads=4), "num_heads"), (dict(num_layers=0), "num_layers")],
)
def test_connector_config_validates_sizes(kwargs, name):
    with pytest.raises(ValueError, match=name):
        ConnectorConfig(**{**dict(hidden_size=32, num_heads=4, intermediate_size=48), **kwargs})


def test_connector_config_defaults_are_the_official_sizes():
    config = ConnectorConfig()
    assert (config.hidden_size, config.num_layers, config.num_heads, config.intermediate_size) == (
        2048,
        6,
        32,
        11946,
    )
    assert config.head_dim == 64
    assert config.layer_norm_eps == 1e-6 and config.attention_dropout == 0.0
