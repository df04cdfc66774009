"""The base DiT under its own prompt encoder: the conditioning it was pretrained with, and what uses it afterwards.

:class:`PromptEncoder` plays SD3's text encoders' role during base pretraining (``shapes.base.pretrain_dit``); it
is replaced by the VLM + SCB, as DeepGen replaces SD3's encoders. Two things keep it after that:
:class:`PromptEncoderPipeline` (the base DiT measured by the same evaluation as every later stage) and
:class:`PromptEncoderTeacher` (a stage-1 teacher for the generic trainer; ``deepgen_components.shapes`` registers
it as the ``prompt_encoder`` teacher kind).
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from deepgen_components.denoising import denoise_loop, flow_match_sigmas
from deepgen_components.dit import ConditionedDiT
from deepgen_components.processing import pil_to_pixels
from deepgen_components.training.config import TeacherConfig
from deepgen_components.training.registry import check_options

__all__ = ["PromptEncoder", "PromptEncoderPipeline", "PromptEncoderTeacher", "teacher_from_config"]


class PromptEncoder(nn.Module):
    """The DiT's own conditioning during pretraining (SD3's text encoders' role): token embeddings of the
    world tokenizer + learned positions + one bidirectional transformer layer -> context (B, 1 + L,
    context_dim) and pooled (B, pooled_dim), a learned start token first.

    The null condition of "" (caption dropout, the CFG negative) is all zeros, of a random number of context
    tokens in pretraining: a fresh bridge (official zero-init heads) then hands the pretrained DiT exactly its
    unconditional input, so stage 1 starts from the unconditional model instead of an input the DiT never saw."""

    def __init__(self, vocab_size: int, context_dim: int, pooled_dim: int, max_length: int = 32) -> None:
        super().__init__()
        self.max_length = max_length
        self.embed = nn.Embedding(vocab_size, context_dim)
        self.start = nn.Parameter(torch.randn(context_dim) * 0.02)
        self.position = nn.Parameter(torch.randn(max_length + 1, context_dim) * 0.02)
        layer = nn.TransformerEncoderLayer(
            context_dim, nhead=4, dim_feedforward=2 * context_dim, dropout=0.0, batch_first=True, norm_first=True
        )
        self.encoder = nn.TransformerEncoder(layer, num_layers=1, enable_nested_tensor=False)
        self.pooled = nn.Linear(context_dim, pooled_dim)

    def tokenize(self, tokenizer, texts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        ids = [tokenizer(t, add_special_tokens=False)["input_ids"][: self.max_length] for t in texts]
        length = max(1, max(len(i) for i in ids))
        input_ids = torch.zeros(len(ids), length, dtype=torch.long)
        mask = torch.zeros(len(ids), length, dtype=torch.bool)
        for row, seq in enumerate(ids):
            input_ids[row, : len(seq)] = torch.tensor(seq, dtype=torch.long)
            mask[row, : len(seq)] = True
        return input_ids, mask

    def forward(
        self, input_ids: torch.Tensor, mask: torch.Tensor, null_lengths: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Rows with no token ("") get the null condition: ``null_lengths[row]`` all-zero context tokens (default
        1) and a zero pooled vector, which is exactly what a fresh SCB with zero heads hands the DiT."""
        batch, length = input_ids.shape
        x = torch.cat([self.start.expand(batch, 1, -1), self.embed(input_ids)], dim=1) + self.position[: length + 1]
        mask = torch.cat([torch.ones(batch, 1, dtype=torch.bool, device=mask.device), mask], dim=1)
        context = self.encoder(x, src_key_padding_mask=~mask)
        weights = mask.unsqueeze(-1).to(context.dtype)
        pooled = self.pooled((context * weights).sum(1) / weights.sum(1))
        null = mask.sum(1) == 1
        if bool(null.any()):
            keep = (~null).to(context.dtype)
            context = context * keep.view(-1, 1, 1)
            pooled = pooled * keep.view(-1, 1)
            if null_lengths is not None:
                count = null_lengths.clamp(1, length + 1).view(-1, 1)
                positions = torch.arange(length + 1, device=mask.device).view(1, -1)
                mask = torch.where(null.view(-1, 1), positions < count, mask)
        return context, pooled, mask


