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
import math
import random
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from deepgen_components.training.batches import BatchStream
from deepgen_components.training.config import TrainConfig
from deepgen_components.training.distributed import (
    DistInfo,
    all_gather_cat,
    all_reduce_gradients,
    all_reduce_mean,
    apply_fsdp,
    barrier,
    cleanup,
    init_distributed,
    seed_rank_rng,
)
from deepgen_components.training.ema import EMA
from deepgen_components.training.evaluate_during import TrainingEvaluation
from deepgen_components.training.memory import cast_frozen, resolve_frozen_dtype
from deepgen_components.training.optim import build_optimizer, build_schedule
from deepgen_components.training.prompts import PromptPool
from deepgen_components.training.run import autocast, open_logs, resume, save_final_pipeline, write_checkpoint
from deepgen_components.training.stage_model import (
    apply_lora,
    build_model,
    configure_stage,
    load_init_weights,
)
from deepgen_components.training.trainer import prepare_batch

from deepgen_components.bridge import BridgeOutput
from deepgen_components.denoising import guidance
from deepgen_components.lora import lora_module_names
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
    for pixels in model.reference_pixels(images):
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
        v = guidance(velocity(latents, timestep, negative), v, guidance_scale)
    return v


def _check(cfg: TrainConfig) -> None:
    if cfg.stage != "rl" or cfg.rl is None:
        raise ValueError("train_rl needs stage: rl and an rl: section")
    rl = cfg.rl
    if rl.update_mode not in ("per_rollout", "per_timestep"):
        raise ValueError(f"rl.update_mode must be 'per_rollout' or 'per_timestep', got {rl.update_mode!r}")
    if rl.advantages not in ("gdpo", "grpo"):
        raise ValueError(f"rl.advantages must be 'gdpo' or 'grpo', got {rl.advantages!r}")
    if cfg.trainer.distributed not in ("auto", "none", "ddp", "fsdp"):
        raise ValueError(f"rl: trainer.distributed must be auto, none, ddp or fsdp, got {cfg.trainer.distributed!r}")


@dataclass
class _Rollouts:
    """One step's prompts, their frozen condition, the rollouts and what the rewards made of them."""

    drawn: list[dict]
    condition: BridgeOutput
    negative: BridgeOutput | None
    references: list | None  # per rollout row, its reference latents (edit prompts); None without edits
    trajectory: object  # rl.grpo.Trajectory
    chunks: list[slice]  # micro-batches of rollout rows
    scores: torch.Tensor  # (N, R): every reward on every image
    weights: torch.Tensor  # (N, R): the reward weights of each image's category
    advantages: torch.Tensor  # (N,)


