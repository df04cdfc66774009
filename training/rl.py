"""Stage 3 (``rl``): MR-GRPO on the DiT, with the same CLI, checkpoints and ``metrics.jsonl`` as stages 1-2.

One iteration, top to bottom: draw prompts -> encode them once (frozen VLM + bridge) -> no-grad CPS rollouts
(group of G images per prompt, shared initial noise) -> decode and score with every reward -> GDPO advantages
(normalised over all ranks) -> for a random subset of timesteps, recompute the step log-probs with gradients,
clipped-ratio loss + velocity-space KL to a frozen reference DiT -> SFT auxiliary flow-matching loss ->
clip and step (``update_mode: per_timestep``, the official cadence: one optimizer step after every trained
timestep and one for the SFT gradient; ``per_rollout``: one step per rollout).

Distributed: ``ddp`` (or ``auto`` under torchrun) keeps a whole DiT on every rank and averages the gradients
after the backward passes of an update (a rollout, its re-evaluated timesteps and the SFT batch are not one
forward, so the DiT is not DDP-wrapped); ``fsdp`` shards the policy DiT with FSDP2 (each block a unit), whose
reduce-scatter averages the gradients. The frozen reference DiT stays whole on every rank.
"""

from __future__ import annotations

import copy
import logging
import math
import random
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from deepgen_components.training.checkpoint import (
    capture_rng,
    latest_checkpoint,
    load_checkpoint,
    restore_rank_rng,
    save_checkpoint,
)
from deepgen_components.training.common import (
    apply_lora,
    build_model,
    build_optimizer,
    build_schedule,
    configure_stage,
    load_init_weights,
    lora_modules,
)
from deepgen_components.training.config import TrainConfig
from deepgen_components.training.data import build_sources
from deepgen_components.training.distributed import (
    all_gather_cat,
    all_reduce_mean,
    apply_fsdp,
    barrier,
    cleanup,
    gather_to_main,
    init_distributed,
    seed_rank_rng,
)
from deepgen_components.training.metrics import MetricsLogger
from deepgen_components.training.prompts import PromptPool
from deepgen_components.training.sampler import TaskBatchSampler
from deepgen_components.training.trainer import (
    _autocast,
    _full_state,
    _load_optimizer,
    _load_trainable,
    _next_batch,
    _optimizer_state,
    _unsharded_model,
    prepare_batch,
)

from deepgen_components.bridge import BridgeOutput
from deepgen_components.model import DeepGenModel
from deepgen_components.processing import pixels_to_pil
from deepgen_components.rl.grpo import (
    MRGRPOLoss,
    gdpo_advantages,
    grpo_advantages,
    policy_step_log_prob,
    rollout,
    select_timesteps,
)
from deepgen_components.rl.rewards import build_reward, reward_weights

__all__ = ["RLResult", "rollout_seed", "train_rl"]

logger = logging.getLogger(__name__)


@dataclass
class RLResult:
    out: Path
    steps: int
    final_loss: float | None
    checkpoint: Path | None
    pipeline: Path | None


def rollout_seed(seed: int, step: int, rank: int) -> int:
    """The seed of a rollout's generator (initial noise and every per-step epsilon): distinct for every
    (seed, step, rank), so ranks never repeat each other's noise (the official run seeds every rank alike)."""
    return (seed * 1_000_003 + step * 7_919 + rank * 104_729) % (2**63)


def _edit_images(drawn: list[dict]) -> list | None:
    """The images of the drawn prompts (a path is opened as RGB), or None when none of them is an edit."""
    if all(d.get("image") is None for d in drawn):
        return None
    from PIL import Image

    out = []
    for d in drawn:
        image = d.get("image")
        if isinstance(image, (str, Path)):
            if not Path(image).is_file():
                raise FileNotFoundError(f"rl prompt {d['text']!r}: image {image} does not exist")
            with Image.open(image) as opened:
                image = opened.convert("RGB")
        out.append(image)
    return out


