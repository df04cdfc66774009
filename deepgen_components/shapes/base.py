"""Base models of the shapes world: what DeepGen starts from, made from scratch on a CPU in minutes.

DeepGen 1.0 starts from pretrained parts: the SD3 VAE, an (edit-capable) SD3.5-Medium DiT from UniPic2 and a
Qwen2.5-VL-3B. None of them exists for a 64 px world of coloured shapes, so this module makes their toy
counterparts, each with its own small loop (not part of DeepGen's recipes, which are ``trainer.train`` for
stages 1-2 and ``rl.train_rl`` for stage 3):

1. **tokenizer**: a Qwen2 byte-level BPE tokenizer whose merges are learned on the world's text, so a world
   word is one token as in the real Qwen vocabulary (a 22-token T2I prompt instead of 63 byte tokens);
2. **VAE**: a diffusers ``AutoencoderKL`` (16 latent channels, 4x down: 64 px -> 16x16 latents) trained on shapes
   images; its latent ``shift_factor`` / ``scaling_factor`` come from the trained latents' statistics (as
   SD3's do);
3. **DiT**: a small diffusers ``SD3Transformer2DModel`` (MMDiT-X: dual attention, qk RMSNorm) pretrained with
   flow matching on text-to-image and on edits (clean reference latents appended, Kontext style) under a
   conditioning of its own, ``shapes.teacher.PromptEncoder`` (token embeddings + one transformer layer ->
   context and pooled vector at the DiT's widths). The VLM + SCB replace it, as DeepGen replaces SD3's text
   encoders; it stays beside the base as the stage-1 teacher (``shapes.teacher``);
4. **VLM**: the tiny Qwen2.5-VL (``deepgen_components.tiny.tiny_vlm``) with the world tokenizer, optionally
   given a short next-token LM on the world's chat-templated prompts (``lm_steps``; 0 keeps it random).

:func:`build_base` runs all four and saves a ``DeepGenPipeline`` folder with a fresh SCB (official init:
zero heads): the start of stage 1.
"""

from __future__ import annotations

import json
import logging
import math
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from deepgen_components.bridge import BridgeConfig, StackedChannelBridge
from deepgen_components.connector import ConnectorConfig
from deepgen_components.dit import ConditionedDiT
from deepgen_components.layer_selection import LayerSelection
from deepgen_components.model import DeepGenConfig, DeepGenModel
from deepgen_components.processing import pil_to_pixels, t2i_prompt
from deepgen_components.shapes.data import foreground_mask
from deepgen_components.shapes.teacher import PromptEncoder
from deepgen_components.shapes.world import ShapesWorld
from deepgen_components.think_tokens import ThinkTokens
from deepgen_components.tiny import QWEN_SPECIAL_TOKENS, tiny_vlm

__all__ = [
    "ShapesBaseConfig",
    "ShapesData",
    "build_base",
    "make_shapes_data",
    "pretrain_dit",
    "pretrain_vlm_lm",
    "shapes_scheduler",
    "shapes_tokenizer",
    "shapes_transformer",
    "shapes_vae",
    "train_vae",
    "world_texts",
]

logger = logging.getLogger(__name__)


