"""Stages 1 (``align``) and 2 (``sft``): the flow-matching recipe, from one CPU process to torchrun + DDP/FSDP2.

Read top to bottom: build the model and choose what trains -> data sources and the task-homogeneous sampler
-> optimizer and LR schedule -> resume from the newest checkpoint -> the loop (gradient accumulation over
micro-batches, clip, step) with metrics and atomic checkpoints -> save the final pipeline.

Randomness that shapes a sample (caption dropout, VAE posterior sample, noise, timestep) is drawn from a
generator seeded by (seed, micro-batch position, sample position in the source stream), so a run gives the
same numbers with any number of processes and after any resume. Only the LoRA dropout masks come from the global
torch RNG: under torchrun each rank has its own stream (seeded by (seed, rank)), and checkpoints save and restore
every rank's own states.
"""

from __future__ import annotations

import math
import time
import zlib
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from deepgen_components.training.batches import BatchStream
from deepgen_components.training.config import TrainConfig
from deepgen_components.training.distributed import (
    all_reduce_mean,
    apply_fsdp,
    barrier,
    cleanup,
    init_distributed,
    seed_rank_rng,
    wrap_ddp,
)
from deepgen_components.training.ema import EMA
from deepgen_components.training.evaluate_during import TrainingEvaluation
from deepgen_components.training.memory import cast_frozen, measure_state, plan_memory, resolve_frozen_dtype
from deepgen_components.training.optim import build_optimizer, build_schedule
from deepgen_components.training.run import (
    autocast,
    open_logs,
    resume,
    save_final_pipeline,
    write_checkpoint,
)
from deepgen_components.training.sampler import MicroBatchPlan
from deepgen_components.training.stage_model import build_model, configure_stage, load_init_weights
from deepgen_components.training.teacher import build_teacher
from torch import nn

from deepgen_components.model import DeepGenModel

__all__ = ["FlowMatchingObjective", "TrainResult", "dry_run", "prepare_batch", "sample_seed", "train"]


@dataclass
class TrainResult:
    out: Path
    steps: int
    final_loss: float | None
    checkpoint: Path | None
    pipeline: Path | None


def sample_seed(seed: int, position: int, stream_position: int, source: str) -> int:
    """A per-sample seed that depends on the run seed, the micro-batch and the sample, not on the world size."""
    return (seed * 1_000_003 + position * 7_919 + stream_position * 104_729 + zlib.crc32(source.encode())) % (2**63)


class FlowMatchingObjective(nn.Module):
    """What DDP / FSDP wrap: ``forward(batch) -> loss`` (batch already holds latents, noise, timesteps).

    ``flow_weight`` scales DeepGen's flow-matching loss; at 0 the DiT is not run at all and the loss is the
    feature teacher's alone over the whole context (``batch["feature_teacher"]``, ``feature_loss(whole=True)``:
    the bridge's context and pooled vector against the base prompt encoder's), a stage-1 alignment that costs
    the VLM and the bridge only."""

    def __init__(self, model: DeepGenModel, flow_weight: float = 1.0) -> None:
        super().__init__()
        self.model = model
        self.flow_weight = flow_weight

    def forward(self, batch: dict) -> torch.Tensor:
        teacher = batch.get("feature_teacher")
        if self.flow_weight == 0:
            if teacher is None:
                raise ValueError("flow_weight 0 needs batch['feature_teacher'] (teacher.features > 0)")
            references = batch.get("reference_pixels")
            editing = references is not None and any(len(r or []) for r in references)
            prompt_batch = self.model.prepare_prompts(batch["prompts"], references if editing else None)
            condition, _ = self.model.encode_tokens(prompt_batch)
            features = teacher.feature_loss(condition, prompt_batch.input_ids, batch["prompts"], whole=True)
            return teacher.feature_weight * features
        out = self.model.flow_matching_loss(batch, condition_dropout=0.0)
        loss = self.flow_weight * out.loss
        if teacher is not None:
            features = teacher.feature_loss(out.condition, out.input_ids, batch["prompts"])
            return loss + teacher.feature_weight * features
        return loss