def _reference_rows(model: DeepGenModel, images: list | None, group_size: int, generator) -> list | None:
    """Per rollout row, the clean reference latents of its prompt's image ([] for a text-to-image prompt; the
    DiT takes a per-sample list), encoded once per prompt; None without edit prompts."""
    if images is None:
        return None
    per_prompt = []
    for pixels in model._reference_pixels(images):
        latents = model.encode_images(pixels, generator) if pixels else []
        per_prompt.append([z.to(model.dtype) for z in latents])
    return [refs for refs in per_prompt for _ in range(group_size)]


def _reference_velocity(reference_dit, model: DeepGenModel, latents, timestep, condition: BridgeOutput,
                        negative: BridgeOutput | None, guidance_scale: float, reference_latents=None):
    """The frozen reference DiT's velocity, guided exactly as the policy's is (CFG off by default)."""

    def velocity(x, t, cond):
        mask = cond.mask if model.bridge.config.mask_padding else None
        return reference_dit(x, t, cond.context, cond.pooled, reference_latents, context_mask=mask)

    v = velocity(latents, timestep, condition)
    if guidance_scale != 1.0:
        v_u = velocity(latents, timestep, negative)
        v = v_u + guidance_scale * (v - v_u)
    return v


def _sync_gradients(params: list[torch.nn.Parameter], info) -> None:
    """Average the gradients over ranks (what DDP does; the RL loop runs the DiT unwrapped because a rollout,
    30 re-evaluations and the SFT batch are not one forward). Every rank runs the same code path, so the set
    of parameters with a gradient is the same on every rank."""
    if not info.enabled:
        return
    import torch.distributed as dist

    grads = [p.grad for p in params if p.grad is not None]
    if not grads:
        return
    flat = torch.cat([g.reshape(-1) for g in grads])
    dist.all_reduce(flat, op=dist.ReduceOp.SUM)
    flat /= info.world_size
    offset = 0
    for g in grads:
        g.copy_(flat[offset : offset + g.numel()].view_as(g))
        offset += g.numel()