@dataclass
class ShapesBaseConfig:
    """Sizes and budgets of the base models (defaults: the shipped ``deepgen-shapes`` preset)."""

    image_size: int = 64
    seed: int = 0
    data_seed: int = 100  # world seed of the base-model data (stages 1-2 stream seeds 0 and 1)
    t2i_images: int = 4000
    edit_triplets: int = 2000
    t2i_second_shape_prob: float = 0.0  # T2I scenes with a second shape ("... and a blue square on the right ...")
    edit_add_share: float = 0.0  # share of the edit triplets drawn from "add" alone (the rest: uniform over kinds)
    # VAE: 4x down (3 blocks): 64 px -> 16x16x16 latents
    vae_channels: tuple[int, ...] = (8, 16, 32)
    vae_norm_groups: int = 1
    vae_steps: int = 900
    vae_batch: int = 8
    vae_lr: float = 2e-3
    vae_kl_weight: float = 0.01  # per latent element: posterior std ~0.3 of the latent spread, so the decoder
    # tolerates what a DiT gets wrong (1e-3: sharp reconstructions, but DiT samples decode to speckles)
    vae_foreground_weight: float = 10.0  # extra pixel-loss weight on shape pixels (a shape is ~4 % of the image)
    vae_edge_weight: float = 4.0  # L1 on horizontal / vertical pixel differences (sharp edges, against blur)
    vae_anchor_weight: float = 1.0  # latent channels 0-2 ~ the image average-pooled to the latent grid
    # DiT (SD3 MMDiT-X) and its pretraining
    dit_width: int = 128
    dit_heads: int = 4
    dit_layers: int = 6
    dit_dual_layers: tuple[int, ...] = (0, 1)
    context_dim: int = 64  # joint_attention_dim: what the SCB's context head produces
    pooled_dim: int = 64  # pooled_projection_dim
    scheduler_shift: float = 3.0  # DeepGen / SD3.5: high noise levels, where the layout is decided, get more steps
    # (shift 1 measured worse here: docs/shapes.md, experiment 4)
    dit_steps: int = 2800  # the lever for the edits, which grow steeply with these steps (docs/shapes.md,
    # experiments 31 and 40)
    dit_batch: int = 32
    dit_lr: float = 3e-3  # beat 2e-3 on 2 CPU cores, as 2e-3 beat 1e-3 on a GPU (docs/shapes.md, experiments 17, 19)
    dit_edit_every: int = 2  # one edit micro-batch in every 2 (the Kontext-style init is edit-capable)
    dit_copy_fraction: float = 0.25  # edit samples whose instruction is "" and target the source itself
    dit_condition_dropout: float = 0.1
    dit_foreground_weight: float = 4.0  # extra loss weight on the latent cells a shape covers (~4 % of the image)
    dit_timesteps: str = "uniform"  # uniform index into the shifted grid (DeepGen) or "logit_normal" (SD3)
    dit_latents: str = "mean"  # "mean": posterior means; "sample": posterior samples (DeepGen; here the VAE's
    # posterior noise doubles the flow-matching loss and shape accuracy drops, docs/shapes.md, experiment 3)
    # VLM
    vlm_hidden: int = 64
    vlm_layers: int = 4
    lm_steps: int = 200  # next-token LM on the world's prompts; 0 = keep the random VLM
    lm_batch: int = 32
    lm_lr: float = 3e-3
    # SCB (fresh, zero heads; trained by stages 1-2)
    think_tokens: int = 16
    stacked_layers: int = 3
    connector_width: int = 128
    connector_layers: int = 2
    connector_heads: int = 4

    def to_dict(self) -> dict:
        return asdict(self)


# --------------------------------------------------------------------------------------------- tokenizer
def world_texts(world: ShapesWorld, count: int = 3000) -> list[str]:
    """The world's text: training captions and edit instructions, and the chat-template words around them."""
    texts = []
    for i in range(count):
        texts.append(world.t2i_sample(i)[1])
        texts.append(world.edit_triplet(i)[1])
    return texts + ["Generate an image: ", "user\n", "assistant\n"]


def shapes_tokenizer(world: ShapesWorld | None = None, vocab_size: int = 400):
    """A Qwen2 byte-level BPE tokenizer (Qwen chat/vision special tokens, left padding, pad <|endoftext|>) whose
    merges are learned on the world's text: every world word is one token, any other text still encodes
    (byte fallback), like the tiny tokenizer but with the real tokenizer's word-level granularity."""
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import Qwen2Tokenizer

    world = world or ShapesWorld(64)
    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False
    )
    bpe.train_from_iterator(world_texts(world), trainer)
    model = json.loads(bpe.to_str())["model"]
    merges = [tuple(m.split(" ")) if isinstance(m, str) else tuple(m) for m in model["merges"]]
    tokenizer = Qwen2Tokenizer(vocab=model["vocab"], merges=merges, errors="replace")
    tokenizer.add_special_tokens({"additional_special_tokens": list(QWEN_SPECIAL_TOKENS)})
    tokenizer.pad_token = "<|endoftext|>"
    tokenizer.eos_token = "<|im_end|>"
    tokenizer.padding_side = "left"
    return tokenizer


