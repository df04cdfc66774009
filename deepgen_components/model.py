"""DeepGenModel: VLM + think tokens + SCB bridge + conditioned DiT + VAE + scheduler, composed.

``encode_condition`` turns prompts (and reference images) into the DiT condition, ``velocity`` runs the DiT,
``flow_matching_loss`` is the training objective of stages 1-2 (and the SFT auxiliary of stage 3).
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass, fields
from typing import Literal

import torch
from torch import nn

from deepgen_components.bridge import BridgeOutput, StackedChannelBridge
from deepgen_components.dit import ConditionedDiT
from deepgen_components.layer_selection import LayerSelection
from deepgen_components.processing import PromptBatch, reference_pixels, tokenize_prompts
from deepgen_components.think_tokens import ThinkTokens, ThinkTokenVLM, VLMHiddenStates

__all__ = ["DeepGenConfig", "DeepGenModel", "FlowMatchingOutput"]

logger = logging.getLogger(__name__)


@dataclass
class DeepGenConfig:
    """Behaviour of the composed model (the component sizes live in each component's own config).

    max_length: text tokens a prompt may have (official 1024); longer prompts keep their last tokens.
    image_size: target size of the resize rules (official 512).
    condition_dropout: probability of replacing a text-to-image caption by "" in training (official 0.1;
        editing batches are never dropped).
    timestep_sampling: "uniform" (official: uniform index into the shifted training grid) or "logit_normal".
    reference_latents: "sample" (official: a VAE posterior sample) or "mean" (deterministic).
    guidance_scale / edit_guidance_scale: the CFG scales the pipeline uses when a call gives none, for
        text-to-image and for editing (official: 4.0 for both; a model may ship its own, e.g. the shapes preset
        edits best without CFG, docs/shapes.md).
    """

    max_length: int = 1024
    image_size: int = 512
    condition_dropout: float = 0.1
    timestep_sampling: Literal["uniform", "logit_normal"] = "uniform"
    logit_mean: float = 0.0
    logit_std: float = 1.0
    reference_latents: Literal["sample", "mean"] = "sample"
    guidance_scale: float = 4.0
    edit_guidance_scale: float = 4.0

    def __post_init__(self) -> None:
        for name in ("guidance_scale", "edit_guidance_scale"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value < 0:
                raise ValueError(f"{name} must be a finite number >= 0 (1 = no CFG), got {value!r}")
        if self.timestep_sampling not in ("uniform", "logit_normal"):
            raise ValueError(
                f"timestep_sampling must be 'uniform' or 'logit_normal', got {self.timestep_sampling!r}"
            )
        if self.reference_latents not in ("sample", "mean"):
            raise ValueError(f"reference_latents must be 'sample' or 'mean', got {self.reference_latents!r}")
        if not 0.0 <= self.condition_dropout <= 1.0:
            raise ValueError(f"condition_dropout must be in [0, 1], got {self.condition_dropout}")
        if self.image_size % 32:
            raise ValueError(f"image_size must be a multiple of 32, got {self.image_size}")

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> DeepGenConfig:
        known = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in known})



@dataclass
class FlowMatchingOutput:
    loss: torch.Tensor  # scalar, fp32
    per_sample: torch.Tensor  # (B,)
    sigmas: torch.Tensor  # (B,)
    timesteps: torch.Tensor  # (B,)
    noise: list[torch.Tensor] | torch.Tensor
    prediction: list[torch.Tensor] | torch.Tensor
    noisy_latents: list[torch.Tensor] | torch.Tensor | None = None  # x_t given to the DiT
    target: list[torch.Tensor] | torch.Tensor | None = None  # noise - x0 (or the teacher's velocity)
    condition: BridgeOutput | None = None  # the bridge's output the DiT was given
    input_ids: torch.Tensor | None = None  # (B, L) the VLM's prompt tokens (left padded)



class DeepGenModel(nn.Module):
    """The composed DeepGen model.

    Args:
        vlm: a Hugging Face Qwen2.5-VL (or plain causal LM for text-only use).
        think_tokens: the learnable tokens appended to every prompt.
        layers: which VLM hidden states the bridge stacks.
        bridge: the Stacked Channel Bridge.
        dit: a ``ConditionedDiT`` (or a diffusers ``SD3Transformer2DModel``, wrapped).
        vae: a diffusers ``AutoencoderKL``; scheduler: a ``FlowMatchEulerDiscreteScheduler``.
        tokenizer: the VLM's tokenizer (left padding is applied here).
    """

    def __init__(
        self,
        vlm: nn.Module,
        think_tokens: ThinkTokens,
        layers: LayerSelection,
        bridge: StackedChannelBridge,
        dit: ConditionedDiT | nn.Module,
        vae: nn.Module,
        scheduler,
        tokenizer,
        config: DeepGenConfig | None = None,
    ) -> None:
        super().__init__()
        self.config = config or DeepGenConfig()
        self.encoder = ThinkTokenVLM(vlm, think_tokens=think_tokens, layers=layers)
        if len(layers) != bridge.config.num_stacked_layers:
            raise ValueError(
                f"layers selects {len(layers)} hidden states but the bridge stacks "
                f"{bridge.config.num_stacked_layers}"
            )
        if self.encoder.hidden_size != bridge.config.vlm_hidden_size:
            raise ValueError(
                f"bridge: vlm_hidden_size={bridge.config.vlm_hidden_size} but the VLM is "
                f"{self.encoder.hidden_size} wide"
            )
        self.bridge = bridge
        self.dit = dit if isinstance(dit, ConditionedDiT) else ConditionedDiT(dit)
        dit_cfg = self.dit.config
        if bridge.config.context_dim != dit_cfg.joint_attention_dim or bridge.config.pooled_dim != dit_cfg.pooled_projection_dim:
            raise ValueError(
                f"bridge heads ({bridge.config.context_dim} context, {bridge.config.pooled_dim} pooled) do not fit the "
                f"DiT (joint_attention_dim {dit_cfg.joint_attention_dim}, pooled_projection_dim "
                f"{dit_cfg.pooled_projection_dim})"
            )
        self.vae = vae
        self.scheduler = scheduler
        self.tokenizer = tokenizer
        # Training uses its own copy of the scheduler tables: set_timesteps() on the sampling scheduler changes
        # them (official: one scheduler for training, one for sampling).
        train_table = type(scheduler).from_config(scheduler.config)
        self.register_buffer("train_timesteps", train_table.timesteps.clone().float(), persistent=False)
        self.register_buffer("train_sigmas", train_table.sigmas[: len(train_table.timesteps)].clone().float(), persistent=False)

    # -- convenience -------------------------------------------------------------------------------
    @property
    def think_tokens(self) -> ThinkTokens:
        return self.encoder.think_tokens

    @property
    def layers(self) -> LayerSelection:
        return self.encoder.layers

    @property
    def vlm(self) -> nn.Module:
        return self.encoder.vlm

    @property
    def device(self) -> torch.device:
        """Where the model computes: its bridge's device, or, while accelerate's offload hooks (diffusers'
        ``enable_model_cpu_offload`` / ``enable_sequential_cpu_offload``) keep the weights on the CPU or the meta
        device between calls, the hooks' execution device (where inputs and latents must be created)."""
        if hasattr(self.bridge, "_hf_hook"):
            for module in self.bridge.modules():
                device = getattr(getattr(module, "_hf_hook", None), "execution_device", None)
                if device is not None:
                    return torch.device(device)
        return self.bridge.projector.weight.device

    @property
    def dtype(self) -> torch.dtype:
        return self.dit.transformer.dtype

    @property
    def vae_scale_factor(self) -> int:
        return 2 ** (len(self.vae.config.block_out_channels) - 1)

    @property
    def latent_channels(self) -> int:
        return self.vae.config.latent_channels

    # -- condition ---------------------------------------------------------------------------------
    def reference_pixels(self, images) -> list[list[torch.Tensor]] | None:
        """Normalise ``images`` (None, or one entry per prompt: None / image / list of images) to pixels: PIL images
        resized by the official rule, tensors (3, H, W) in [-1, 1] with sides multiples of 32 taken as given
        (:func:`~deepgen_components.processing.reference_pixels`)."""
        return reference_pixels(images, self.config.image_size, resize_tensors=False, name="images[{i}][{j}]")


    def prepare_prompts(self, prompts: Sequence[str], images=None) -> PromptBatch:
        """Templates, tokenization (left padding) and vision patches, on the model's device."""
        references = self.reference_pixels(images)
        if references is not None and len(references) != len(prompts):
            raise ValueError(f"images: got {len(references)} entries for {len(prompts)} prompts")
        merge = 2
        if self.encoder.kind == "qwen_vl":
            merge = self.encoder.config.vision_config.spatial_merge_size
        batch = tokenize_prompts(
            self.tokenizer, list(prompts), references, max_length=self.config.max_length, merge_size=merge
        )
        return batch.to(self.device)

    def encode_tokens(
        self, batch: PromptBatch, *, return_intermediates: bool = False
    ) -> tuple[BridgeOutput, VLMHiddenStates]:
        """VLM (with think tokens) + bridge on an already tokenized batch."""
        hidden = self.encoder(
            batch.input_ids,
            batch.attention_mask,
            pixel_values=batch.pixel_values,
            image_grid_thw=batch.image_grid_thw,
            output_all_hidden_states=return_intermediates,
        )
        condition = self.bridge(
            hidden.hidden_states, hidden.attention_mask, hidden.think_mask, return_intermediates=return_intermediates
        )
        return condition, hidden

    def encode_condition(self, prompts: Sequence[str], images=None) -> BridgeOutput:
        """Prompts (+ reference images per prompt) -> the DiT condition (context, pooled, mask).

        All prompts are encoded in one left-padded batch, as the official model does (with pad masking off,
        the amount of padding changes the result; see ``BridgeConfig.mask_padding``).
        """
        if isinstance(prompts, str):
            prompts = [prompts]
        return self.encode_tokens(self.prepare_prompts(prompts, images))[0]

    # -- DiT ---------------------------------------------------------------------------------------
    def velocity(
        self,
        latents,
        timestep,
        condition: BridgeOutput,
        reference_latents=None,
    ):
        """DiT velocity for ``latents`` at ``timestep`` (1000 * sigma) under ``condition``."""
        mask = condition.mask if self.bridge.config.mask_padding else None
        return self.dit(latents, timestep, condition.context, condition.pooled, reference_latents, context_mask=mask)

    # -- VAE ---------------------------------------------------------------------------------------
    def encode_images(self, pixels, generator: torch.Generator | None = None, mode: str | None = None):
        """[-1, 1] pixels (B, 3, H, W) or a list of (3, H, W) -> latents ((z - shift) * scale)."""
        mode = mode or self.config.reference_latents
        if isinstance(pixels, torch.Tensor):
            dist = self.vae.encode(pixels.to(self.device, self.vae.dtype)).latent_dist
            return self._scaled(dist.mean if mode == "mean" else dist.sample(generator))
        # a list: one encoder pass per image size, then one draw per image in order (as one call per image would)
        return [self.sample_posterior(p, generator, mode) for p in self.encode_posteriors(list(pixels))]

    def _scaled(self, z: torch.Tensor) -> torch.Tensor:
        """VAE latents -> the DiT's latent space: (z - shift) * scale."""
        cfg = self.vae.config
        return (z - (cfg.shift_factor or 0.0)) * cfg.scaling_factor

    def encode_posteriors(self, images: list[torch.Tensor]) -> list:
        """The VAE posterior of each [-1, 1] image (3, H, W), from one batched encoder pass per image size.

        The distributions are those a one-image ``encode_images`` call samples from (equal up to floating-point
        rounding), at a fraction of the cost on a CPU; draw from one with ``sample_posterior``."""
        from diffusers.models.autoencoders.vae import DiagonalGaussianDistribution

        groups: dict[tuple, list[int]] = {}
        for i, image in enumerate(images):
            if image.dim() != 3:
                raise ValueError(f"images[{i}]: expected (3, H, W) pixels, got {tuple(image.shape)}")
            groups.setdefault(tuple(image.shape), []).append(i)
        out: list = [None] * len(images)
        for index in groups.values():
            batch = torch.stack([images[i] for i in index]).to(self.device, self.vae.dtype)
            parameters = self.vae.encode(batch).latent_dist.parameters
            for k, i in enumerate(index):
                out[i] = DiagonalGaussianDistribution(parameters[k : k + 1])
        return out

    def sample_posterior(self, posterior, generator: torch.Generator | None = None, mode: str = "sample"):
        """One latent (C, h, w) from a posterior of ``encode_posteriors``: its sample (drawn from ``generator``
        exactly as ``encode_images`` draws it) or its mean, as ``(z - shift) * scale``."""
        return self._scaled(posterior.mean if mode == "mean" else posterior.sample(generator))[0]

    def decode_latents(self, latents: torch.Tensor) -> torch.Tensor:
        """Latents -> pixels in about [-1, 1] (not clamped)."""
        cfg = self.vae.config
        z = latents.to(self.vae.dtype) / cfg.scaling_factor + (cfg.shift_factor or 0.0)
        return self.vae.decode(z).sample

    # -- training objective --------------------------------------------------------------------------
    def sample_training_timesteps(
        self, batch_size: int, generator: torch.Generator | None = None, u: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(u, timesteps, sigmas): u in [0, 1) picks an index of the shifted training grid (official: uniform)."""
        if u is None:
            if self.config.timestep_sampling == "logit_normal":
                normal = torch.randn(batch_size, generator=generator) * self.config.logit_std + self.config.logit_mean
                u = torch.sigmoid(normal)
            else:
                u = torch.rand(batch_size, generator=generator)
        u = u.float().cpu()
        count = self.train_timesteps.shape[0]
        index = (u * count).long().clamp(0, count - 1).to(self.train_timesteps.device)
        return u, self.train_timesteps[index], self.train_sigmas[index]

    def flow_matching_loss(
        self, batch: dict, generator: torch.Generator | None = None, *, condition_dropout: float | None = None
    ) -> FlowMatchingOutput:
        """Rectified-flow loss: x_t = (1 - sigma) x0 + sigma * eps, target eps - x0, per-sample MSE, mean.

        ``batch`` keys: ``prompts`` (list[str]); ``latents`` (clean target latents: (B, C, h, w) or a list)
        or ``pixels`` (targets in [-1, 1], VAE-encoded here); optional ``reference_pixels`` (per sample, a
        list of (3, H, W) references: editing; also VAE-encoded for the DiT unless ``reference_latents`` is
        given); optional ``noise`` / ``u`` to fix the random draws; optional ``loss_weight`` (B, 1, h, w) on the
        latent grid (each sample's loss is then its weighted mean); optional ``teacher``: a callable
        ``teacher(noisy, timesteps, prompts, reference_latents) -> velocity`` whose output (no gradient) replaces
        the target eps - x0, i.e. the loss distils a teacher's velocity, e.g. the DiT under the conditioning it
        was pretrained with, while the gradient still reaches the bridge only through the DiT (tensor latents
        only). Text-to-image captions are replaced by "" with probability ``condition_dropout`` (default: the
        model config's; pass 0 when the caller already dropped captions itself); editing samples never are.
        """
        prompts = list(batch["prompts"])
        references = batch.get("reference_pixels")
        editing = references is not None and any(len(r or []) for r in references)
        if "latents" in batch:
            x0 = batch["latents"]
        elif "pixels" in batch:
            with torch.no_grad():
                x0 = self.encode_images(batch["pixels"], generator, mode="sample")
        else:
            raise ValueError("batch: needs 'latents' or 'pixels'")
        x0_list = list(x0) if not isinstance(x0, torch.Tensor) else None
        size = len(x0_list) if x0_list is not None else x0.shape[0]
        if len(prompts) != size:
            raise ValueError(f"batch: {len(prompts)} prompts for {size} images")

        dropout = self.config.condition_dropout if condition_dropout is None else condition_dropout
        if not editing and dropout > 0:
            drop = torch.rand(len(prompts), generator=generator) < dropout
            prompts = ["" if d else p for p, d in zip(prompts, drop.tolist())]

        reference_latents = batch.get("reference_latents")
        if editing and reference_latents is None:
            with torch.no_grad():
                reference_latents = [self.encode_images(list(refs), generator, mode="sample") for refs in references]

        prompt_batch = self.prepare_prompts(prompts, references if editing else None)
        condition, _ = self.encode_tokens(prompt_batch)
        u, timesteps, sigmas = self.sample_training_timesteps(size, generator, batch.get("u"))
        noise = batch.get("noise")
        teacher = batch.get("teacher")
        if teacher is not None and x0_list is not None:
            raise ValueError("batch['teacher']: needs latents of one size (a tensor), got a list")
        if x0_list is None:
            if noise is None:
                noise = torch.randn(x0.shape, generator=generator).to(x0.device, x0.dtype)
            s = sigmas.to(x0.device, x0.dtype).view(-1, 1, 1, 1)
            noisy = (1 - s) * x0 + s * noise
            target = noise - x0
            if teacher is not None:
                with torch.no_grad():
                    target = teacher(noisy, timesteps, prompts, reference_latents if editing else None).to(target)
            prediction = self.velocity(noisy.to(self.dtype), timesteps, condition, reference_latents)
            error = (prediction.float() - target.float()) ** 2
            weight = batch.get("loss_weight")
            if weight is not None:
                if weight.shape[0] != size or weight.shape[-2:] != error.shape[-2:]:
                    raise ValueError(f"batch['loss_weight']: expected shape ({size}, 1, {error.shape[-2]}, "
                                     f"{error.shape[-1]}) on the latent grid, got {tuple(weight.shape)}")
                weight = weight.to(error)
                error = error * weight / weight.flatten(1).mean(1).view(-1, 1, 1, 1)
            per_sample = error.flatten(1).mean(1)
        else:
            if noise is None:
                noise = [torch.randn(x.shape, generator=generator).to(x.device, x.dtype) for x in x0_list]
            noisy = [(1 - s) * x + s * n for x, n, s in zip(x0_list, noise, sigmas.tolist())]
            prediction = self.velocity([n.to(self.dtype) for n in noisy], timesteps, condition, reference_latents)
            target = [n - x for n, x in zip(noise, x0_list)]
            per_sample = torch.stack([((p.float() - tg.float()) ** 2).mean() for p, tg in zip(prediction, target)])
        return FlowMatchingOutput(
            loss=per_sample.mean(), per_sample=per_sample, sigmas=sigmas, timesteps=timesteps, noise=noise,
            prediction=prediction, noisy_latents=noisy, target=target, condition=condition,
            input_ids=prompt_batch.input_ids,
        )