class _Stage3:
    """A stage-3 run's parts, built once (top of :func:`train_rl`), and the three things a step does with them:
    roll out and score, update the policy, take the SFT auxiliary loss."""

    def __init__(self, cfg: TrainConfig, info: DistInfo, total_steps: int) -> None:
        rl, device = cfg.rl, info.device
        self.cfg, self.rl, self.info, self.device = cfg, rl, info, device
        # 1. Policy (the DiT trains), frozen reference copy, rewards.
        model = build_model(cfg.model, device=device)
        if cfg.lora is not None and not lora_module_names(model.encoder.vlm):
            apply_lora(model, cfg.lora)  # the stage-2 LoRA of an init_from checkpoint loads into it; frozen here
        if cfg.model.init_from:
            load_init_weights(model, cfg.model.init_from)
        configure_stage(model, "rl")
        model.eval()  # no dropout anywhere: rollouts and updates must see the same function
        # The reference DiT stays the initial (init_from) policy: it is copied before a resumed run's weights load.
        self.reference_dit = copy.deepcopy(model.dit).requires_grad_(False).eval()
        # Frozen weights (VLM, VAE, the reference DiT) in the compute dtype (model.frozen_dtype); the policy fp32.
        frozen_dtype = resolve_frozen_dtype(cfg.model.frozen_dtype, cfg.trainer.precision, device.type)
        cast_frozen(model, frozen_dtype)
        cast_frozen(self.reference_dit, frozen_dtype)
        if cfg.trainer.activation_checkpointing:
            model.dit.transformer.enable_gradient_checkpointing()  # recomputation is exact: ratios stay 1 on-policy
        self.sharded = cfg.trainer.distributed == "fsdp" and info.enabled
        if self.sharded:  # after the reference copy; the policy's parameters become DTensor shards
            apply_fsdp(model.dit, list(model.dit.transformer.transformer_blocks), info)
        self.model = model
        params = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
        self.trainable = [p for _, p in params]
        self.rewards = {name: build_reward(spec, argument=f"rl.rewards.{name}") for name, spec in rl.rewards.items()}
        if not self.rewards:
            raise ValueError("rl.rewards: configure at least one reward")
        self.reward_names = list(self.rewards)
        self.categories = rl.categories or {"general": {name: 1.0 for name in self.reward_names}}
        self.loss_fn = MRGRPOLoss(rl.clip_range, rl.kl_beta, rl.sft_lambda, rl.eta)
        self.prompts = PromptPool(rl, cfg.data.image_size)
        # SFT auxiliary data: the data sources of the config (optional when sft_lambda == 0).
        # (streaming sources are read by data.num_workers workers; see training.batches.BatchStream)
        self.sft_stream = None
        if cfg.data.sources and rl.sft_lambda > 0:
            self.sft_stream = BatchStream.from_config(cfg, rank=info.rank, world_size=info.world_size,
                                                      batch_size=rl.sft_batch_size)
        self.ema = EMA(model, cfg.trainer.ema) if cfg.trainer.ema is not None else None
        self.optimizer = build_optimizer(params, cfg.optim)
        self.schedule = build_schedule(self.optimizer, cfg.optim, total_steps)
        seed_rank_rng(cfg.trainer.seed, info)  # everything is built: from here on each rank has its own RNG
        self.gather = (lambda t: all_gather_cat(t, info)) if rl.global_normalisation else None

    @property
    def state(self) -> dict:
        """What a checkpoint saves and a resume restores."""
        return dict(module=self.model, model=self.model, optimizer=self.optimizer, schedule=self.schedule,
                    sampler=self.sft_stream, sharded=self.sharded, info=self.info, ema=self.ema)

    def autocast(self):
        return autocast(self.cfg, self.device)  # bf16 on CUDA with precision auto, fp32 on CPU

    def rollout_and_score(self, step: int) -> _Rollouts:
        """2. Prompts and the frozen condition (once per step) -> 3. rollouts (no gradient), seeded by (seed, step,
        rank) -> 4. every reward on every image -> 5. advantages (GDPO: normalised over every rank's images)."""
        rl, model, cfg = self.rl, self.model, self.cfg
        drawn = self.prompts.draw(rl.prompts_per_step, cfg.trainer.seed, step, self.info.rank)
        texts = [d["text"] for d in drawn]
        sources = _edit_images(drawn)  # None without edit prompts, else one entry (None or an image) per prompt
        generator = torch.Generator().manual_seed(rollout_seed(cfg.trainer.seed, step, self.info.rank))
        with torch.no_grad(), self.autocast():
            condition = model.encode_condition(texts, sources).repeat_interleave(rl.group_size)
            negative = None
            if rl.guidance_scale != 1.0:  # the negative of an edit keeps its image, as in the pipeline
                negative = model.encode_condition([""] * len(texts), sources).repeat_interleave(rl.group_size)
            references = _reference_rows(model, sources, rl.group_size, generator)
        with self.autocast():
            size = cfg.data.image_size
            trajectory = rollout(
                model, condition, height=size, width=size, num_steps=rl.num_steps, group_size=rl.group_size,
                eta=rl.eta, sampler=rl.sampler, logprob=rl.logprob, noise_level=rl.noise_level,
                same_noise_in_group=rl.same_noise_in_group, generator=generator, micro_batch=rl.micro_batch,
                negative_condition=negative, guidance_scale=rl.guidance_scale, reference_latents=references,
            )
        count = condition.context.shape[0]
        chunks = [slice(s, s + rl.micro_batch) for s in range(0, count, rl.micro_batch)]
        with torch.no_grad(), self.autocast():
            images = [im for rows in chunks
                      for im in pixels_to_pil(model.decode_latents(trajectory.final[rows].to(model.dtype)).float())]
        image_prompts = [d.get("reward_prompt", d["text"]) for d in drawn for _ in range(rl.group_size)]
        image_categories = [d["category"] for d in drawn for _ in range(rl.group_size)]
        scores = torch.stack([self.rewards[name].score(images, image_prompts).float().cpu()
                              for name in self.reward_names], dim=1)
        weights = reward_weights(self.categories, image_categories, self.reward_names)
        if rl.advantages == "gdpo":
            advantages = gdpo_advantages(scores, weights, rl.group_size, rl.adv_eps, rl.adv_clip, self.gather)
        else:
            advantages = grpo_advantages(scores, weights, rl.group_size, rl.adv_eps, rl.adv_clip)
        return _Rollouts(drawn, condition, negative, references, trajectory, chunks, scores, weights,
                         advantages.to(self.device))

    def optimizer_step(self, norms: list[float]) -> None:
        """Average the gradients over ranks, clip, one AdamW step; records the pre-clip gradient norm."""
        # Under DDP the DiT runs unwrapped (a rollout, its re-evaluated timesteps and the SFT batch are not one
        # forward), so the gradients are averaged here, in bounded buckets; FSDP2's reduce-scatter already did.
        if not self.sharded:
            all_reduce_gradients(self.trainable, self.info)
        norms.append(float(torch.nn.utils.clip_grad_norm_(self.trainable, self.cfg.optim.grad_clip)))
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)

    def update_policy(self, step: int, r: _Rollouts, grad_norms: list[float]) -> tuple[dict, list[int]]:
        """6. The clipped-ratio loss + KL to the reference DiT on a random subset of timesteps, shared by every image
        (and rank); ``per_timestep``: one optimizer step after each. Returns the logged terms and the timesteps."""
        rl, model, device, trajectory = self.rl, self.model, self.device, r.trajectory
        rng = random.Random(self.cfg.trainer.seed * 31 + step)
        steps_trained = select_timesteps(rl.num_steps, rl.timestep_fraction, include_last=rl.include_last_step, rng=rng)
        scale = 1.0 / (len(steps_trained) * len(r.chunks))
        self.optimizer.zero_grad(set_to_none=True)
        logs = {"policy_loss": 0.0, "kl": 0.0, "ratio_mean": 0.0, "clip_fraction": 0.0}
        for i in steps_trained:
            for rows in r.chunks:
                x = trajectory.latents[rows, i].to(device)
                x_next = trajectory.latents[rows, i + 1].to(device)
                cond = r.condition.select(rows)
                neg = r.negative.select(rows) if r.negative is not None else None
                refs = r.references[rows] if r.references is not None else None
                with self.autocast():
                    log_prob, velocity = policy_step_log_prob(
                        model, x, x_next, i, trajectory.sigmas, trajectory.timesteps, cond,
                        eta=rl.eta, sampler=rl.sampler, logprob=rl.logprob, noise_level=rl.noise_level,
                        negative_condition=neg, guidance_scale=rl.guidance_scale, reference_latents=refs,
                    )
                    with torch.no_grad():
                        t = trajectory.timesteps[i].expand(x.shape[0]).to(model.dtype)
                        ref_velocity = _reference_velocity(self.reference_dit, model, x.to(model.dtype), t, cond, neg,
                                                           rl.guidance_scale, refs)
                terms = self.loss_fn(
                    log_prob, trajectory.log_probs[rows, i].to(device), r.advantages[rows],
                    velocity=velocity, reference_velocity=ref_velocity, sigma_next=trajectory.sigmas[i + 1],
                )
                (self.loss_fn.combine(terms["loss"], None) * scale).backward()
                for key in logs:
                    logs[key] += float(terms[key].detach()) * scale
            if rl.update_mode == "per_timestep":
                self.optimizer_step(grad_norms)
        return logs, steps_trained

    def sft_loss(self) -> float | None:
        """7. The SFT auxiliary loss, lambda * flow-matching loss on an image-caption batch (its gradient only)."""
        if self.sft_stream is None:
            return None
        batch, plan = next(self.sft_stream)
        prepared = prepare_batch(self.model, batch, plan, self.cfg.trainer.seed)
        with self.autocast():
            sft = self.model.flow_matching_loss(prepared, condition_dropout=0.0).loss
        (self.rl.sft_lambda * sft).backward()
        return float(sft.detach())

    def step(self, step: int) -> dict:
        """One iteration (2-7 of the module docstring); returns its metrics record (without ``seconds``)."""
        rl, info, device = self.rl, self.info, self.device
        r = self.rollout_and_score(step)
        self.model.dit.train()
        grad_norms: list[float] = []  # one entry per optimizer step of this rollout
        lr = self.optimizer.param_groups[0]["lr"]
        logs, steps_trained = self.update_policy(step, r, grad_norms)
        sft_loss = self.sft_loss()
        # per_rollout: the one step of this rollout; per_timestep: the official extra step for the SFT gradient.
        if rl.update_mode == "per_rollout" or sft_loss is not None:
            self.optimizer_step(grad_norms)
        self.schedule.step()
        self.model.dit.eval()
        reward_means = all_reduce_mean(r.scores.mean(0).to(device), info).cpu()
        weighted = all_reduce_mean((r.scores * r.weights).sum(1).mean().to(device), info)
        return {
            "step": step + 1,
            "loss": (1 - rl.sft_lambda) * (logs["policy_loss"] + rl.kl_beta * logs["kl"])
            + (rl.sft_lambda * sft_loss if sft_loss is not None else 0.0),
            "lr": lr,
            "grad_norm": sum(grad_norms) / max(1, len(grad_norms)),
            "reward": float(weighted),
            **{f"reward/{name}": float(reward_means[k]) for k, name in enumerate(self.reward_names)},
            **logs,
            "sft_loss": sft_loss,
            "advantage_abs_mean": float(r.advantages.abs().mean()),
            "optimizer_updates": len(grad_norms),
            "timesteps": steps_trained,
        }

    def fresh_model(self) -> DeepGenModel:
        """The layout of the policy, for gathering FSDP shards: the base model, with the stage-2 LoRA if any."""
        fresh = build_model(self.cfg.model)
        if self.cfg.lora is not None:
            apply_lora(fresh, self.cfg.lora)
        return fresh