# ------------------------------------------------------------------------------------------------ data
@dataclass
class ShapesData:
    """Rendered base-model data: T2I images + captions, edit (source, instruction, target) triplets."""

    t2i_pixels: torch.Tensor  # (N, 3, H, W) in [-1, 1]
    captions: list[str]
    edit_sources: torch.Tensor  # (M, 3, H, W)
    instructions: list[str]
    edit_targets: torch.Tensor  # (M, 3, H, W)

    def all_pixels(self) -> torch.Tensor:
        return torch.cat([self.t2i_pixels, self.edit_sources, self.edit_targets])


def _t2i_world(cfg: ShapesBaseConfig) -> ShapesWorld:
    """The world of the base models' T2I data (the tokenizer learns its text)."""
    return ShapesWorld(cfg.image_size, seed=cfg.data_seed, second_shape_prob=cfg.t2i_second_shape_prob)


def make_shapes_data(cfg: ShapesBaseConfig) -> ShapesData:
    if not 0.0 <= cfg.edit_add_share <= 1.0:
        raise ValueError(f"edit_add_share must be in [0, 1], got {cfg.edit_add_share}")
    world = _t2i_world(cfg)
    edit_world = ShapesWorld(cfg.image_size, seed=cfg.data_seed + 1)
    t2i = [world.t2i_sample(i) for i in range(cfg.t2i_images)]
    n_add = int(round(cfg.edit_add_share * cfg.edit_triplets))
    edits = [edit_world.edit_sample(i) for i in range(cfg.edit_triplets - n_add)]
    if n_add:
        add_world = ShapesWorld(cfg.image_size, seed=cfg.data_seed + 2, edit_kinds=("add",))
        edits += [add_world.edit_sample(i) for i in range(n_add)]
    return ShapesData(
        t2i_pixels=torch.stack([pil_to_pixels(image) for image, _ in t2i]),
        captions=[text for _, text in t2i],
        edit_sources=torch.stack([pil_to_pixels(source) for source, _, _ in edits]),
        instructions=[text for _, text, _ in edits],
        edit_targets=torch.stack([pil_to_pixels(target) for _, _, target in edits]),
    )


# ------------------------------------------------------------------------------------------------- VAE
def shapes_vae(cfg: ShapesBaseConfig):
    """A 16-channel AutoencoderKL small enough to train on a CPU in minutes: 4x down with the default 3 blocks
    (64 px -> 16x16 latents); an 8x-down VAE stays blurry for the steps a CPU budget allows (docs/shapes.md).

    ``norm_num_groups=1``: with one or two channels per group, GroupNorm removes each channel's per-image level,
    which is exactly the flat background colour of this world (the decoder then barely depends on the latents).
    No mid-block attention (8x8 latents need none). The residual branches start at zero (their second conv is
    zero-initialised), so the untrained network is a shallow conv stack that learns quickly.
    """
    from diffusers import AutoencoderKL
    from diffusers.models.resnet import ResnetBlock2D

    channels = tuple(cfg.vae_channels)
    vae = AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * len(channels),
        up_block_types=("UpDecoderBlock2D",) * len(channels),
        block_out_channels=channels,
        layers_per_block=1,
        latent_channels=16,
        norm_num_groups=cfg.vae_norm_groups,
        sample_size=cfg.image_size,
        use_quant_conv=False,
        use_post_quant_conv=False,
        mid_block_add_attention=False,
        shift_factor=0.0,
        scaling_factor=1.0,
    )
    with torch.no_grad():
        for module in vae.modules():
            if isinstance(module, ResnetBlock2D):
                nn.init.zeros_(module.conv2.weight)
                nn.init.zeros_(module.conv2.bias)
        vae.encoder.conv_out.bias[16:].fill_(-6.0)  # posterior log-variance starts small (std ~0.05)
    return vae


