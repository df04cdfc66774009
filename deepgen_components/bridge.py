"""Stacked Channel Bridging (SCB): K VLM hidden states -> DiT context tokens and pooled vector.

stack the K selected hidden states along channels (K*D) -> one Linear to the connector width ->
bidirectional connector encoder -> two zero-initialised heads: ``pooled`` = head(mean over tokens),
``context`` = head(per token). The stacked (B, L, K*D) tensor is never materialised: the projection reads
the K states directly (``ops.stack_project``).

Two options decide how faithful to the official model the bridge is:

* ``tokens``: ``"all"`` (official: every VLM token, prompt + vision + think + pads, reaches the DiT) or
  ``"think"`` (only the N think tokens; they already attended to the whole prompt inside the VLM).
* ``mask_padding``: the official model masks nothing after the VLM (pads attend and are attended to in the
  connector, the pooled mean includes them, the DiT attends to them), so its outputs depend on how much
  left padding a batch has. With ``mask_padding=True`` pads are excluded everywhere and the outputs of a
  prompt no longer depend on the batch it is in. Official parity needs ``False``; new training should
  use ``True`` (the default).

The bridge is a diffusers model (``ModelMixin`` + ``ConfigMixin``): ``bridge.save_pretrained(folder)`` and
``StackedChannelBridge.from_pretrained(folder, torch_dtype=...)``. Build one from a ``BridgeConfig`` (the friendly
way) or from the flat keyword arguments of its config.json; ``bridge.config`` is the ``BridgeConfig``.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass, field, fields
from typing import Any, Literal

import torch
from diffusers.configuration_utils import register_to_config
from torch import nn

from deepgen_components import ops
from deepgen_components.connector import ComponentModel, ConnectorConfig, ConnectorEncoder

__all__ = ["BridgeConfig", "BridgeOutput", "StackedChannelBridge"]


@dataclass
class BridgeConfig:
    num_stacked_layers: int = 6
    vlm_hidden_size: int = 2048
    connector: ConnectorConfig = field(default_factory=ConnectorConfig)
    context_dim: int = 4096  # DiT joint_attention_dim
    pooled_dim: int = 2048  # DiT pooled_projection_dim
    tokens: Literal["all", "think"] = "all"
    mask_padding: bool = True

    def __post_init__(self) -> None:
        if isinstance(self.connector, dict):
            self.connector = ConnectorConfig(**self.connector)
        if self.tokens not in ("all", "think"):
            raise ValueError(f"tokens must be 'all' or 'think', got {self.tokens!r}")
        for name in ("num_stacked_layers", "vlm_hidden_size", "context_dim", "pooled_dim"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")

    @property
    def stacked_dim(self) -> int:
        return self.num_stacked_layers * self.vlm_hidden_size

    @classmethod
    def deepgen_1_0(cls, **overrides) -> BridgeConfig:
        """The official sizes: 6 x 2048 -> 2048, 6 layers, 32 heads, FFN 11946, context 4096, pooled 2048.

        Official parity (``tokens="all"``, ``mask_padding=False``) unless overridden.
        """
        values = dict(
            num_stacked_layers=6,
            vlm_hidden_size=2048,
            connector=ConnectorConfig(hidden_size=2048, num_layers=6, num_heads=32, intermediate_size=11946),
            context_dim=4096,
            pooled_dim=2048,
            tokens="all",
            mask_padding=False,
        )
        values.update(overrides)
        return cls(**values)

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> BridgeConfig:
        known = {f.name for f in fields(cls)}
        unknown = set(data) - known
        if unknown:
            raise ValueError(f"unknown BridgeConfig keys {sorted(unknown)}; known: {sorted(known)}")
        return cls(**data)


@dataclass
class BridgeOutput:
    """context (B, L', context_dim), pooled (B, pooled_dim), mask (B, L') bool: the context tokens the DiT
    should attend to (all True when padding is not masked). ``intermediates`` only when requested."""

    context: torch.Tensor
    pooled: torch.Tensor
    mask: torch.Tensor
    intermediates: dict[str, torch.Tensor] | None = None

    def select(self, index: slice | torch.Tensor) -> BridgeOutput:
        """Rows ``index`` (a slice or an index tensor) of the condition."""
        if isinstance(index, torch.Tensor):
            index = index.to(self.context.device)
        return BridgeOutput(self.context[index], self.pooled[index], self.mask[index])

    def repeat_interleave(self, times: int) -> BridgeOutput:
        """Each row repeated ``times`` times in place (e.g. a group of images per prompt)."""
        if times == 1:
            return self
        return BridgeOutput(
            self.context.repeat_interleave(times, 0),
            self.pooled.repeat_interleave(times, 0),
            self.mask.repeat_interleave(times, 0),
        )


def _config_arguments(config: BridgeConfig) -> dict[str, Any]:
    """``config`` as the bridge's flat config.json keys (the connector's sizes under ``connector_config``)."""
    values = config.to_dict()
    values["connector_config"] = values.pop("connector")
    return values


class StackedChannelBridge(ComponentModel):
    """``StackedChannelBridge(BridgeConfig(...))``, or the same values as keyword arguments (the keys of its
    config.json; ``connector_config`` a ``ConnectorConfig`` or its dict); an argument left out takes the
    ``BridgeConfig`` default. ``config`` is the ``BridgeConfig`` (read it, do not change it: build a new bridge)."""

    ignore_for_config = ["config"]
    # pipeline folder format 1 wrote BridgeConfig.to_dict(): the connector's sizes under "connector"
    _legacy_renames = {"connector": "connector_config"}

    @register_to_config
    def __init__(
        self,
        config: BridgeConfig | None = None,
        *,
        num_stacked_layers: int | None = None,
        vlm_hidden_size: int | None = None,
        connector_config: ConnectorConfig | dict | None = None,
        context_dim: int | None = None,
        pooled_dim: int | None = None,
        tokens: Literal["all", "think"] | None = None,
        mask_padding: bool | None = None,
    ) -> None:
        super().__init__()
        given = {
            name: value
            for name, value in dict(
                num_stacked_layers=num_stacked_layers, vlm_hidden_size=vlm_hidden_size, connector=connector_config,
                context_dim=context_dim, pooled_dim=pooled_dim, tokens=tokens, mask_padding=mask_padding,
            ).items()
            if value is not None
        }
        if config is None:
            config = BridgeConfig(**given)
        elif not isinstance(config, BridgeConfig):
            raise TypeError(f"config: expected a BridgeConfig, got {type(config).__name__}")
        elif given:
            raise ValueError(f"config: give a BridgeConfig or keyword arguments, not both (got {sorted(given)} too)")
        # the config.json of the bridge: every value spelled out, whichever way it was built
        self.register_to_config(**_config_arguments(config), _use_default_values=[])
        config = BridgeConfig.from_dict(config.to_dict())  # its own copy: the caller may reuse theirs
        self._bridge_config = (self._internal_dict, config)
        width = config.connector.hidden_size
        self.projector = nn.Linear(config.stacked_dim, width)
        self.connector = ConnectorEncoder(config.connector)
        self.pooled_head = nn.Linear(width, config.pooled_dim)
        self.context_head = nn.Linear(width, config.context_dim)
        self.reset_heads()

    @property
    def config(self) -> BridgeConfig:
        """The bridge's ``BridgeConfig`` (diffusers' dict of the same values is what config.json holds)."""
        source, config = self._bridge_config
        if source is not self._internal_dict:  # register_to_config replaced the dict
            values = {k: v for k, v in self._internal_dict.items() if not k.startswith("_")}
            values["connector"] = values.pop("connector_config")
            config = BridgeConfig.from_dict(values)
            self._bridge_config = (self._internal_dict, config)
        return config

    @torch.no_grad()
    def reset_heads(self) -> None:
        """Zero heads (official): a fresh bridge hands the DiT an all-zero condition."""
        for head in (self.pooled_head, self.context_head):
            nn.init.zeros_(head.weight)
            nn.init.zeros_(head.bias)

    def _check_inputs(self, hidden_states: Sequence[torch.Tensor], attention_mask: torch.Tensor) -> None:
        cfg = self.config
        if len(hidden_states) != cfg.num_stacked_layers:
            raise ValueError(
                f"hidden_states: got {len(hidden_states)} tensors, the bridge stacks "
                f"num_stacked_layers={cfg.num_stacked_layers}"
            )
        shape = hidden_states[0].shape
        for i, h in enumerate(hidden_states):
            if h.dim() != 3 or h.shape != shape:
                raise ValueError(
                    f"hidden_states[{i}]: every tensor must be (B, L, D) with one shape, got "
                    f"{tuple(h.shape)} vs {tuple(shape)}"
                )
        if shape[-1] != cfg.vlm_hidden_size:
            raise ValueError(
                f"hidden_states: width {shape[-1]} does not match vlm_hidden_size={cfg.vlm_hidden_size}"
            )
        if attention_mask.shape != shape[:2]:
            raise ValueError(
                f"attention_mask shape {tuple(attention_mask.shape)} must be (B, L) = {tuple(shape[:2])}"
            )

    def forward(
        self,
        hidden_states: Sequence[torch.Tensor],
        attention_mask: torch.Tensor,
        think_mask: torch.Tensor | None = None,
        *,
        return_intermediates: bool = False,
    ) -> BridgeOutput:
        cfg = self.config
        self._check_inputs(hidden_states, attention_mask)
        mask = attention_mask.bool()
        if cfg.tokens == "think":
            if think_mask is None:
                raise ValueError("think_mask is required when tokens='think'")
            batch = mask.shape[0]
            count = int(think_mask[0].sum())
            if count == 0 or not bool((think_mask.sum(1) == count).all()):
                raise ValueError("think_mask must mark the same positive number of think tokens in every sample")
            hidden_states = [h[think_mask].view(batch, count, -1) for h in hidden_states]
            mask = mask[think_mask].view(batch, count)

        return self.encode(hidden_states, mask, return_intermediates=return_intermediates)

    def encode(
        self,
        hidden_states: Sequence[torch.Tensor],
        mask: torch.Tensor,
        *,
        return_intermediates: bool = False,
    ) -> BridgeOutput:
        """The SCB arithmetic on the tokens that reach the DiT (``forward`` after its checks and, for
        ``tokens="think"``, after selecting the think tokens): project the K stacked (B, L, D) states, run the
        connector, pool the mean (over real tokens when padding is masked, over every token otherwise) and apply
        the two heads. ``mask``: (B, L) bool, True for real tokens."""
        cfg = self.config
        projected = ops.stack_project(hidden_states, self.projector.weight, self.projector.bias)
        encoded = self.connector(projected, mask if cfg.mask_padding else None)
        if cfg.mask_padding:
            weights = mask.to(encoded.dtype).unsqueeze(-1)
            mean = (encoded * weights).sum(1) / weights.sum(1).clamp_min(1.0)
            out_mask = mask
        else:
            mean = encoded.mean(1)  # official: plain mean over every token, pads included
            out_mask = torch.ones_like(mask)
        pooled = self.pooled_head(mean)
        context = self.context_head(encoded)
        intermediates = None
        if return_intermediates:
            intermediates = {"projector_out": projected, "connector_out": encoded, "connector_mean": mean}
        return BridgeOutput(context=context, pooled=pooled, mask=out_mask, intermediates=intermediates)
