"""The SCB connector: a SigLIP-style pre-LN bidirectional transformer encoder.

As the official DeepGen 1.0 connector: ``x = x + Attn(LN1(x))``, ``x = x + FC2(gelu_tanh(FC1(LN2(x))))``,
biased q/k/v/out projections, softmax scale 1/sqrt(head_dim), no positional encoding (the VLM states
already carry positions), no final LayerNorm. Module names match the official checkpoint
(``layers.N.self_attn.{q,k,v,out}_proj``, ``layer_norm1/2``, ``mlp.fc1/fc2``).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F
from torch import nn

from deepgen_components import ops

__all__ = ["ConnectorConfig", "ConnectorEncoder"]


@dataclass
class ConnectorConfig:
    hidden_size: int = 2048
    num_layers: int = 6
    num_heads: int = 32
    intermediate_size: int = 11946
    layer_norm_eps: float = 1e-6
    attention_dropout: float = 0.0

    def __post_init__(self) -> None:
        if self.hidden_size % self.num_heads:
            raise ValueError(
                f"hidden_size ({self.hidden_size}) must be divisible by num_heads ({self.num_heads})"
            )
        for name in ("hidden_size", "num_layers", "num_heads", "intermediate_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads

    def to_dict(self) -> dict:
        return asdict(self)


class ConnectorAttention(nn.Module):
    def __init__(self, config: ConnectorConfig) -> None:
        super().__init__()
        d = config.hidden_size
        self.num_heads = config.num_heads
        self.head_dim = config.head_dim
        self.dropout = config.attention_dropout
        self.q_proj = nn.Linear(d, d)
        self.k_proj = nn.Linear(d, d)
        self.v_proj = nn.Linear(d, d)
        self.out_proj = nn.Linear(d, d)

    def forward(self, x: torch.Tensor, key_padding_mask: torch.Tensor | None) -> torch.Tensor:
        batch, length, width = x.shape
        # (B, L, D) -> (B, H, L, d)
        q = self.q_proj(x).view(batch, length, self.num_heads, self.head_dim).transpose(1, 2)
        k = self.k_proj(x).view(batch, length, self.num_heads, self.head_dim).transpose(1, 2)
        v = self.v_proj(x).view(batch, length, self.num_heads, self.head_dim).transpose(1, 2)
        dropout = self.dropout if self.training else 0.0
        out = ops.attention(q, k, v, key_padding_mask, dropout_p=dropout)
        return self.out_proj(out.transpose(1, 2).reshape(batch, length, width))


class ConnectorMLP(nn.Module):
    def __init__(self, config: ConnectorConfig) -> None:
        super().__init__()
        self.fc1 = nn.Linear(config.hidden_size, config.intermediate_size)
        self.fc2 = nn.Linear(config.intermediate_size, config.hidden_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(F.gelu(self.fc1(x), approximate="tanh"))


class ConnectorLayer(nn.Module):
    def __init__(self, config: ConnectorConfig) -> None:
        super().__init__()
        self.layer_norm1 = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.self_attn = ConnectorAttention(config)
        self.layer_norm2 = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.mlp = ConnectorMLP(config)

    def forward(self, x: torch.Tensor, key_padding_mask: torch.Tensor | None) -> torch.Tensor:
        x = x + self.self_attn(self.layer_norm1(x), key_padding_mask)
        return x + self.mlp(self.layer_norm2(x))


class ConnectorEncoder(nn.Module):
    """Bidirectional encoder over (B, L, hidden) with an optional key-padding mask (True = real token)."""

    def __init__(self, config: ConnectorConfig) -> None:
        super().__init__()
        self.config = config
        self.layers = nn.ModuleList(ConnectorLayer(config) for _ in range(config.num_layers))
        self.gradient_checkpointing = False
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self) -> None:
        """Official init: xavier-uniform projection weights, zero attention biases, MLP biases N(0, 1e-6)."""
        for layer in self.layers:
            attn = layer.self_attn
            for proj in (attn.q_proj, attn.k_proj, attn.v_proj, attn.out_proj):
                nn.init.xavier_uniform_(proj.weight)
                nn.init.zeros_(proj.bias)
            for fc in (layer.mlp.fc1, layer.mlp.fc2):
                nn.init.xavier_uniform_(fc.weight)
                nn.init.normal_(fc.bias, std=1e-6)
            for norm in (layer.layer_norm1, layer.layer_norm2):
                nn.init.ones_(norm.weight)
                nn.init.zeros_(norm.bias)

    def forward(self, x: torch.Tensor, key_padding_mask: torch.Tensor | None = None) -> torch.Tensor:
        if x.shape[-1] != self.config.hidden_size:
            raise ValueError(f"x: width {x.shape[-1]} does not match hidden_size {self.config.hidden_size}")
        if key_padding_mask is not None:
            if key_padding_mask.shape != x.shape[:2]:
                raise ValueError(
                    f"key_padding_mask shape {tuple(key_padding_mask.shape)} must be (batch, length) = {tuple(x.shape[:2])}"
                )
            key_padding_mask = key_padding_mask.bool()
        for layer in self.layers:
            if self.gradient_checkpointing and torch.is_grad_enabled():
                x = torch.utils.checkpoint.checkpoint(layer, x, key_padding_mask, use_reentrant=False)
            else:
                x = layer(x, key_padding_mask)
        return x