def train_vae(vae, pixels: torch.Tensor, cfg: ShapesBaseConfig, log=None) -> dict:
    """L1 + MSE (shape pixels weighted up) + an edge term + a latent anchor + a small KL; AdamW, one-cycle LR.

    From scratch, a conv autoencoder first learns blurry blobs (low frequencies come first); two terms make it
    sharp within a CPU budget: the L1 of the pixel differences' error (edges), and an anchor that asks latent
    channels 0-2 to hold the image average-pooled to the latent grid (colours and positions are then easy for
    the encoder; SD's latents look like a small image too). Returns the last losses."""
    generator = torch.Generator().manual_seed(cfg.seed)  # on the CPU whatever the device: the same draws
    optimizer = torch.optim.AdamW(vae.parameters(), lr=cfg.vae_lr, weight_decay=0.0)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, cfg.vae_lr, total_steps=cfg.vae_steps, pct_start=0.05)
    foreground = foreground_mask(pixels)
    factor = 2 ** (len(vae.config.block_out_channels) - 1)
    vae.train()
    stats = {}
    for step in range(cfg.vae_steps):
        index = torch.randint(0, pixels.shape[0], (cfg.vae_batch,), generator=generator).to(pixels.device)
        x = pixels[index]
        weight = 1.0 + cfg.vae_foreground_weight * foreground[index]
        posterior = vae.encode(x).latent_dist
        eps = torch.randn(posterior.mean.shape, generator=generator).to(x.device)
        reconstruction = vae.decode(posterior.mean + posterior.std * eps).sample
        error = reconstruction - x
        l1 = (error.abs() * weight).mean()
        mse = (error.square() * weight).mean()
        edges = (error[..., :, 1:] - error[..., :, :-1]).abs().mean() + (error[..., 1:, :] - error[..., :-1, :]).abs().mean()
        anchor = (posterior.mean[:, :3] - F.avg_pool2d(x, factor)).square().mean()
        kl = posterior.kl().mean() / posterior.mean[0].numel()
        loss = l1 + mse + cfg.vae_edge_weight * edges + cfg.vae_anchor_weight * anchor + cfg.vae_kl_weight * kl
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(vae.parameters(), 1.0)
        optimizer.step()
        schedule.step()
        stats = {"step": step + 1, "l1": l1.item(), "mse": mse.item(), "edges": edges.item(), "anchor": anchor.item(),
                 "kl_per_element": kl.item()}
        if log is not None and (step % 50 == 0 or step + 1 == cfg.vae_steps):
            log("vae", stats)
    vae.eval()
    return stats


@torch.no_grad()
def encode_posterior(vae, pixels: torch.Tensor, batch: int = 256) -> tuple[torch.Tensor, torch.Tensor]:
    """Raw (unshifted, unscaled) posterior mean and std of every image."""
    means, stds = [], []
    for start in range(0, pixels.shape[0], batch):
        posterior = vae.encode(pixels[start : start + batch]).latent_dist
        means.append(posterior.mean)
        stds.append(posterior.std)
    return torch.cat(means), torch.cat(stds)


def set_latent_statistics(vae, means: torch.Tensor) -> tuple[float, float]:
    """SD3-style latent normalisation: shift = mean, scale = 1 / std of the trained latents."""
    shift = float(means.mean())
    scale = float(1.0 / means.std())
    vae.register_to_config(shift_factor=shift, scaling_factor=scale)
    return shift, scale


