"""Learnable think tokens appended to a VLM prompt, and the wrapper that returns selected hidden states.

DeepGen 1.0 appends N learnable embeddings ("meta queries", N = 128) after the left-padded prompt, runs the
causal VLM once and hands the hidden states of several decoder layers to the Stacked Channel Bridge.
Think token i sees every real prompt token and think tokens <= i; prompt tokens never see think tokens,
so the prompt's own hidden states are those of the plain prompt.

``ThinkTokens`` is a diffusers model (``ModelMixin`` + ``ConfigMixin``): ``save_pretrained(folder)`` and
``ThinkTokens.from_pretrained(folder, torch_dtype=...)``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from diffusers.configuration_utils import register_to_config
from torch import nn

from deepgen_components.connector import ComponentModel
from deepgen_components.conventions import OFFICIAL_PAD_POSITION, mrope_positions
from deepgen_components.layer_selection import LayerSelection

__all__ = ["ThinkTokens", "ThinkTokenVLM", "VLMHiddenStates", "mrope_position_ids", "text_position_ids"]


_QWEN_VL_TYPES = ("qwen2_5_vl", "qwen2_vl")


class ThinkTokens(ComponentModel):
    """N learnable embeddings of width D, identical for every sample; init N(0, 1/sqrt(D)) as official
    (``init_std`` overrides the std). Built on the meta device (``from_pretrained``) it draws no random numbers."""

    @register_to_config
    def __init__(self, num_tokens: int, hidden_size: int, init_std: float | None = None) -> None:
        super().__init__()
        if num_tokens < 0:
            raise ValueError(f"num_tokens must be >= 0, got {num_tokens}")
        if hidden_size < 1:
            raise ValueError(f"hidden_size must be >= 1, got {hidden_size}")
        self.weight = nn.Parameter(torch.empty(num_tokens, hidden_size))
        if not self.weight.is_meta:
            std = 1.0 / math.sqrt(hidden_size) if init_std is None else init_std
            with torch.no_grad():
                self.weight.copy_(torch.randn(num_tokens, hidden_size) * std)

    @property
    def num_tokens(self) -> int:
        return self.weight.shape[0]

    @property
    def hidden_size(self) -> int:
        return self.weight.shape[1]

    def forward(self, batch_size: int) -> torch.Tensor:
        """(batch_size, N, D) view of the tokens."""
        return self.weight.unsqueeze(0).expand(batch_size, -1, -1)


@dataclass
class VLMHiddenStates:
    """What the VLM hands to the bridge.

    hidden_states: the selected layers' outputs in selection order, each (B, L + N, D).
    attention_mask: (B, L + N) bool, True for real tokens (prompt and think tokens), False for left pads.
    think_mask: (B, L + N) bool, True at the N think-token positions (the last N).
    position_ids: the position ids given to the decoder ((3, B, L + N) for M-RoPE, (B, L + N) for 1-D).
    inputs_embeds: the decoder's input embeddings (B, L + N, D).
    all_hidden_states: every hidden state of the decoder, only when requested.
    """

    hidden_states: tuple[torch.Tensor, ...]
    attention_mask: torch.Tensor
    think_mask: torch.Tensor
    position_ids: torch.Tensor | None = None
    inputs_embeds: torch.Tensor | None = None
    all_hidden_states: tuple[torch.Tensor, ...] | None = None


def text_position_ids(attention_mask: torch.Tensor, pad_position: int = OFFICIAL_PAD_POSITION) -> torch.Tensor:
    """1-D positions counted over real tokens only (left padding does not shift them)."""
    mask = attention_mask.bool()
    positions = mask.long().cumsum(-1) - 1
    return positions.masked_fill(~mask, pad_position)


def mrope_position_ids(
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    image_grid_thw: torch.Tensor | None,
    *,
    image_token_id: int,
    spatial_merge_size: int,
    pad_position: int = OFFICIAL_PAD_POSITION,
) -> torch.Tensor:
    """Qwen2/2.5-VL multi-axis (temporal, row, col) rope positions, shape (3, B, L), on ``input_ids``' device.

    Text tokens get the same 1-D position on all three axes, counted over real tokens only. Each image (grid
    (t, h, w) in patches, ``t*h*w / merge**2`` consecutive image tokens) gets (start, start + row, start + col)
    and the text after it resumes at ``start + max(h, w) / merge``. Images are consumed from
    ``image_grid_thw`` in order across the batch, as the Hugging Face implementation does. (One implementation,
    shared with the torch-free runtime: ``conventions.mrope_positions``.)
    """
    grids = [] if image_grid_thw is None else image_grid_thw.tolist()
    positions = mrope_positions(
        input_ids.detach().cpu().numpy(),
        attention_mask.detach().cpu().numpy(),
        grids,
        image_token_id=image_token_id,
        spatial_merge_size=spatial_merge_size,
        pad_position=pad_position,
    )
    return torch.from_numpy(positions).to(input_ids.device)


def _unwrap_peft(model: nn.Module) -> nn.Module:
    get_base = getattr(model, "get_base_model", None)
    if callable(get_base) and type(model).__name__.startswith("Peft"):
        return get_base()
    return model


def _is_causal_lm(model: nn.Module) -> bool:
    try:
        from transformers.models.auto.modeling_auto import (
            MODEL_FOR_CAUSAL_LM_MAPPING_NAMES,
            MODEL_MAPPING_NAMES,
        )
    except ImportError:  # pragma: no cover - very old transformers
        return type(model).__name__.endswith("ForCausalLM")
    config = getattr(model, "config", None)
    model_type = getattr(config, "model_type", None)
    names = {MODEL_FOR_CAUSAL_LM_MAPPING_NAMES.get(model_type), MODEL_MAPPING_NAMES.get(model_type)}
    registered = model_type in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES and type(model).__name__ in names
    # Encoder families (BERT, RoBERTa, ...) also have a causal-LM class, so the registry alone would let a
    # bidirectional encoder such as BertModel through: require the self-attention to be causal as well.
    causal_flags = [m.is_causal for m in model.modules() if isinstance(getattr(m, "is_causal", None), bool)]
    return registered and (not causal_flags or any(causal_flags))


class ThinkTokenVLM(nn.Module):
    """Wraps a Hugging Face VLM or causal LM: appends think tokens and returns selected hidden states.

    Supported: ``Qwen2_5_VLForConditionalGeneration`` / ``Qwen2VLForConditionalGeneration`` (and their
    ``*Model`` bases) with M-RoPE positions and vision input; any plain causal LM of the transformers
    causal-LM registry (e.g. ``Qwen2ForCausalLM``) with 1-D positions. A peft-wrapped model is unwrapped.

    The VLM may be frozen (``requires_grad=False``): gradients still flow through it to the think tokens.
    The language-model head is never run (only decoder hidden states are needed).
    """

    def __init__(
        self,
        vlm: nn.Module,
        num_think_tokens: int = 128,
        layers: LayerSelection | None = None,
        *,
        think_tokens: ThinkTokens | None = None,
        pad_position: int = OFFICIAL_PAD_POSITION,
        vision_grad: bool = False,
    ) -> None:
        super().__init__()
        base = _unwrap_peft(vlm)
        model_type = getattr(getattr(base, "config", None), "model_type", None)
        if model_type in _QWEN_VL_TYPES:
            self.kind = "qwen_vl"
            core = base.model if hasattr(base, "model") and hasattr(base.model, "visual") else base
            if not hasattr(core, "visual") or not hasattr(core, "language_model"):
                raise ValueError(f"vlm: cannot find the vision tower and language model inside {type(base).__name__}")
            decoder = core.language_model
        elif _is_causal_lm(base):
            self.kind = "causal_lm"
            core = base
            decoder = base.get_decoder() if hasattr(base, "get_decoder") else base
        else:
            raise ValueError(
                f"vlm: {type(base).__name__} (model_type={model_type!r}) is not supported; supported are "
                "Qwen2_5_VLForConditionalGeneration / Qwen2VLForConditionalGeneration (M-RoPE, images) and "
                "plain causal language models from transformers such as Qwen2ForCausalLM or LlamaForCausalLM"
            )
        # Register the wrapped model once (as `vlm`); keep plain references to its inner parts.
        self.vlm = vlm
        object.__setattr__(self, "_core", core)
        object.__setattr__(self, "_decoder", decoder)

        embed = decoder.get_input_embeddings()
        self.hidden_size = embed.weight.shape[1]
        text_config = getattr(decoder, "config", None)
        self.num_layers = int(getattr(text_config, "num_hidden_layers", 0) or len(decoder.layers))
        if think_tokens is None:
            think_tokens = ThinkTokens(num_think_tokens, self.hidden_size)
        elif think_tokens.hidden_size != self.hidden_size:
            raise ValueError(
                f"think_tokens: width {think_tokens.hidden_size} does not match the VLM hidden size {self.hidden_size}"
            )
        self.think_tokens = think_tokens
        self.layers = layers if layers is not None else LayerSelection.official(self.num_layers)
        self.layers.check_model(self.num_layers)
        self.pad_position = pad_position
        self.vision_grad = vision_grad

    # -- properties ------------------------------------------------------------------------------
    @property
    def num_think_tokens(self) -> int:
        return self.think_tokens.num_tokens

    @property
    def decoder(self) -> nn.Module:
        return self._decoder

    @property
    def config(self):
        return self._core.config

    @property
    def vision_tower(self) -> nn.Module | None:
        """The VLM's vision tower (Qwen2/2.5-VL ``visual``: patch embedding, blocks, merger); None for a text-only
        causal LM."""
        return self._core.visual if self.kind == "qwen_vl" else None

    def image_token_id(self) -> int | None:
        return getattr(self._core.config, "image_token_id", None) if self.kind == "qwen_vl" else None

    # -- pieces ------------------------------------------------------------------------------------
    def image_features(self, pixel_values: torch.Tensor, image_grid_thw: torch.Tensor) -> torch.Tensor:
        """Merged vision-tower tokens for all images, (num_image_tokens, D), in image order."""
        if self.kind != "qwen_vl":
            raise ValueError("pixel_values: this wrapped model is a text-only causal LM and takes no images")
        visual = self.vision_tower
        with torch.set_grad_enabled(self.vision_grad and torch.is_grad_enabled()):
            out = self._core.get_image_features(pixel_values.to(visual.dtype), image_grid_thw)
        features = getattr(out, "pooler_output", out)
        if isinstance(features, (tuple, list)):
            features = torch.cat(list(features), dim=0)
        return features

    def embed(self, input_ids: torch.Tensor) -> torch.Tensor:
        """(B, L) token ids -> (B, L, D) the decoder's input embeddings (image-token slots hold the embedding of
        the image token until the vision features are placed there)."""
        return self._decoder.get_input_embeddings()(input_ids)

    def append_think_tokens(
        self, inputs_embeds: torch.Tensor, attention_mask: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(B, L, D) prompt embeddings and their (B, L) mask -> (B, L + N, D) with the N think tokens appended after
        the left-padded prompt, and the (B, L + N) bool mask (think tokens are real tokens)."""
        batch = inputs_embeds.shape[0]
        think = self.think_tokens(batch).to(inputs_embeds.dtype)
        inputs_embeds = torch.cat([inputs_embeds, think], dim=1)
        ones = attention_mask.new_ones(batch, think.shape[1]).bool()
        return inputs_embeds, torch.cat([attention_mask.bool(), ones], dim=1)

    def decode(
        self, inputs_embeds: torch.Tensor, attention_mask: torch.Tensor, position_ids: torch.Tensor
    ) -> tuple[torch.Tensor, ...]:
        """The decoder (no language-model head) on (B, L + N, D) embeddings with the (B, L + N) mask: every hidden
        state, the embeddings first then each layer's output (``num_layers + 1`` tensors)."""
        out = self._decoder(
            inputs_embeds=inputs_embeds,
            attention_mask=attention_mask.long(),
            position_ids=position_ids,
            output_hidden_states=True,
            use_cache=False,
            return_dict=True,
        )
        return tuple(out.hidden_states)

    def position_ids(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor, image_grid_thw: torch.Tensor | None
    ) -> torch.Tensor:
        """Positions over the prompt plus the appended think tokens (which count as text)."""
        n = self.num_think_tokens
        batch = input_ids.shape[0]
        ext_mask = torch.cat([attention_mask.bool(), attention_mask.new_ones(batch, n).bool()], dim=1)
        if self.kind == "causal_lm":
            return text_position_ids(ext_mask, self.pad_position)
        config = self._core.config
        # Think-token placeholders are text: any id that is not the image token works (official uses 0).
        placeholder = 0 if config.image_token_id != 0 else 1
        ext_ids = torch.cat([input_ids, input_ids.new_full((batch, n), placeholder)], dim=1)
        return mrope_position_ids(
            ext_ids,
            ext_mask,
            image_grid_thw,
            image_token_id=config.image_token_id,
            spatial_merge_size=config.vision_config.spatial_merge_size,
            pad_position=self.pad_position,
        )

    # -- forward -----------------------------------------------------------------------------------
    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        pixel_values: torch.Tensor | None = None,
        image_grid_thw: torch.Tensor | None = None,
        *,
        output_all_hidden_states: bool = False,
    ) -> VLMHiddenStates:
        if input_ids.dim() != 2:
            raise ValueError(f"input_ids must be (batch, length), got shape {tuple(input_ids.shape)}")
        batch, length = input_ids.shape
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids, dtype=torch.bool)
        if attention_mask.shape != input_ids.shape:
            raise ValueError(
                f"attention_mask shape {tuple(attention_mask.shape)} must equal input_ids shape {tuple(input_ids.shape)}"
            )
        if (pixel_values is None) != (image_grid_thw is None):
            raise ValueError("pixel_values and image_grid_thw must be given together")

        inputs_embeds = self.embed(input_ids)
        image_token_id = self.image_token_id()
        if pixel_values is not None:
            features = self.image_features(pixel_values, image_grid_thw).to(inputs_embeds.dtype)
            slots = input_ids == image_token_id
            if int(slots.sum()) != features.shape[0]:
                raise ValueError(
                    f"input_ids hold {int(slots.sum())} image tokens but the images give {features.shape[0]} "
                    "features; each image needs t*h*w/merge**2 <|image_pad|> tokens"
                )
            inputs_embeds = inputs_embeds.masked_scatter(slots.unsqueeze(-1), features)
        elif image_token_id is not None and bool((input_ids == image_token_id).any()):
            raise ValueError("input_ids contain image tokens but no pixel_values were given")

        inputs_embeds, ext_mask = self.append_think_tokens(inputs_embeds, attention_mask)
        think_mask = torch.zeros_like(ext_mask)
        think_mask[:, length:] = True
        position_ids = self.position_ids(input_ids, attention_mask, image_grid_thw)

        all_hidden = self.decode(inputs_embeds, ext_mask, position_ids)
        if len(all_hidden) != self.num_layers + 1:
            raise RuntimeError(
                f"the decoder returned {len(all_hidden)} hidden states, expected num_layers + 1 = {self.num_layers + 1}"
            )
        selected = tuple(all_hidden[i] for i in self.layers.indices)
        return VLMHiddenStates(
            hidden_states=selected,
            attention_mask=ext_mask,
            think_mask=think_mask,
            position_ids=position_ids,
            inputs_embeds=inputs_embeds,
            all_hidden_states=all_hidden if output_all_hidden_states else None,
        )