class PromptEncoderPipeline:
    """The base DiT driven by its own :class:`PromptEncoder`, with the ``DeepGenPipeline`` call signature (T2I,
    and editing with ``image=``): FlowMatch Euler + CFG against "" on the same grid and from the same initial
    noise as the pipeline, so the base DiT is measured by the same evaluation as every later stage."""

    def __init__(self, dit: ConditionedDiT, encoder: PromptEncoder, tokenizer, vae, scheduler, image_size: int) -> None:
        from types import SimpleNamespace

        self.dit, self.encoder, self.tokenizer, self.vae, self.scheduler = dit, encoder, tokenizer, vae, scheduler
        self.model = SimpleNamespace(config=SimpleNamespace(image_size=image_size))

    @property
    def device(self) -> torch.device:
        return next(self.dit.parameters()).device

    def to(self, device) -> PromptEncoderPipeline:
        for module in (self.dit, self.encoder, self.vae):
            module.to(device)
        return self

    def set_progress_bar_config(self, **kwargs) -> None:
        """The pipeline interface the shapes evaluation drives; this loop draws no progress bar."""

    @classmethod
    def from_base(cls, base_dir: str | Path) -> PromptEncoderPipeline:
        from deepgen_components.pipeline import DeepGenPipeline

        model = DeepGenPipeline.from_pretrained(Path(base_dir) / "pipeline").model
        saved = torch.load(Path(base_dir) / "prompt_encoder.pt", weights_only=True)
        cfg = model.dit.config
        encoder = PromptEncoder(saved["vocab_size"], cfg.joint_attention_dim, cfg.pooled_projection_dim)
        encoder.load_state_dict(saved["encoder"])
        return cls(model.dit, encoder.eval(), model.tokenizer, model.vae, model.scheduler, model.config.image_size)

    def _latents(self, pixels: torch.Tensor) -> torch.Tensor:
        cfg = self.vae.config
        return (self.vae.encode(pixels).latent_dist.mean - cfg.shift_factor) * cfg.scaling_factor

    @torch.no_grad()
    def __call__(self, prompt, image=None, *, num_inference_steps: int = 20, guidance_scale: float = 4.0,
                 generator: torch.Generator | None = None, height: int | None = None, width: int | None = None,
                 **_ignored):
        from types import SimpleNamespace

        from deepgen_components.processing import pixels_to_pil

        prompts = [prompt] if isinstance(prompt, str) else list(prompt)
        size = self.model.config.image_size
        factor = 2 ** (len(self.vae.config.block_out_channels) - 1)
        device = self.device
        tokens, mask = (t.to(device) for t in self.encoder.tokenize(self.tokenizer, prompts))
        null_tokens = torch.zeros_like(tokens)
        null_mask = torch.zeros_like(mask)  # "": the start token alone
        context, pooled, context_mask = self.encoder(torch.cat([null_tokens, tokens]), torch.cat([null_mask, mask]))
        references = None
        if image is not None:
            references = self._latents(torch.stack([pil_to_pixels(im) for im in image]).to(device))
            references = torch.cat([references, references])
        latents = torch.randn((len(prompts), 16, (height or size) // factor, (width or size) // factor),
                              generator=generator).to(device)
        timesteps, sigmas = flow_match_sigmas(self.scheduler, num_inference_steps, device=device)

        def velocity(model_input: torch.Tensor, timestep: torch.Tensor) -> torch.Tensor:
            return self.dit(model_input, timestep.expand(model_input.shape[0]), context, pooled, references,
                            context_mask=context_mask)

        # the library's one denoising loop; CFG against "" on every step, also at scale 1 (as the base was measured)
        latents, _ = denoise_loop(velocity, latents, timesteps, sigmas, guidance_scale=guidance_scale, do_cfg=True)
        cfg = self.vae.config
        pixels = self.vae.decode(latents / cfg.scaling_factor + cfg.shift_factor).sample
        return SimpleNamespace(images=pixels_to_pil(pixels))


class PromptEncoderTeacher:
    """The base DiT under its own :class:`PromptEncoder`, as a velocity teacher for ``flow_matching_loss``
    (``batch["teacher"]``): ``teacher(noisy, timesteps, prompts, reference_latents)`` -> the base DiT's
    velocity for the raw captions / instructions ("" = its null condition). Distilling it instead of the noisy
    target eps - x0 removes the target's sampling noise (the teacher gives the expected velocity given the
    noisy latents), which is most of the target at the high noise levels where the condition matters."""

    def __init__(self, dit: ConditionedDiT, encoder: PromptEncoder, tokenizer, *, target: bool = True,
                 feature_weight: float = 0.0) -> None:
        self.dit, self.encoder, self.tokenizer = dit.eval().requires_grad_(False), encoder.eval(), tokenizer
        self.encoder.requires_grad_(False)
        self.target = target
        self.feature_weight = feature_weight

    @classmethod
    def from_base(cls, base_dir: str | Path, *, target: bool = True, feature_weight: float = 0.0) -> PromptEncoderTeacher:
        base = Path(base_dir)
        if not (base / "prompt_encoder.pt").is_file():
            raise FileNotFoundError(f"teacher.options.base: {base / 'prompt_encoder.pt'} not found (a shapes base "
                                    "folder written by build_base has it)")
        pipe = PromptEncoderPipeline.from_base(base)
        return cls(pipe.dit, pipe.encoder, pipe.tokenizer, target=target, feature_weight=feature_weight)

    def to(self, device) -> PromptEncoderTeacher:
        self.dit.to(device)
        self.encoder.to(device)
        return self

    def feature_loss(self, condition, input_ids: torch.Tensor, prompts: list[str], whole: bool = False
                     ) -> torch.Tensor:
        """Mean squared distance between the bridge's context at a prompt's words and the prompt encoder's output
        for the same words (its token i+1: the start token comes first), plus the same for the pooled vector;
        prompts without words ("") are skipped. The words are found in the VLM's token ids (after the chat
        template; the first word's token may differ by a leading space, so the match starts at the second).

        ``whole`` (when nothing else trains the bridge, i.e. without the flow-matching loss) gives every real
        context token a target: each other token of a prompt (template, image and think tokens) the encoder's
        start token for that prompt, the one non-word token the DiT saw beside the words in pretraining; every
        token and the pooled vector of "" zero, the encoder's null condition. Their mean squares are added."""
        device = condition.context.device
        tokens, mask = self.encoder.tokenize(self.tokenizer, list(prompts))  # one tokenization: words and encoder
        words = mask.sum(1)
        rows = [i for i in range(len(prompts)) if int(words[i]) >= 2]
        rest, rest_target = None, None
        if whole:  # "" rows and, below, the non-word tokens of matched rows; one-word prompts are left alone
            rest = condition.mask & (words == 0).to(device)[:, None]
            rest_target = torch.zeros_like(condition.context)
        if rows:
            with torch.no_grad():
                target, target_pooled, _ = self.encoder(tokens[rows].to(device), mask[rows].to(device))
        student, teacher = [], []
        ids = input_ids.tolist()
        for k, row in enumerate(rows):
            tail = tokens[row][mask[row]].tolist()[1:]
            seq = ids[row]
            start = next((j for j in range(len(seq) - len(tail), 0, -1) if seq[j : j + len(tail)] == tail), None)
            if start is None:
                continue
            student.append(condition.context[row, start - 1 : start + len(tail)])
            teacher.append(target[k, 1 : 2 + len(tail)])
            if rest is not None:
                rest[row] = condition.mask[row]
                rest[row, start - 1 : start + len(tail)] = False
                rest_target[row] = target[k, 0].to(rest_target)
        loss = condition.context.sum() * 0.0
        if rows:
            loss = loss + (condition.pooled[rows] - target_pooled.to(condition.pooled)).square().mean()
        if student:
            loss = loss + (torch.cat(student) - torch.cat(teacher).to(condition.context)).square().mean()
        if rest is not None:
            if bool(rest.any()):
                loss = loss + (condition.context[rest] - rest_target[rest]).square().mean()
            empty = [i for i in range(len(prompts)) if int(words[i]) == 0]
            if empty:
                loss = loss + condition.pooled[empty].square().mean()
        return loss

    @torch.no_grad()
    def __call__(self, noisy, timesteps, prompts, reference_latents=None):
        device = next(self.dit.parameters()).device
        tokens, mask = (t.to(device) for t in self.encoder.tokenize(self.tokenizer, list(prompts)))
        context, pooled, context_mask = self.encoder(tokens, mask)
        return self.dit(noisy.to(device), timesteps.to(device), context, pooled, reference_latents,
                        context_mask=context_mask)


def teacher_from_config(spec: TeacherConfig) -> PromptEncoderTeacher:
    """The ``teacher: {kind: prompt_encoder, target, features, options: {base: DIR}}`` section: the base DiT of the
    shapes base folder ``DIR`` (``build_base``'s output) under its own prompt encoder."""
    check_options("teacher.options", spec.options, ("base",), required=("base",))
    return PromptEncoderTeacher.from_base(spec.options["base"], target=spec.target, feature_weight=spec.features)