# ------------------------------------------------------------------------------------------------- DiT
def shapes_transformer(cfg: ShapesBaseConfig):
    """SD3 MMDiT-X at toy size: patch 2 (16x16 latents = 64 image tokens of 2x2x16 values; with patch 4 the
    256 values of a token do not fit through a 128-wide model), dual attention in the first blocks, qk RMSNorm,
    a 32x32-patch position table (images up to 256 px)."""
    from diffusers import SD3Transformer2DModel

    return SD3Transformer2DModel(
        sample_size=cfg.image_size // 2 ** (len(cfg.vae_channels) - 1),
        patch_size=2,
        in_channels=16,
        out_channels=16,
        num_layers=cfg.dit_layers,
        num_attention_heads=cfg.dit_heads,
        attention_head_dim=cfg.dit_width // cfg.dit_heads,
        joint_attention_dim=cfg.context_dim,
        caption_projection_dim=cfg.dit_width,
        pooled_projection_dim=cfg.pooled_dim,
        pos_embed_max_size=32,
        dual_attention_layers=tuple(cfg.dit_dual_layers),
        qk_norm="rms_norm",
    )


def shapes_scheduler(cfg: ShapesBaseConfig):
    from diffusers import FlowMatchEulerDiscreteScheduler

    return FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=cfg.scheduler_shift)


def _training_sigmas(scheduler) -> tuple[torch.Tensor, torch.Tensor]:
    """The training grid (timesteps, sigmas) of a FlowMatch scheduler (DeepGen: uniform index into it)."""
    table = type(scheduler).from_config(scheduler.config)
    return table.timesteps.float(), table.sigmas[: len(table.timesteps)].float()


def _flow_matching_step(dit, encoder, tokens, mask, x0, references, weight, generator, timesteps, sigmas, sampling):
    """One flow-matching loss: x_sigma = (1 - sigma) x0 + sigma eps, target eps - x0, per-element ``weight``."""
    device = x0.device  # the draws come from the CPU ``generator`` whatever the device (same numbers)
    null_lengths = torch.randint(1, tokens.shape[1] + 2, (x0.shape[0],), generator=generator).to(device)
    if sampling == "logit_normal":
        u = torch.sigmoid(torch.randn(x0.shape[0], generator=generator))
    else:
        u = torch.rand(x0.shape[0], generator=generator)
    index = (u * len(timesteps)).long().clamp(0, len(timesteps) - 1)
    sigma = sigmas[index].view(-1, 1, 1, 1).to(device)
    noise = torch.randn(x0.shape, generator=generator).to(device)
    noisy = (1 - sigma) * x0 + sigma * noise
    context, pooled, context_mask = encoder(tokens, mask, null_lengths)
    prediction = dit(noisy, timesteps[index].to(device), context, pooled, references, context_mask=context_mask)
    return ((prediction - (noise - x0)).square() * weight).mean() / weight.mean()


def latent_foreground(pixels: torch.Tensor, factor: int) -> torch.Tensor:
    """(N, 1, H/f, W/f) in [0, 1]: the share of each latent cell covered by a shape, dilated by one cell."""
    return F.max_pool2d(F.avg_pool2d(foreground_mask(pixels), factor), 3, stride=1, padding=1)