@torch.no_grad()
def prepare_batch(model: DeepGenModel, batch: dict, plan: MicroBatchPlan, seed: int, teacher=None,
                  with_latents: bool = True) -> dict:
    """Draw every random quantity of a micro-batch from per-sample generators; encode images with the VAE.

    ``with_latents=False`` (an objective that runs no DiT): only the prompts (caption dropout, the first draw of
    each sample's generator either way) and the reference pixels, no VAE pass."""
    device = model.device
    references = batch.get("reference_pixels")
    dropout = model.config.condition_dropout if batch["task"] == "t2i" else 0.0
    gens, prompts = [], []
    for j, prompt in enumerate(batch["prompts"]):
        gen = torch.Generator().manual_seed(sample_seed(seed, plan.position, plan.global_offset + j, plan.source))
        prompts.append("" if bool(torch.rand((), generator=gen) < dropout) else prompt)
        gens.append(gen)
    if not with_latents:
        out = {"prompts": prompts}
        if references is not None:
            out["reference_pixels"] = [[r.to(device) for r in refs] for refs in references]
        if teacher is not None and teacher.feature_weight > 0:
            out["feature_teacher"] = teacher
        return out
    latents, noise, u, ref_latents = [], [], [], []
    pixels = batch["pixels"]
    # One batched VAE pass over every image of the micro-batch (targets and references); each sample then draws
    # from its own generator in a fixed order, so what a sample gets does not depend on the batch around it.
    count = len(batch["prompts"])
    posteriors = model.encode_posteriors([pixels[j] for j in range(count)]
                                         + [r for refs in (references or []) for r in refs])
    targets, reference_posteriors = posteriors[:count], iter(posteriors[count:])
    for j, gen in enumerate(gens):
        u.append(torch.rand((), generator=gen))
        x = model.sample_posterior(targets[j], gen)
        latents.append(x)
        noise.append(torch.randn(x.shape, generator=gen).to(device, x.dtype))
        if references is not None:
            ref_latents.append([model.sample_posterior(next(reference_posteriors), gen) for _ in references[j]])
    same = len({tuple(x.shape) for x in latents}) == 1
    out = {
        "prompts": prompts,
        "latents": torch.stack(latents) if same else latents,
        "noise": torch.stack(noise) if same else noise,
        "u": torch.stack(u),
    }
    if batch.get("loss_weight") is not None:  # pixel-space weights -> the latent grid (mean over each cell)
        out["loss_weight"] = F.avg_pool2d(batch["loss_weight"].float(), model.vae_scale_factor).to(device)
    if references is not None:
        out["reference_pixels"] = [[r.to(device) for r in refs] for refs in references]
        out["reference_latents"] = ref_latents
    if teacher is not None and teacher.target:  # its velocity is the target
        out["teacher"] = teacher
    if teacher is not None and teacher.feature_weight > 0:  # + its feature loss on the bridge's output
        out["feature_teacher"] = teacher
    return out


def _enable_activation_checkpointing(model: DeepGenModel) -> None:
    model.dit.transformer.enable_gradient_checkpointing()
    model.bridge.connector.gradient_checkpointing = True
    vlm = model.encoder.vlm
    if hasattr(vlm, "gradient_checkpointing_enable"):
        vlm.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})


def _count(params) -> int:
    return sum(p.numel() for p in params)


def dry_run(cfg: TrainConfig, world_size: int = 1) -> dict:
    """Parameter counts (total / trainable per component) and the persistent memory per GPU, without data.

    The plan is :func:`~deepgen_components.training.memory.plan_memory` on the stage's model: frozen weights in the
    dtype the run keeps them in (``model.frozen_dtype``, resolved for ``trainer.device`` — a GPU unless it says
    cpu — and ``trainer.precision``), trainable weights and gradients in fp32, the two AdamW moments, the EMA
    shadow when ``trainer.ema`` is on, stage 3's frozen reference DiT; with FSDP all but the VAE (and the reference)
    divided by ``world_size``. Activations and a
    teacher model are not included. A run writes what it measured against this plan to ``memory.json``.
    """
    spec = cfg.model
    if spec.preset == "deepgen-1.0" or spec.vlm or spec.weights or spec.transformer:
        from deepgen_components.builders import deepgen_1_0

        model = deepgen_1_0(device="meta")  # DeepGen 1.0 shapes, no memory, no files read
    else:
        model = build_model(spec)
    configure_stage(model, cfg.stage, cfg.lora)
    parts = {"vlm": model.encoder.vlm, "think_tokens": model.think_tokens, "bridge": model.bridge,
             "dit": model.dit, "vae": model.vae}
    counts = {name: {"total": _count(m.parameters()), "trainable": _count(p for p in m.parameters() if p.requires_grad)}
              for name, m in parts.items()}
    trainable = sum(c["trainable"] for c in counts.values())
    frozen = sum(c["total"] for c in counts.values()) - trainable
    world = max(1, world_size) if cfg.trainer.distributed == "fsdp" else 1
    device_type = "cpu" if cfg.trainer.device == "cpu" else "cuda"
    frozen_dtype = resolve_frozen_dtype(cfg.model.frozen_dtype, cfg.trainer.precision, device_type)
    estimate = plan_memory(model, frozen_dtype=frozen_dtype, world=world, ema=cfg.trainer.ema is not None,
                           unsharded=model.vae)
    if cfg.stage == "rl":  # stage 3 also keeps a frozen copy of the initial DiT (the KL reference), not sharded
        reference = counts["dit"]["total"] * frozen_dtype.itemsize / 1024**3
        total = estimate.pop("total_without_activations_gib")
        estimate["reference_dit_gib"] = reference
        estimate["total_without_activations_gib"] = total + reference
    return {"stage": cfg.stage, "parameters": counts, "trainable": trainable, "frozen": frozen,
            "frozen_dtype": str(frozen_dtype).removeprefix("torch."), "memory_per_gpu": estimate,
            "sharded_over": world}


