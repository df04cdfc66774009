"""CLIP text-image similarity reward (reference §4 ``clip_sim``).

``score = cos(text_emb, image_emb)`` of the projected, L2-normalised CLIP embeddings, in [-1, 1]. As in the
official code there is **no ×100 logit scale** (so CLIP-large scores of matching pairs are ~0.2–0.35), the
text is truncated to 77 tokens (or the model's position limit, if smaller), and the images are prepared by
the checkpoint's own image processor (for ``openai/clip-vit-large-patch14``: shortest side → 224, 224 centre
crop, CLIP mean/std).

Differences from the official code: the model is loaded from a **local folder only** (``local_files_only``;
a hub id raises instead of downloading), and a batch's repeated prompts (a GRPO group shares one prompt) are
encoded once.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from .base import ImageBatch, check_batch, to_pil_list

__all__ = ["ClipReward"]


def _pooled(out: Any) -> torch.Tensor:
    """``get_*_features`` returns a tensor in transformers 4.x and a ModelOutput (``pooler_output``) in 5.x."""
    if isinstance(out, torch.Tensor):
        return out
    pooled = getattr(out, "pooler_output", None)
    if pooled is None:
        raise TypeError(f"unexpected CLIP feature output {type(out).__name__}")
    return pooled


class ClipReward:
    """Cosine similarity of CLIP text and image embeddings (no logit scale), float32 (N,) in [-1, 1].

    Args:
        model_path: a local folder holding a transformers ``CLIPModel`` checkpoint with its tokenizer and image
            processor (e.g. a snapshot of ``openai/clip-vit-large-patch14``). Nothing is downloaded.
        device: where the model runs.
        dtype: the model's parameter dtype (float32 by default; bf16/fp16 on GPU). The cosine itself is
            computed in float32.
        batch_size: images (and unique prompts) per forward pass.
        max_text_tokens: the text truncation length, 77 as in CLIP; capped at the model's
            ``max_position_embeddings``.
    """

    name = "clip"

    def __init__(
        self,
        model_path: str | os.PathLike[str],
        device: str | torch.device = "cpu",
        dtype: torch.dtype = torch.float32,
        *,
        batch_size: int = 32,
        max_text_tokens: int = 77,
    ):
        path = Path(model_path)
        if not path.is_dir():
            raise FileNotFoundError(
                f"ClipReward: model_path={str(model_path)!r} is not a local folder; the CLIP reward loads only "
                "from disk (local_files_only=True), download the checkpoint beforehand"
            )
        from transformers import CLIPModel, CLIPProcessor

        model = CLIPModel.from_pretrained(path, local_files_only=True, dtype=dtype)
        processor = CLIPProcessor.from_pretrained(path, local_files_only=True)
        self._setup(model, processor, device, dtype, batch_size, max_text_tokens)

    @classmethod
    def from_model(
        cls,
        model: Any,
        processor: Any,
        *,
        device: str | torch.device | None = None,
        dtype: torch.dtype | None = None,
        batch_size: int = 32,
        max_text_tokens: int = 77,
    ) -> ClipReward:
        """Wrap an already-built ``CLIPModel`` and ``CLIPProcessor`` (anything with ``.tokenizer`` and
        ``.image_processor``). ``device``/``dtype`` default to the model's own."""
        if not hasattr(processor, "tokenizer") or not hasattr(processor, "image_processor"):
            raise TypeError(
                "ClipReward.from_model: processor needs .tokenizer and .image_processor (a CLIPProcessor)"
            )
        first = next(model.parameters())
        self = cls.__new__(cls)
        self._setup(
            model, processor, device or first.device, dtype or first.dtype, batch_size, max_text_tokens
        )
        return self

    def _setup(
        self,
        model: Any,
        processor: Any,
        device: str | torch.device,
        dtype: torch.dtype,
        batch_size: int,
        max_text_tokens: int,
    ) -> None:
        if batch_size < 1:
            raise ValueError(f"ClipReward: batch_size must be >= 1, got {batch_size}")
        if max_text_tokens < 2:
            raise ValueError(f"ClipReward: max_text_tokens must be >= 2, got {max_text_tokens}")
        self.device = torch.device(device)
        self.dtype = dtype
        self.model = model.to(device=self.device, dtype=dtype).eval().requires_grad_(False)
        self.tokenizer = processor.tokenizer
        self.image_processor = processor.image_processor
        self.batch_size = batch_size
        limit = getattr(getattr(model.config, "text_config", model.config), "max_position_embeddings", None)
        self.max_text_tokens = min(max_text_tokens, limit) if limit else max_text_tokens

    @torch.inference_mode()
    def text_embeddings(self, prompts: Sequence[str]) -> torch.Tensor:
        """L2-normalised float32 text embeddings (len(prompts), D) on ``self.device``."""
        out = []
        for s in range(0, len(prompts), self.batch_size):
            tok = self.tokenizer(
                list(prompts[s : s + self.batch_size]),
                padding=True,
                truncation=True,
                max_length=self.max_text_tokens,
                return_tensors="pt",
            )
            feats = _pooled(
                self.model.get_text_features(
                    input_ids=tok["input_ids"].to(self.device),
                    attention_mask=tok["attention_mask"].to(self.device),
                )
            )
            out.append(torch.nn.functional.normalize(feats.float(), dim=-1))
        return torch.cat(out)

    @torch.inference_mode()
    def image_embeddings(self, images: ImageBatch) -> torch.Tensor:
        """L2-normalised float32 image embeddings (N, D) on ``self.device``."""
        pil = to_pil_list(images)
        out = []
        for s in range(0, len(pil), self.batch_size):
            pix = self.image_processor(images=pil[s : s + self.batch_size], return_tensors="pt")[
                "pixel_values"
            ]
            feats = _pooled(self.model.get_image_features(pixel_values=pix.to(self.device, self.dtype)))
            out.append(torch.nn.functional.normalize(feats.float(), dim=-1))
        return torch.cat(out)

    def score(self, images: ImageBatch, prompts: Sequence[str]) -> torch.Tensor:
        """Cosine similarity of each image with its own prompt: float32 CPU tensor (N,) in [-1, 1]."""
        pil, prompts = check_batch(images, prompts)
        if not pil:
            return torch.zeros(0, dtype=torch.float32)
        slot = {p: k for k, p in enumerate(dict.fromkeys(prompts))}  # encode each distinct prompt once
        text = self.text_embeddings(list(slot))
        text = text[torch.tensor([slot[p] for p in prompts], device=text.device)]
        img = self.image_embeddings(pil)
        return (text * img).sum(-1).clamp(-1.0, 1.0).cpu()