def pretrain_dit(
    dit: ConditionedDiT,
    encoder: PromptEncoder,
    tokenizer,
    latents: dict[str, torch.Tensor],
    captions: list[str],
    instructions: list[str],
    scheduler,
    cfg: ShapesBaseConfig,
    log=None,
) -> dict:
    """Flow matching on T2I and edits (one edit micro-batch every ``dit_edit_every``), DeepGen's objective:
    x_sigma = (1 - sigma) x0 + sigma eps, target eps - x0, sigma from a uniform index into the shifted training
    grid (``dit_timesteps: uniform``) or SD3's logit-normal sigmas. Latents are posterior samples (mean + std *
    eps) of the cached encodings. The loss weighs the latent cells a shape covers ``1 + dit_foreground_weight``
    (a shape is ~4 % of the image: unweighted, 600 steps learn the backgrounds and leave only specks of shapes).
    T2I captions are dropped to "" with probability ``dit_condition_dropout`` (the CFG null condition)."""
    generator = torch.Generator().manual_seed(cfg.seed + 1)
    params = list(dit.parameters()) + list(encoder.parameters())
    optimizer = torch.optim.AdamW(params, lr=cfg.dit_lr, betas=(0.9, 0.95), weight_decay=0.01)
    warmup = max(1, cfg.dit_steps // 50)
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer,
        lambda s: min(1.0, (s + 1) / warmup) * 0.5 * (1 + math.cos(math.pi * min(1.0, s / cfg.dit_steps))),
    )
    timesteps, sigmas = _training_sigmas(scheduler)
    device = next(dit.parameters()).device  # latents live there too; random draws stay on the CPU generator
    t2i_tokens = tuple(t.to(device) for t in encoder.tokenize(tokenizer, captions))
    edit_tokens = tuple(t.to(device) for t in encoder.tokenize(tokenizer, instructions))

    def sample(mean, std, index):
        if cfg.dit_latents == "mean":
            return mean[index]
        return mean[index] + std[index] * torch.randn(mean[index].shape, generator=generator).to(device)

    dit.train()
    encoder.train()
    stats, losses = {}, []
    for step in range(cfg.dit_steps):
        index_space = len(instructions) if step % cfg.dit_edit_every == 0 else len(captions)
        index = torch.randint(0, index_space, (cfg.dit_batch,), generator=generator).to(device)
        if step % cfg.dit_edit_every == 0:
            tokens, mask = edit_tokens[0][index], edit_tokens[1][index]
            x0 = sample(latents["target_mean"], latents["target_std"], index)
            references = sample(latents["source_mean"], latents["source_std"], index)
            foreground = latents["target_fg"][index]
            # Copy samples: no instruction -> reproduce the reference. This teaches the position-wise copy an edit
            # needs, and makes "" + reference (the CFG negative of an edit) mean "no change".
            copy = (torch.rand(cfg.dit_batch, generator=generator) < cfg.dit_copy_fraction).to(device)
            tokens = torch.where(copy[:, None], torch.zeros_like(tokens), tokens)
            mask = mask & ~copy[:, None]
            x0 = torch.where(copy.view(-1, 1, 1, 1), sample(latents["source_mean"], latents["source_std"], index), x0)
            foreground = torch.where(copy.view(-1, 1, 1, 1), latents["source_fg"][index], foreground)
        else:
            tokens, mask = t2i_tokens[0][index], t2i_tokens[1][index]
            drop = (torch.rand(cfg.dit_batch, generator=generator) < cfg.dit_condition_dropout).to(device)
            tokens = torch.where(drop[:, None], torch.zeros_like(tokens), tokens)
            mask = mask & ~drop[:, None]  # "" = the start token alone
            x0 = sample(latents["t2i_mean"], latents["t2i_std"], index)
            references = None
            foreground = latents["t2i_fg"][index]
        weight = 1.0 + cfg.dit_foreground_weight * foreground
        loss = _flow_matching_step(dit, encoder, tokens, mask, x0, references, weight, generator, timesteps, sigmas,
                                   cfg.dit_timesteps)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        schedule.step()
        losses.append(loss.item())
        stats = {"step": step + 1, "loss_avg50": float(np.mean(losses[-50:])), "lr": schedule.get_last_lr()[0]}
        if log is not None and (step % 100 == 0 or step + 1 == cfg.dit_steps):
            log("dit", stats)
    dit.eval()
    encoder.eval()
    return stats