def train_rl(cfg: TrainConfig, *, out: str | Path | None = None, max_steps: int | None = None) -> RLResult:
    """Run MR-GRPO as configured; resumes from the newest checkpoint in ``out``."""
    _check(cfg)
    out = Path(out or cfg.out)
    total_steps = max_steps if max_steps is not None else cfg.trainer.max_steps
    info = init_distributed(cfg.trainer.device)
    torch.manual_seed(cfg.trainer.seed)
    run = _Stage3(cfg, info, total_steps)
    start_step = resume(out, **run.state)
    metrics = open_logs(out, cfg, info, start_step=start_step, total_steps=total_steps, runs=("ema", "eval"))
    evaluation = TrainingEvaluation(cfg, out, info, sharded=run.sharded)

    last_loss, last_ckpt = None, None
    for step in range(start_step, total_steps):
        started = time.perf_counter()
        record = run.step(step)
        if run.ema is not None:
            run.ema.update(step + 1)
        record["seconds"] = time.perf_counter() - started
        last_loss = record["loss"]
        metrics.log(record)
        if not math.isfinite(record["loss"]):
            raise FloatingPointError(f"loss became non-finite at step {step + 1}")
        if evaluation.due(step + 1, total_steps):
            evaluation(run.model, step + 1, metrics, run.ema, precision=run.autocast)
        # 8. Checkpoints (collectives under FSDP: every rank takes part).
        if (step + 1) % cfg.trainer.checkpoint_every == 0 or step + 1 == total_steps:
            if run.sft_stream is not None:
                run.sft_stream.gather_state(info)  # every rank's stream position into the checkpoint
            extra = {"stage": "rl", "model": cfg.to_dict()["model"]}
            last_ckpt = write_checkpoint(out, step + 1, **run.state, extra=extra, keep_last=cfg.trainer.keep_last)
    metrics.close()
    if run.sft_stream is not None:
        run.sft_stream.close()
    pipeline_dir = None
    if cfg.trainer.save_pipeline and total_steps > start_step:
        if not run.sharded:  # one dtype in the saved pipeline (frozen parts may be bf16; FSDP gathers into fp32)
            cast_frozen(run.model, torch.float32)
        pipeline_dir = save_final_pipeline(out, module=run.model, model=run.model, sharded=run.sharded, info=info,
                                           build=run.fresh_model, ema=run.ema,
                                           ema_mode=cfg.trainer.ema.save_pipeline if run.ema is not None else "raw")
    barrier(info)
    cleanup(info)
    return RLResult(out=out, steps=total_steps, final_loss=last_loss, checkpoint=last_ckpt, pipeline=pipeline_dir)