def train_rl(cfg: TrainConfig, *, out: str | Path | None = None, max_steps: int | None = None) -> RLResult:
    """Run MR-GRPO as configured; resumes from the newest checkpoint in ``out``."""
    if cfg.stage != "rl" or cfg.rl is None:
        raise ValueError("train_rl needs stage: rl and an rl: section")
    rl = cfg.rl
    if rl.update_mode not in ("per_rollout", "per_timestep"):
        raise ValueError(f"rl.update_mode must be 'per_rollout' or 'per_timestep', got {rl.update_mode!r}")
    if rl.advantages not in ("gdpo", "grpo"):
        raise ValueError(f"rl.advantages must be 'gdpo' or 'grpo', got {rl.advantages!r}")
    if cfg.trainer.distributed not in ("auto", "none", "ddp", "fsdp"):
        raise ValueError(f"rl: trainer.distributed must be auto, none, ddp or fsdp, got {cfg.trainer.distributed!r}")
    out = Path(out or cfg.out)
    total_steps = max_steps if max_steps is not None else cfg.trainer.max_steps
    info = init_distributed(cfg.trainer.device)
    device = info.device
    torch.manual_seed(cfg.trainer.seed)

    # 1. Policy (the DiT trains), frozen reference copy, rewards.
    model = build_model(cfg.model, device=device)
    if cfg.lora is not None and not lora_modules(model.encoder.vlm):
        apply_lora(model, cfg.lora)  # the stage-2 LoRA of an init_from checkpoint loads into it; frozen here
    if cfg.model.init_from:
        load_init_weights(model, cfg.model.init_from)
    configure_stage(model, "rl")
    model.eval()  # no dropout anywhere: rollouts and updates must see the same function
    reference_dit = copy.deepcopy(model.dit).requires_grad_(False).eval()
    if cfg.trainer.activation_checkpointing:
        model.dit.transformer.enable_gradient_checkpointing()  # recomputation is exact: ratios stay 1 on-policy
    sharded = cfg.trainer.distributed == "fsdp" and info.enabled
    if sharded:  # after the reference copy; the policy's parameters become DTensor shards
        apply_fsdp(model.dit, list(model.dit.transformer.transformer_blocks), info)
    params = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    trainable = [p for _, p in params]
    rewards = {name: build_reward(spec, argument=f"rl.rewards.{name}") for name, spec in rl.rewards.items()}
    if not rewards:
        raise ValueError("rl.rewards: configure at least one reward")
    reward_names = list(rewards)
    categories = rl.categories or {"general": {name: 1.0 for name in reward_names}}
    loss_fn = MRGRPOLoss(rl.clip_range, rl.kl_beta, rl.sft_lambda, rl.eta)
    prompts = PromptPool(rl, cfg.data.image_size)
    height = width = cfg.data.image_size
    autocast = lambda: _autocast(cfg, device)  # noqa: E731  (bf16 on CUDA with precision auto, fp32 on CPU)

    # SFT auxiliary data: the data sources of the config (optional when sft_lambda == 0).
    sft_sources = build_sources(cfg) if cfg.data.sources and rl.sft_lambda > 0 else None
    sft_sampler = None
    if sft_sources is not None:
        sft_sampler = TaskBatchSampler(
            {n: len(s) for n, s in sft_sources.items()}, {s.name: s.repeat for s in cfg.data.sources},
            rl.sft_batch_size, seed=cfg.trainer.seed, rank=info.rank, world_size=info.world_size,
        )

    optimizer = build_optimizer(params, cfg.optim)
    schedule = build_schedule(optimizer, cfg.optim, total_steps)
    seed_rank_rng(cfg.trainer.seed, info)  # everything is built: from here on each rank has its own RNG
    start_step = 0
    ckpt_dir = out / "checkpoints"
    resume = latest_checkpoint(ckpt_dir)
    if resume is not None:
        state = load_checkpoint(resume)
        _load_trainable(model, model, state["trainable"])
        _load_optimizer(model, optimizer, state["optimizer"], sharded)
        schedule.load_state_dict(state["scheduler"])
        if sft_sampler is not None and state["sampler"]:
            sft_sampler.load_state_dict(state["sampler"])
        if state["rng"] is not None:
            restore_rank_rng(state["rng"], info.rank)
        start_step = state["step"]
        # The reference DiT stays the initial (init_from) policy: it was copied before the resumed weights loaded.
        logger.warning("resuming from %s (step %d)", resume, start_step)
    metrics = MetricsLogger(out, enabled=info.is_main, resume_step=start_step,
                            tensorboard=cfg.trainer.tensorboard, total_steps=total_steps)
    if info.is_main:
        import yaml

        out.mkdir(parents=True, exist_ok=True)
        (out / "config.yaml").write_text(yaml.safe_dump(cfg.to_dict(), sort_keys=False))
    sft_plans = iter(sft_sampler) if sft_sampler is not None else None

    gather = (lambda t: all_gather_cat(t, info)) if rl.global_normalisation else None

    def optimizer_step(norms: list[float]) -> None:
        """Average the gradients over ranks, clip, one AdamW step; records the pre-clip gradient norm."""
        if not sharded:  # FSDP2's reduce-scatter has already averaged them
            _sync_gradients(trainable, info)
        norms.append(float(torch.nn.utils.clip_grad_norm_(trainable, cfg.optim.grad_clip)))
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    last_loss, last_ckpt = None, None
    for step in range(start_step, total_steps):
        started = time.perf_counter()
        # 2. Prompts and the frozen condition (computed once per step).
        drawn = prompts.draw(rl.prompts_per_step, cfg.trainer.seed, step, info.rank)
        texts = [d["text"] for d in drawn]
        sources = _edit_images(drawn)  # None without edit prompts, else one entry (None or an image) per prompt
        generator = torch.Generator().manual_seed(rollout_seed(cfg.trainer.seed, step, info.rank))
        with torch.no_grad(), autocast():
            condition = model.encode_condition(texts, sources).repeat_interleave(rl.group_size)
            negative = None
            if rl.guidance_scale != 1.0:  # the negative of an edit keeps its image, as in the pipeline
                negative = model.encode_condition([""] * len(texts), sources).repeat_interleave(rl.group_size)
            references = _reference_rows(model, sources, rl.group_size, generator)
        # 3. Rollouts (no gradient), seeded by (seed, step, rank).
        with autocast():
            trajectory = rollout(
                model, condition, height=height, width=width, num_steps=rl.num_steps, group_size=rl.group_size,
                eta=rl.eta, sampler=rl.sampler, logprob=rl.logprob, noise_level=rl.noise_level,
                same_noise_in_group=rl.same_noise_in_group, generator=generator, micro_batch=rl.micro_batch,
                negative_condition=negative, guidance_scale=rl.guidance_scale, reference_latents=references,
            )
        # 4. Rewards: every reward on every image.
        count = condition.context.shape[0]
        chunks = [slice(s, s + rl.micro_batch) for s in range(0, count, rl.micro_batch)]
        with torch.no_grad(), autocast():
            images = [im for rows in chunks
                      for im in pixels_to_pil(model.decode_latents(trajectory.final[rows].to(model.dtype)).float())]
        image_prompts = [d.get("reward_prompt", d["text"]) for d in drawn for _ in range(rl.group_size)]
        image_categories = [d["category"] for d in drawn for _ in range(rl.group_size)]
        scores = torch.stack([rewards[name].score(images, image_prompts).float().cpu() for name in reward_names], dim=1)
        weights = reward_weights(categories, image_categories, reward_names)
        # 5. Advantages (GDPO: batch normalisation over every rank's images).
        if rl.advantages == "gdpo":
            advantages = gdpo_advantages(scores, weights, rl.group_size, rl.adv_eps, rl.adv_clip, gather)
        else:
            advantages = grpo_advantages(scores, weights, rl.group_size, rl.adv_eps, rl.adv_clip)
        advantages = advantages.to(device)

        # 6. Policy update on a random subset of timesteps, shared by every image (and rank).
        model.dit.train()
        rng = random.Random(cfg.trainer.seed * 31 + step)
        steps_trained = select_timesteps(rl.num_steps, rl.timestep_fraction, include_last=rl.include_last_step, rng=rng)
        scale = 1.0 / (len(steps_trained) * len(chunks))
        optimizer.zero_grad(set_to_none=True)
        logs = {"policy_loss": 0.0, "kl": 0.0, "ratio_mean": 0.0, "clip_fraction": 0.0}
        grad_norms: list[float] = []  # one entry per optimizer step of this rollout
        lr = optimizer.param_groups[0]["lr"]
        for i in steps_trained:
            for rows in chunks:
                x = trajectory.latents[rows, i].to(device)
                x_next = trajectory.latents[rows, i + 1].to(device)
                cond = condition.select(rows)
                neg = negative.select(rows) if negative is not None else None
                refs = references[rows] if references is not None else None
                with autocast():
                    log_prob, velocity = policy_step_log_prob(
                        model, x, x_next, i, trajectory.sigmas, trajectory.timesteps, cond,
                        eta=rl.eta, sampler=rl.sampler, logprob=rl.logprob, noise_level=rl.noise_level,
                        negative_condition=neg, guidance_scale=rl.guidance_scale, reference_latents=refs,
                    )
                    with torch.no_grad():
                        t = trajectory.timesteps[i].expand(x.shape[0]).to(model.dtype)
                        ref_velocity = _reference_velocity(reference_dit, model, x.to(model.dtype), t, cond, neg,
                                                           rl.guidance_scale, refs)
                terms = loss_fn(
                    log_prob, trajectory.log_probs[rows, i].to(device), advantages[rows],
                    velocity=velocity, reference_velocity=ref_velocity, sigma_next=trajectory.sigmas[i + 1],
                )
                (loss_fn.combine(terms["loss"], None) * scale).backward()
                for key in logs:
                    logs[key] += float(terms[key].detach()) * scale
            if rl.update_mode == "per_timestep":
                optimizer_step(grad_norms)
        # 7. SFT auxiliary loss: lambda * flow-matching loss on an image-caption batch.
        sft_loss = None
        if sft_plans is not None:
            batch, plan = _next_batch(sft_plans, sft_sources)
            prepared = prepare_batch(model, batch, plan, cfg.trainer.seed)
            with autocast():
                sft = model.flow_matching_loss(prepared, condition_dropout=0.0).loss
            (rl.sft_lambda * sft).backward()
            sft_loss = float(sft.detach())
        # per_rollout: the one step of this rollout; per_timestep: the official extra step for the SFT gradient.
        if rl.update_mode == "per_rollout" or sft_loss is not None:
            optimizer_step(grad_norms)
        schedule.step()
        model.dit.eval()

        # 8. Logs and checkpoints.
        reward_means = all_reduce_mean(scores.mean(0).to(device), info).cpu()
        weighted = all_reduce_mean((scores * weights).sum(1).mean().to(device), info)
        record = {
            "step": step + 1,
            "loss": (1 - rl.sft_lambda) * (logs["policy_loss"] + rl.kl_beta * logs["kl"])
            + (rl.sft_lambda * sft_loss if sft_loss is not None else 0.0),
            "lr": lr,
            "grad_norm": sum(grad_norms) / max(1, len(grad_norms)),
            "reward": float(weighted),
            **{f"reward/{name}": float(reward_means[k]) for k, name in enumerate(reward_names)},
            **logs,
            "sft_loss": sft_loss,
            "advantage_abs_mean": float(advantages.abs().mean()),
            "optimizer_updates": len(grad_norms),
            "timesteps": steps_trained,
            "seconds": time.perf_counter() - started,
        }
        last_loss = record["loss"]
        metrics.log(record)
        if not math.isfinite(record["loss"]):
            raise FloatingPointError(f"loss became non-finite at step {step + 1}")
        if (step + 1) % cfg.trainer.checkpoint_every == 0 or step + 1 == total_steps:
            weights = _full_state(model, model)  # collectives under FSDP: every rank takes part
            optimizer_state = _optimizer_state(model, optimizer, sharded)
            rng_states = gather_to_main(capture_rng(), info)
            if info.is_main:
                last_ckpt = save_checkpoint(
                    ckpt_dir, step + 1,
                    trainable=weights,
                    optimizer_state=optimizer_state,
                    scheduler_state=schedule.state_dict(),
                    sampler_state=sft_sampler.state_dict() if sft_sampler is not None else None,
                    extra={"stage": "rl", "model": cfg.to_dict()["model"]},
                    keep_last=cfg.trainer.keep_last,
                    rng_states=rng_states,
                )
            barrier(info)
    metrics.close()
    pipeline_dir = None
    if cfg.trainer.save_pipeline and total_steps > start_step:
        from deepgen_components.training.trainer import save_training_pipeline

        def fresh_model() -> DeepGenModel:  # the layout of the policy: the base model, with the stage-2 LoRA if any
            fresh = build_model(cfg.model)
            if cfg.lora is not None:
                apply_lora(fresh, cfg.lora)
            return fresh

        whole = _unsharded_model(model, info, fresh_model) if sharded else model
        if info.is_main:
            pipeline_dir = save_training_pipeline(whole, out / "pipeline")
    barrier(info)
    cleanup(info)
    return RLResult(out=out, steps=total_steps, final_loss=last_loss, checkpoint=last_ckpt, pipeline=pipeline_dir)