# ------------------------------------------------------------------------------------------------- VLM
def pretrain_vlm_lm(vlm, tokenizer, texts: list[str], cfg: ShapesBaseConfig, log=None) -> dict:
    """Next-token LM on the world's chat-templated prompts (T2I: "Generate an image: {caption}"; edits: the
    instruction after an empty vision block's newline), so the VLM's hidden states carry context (which
    colour belongs to which shape) before the bridge reads them. Text only: the tiny vision tower stays random
    (DeepGen also never trains the ViT)."""
    generator = torch.Generator().manual_seed(cfg.seed + 2)
    encoded = [tokenizer(t, add_special_tokens=True)["input_ids"] for t in texts]
    optimizer = torch.optim.AdamW(vlm.parameters(), lr=cfg.lm_lr, weight_decay=0.0)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, cfg.lm_lr, total_steps=max(1, cfg.lm_steps), pct_start=0.1)
    pad = tokenizer.pad_token_id
    vlm.train()
    stats = {}
    for step in range(cfg.lm_steps):
        rows = [encoded[i] for i in torch.randint(0, len(encoded), (cfg.lm_batch,), generator=generator).tolist()]
        length = max(len(r) for r in rows)
        input_ids = torch.full((len(rows), length), pad, dtype=torch.long)
        attention = torch.zeros((len(rows), length), dtype=torch.long)
        for i, r in enumerate(rows):  # right padding for the LM loss; the labels ignore the pads
            input_ids[i, : len(r)] = torch.tensor(r)
            attention[i, : len(r)] = 1
        labels = input_ids.masked_fill(attention == 0, -100)
        device = vlm.device
        loss = vlm(input_ids=input_ids.to(device), attention_mask=attention.to(device), labels=labels.to(device)).loss
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(vlm.parameters(), 1.0)
        optimizer.step()
        schedule.step()
        stats = {"step": step + 1, "loss": loss.item()}
        if log is not None and (step % 50 == 0 or step + 1 == cfg.lm_steps):
            log("vlm_lm", stats)
    vlm.eval()
    return stats


def lm_texts(captions: list[str], instructions: list[str]) -> list[str]:
    from deepgen_components.conventions import USER_TURN

    return [t2i_prompt(c) for c in captions] + [USER_TURN.format(content=f"\n{i}") for i in instructions]


# --------------------------------------------------------------------------------------------- assembly
def assemble(cfg: ShapesBaseConfig, vlm, tokenizer, transformer, vae, scheduler) -> DeepGenModel:
    """The stage-1 start: base VLM + fresh think tokens and SCB (official init, zero heads) + base DiT + VAE."""
    hidden = vlm.config.text_config.hidden_size
    layers = LayerSelection.uniform(vlm.config.text_config.num_hidden_layers, cfg.stacked_layers)
    bridge = StackedChannelBridge(
        BridgeConfig(
            num_stacked_layers=len(layers),
            vlm_hidden_size=hidden,
            connector=ConnectorConfig(
                hidden_size=cfg.connector_width,
                num_layers=cfg.connector_layers,
                num_heads=cfg.connector_heads,
                intermediate_size=2 * cfg.connector_width,
            ),
            context_dim=cfg.context_dim,
            pooled_dim=cfg.pooled_dim,
            tokens="all",
            mask_padding=True,
        )
    )
    # Edits sample without CFG: CFG against "" + the same reference pushes the whole image away from the source,
    # which blurs and recolours what should be kept (docs/shapes.md, experiment 13).
    config = DeepGenConfig(image_size=cfg.image_size, max_length=128, reference_latents="mean", edit_guidance_scale=1.0)
    return DeepGenModel(
        vlm, ThinkTokens(cfg.think_tokens, hidden), layers, bridge, ConditionedDiT(transformer), vae, scheduler,
        tokenizer, config,
    ).eval()