def _write_memory_record(out: Path, cfg: TrainConfig, model: DeepGenModel, objective: nn.Module, optimizer, ema,
                         *, device: torch.device, world: int) -> None:
    """``out/memory.json``: the persistent bytes this process holds after its first optimizer step, measured, next
    to the plan ``--dry-run`` prints for the same config (the frozen dtype resolved for this run's device)."""
    import json

    frozen_dtype = resolve_frozen_dtype(cfg.model.frozen_dtype, cfg.trainer.precision, device.type)
    record = {
        "device": str(device),
        "frozen_dtype": str(frozen_dtype).removeprefix("torch."),
        "measured_gib": measure_state(objective, optimizer, ema),
        "planned_gib": plan_memory(model, frozen_dtype=frozen_dtype, world=world, ema=ema is not None,
                                   unsharded=model.vae),
        "note": "persistent state only (weights, gradients, AdamW moments, EMA); activations are not included",
    }
    out.mkdir(parents=True, exist_ok=True)
    (out / "memory.json").write_text(json.dumps(record, indent=2) + "\n")


def train(cfg: TrainConfig, *, out: str | Path | None = None, max_steps: int | None = None) -> TrainResult:
    """Run stage 1 or 2 as configured; resumes from the newest checkpoint in ``out`` if there is one."""
    if cfg.stage not in ("align", "sft"):
        raise ValueError("train() runs stages 'align' and 'sft'; for 'rl' use deepgen_components.training.rl")
    out = Path(out or cfg.out)
    total_steps = max_steps if max_steps is not None else cfg.trainer.max_steps
    info = init_distributed(cfg.trainer.device)
    device = info.device
    torch.manual_seed(cfg.trainer.seed)

    # 1. Model and what trains.
    model = build_model(cfg.model, device=device)
    configure_stage(model, cfg.stage, cfg.lora)
    if cfg.model.init_from:
        load_init_weights(model, cfg.model.init_from)
    cast_frozen(model, resolve_frozen_dtype(cfg.model.frozen_dtype, cfg.trainer.precision, device.type))
    if cfg.trainer.activation_checkpointing:
        _enable_activation_checkpointing(model)
    model.train()
    model.vae.eval()
    params = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    teacher = build_teacher(cfg.teacher, device) if cfg.teacher is not None else None  # frozen, its own copy

    objective: nn.Module = FlowMatchingObjective(model, cfg.model.flow_weight)
    mode = cfg.trainer.distributed
    if mode == "auto":
        mode = "ddp" if info.enabled else "none"
    sharded = mode == "fsdp" and info.enabled
    if mode == "ddp" and info.enabled:
        objective = wrap_ddp(objective, info)
    elif sharded:
        units = list(model.dit.transformer.transformer_blocks) + list(model.bridge.connector.layers)
        objective = apply_fsdp(objective, units, info, ignored=[model.vae])
        params = [(n, p) for n, p in objective.named_parameters() if p.requires_grad]
    elif mode not in ("none", "ddp", "fsdp"):
        raise ValueError(f"trainer.distributed must be auto, none, ddp or fsdp, got {mode!r}")
    # fp32 average of the trainable weights (under FSDP each rank its shard); the in-training evaluation.
    ema = EMA(model, cfg.trainer.ema) if cfg.trainer.ema is not None else None
    evaluation = TrainingEvaluation(cfg, out, info, sharded=sharded)

    # 2. Data: the sources in their task cycle (streaming ones read by data.num_workers workers).
    data = BatchStream.from_config(cfg, rank=info.rank, world_size=info.world_size)

    # 3. Optimizer and schedule.
    optimizer = build_optimizer(params, cfg.optim)
    schedule = build_schedule(optimizer, cfg.optim, total_steps)
    seed_rank_rng(cfg.trainer.seed, info)  # everything is built: from here on each rank has its own RNG

    # 4. Resume.
    run_state = dict(module=objective, model=model, optimizer=optimizer, schedule=schedule, sampler=data,
                     sharded=sharded, info=info, ema=ema)
    start_step = resume(out, **run_state)
    metrics = open_logs(out, cfg, info, start_step=start_step, total_steps=total_steps, runs=("ema", "eval"))

    # 5. The loop.
    accum = cfg.optim.grad_accum
    last_loss, last_ckpt = None, None
    for step in range(start_step, total_steps):
        started = time.perf_counter()
        optimizer.zero_grad(set_to_none=True)
        losses, samples = [], 0
        for micro in range(accum):
            batch, plan = next(data)
            prepared = prepare_batch(model, batch, plan, cfg.trainer.seed, teacher,
                                     with_latents=cfg.model.flow_weight > 0)
            sync = nullcontext()
            if micro < accum - 1 and hasattr(objective, "no_sync"):
                sync = objective.no_sync()
            with sync, autocast(cfg, device):
                loss = objective(prepared)
            (loss / accum).backward()
            losses.append(loss.detach().float())
            samples += len(batch["prompts"])
        grad_norm = torch.nn.utils.clip_grad_norm_([p for _, p in params], cfg.optim.grad_clip)
        lr = optimizer.param_groups[0]["lr"]
        optimizer.step()
        schedule.step()
        if ema is not None:
            ema.update(step + 1)
        if step == start_step and info.is_main:
            _write_memory_record(out, cfg, model, objective, optimizer, ema, device=device,
                                 world=info.world_size if sharded else 1)
        step_loss = all_reduce_mean(torch.stack(losses).mean(), info).item()
        last_loss = step_loss
        elapsed = time.perf_counter() - started
        metrics.log({
            "step": step + 1,
            "loss": step_loss,
            "lr": lr,
            "grad_norm": float(grad_norm),
            "samples_per_s": samples * info.world_size / elapsed,
            "task": batch["task"] if accum == 1 else "mixed",
        })
        if not math.isfinite(step_loss):
            raise FloatingPointError(f"loss became non-finite at step {step + 1}")
        done = step + 1 == total_steps
        if evaluation.due(step + 1, total_steps):
            evaluation(model, step + 1, metrics, ema, precision=lambda: autocast(cfg, device))
        if (step + 1) % cfg.trainer.checkpoint_every == 0 or done:
            data.gather_state(info)  # every rank's stream position into the main process's checkpoint
            extra = {"stage": cfg.stage, "model": cfg.to_dict()["model"], "lora": cfg.to_dict()["lora"]}
            last_ckpt = write_checkpoint(out, step + 1, **run_state, extra=extra, keep_last=cfg.trainer.keep_last)
    metrics.close()
    data.close()

    pipeline_dir = None
    if cfg.trainer.save_pipeline and total_steps > start_step:
        def fresh_model() -> DeepGenModel:
            fresh = build_model(cfg.model)
            configure_stage(fresh, cfg.stage, cfg.lora)
            return fresh

        if not sharded:  # one dtype in the saved pipeline (frozen parts may be bf16; FSDP gathers into a fresh fp32 model)
            cast_frozen(model, torch.float32)
        pipeline_dir = save_final_pipeline(out, module=objective, model=model, sharded=sharded, info=info,
                                           build=fresh_model, ema=ema,
                                           ema_mode=cfg.trainer.ema.save_pipeline if ema is not None else "raw")
    barrier(info)
    cleanup(info)
    return TrainResult(out=out, steps=total_steps, final_loss=last_loss, checkpoint=last_ckpt, pipeline=pipeline_dir)


