"""The SCB connector: a SigLIP-style pre-LN bidirectional transformer encoder, and ``ComponentModel``, the
diffusers model base of the library's own components (the bridge and the think tokens).

As the official DeepGen 1.0 connector: ``x = x + Attn(LN1(x))``, ``x = x + FC2(gelu_tanh(FC1(LN2(x))))``,
biased q/k/v/out projections, softmax scale 1/sqrt(head_dim), no positional encoding (the VLM states
already carry positions), no final LayerNorm. Module names match the official checkpoint
(``layers.N.self_attn.{q,k,v,out}_proj``, ``layer_norm1/2``, ``mlp.fc1/fc2``).
"""

from __future__ import annotations

import os
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from diffusers import ConfigMixin, ModelMixin
from torch import nn

from deepgen_components import ops

__all__ = ["LEGACY_WEIGHTS_NAME", "ComponentModel", "ConnectorConfig", "ConnectorEncoder"]

# The weights file of a component folder written before the components were diffusers models (pipeline folder
# format 1): our own config.json (no ``_class_name``) beside ``model.safetensors``.
LEGACY_WEIGHTS_NAME = "model.safetensors"
_DIFFUSERS_WEIGHTS = (
    "diffusion_pytorch_model.safetensors",
    "diffusion_pytorch_model.safetensors.index.json",
    "diffusion_pytorch_model.bin",
)


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


class ComponentModel(ModelMixin, ConfigMixin):
    """diffusers ``ModelMixin`` + ``ConfigMixin`` with the library's loading rules, the base of
    ``StackedChannelBridge`` and ``ThinkTokens``.

    ``save_pretrained`` / ``from_pretrained(folder, torch_dtype=...)`` are diffusers' own (config.json with
    ``_class_name`` beside ``diffusion_pytorch_model.safetensors``, built on the meta device and materialised in the
    target dtype). On top of them:

    * a config key that is not an ``__init__`` argument is an error naming it (diffusers only logs it), and so is a
      config.json that names another class;
    * a folder written before the components were diffusers models (our own config.json beside
      ``model.safetensors``) loads too, also with ``torch_dtype`` (cast tensor by tensor, no full-precision copy);
      ``_legacy_renames`` maps its config keys to today's arguments;
    * a local folder without config.json is a ``FileNotFoundError`` naming the folder.
    """

    _legacy_renames: dict[str, str] = {}

    @classmethod
    def extract_init_dict(cls, config_dict, **kwargs):
        config_dict = dict(config_dict)
        for old, new in cls._legacy_renames.items():
            if old in config_dict and new not in config_dict:
                config_dict[new] = config_dict.pop(old)
        class_name = config_dict.get("_class_name")
        if isinstance(class_name, str) and class_name != cls.__name__:
            raise ValueError(f"config: _class_name is {class_name!r}; this config is not a {cls.__name__} config")
        known = cls._get_init_keys(cls) - {"self", "kwargs"} - set(cls.ignore_for_config)
        unknown = sorted(k for k in config_dict if not k.startswith("_") and k != "quantization_config" and k not in known)
        if unknown:
            raise ValueError(f"config: unknown {cls.__name__} keys {unknown}; known: {sorted(known)}")
        return super().extract_init_dict(config_dict, **kwargs)

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path: str | os.PathLike, **kwargs):
        """diffusers' ``ModelMixin.from_pretrained`` (same arguments: ``torch_dtype``, ``subfolder``,
        ``device_map``, ...), which also reads a component folder of the library's pipeline folder format 1."""
        folder = Path(pretrained_model_name_or_path)
        if kwargs.get("subfolder"):
            folder = folder / kwargs["subfolder"]
        if folder.is_dir():
            if not (folder / cls.config_name).is_file():
                raise FileNotFoundError(
                    f"pretrained_model_name_or_path: {folder} has no {cls.config_name}; a {cls.__name__} folder holds "
                    f"{cls.config_name} and the weights written by save_pretrained"
                )
            if (folder / LEGACY_WEIGHTS_NAME).is_file() and not any((folder / n).is_file() for n in _DIFFUSERS_WEIGHTS):
                return cls._from_legacy_folder(folder, **kwargs)
        elif folder.exists():
            raise ValueError(f"pretrained_model_name_or_path: {folder} is a file, not a {cls.__name__} folder")
        elif folder.is_absolute() or str(pretrained_model_name_or_path).startswith(".") or len(folder.parts) > 2:
            raise FileNotFoundError(f"pretrained_model_name_or_path: no folder {folder}")
        return super().from_pretrained(pretrained_model_name_or_path, **kwargs)

    @classmethod
    def _from_legacy_folder(cls, folder: Path, *, torch_dtype=None, dtype=None, device_map=None, **_ignored):
        from safetensors import safe_open

        dtype = dtype if dtype is not None else torch_dtype
        if dtype is not None and not isinstance(dtype, torch.dtype):
            raise TypeError(f"torch_dtype: expected a torch.dtype, got {dtype!r}")
        if isinstance(device_map, dict) and set(device_map) == {""}:
            device_map = device_map[""]
        if device_map is not None and not isinstance(device_map, (str, int, torch.device)):
            raise ValueError(f"device_map: a folder in the old format loads onto one device, got {device_map!r}")
        device = torch.device("cpu" if device_map is None else device_map)
        with torch.device("meta"):
            model = cls.from_config(cls.load_config(folder))
        state = {}
        with safe_open(str(folder / LEGACY_WEIGHTS_NAME), framework="pt", device=str(device)) as weights:
            for key in weights.keys():
                tensor = weights.get_tensor(key)
                state[key] = tensor.to(dtype) if dtype is not None and tensor.is_floating_point() else tensor
        try:
            model.load_state_dict(state, strict=True, assign=True)
        except RuntimeError as error:
            raise ValueError(f"pretrained_model_name_or_path: {folder / LEGACY_WEIGHTS_NAME} does not fit the config: {error}") from None
        model.register_to_config(_name_or_path=str(folder))
        return model.eval()