def build_base(cfg: ShapesBaseConfig, out: str | Path, log=None, device: str | torch.device | None = None) -> dict:
    """Make every base model, save the stage-1 start as a ``DeepGenPipeline`` in ``out/pipeline`` and return a
    report (seconds per part, final losses, latent statistics). ``log(part, stats)`` receives progress.

    ``device`` (default: the CPU) trains the VAE, the DiT and the VLM LM there; weights are initialised and every
    random draw is made on the CPU, so only floating-point rounding differs between devices."""
    from deepgen_components.pipeline import DeepGenPipeline

    device = torch.device(device or "cpu")
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    report: dict = {"config": cfg.to_dict(), "seconds": {}}
    torch.manual_seed(cfg.seed)

    start = time.perf_counter()
    tokenizer = shapes_tokenizer(_t2i_world(cfg))
    data = make_shapes_data(cfg)
    report["seconds"]["data"] = time.perf_counter() - start
    report["tokenizer_vocab"] = len(tokenizer)

    start = time.perf_counter()
    torch.manual_seed(cfg.seed)
    vae = shapes_vae(cfg).to(device)
    report["vae"] = train_vae(vae, data.all_pixels().to(device), cfg, log)
    t2i_mean, t2i_std = encode_posterior(vae, data.t2i_pixels.to(device))
    source_mean, source_std = encode_posterior(vae, data.edit_sources.to(device))
    target_mean, target_std = encode_posterior(vae, data.edit_targets.to(device))
    shift, scale = set_latent_statistics(vae, torch.cat([t2i_mean, target_mean]))
    norm = lambda m, s: ((m - shift) * scale, s * scale)  # noqa: E731
    latents = {}
    for name, (m, s) in {"t2i": (t2i_mean, t2i_std), "source": (source_mean, source_std),
                         "target": (target_mean, target_std)}.items():
        latents[f"{name}_mean"], latents[f"{name}_std"] = norm(m, s)
    factor = 2 ** (len(cfg.vae_channels) - 1)
    latents["t2i_fg"] = latent_foreground(data.t2i_pixels, factor).to(device)
    latents["target_fg"] = latent_foreground(data.edit_targets, factor).to(device)
    latents["source_fg"] = latent_foreground(data.edit_sources, factor).to(device)
    report["vae"].update(shift_factor=shift, scaling_factor=scale, parameters=sum(p.numel() for p in vae.parameters()))
    report["seconds"]["vae"] = time.perf_counter() - start

    start = time.perf_counter()
    torch.manual_seed(cfg.seed + 1)
    scheduler = shapes_scheduler(cfg)
    transformer = shapes_transformer(cfg)
    dit = ConditionedDiT(transformer).to(device)
    encoder = PromptEncoder(len(tokenizer), cfg.context_dim, cfg.pooled_dim).to(device)
    report["dit"] = pretrain_dit(dit, encoder, tokenizer, latents, data.captions, data.instructions, scheduler, cfg, log)
    report["dit"]["parameters"] = sum(p.numel() for p in transformer.parameters())
    report["seconds"]["dit"] = time.perf_counter() - start

    start = time.perf_counter()
    vlm = tiny_vlm(tokenizer, num_layers=cfg.vlm_layers, hidden_size=cfg.vlm_hidden, seed=cfg.seed + 3).to(device)
    if cfg.lm_steps > 0:
        report["vlm_lm"] = pretrain_vlm_lm(vlm, tokenizer, lm_texts(data.captions, data.instructions), cfg, log)
    report["seconds"]["vlm"] = time.perf_counter() - start

    vlm, transformer, vae, encoder = (m.to("cpu") for m in (vlm, transformer, vae, encoder))
    torch.manual_seed(cfg.seed + 4)
    model = assemble(cfg, vlm.requires_grad_(False), tokenizer, transformer.requires_grad_(False),
                     vae.requires_grad_(False), scheduler)
    DeepGenPipeline(model).save_pretrained(out / "pipeline")
    torch.save({"encoder": encoder.state_dict(), "vocab_size": len(tokenizer)}, out / "prompt_encoder.pt")
    report["parameters"] = {
        "vlm": sum(p.numel() for p in vlm.parameters()),
        "scb": sum(p.numel() for p in model.bridge.parameters()) + model.think_tokens.weight.numel(),
        "dit": report["dit"]["parameters"],
        "vae": report["vae"]["parameters"],
    }
    (out / "report.json").write_text(json.dumps(report, indent=2))
    return report
