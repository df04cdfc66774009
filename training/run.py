"""What every stage's run does around its loop: precision, resume from the newest checkpoint, the run folder's
logs (``metrics.jsonl``, ``config.yaml``), atomic checkpoints, and the final pipeline.

A run folder ``out`` holds ``checkpoints/`` (``training.checkpoint``; with ``trainer.ema`` also the average of each
checkpoint, ``training.ema``), ``metrics.jsonl`` (one line per step, plus ``"type": "eval"`` lines of the in-training
evaluation), ``tensorboard/``, ``eval/`` (``training.evaluate_during``), ``config.yaml`` (the resolved config) and, when
the run is done, ``pipeline/`` (a ``DeepGenPipeline`` folder; ``pipeline_ema/`` with ``trainer.ema.save_pipeline:
both``).
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from contextlib import nullcontext
from pathlib import Path

import torch
from deepgen_components.training.checkpoint import (
    SHARDED_FOLDER,
    capture_rng,
    latest_checkpoint,
    load_checkpoint,
    restore_rank_rng,
    save_checkpoint,
    stage_checkpoint,
)
from deepgen_components.training.config import TrainConfig
from deepgen_components.training.distributed import DistInfo, barrier, broadcast_from_main, gather_to_main
from deepgen_components.training.ema import EMA, ema_path, prune_ema_files, swapped, write_state
from deepgen_components.training.metrics import MetricsLogger
from deepgen_components.training.state import (
    full_state,
    load_optimizer,
    load_sharded,
    load_trainable,
    optimizer_state,
    save_sharded,
    unsharded_model,
)
from torch import nn

from deepgen_components.model import DeepGenModel

__all__ = ["autocast", "open_logs", "resume", "save_final_pipeline", "save_training_pipeline", "write_checkpoint"]

logger = logging.getLogger(__name__)


def autocast(cfg: TrainConfig, device: torch.device):
    """``trainer.precision``: bf16 autocast (``bf16``, or ``auto`` on CUDA) or none (fp32)."""
    use_bf16 = cfg.trainer.precision == "bf16" or (cfg.trainer.precision == "auto" and device.type == "cuda")
    if cfg.trainer.precision not in ("auto", "fp32", "bf16"):
        raise ValueError(f"trainer.precision must be auto, fp32 or bf16, got {cfg.trainer.precision!r}")
    return torch.autocast(device.type, dtype=torch.bfloat16) if use_bf16 else nullcontext()


def resume(out: Path, *, module: nn.Module, model: nn.Module, optimizer: torch.optim.Optimizer, schedule,
           sampler, sharded: bool, info: DistInfo, ema: EMA | None = None) -> int:
    """Load the newest complete checkpoint of ``out/checkpoints`` (if any) into the trainable weights of ``model``,
    the optimizer (of the wrapped ``module``), the LR schedule, the ``sampler`` (if there is one and the checkpoint
    saved its position), the ``ema`` average (if any) and this rank's RNG streams; returns the step to continue
    from (0 for a fresh run)."""
    path = latest_checkpoint(out / "checkpoints")
    if path is None:
        return 0
    # An FSDP run reads its own shards of a sharded checkpoint; anything else reads the tensors whole.
    own_shards = sharded and (path / SHARDED_FOLDER / ".metadata").is_file()
    state = load_checkpoint(path, tensors=not own_shards)
    if own_shards:
        has_average = load_sharded(state["sharded"], module=module, model=model, optimizer=optimizer,
                                   average=ema.shadow if ema is not None else None)
    else:
        load_trainable(model, state["trainable"])
        load_optimizer(module, optimizer, state["optimizer"], sharded)
        average, saved_average = state["ema"], ema_path(out / "checkpoints", state["step"])
        if ema is not None and average is None and saved_average.is_file():
            from safetensors.torch import load_file

            average = load_file(str(saved_average))
        has_average = ema is not None and average is not None
        if has_average:
            ema.load_state_dict(average)
    if ema is not None and not has_average:
        # trainer.ema switched on for a run that ran without it: the average starts at the resumed weights
        logger.warning("trainer.ema: %s has no average; it starts from the resumed weights", path)
        with torch.no_grad():
            for name, shadow in ema.shadow.items():
                shadow.copy_(ema.params[name].detach())
    schedule.load_state_dict(state["scheduler"])
    if sampler is not None and state["sampler"]:
        sampler.load_state_dict(state["sampler"])
    if state["rng"] is not None:
        restore_rank_rng(state["rng"], info.rank)  # each rank its own streams (its LoRA dropout masks)
    if info.is_main:
        logger.warning("resuming from %s (step %d)", path, state["step"])
    return state["step"]


def open_logs(out: Path, cfg: TrainConfig, info: DistInfo, *, start_step: int, total_steps: int,
              runs: tuple[str, ...] = ()) -> MetricsLogger:
    """The run's ``metrics.jsonl`` (lines after ``start_step`` dropped), TensorBoard per ``trainer.log_to`` and, on
    the main process, ``config.yaml``. ``runs``: what the calling loop implements of ``ema`` and ``eval``; a
    config asking for another is an error naming its key (instead of being silently ignored)."""
    asked = {"ema": cfg.trainer.ema is not None, "eval": cfg.trainer.eval_every > 0}
    missing = [name for name, on in asked.items() if on and name not in runs]
    if missing:
        keys = {"ema": "trainer.ema", "eval": "trainer.eval_every"}
        raise ValueError(f"{', '.join(keys[m] for m in missing)}: stage {cfg.stage!r} does not run it yet; "
                         "switch it off (trainer.ema=null, trainer.eval_every=0)")
    metrics = MetricsLogger(out, enabled=info.is_main, resume_step=start_step, log_to=cfg.trainer.log_to,
                            total_steps=total_steps)
    if info.is_main:
        import yaml

        out.mkdir(parents=True, exist_ok=True)
        (out / "config.yaml").write_text(yaml.safe_dump(cfg.to_dict(), sort_keys=False))
    return metrics


def write_checkpoint(out: Path, step: int, *, module: nn.Module, model: nn.Module,
                     optimizer: torch.optim.Optimizer, schedule, sampler, sharded: bool, info: DistInfo,
                     extra: dict, keep_last: int, ema: EMA | None = None) -> Path | None:
    """Checkpoint ``step`` into ``out/checkpoints``: the trainable weights, the optimizer state, the schedule, the
    sampler's position (if there is a sampler), every rank's RNG states and the ``ema`` average (written before
    the checkpoint is published). Every rank must call it (a collective). Unsharded: the main process writes
    everything. ``sharded`` (FSDP2): every rank writes its shards of the weights, the optimizer state and the
    average (``training.state.save_sharded``) into the folder's ``dcp/``; nothing is gathered. The main process
    publishes the folder, and gets it (the others None)."""
    checkpoints = out / "checkpoints"
    rng_states = gather_to_main(capture_rng(), info)  # every rank's RNG, written by the main process
    weights = optimizer_saved = staged = None
    if sharded:  # nothing gathered: every rank writes its shards (DCP) into the folder the main process publishes
        staged = broadcast_from_main(stage_checkpoint(checkpoints, step) if info.is_main else None, info)
        save_sharded(staged / SHARDED_FOLDER, module=module, model=model, optimizer=optimizer,
                     average=ema.shadow if ema is not None else None)
    else:
        if ema is not None and info.is_main:  # written before the checkpoint that it belongs to is published
            checkpoints.mkdir(parents=True, exist_ok=True)
            write_state(ema.state_dict(), ema_path(checkpoints, step))
        weights = full_state(model)
        optimizer_saved = optimizer_state(module, optimizer, sharded)
    path = None
    if info.is_main:
        path = save_checkpoint(
            checkpoints, step,
            trainable=weights,
            optimizer_state=optimizer_saved,
            scheduler_state=schedule.state_dict(),
            sampler_state=sampler.state_dict() if sampler is not None else None,
            extra=extra,
            keep_last=keep_last,
            rng_states=rng_states,
            staged=staged,
        )
        prune_ema_files(checkpoints)
    barrier(info)
    return path


def save_training_pipeline(model: DeepGenModel, directory: str | Path) -> Path:
    """Save a trained model as a DeepGenPipeline folder (``save_pretrained`` merges a LoRA into a copy)."""
    from deepgen_components.pipeline import DeepGenPipeline

    DeepGenPipeline(model).save_pretrained(directory)
    return Path(directory)


def save_final_pipeline(out: Path, *, module: nn.Module, model: DeepGenModel, sharded: bool, info: DistInfo,
                        build: Callable[[], DeepGenModel], ema: EMA | None = None, ema_mode: str = "both") -> Path | None:
    """Save the trained model as ``out/pipeline`` (under FSDP gathered into ``build()``, a fresh model of the same
    layout: a collective, every rank calls it); the main process gets the folder, the others None. With an
    ``ema``, ``ema_mode`` (``trainer.ema.save_pipeline``): ``both`` = the raw weights in ``pipeline/`` and the
    average in ``pipeline_ema/``; ``ema`` = the average in ``pipeline/``; ``raw`` = the raw weights only."""
    whole = unsharded_model(module, info, build) if sharded else model
    average = ema.state_dict() if ema is not None and ema_mode != "raw" else None  # a collective under FSDP
    if not info.is_main:
        return None
    if average is None or ema_mode == "both":
        saved = save_training_pipeline(whole, out / "pipeline")
    if average is not None:
        with swapped(dict(whole.named_parameters()), average):
            averaged = save_training_pipeline(whole, out / ("pipeline_ema" if ema_mode == "both" else "pipeline"))
        saved = averaged if ema_mode == "ema" else saved
    return saved
