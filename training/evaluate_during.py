"""``trainer.eval_every``: render a fixed prompt grid with the current (or EMA) weights during training, score it with
registered evaluators, log both.

Every ``eval_every`` optimizer steps (and after the last one) the main process renders ``trainer.eval``'s prompts
under ``no_grad`` with the model in eval mode: prompt ``i`` always starts from the noise of
``torch.Generator().manual_seed(seed + i)``, so the grids of successive evaluations differ only by the weights. It
writes ``out/eval/step_XXXXXXXX.png`` (the grid, captioned with the prompts), runs each evaluator named in
``trainer.eval.evaluators`` (``deepgen_components.evaluation.build_evaluator``: ``clip``, ``ocr``, ``judge``, and
the ``shapes`` world's once ``deepgen_components.shapes`` is imported) and logs an ``"type": "eval"`` record to
``metrics.jsonl`` and TensorBoard (``eval/NAME`` scalars, the images as ``eval/samples``).

The evaluation leaves the run untouched: every RNG stream (torch, CUDA, numpy, Python) is restored afterwards and
the modules get their train/eval modes back, so a run with evaluation logs the same losses as one without.
Under DDP the other ranks wait at a barrier; under FSDP2 (sharded weights) it is refused: a sharded model cannot be
rendered by one process (evaluate the saved checkpoints or the final pipeline instead).
"""

from __future__ import annotations

import time
from contextlib import nullcontext
from pathlib import Path

import torch
from deepgen_components.training.checkpoint import capture_rng, restore_rng
from deepgen_components.training.config import EvalConfig, TrainConfig
from deepgen_components.training.distributed import DistInfo, barrier
from deepgen_components.training.ema import EMA
from deepgen_components.training.metrics import MetricsLogger

from deepgen_components.evaluation.evaluators import Sample, build_evaluator
from deepgen_components.evaluation.prompts import PromptRecord, load_prompt_file, load_prompts
from deepgen_components.evaluation.report import contact_sheet
from deepgen_components.model import DeepGenModel

__all__ = ["TrainingEvaluation", "eval_prompts", "render_prompts"]


def eval_prompts(spec: EvalConfig) -> list[PromptRecord]:
    """The fixed prompts of ``trainer.eval``: ``prompts``, a ``prompt_file`` or a registered ``benchmark``'s set
    (exactly one of them), the first ``limit``."""
    given = [key for key in ("prompts", "prompt_file", "benchmark") if getattr(spec, key)]
    if len(given) != 1:
        raise ValueError(f"trainer.eval: give exactly one of prompts, prompt_file, benchmark (got "
                         f"{', '.join(given) or 'none'}); trainer.eval_every > 0 renders them")
    if spec.prompts:
        records = [PromptRecord(i, f"{i:05d}", text) for i, text in enumerate(spec.prompts)]
    elif spec.prompt_file:
        records = load_prompt_file(spec.prompt_file)
    else:
        records = load_prompts(spec.benchmark)
    records = records[: spec.limit] if spec.limit else records
    edits = [r.id for r in records if r.image is not None]
    if edits:
        raise ValueError(f"trainer.eval: prompts with a source image (edits: {edits[:3]}) are not rendered during "
                         "training; give text-to-image prompts")
    return records


@torch.no_grad()
def render_prompts(model: DeepGenModel, records: list[PromptRecord], spec: EvalConfig, *, height: int,
                   width: int) -> list:
    """PIL images of ``records`` with ``model`` as it is (one per prompt, in order, ``spec.batch_size`` a call)."""
    from deepgen_components.pipeline import DeepGenPipeline

    pipe = DeepGenPipeline(model)
    pipe.set_progress_bar_config(disable=True)
    extra = {} if spec.guidance_scale is None else {"guidance_scale": spec.guidance_scale}
    images = []
    for start in range(0, len(records), spec.batch_size):
        chunk = records[start : start + spec.batch_size]
        generators = [torch.Generator().manual_seed(spec.seed + r.index) for r in chunk]
        images += pipe([r.prompt for r in chunk], height=height, width=width, num_inference_steps=spec.steps,
                       generator=generators, **extra).images
    return images


class TrainingEvaluation:
    """A run's in-training evaluation, built once before the loop (prompts and evaluators checked up front)."""

    def __init__(self, cfg: TrainConfig, out: Path, info: DistInfo, *, sharded: bool) -> None:
        self.every = cfg.trainer.eval_every
        self.spec = cfg.trainer.eval
        self.out, self.info, self.cfg = Path(out), info, cfg
        self.records, self.evaluators = [], []
        if not self.every:
            return
        if sharded:
            raise ValueError("trainer.eval_every: not available with trainer.distributed: fsdp (the sharded model "
                             "cannot be rendered by one process); set trainer.eval_every=0 and evaluate the "
                             "checkpoints or the final pipeline (deepgen eval)")
        self.records = eval_prompts(self.spec)
        self.height = self.spec.height or cfg.data.image_size
        self.width = self.spec.width or cfg.data.image_size
        if info.is_main:
            self.evaluators = [_build(name, self.spec.evaluator_options) for name in self.spec.evaluators]

    def due(self, step: int, total_steps: int) -> bool:
        """Whether optimizer step ``step`` (1-based) is followed by an evaluation."""
        return bool(self.every) and (step % self.every == 0 or step == total_steps)

    def __call__(self, model: DeepGenModel, step: int, metrics: MetricsLogger, ema: EMA | None = None,
                 precision=nullcontext) -> dict | None:
        """Evaluate after step ``step`` (every rank calls it; the main process renders and gets the record)."""
        record = None
        if self.info.is_main:
            modes = {module: module.training for module in model.modules()}
            rng = capture_rng()
            started = time.perf_counter()
            try:
                model.eval()
                weights = ema.applied() if ema is not None and self.spec.use_ema else nullcontext()
                with weights, precision():
                    images = render_prompts(model, self.records, self.spec, height=self.height, width=self.width)
                record = self._score(images, step)
            finally:
                for module, training in modes.items():
                    module.train(training)
                restore_rng(*rng)
            record["seconds"] = time.perf_counter() - started
            metrics.log_eval(step, record, images)
        barrier(self.info)
        return record

    def _score(self, images: list, step: int) -> dict:
        """The grid PNG and every evaluator's numbers (``NAME`` = its overall score, ``NAME/METRIC`` the rest)."""
        folder = self.out / "eval"
        folder.mkdir(parents=True, exist_ok=True)
        grid = contact_sheet(images, [r.prompt for r in self.records], tile=max(128, min(256, self.height, self.width)))
        grid.save(folder / f"step_{step:08d}.png")
        record: dict = {"weights": "ema" if self.spec.use_ema and self.cfg.trainer.ema is not None else "raw"}
        samples = [Sample(r, [image]) for r, image in zip(self.records, images)]
        for evaluator in self.evaluators:
            result = evaluator.evaluate(samples, folder)
            if result.overall is not None:
                record[evaluator.name] = float(result.overall)
            for key, value in result.metrics.items():
                if isinstance(value, (int, float)) and not isinstance(value, bool):
                    record[f"{evaluator.name}/{key}"] = float(value)
        return record


def _build(name: str, options: dict):
    try:
        return build_evaluator(name, **options)
    except ValueError as err:
        raise ValueError(f"trainer.eval.evaluators: {str(err).removeprefix('--evaluators: ')}") from None
