"""Fixed held-out evaluation of a DeepGen pipeline on the shapes world, and the image grids of docs/shapes.md.

The prompt set is fixed (no randomness outside the seeds given here): held-out T2I prompts (compositions never
produced by the training samplers), seen-composition T2I prompts (new jitter), and held-out edit tasks (a
training-composition source whose target is held out). Every image is generated from the same initial noise at
every stage (one generator seed per call), so stage-to-stage differences are paired, not sampling noise.

The same set's text-to-image part is ``deepgen eval``'s ``shapes`` benchmark (:data:`BENCHMARK`, its prompts
:func:`prompt_records`, scored by :class:`ShapesEvaluator`); ``deepgen_components.shapes`` registers all three.
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from deepgen_components.evaluation.evaluators import EvalResult, by_category, mean
from deepgen_components.evaluation.prompts import Benchmark, PromptRecord, Protocol
from deepgen_components.shapes.evaluator import ShapesEval
from deepgen_components.shapes.world import EditTask, ShapesWorld, caption, parse_instruction

__all__ = ["BENCHMARK", "EvalSet", "ShapesEvaluator", "ShapesScores", "evaluate_pipeline", "eval_set", "image_grid",
           "pair_metrics", "plot_rewards", "prompt_records"]

ATTRIBUTES = ("color", "shape", "position", "background")


@dataclass
class EvalSet:
    heldout_prompts: list[str]
    seen_prompts: list[str]
    edits: list[EditTask]
    image_size: int = 64
    pair_prompts: list[str] = field(default_factory=list)  # distinct held-out two-shape captions

    @property
    def prompts(self) -> list[str]:
        return self.heldout_prompts + self.seen_prompts


def eval_set(heldout: int = 54, seen: int = 54, edits: int = 54, image_size: int = 64, seed: int = 0,
             pairs: int = 0) -> EvalSet:
    """``heldout`` prompts cycle through the 27 held-out compositions (54 = 27 distinct captions, each twice with
    other jitter and noise); ``seen`` are training compositions with new jitter; ``edits`` are held-out edit tasks;
    ``pairs`` are distinct held-out two-shape captions (``ShapesWorld.pair_scenes``), stage 3's headroom task."""
    world = ShapesWorld(image_size, seed=0)
    return EvalSet(
        heldout_prompts=world.heldout_prompts(heldout, seed=seed) if heldout else [],
        seen_prompts=world.heldout_prompts(seen, seed=seed, unseen=False) if seen else [],
        edits=world.heldout_edits(edits, seed=seed) if edits else [],
        image_size=image_size,
        pair_prompts=[caption(s) for s in world.pair_scenes(pairs, seed=seed)] if pairs else [],
    )


@dataclass
class ShapesScores:
    """Accuracies in [0, 1] with their counts; ``t2i`` over all T2I prompts, ``heldout`` / ``seen`` split."""

    t2i: dict[str, float]
    heldout: dict[str, float]
    seen: dict[str, float]
    edit_success: float | None
    edit_by_kind: dict[str, float] = field(default_factory=dict)
    reward: float = 0.0  # mean ShapesEval.reward over the T2I prompts (the stage-3 reward of T2I prompts)
    edit_reward: float | None = None  # mean ShapesEval.reward of the edited images against the target scenes
    n_t2i: int = 0
    n_heldout: int = 0
    n_edits: int = 0
    seconds: float = 0.0
    settings: dict = field(default_factory=dict)
    n_heldout_distinct: int = 0  # distinct held-out captions (the 54 held-out prompts are 27 captions twice)
    # Held-out two-shape captions, per guidance scale ("1.0": none, stage 3's rollouts; "4.0": the T2I default):
    # the score_t2i rates plus "composition", "placement_px" and "reward" means.
    pairs: dict[str, dict[str, float]] = field(default_factory=dict)
    n_pairs: int = 0

    def to_dict(self) -> dict:
        return asdict(self)


def _mean(rows: list[dict], key: str) -> float:
    return sum(float(r[key]) for r in rows) / len(rows) if rows else float("nan")


@torch.no_grad()
def generate_t2i(pipe, prompts: list[str], *, steps: int, guidance: float, seed: int, batch: int = 64) -> list:
    """Images for ``prompts`` in chunks; the initial noise of prompt i depends only on (seed, i). The pipeline's
    progress bar is switched off."""
    pipe.set_progress_bar_config(disable=True)
    images = []
    for start in range(0, len(prompts), batch):
        chunk = prompts[start : start + batch]
        generator = torch.Generator().manual_seed(seed + start)
        images += pipe(chunk, num_inference_steps=steps, guidance_scale=guidance, generator=generator,
                       height=pipe.model.config.image_size, width=pipe.model.config.image_size).images
    return images


@torch.no_grad()
def generate_edits(pipe, tasks: list[EditTask], *, steps: int, guidance: float, seed: int,
                   image_size: int = 64, batch: int = 64) -> tuple[list, list]:
    world = ShapesWorld(image_size)
    sources = [world.render(t.source) for t in tasks]
    pipe.set_progress_bar_config(disable=True)
    images = []
    for start in range(0, len(tasks), batch):
        chunk = tasks[start : start + batch]
        generator = torch.Generator().manual_seed(seed + 10_000 + start)
        images += pipe([t.instruction for t in chunk], image=sources[start : start + len(chunk)],
                       num_inference_steps=steps, guidance_scale=guidance, generator=generator).images
    return sources, images


def evaluate_pipeline(pipe, evals: EvalSet, *, steps: int = 20, guidance: float = 4.0,
                      edit_guidance: float | None = None, seed: int = 0, keep_images: bool = False,
                      pair_guidances: tuple[float, ...] = (1.0, 4.0)):
    """Score T2I (per attribute, held-out and seen), editing and the two-shape captions (at each of
    ``pair_guidances``); returns ``ShapesScores`` (and the images when ``keep_images``: {"t2i": [...],
    "edit_sources": [...], "edits": [...], "pairs": {guidance: [...]}})."""
    edit_guidance = guidance if edit_guidance is None else edit_guidance
    evaluator = ShapesEval()
    started = time.perf_counter()
    t2i_images = generate_t2i(pipe, evals.prompts, steps=steps, guidance=guidance, seed=seed)
    rows = [evaluator.score_t2i(image, prompt) for image, prompt in zip(t2i_images, evals.prompts)]
    rewards = [evaluator.reward(image, prompt) for image, prompt in zip(t2i_images, evals.prompts)]
    held = rows[: len(evals.heldout_prompts)]
    seen = rows[len(evals.heldout_prompts):]
    keys = ATTRIBUTES + ("count", "all")
    edit_success, edit_reward, by_kind, sources, edited = None, None, {}, [], []
    if evals.edits:
        sources, edited = generate_edits(pipe, evals.edits, steps=steps, guidance=edit_guidance, seed=seed,
                                         image_size=evals.image_size)
        results = [evaluator.score_edit(src, task.instruction, out, task.source_caption)
                   for src, task, out in zip(sources, evals.edits, edited)]
        edit_success = _mean(results, "success")
        # The stage-3 reward of an edit prompt: the output scored against the scene the edit should produce.
        edit_reward = sum(evaluator.reward(out, task.target) for task, out in zip(evals.edits, edited)) / len(edited)
        kinds: dict[str, list] = {}
        for task, result in zip(evals.edits, results):
            kinds.setdefault(parse_instruction(task.instruction).kind, []).append(result)
        by_kind = {kind: _mean(res, "success") for kind, res in sorted(kinds.items())}
    pair_scores, pair_images = {}, {}
    for scale in pair_guidances if evals.pair_prompts else ():
        images = generate_t2i(pipe, evals.pair_prompts, steps=steps, guidance=scale, seed=seed + 20_000)
        pair_scores[str(float(scale))] = pair_metrics(evaluator, images, evals.pair_prompts)
        pair_images[str(float(scale))] = images
    scores = ShapesScores(
        t2i={k: _mean(rows, k) for k in keys},
        heldout={k: _mean(held, k) for k in keys},
        seen={k: _mean(seen, k) for k in keys},
        edit_success=edit_success,
        edit_by_kind=by_kind,
        reward=sum(rewards) / len(rewards) if rewards else float("nan"),
        edit_reward=edit_reward,
        n_t2i=len(rows),
        n_heldout=len(held),
        n_edits=len(evals.edits),
        seconds=time.perf_counter() - started,
        settings={"steps": steps, "guidance": guidance, "edit_guidance": edit_guidance, "seed": seed},
        n_heldout_distinct=len(set(evals.heldout_prompts)),
        pairs=pair_scores,
        n_pairs=len(evals.pair_prompts),
    )
    if keep_images:
        return scores, {"t2i": t2i_images, "edit_sources": sources, "edits": edited, "pairs": pair_images}
    return scores


PAIR_METRICS = ("layout", "count", "position", "shape", "color", "background", "all")


def pair_metrics(evaluator: ShapesEval, images: list, prompts: list[str]) -> dict[str, float]:
    """Rates of ``score_t2i`` over two-shape images (``layout`` first: stage 3's headroom metric), and the means of
    the three stage-3 rewards: ``composition``, ``placement_px`` (the error, in pixels) and ``reward``."""
    rows = [evaluator.score_t2i(image, prompt) for image, prompt in zip(images, prompts)]
    out = {k: _mean(rows, k) for k in PAIR_METRICS}
    n = max(len(images), 1)
    out["composition"] = sum(evaluator.composition(i, p) for i, p in zip(images, prompts)) / n
    out["placement_px"] = sum(evaluator.placement_error(i, p) for i, p in zip(images, prompts)) / n
    out["reward"] = sum(evaluator.reward(i, p) for i, p in zip(images, prompts)) / n
    return out


def image_grid(rows: list[list], tile: int = 64, pad: int = 2, background=(255, 255, 255)):
    """Rows of PIL images -> one PIL image (tiles resized to ``tile`` px, ``pad`` px gaps)."""
    from PIL import Image

    columns = max(len(r) for r in rows)
    grid = Image.new("RGB", (columns * (tile + pad) + pad, len(rows) * (tile + pad) + pad), background)
    for r, row in enumerate(rows):
        for c, image in enumerate(row):
            if image is None:
                continue
            grid.paste(image.convert("RGB").resize((tile, tile), Image.NEAREST), (pad + c * (tile + pad), pad + r * (tile + pad)))
    return grid


def plot_rewards(groups: dict[str, list[Path]], target: str | Path) -> None:
    """Stage 3's rollout rewards per step as a PNG: one panel per ``reward/NAME`` of the runs' ``metrics.jsonl``
    files, each run a line (a moving average over 8 steps), one colour per group label. Needs matplotlib."""
    import statistics

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    series = {label: [[json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]
                      for path in paths] for label, paths in groups.items() if paths}
    names = sorted({k for runs in series.values() for rows in runs for r in rows for k in r if k.startswith("reward/")})
    if not names:
        return
    fig, axes = plt.subplots(1, len(names), figsize=(4.2 * len(names), 3.2), squeeze=False)
    colours = ["tab:blue", "tab:orange", "tab:green", "tab:red"]
    for ax, name in zip(axes[0], names):
        for colour, (label, runs) in zip(colours, series.items()):
            for i, rows in enumerate(runs):
                values = [r[name] for r in rows if name in r]
                smooth = [statistics.fmean(values[max(0, j - 7): j + 1]) for j in range(len(values))]
                ax.plot(range(1, len(smooth) + 1), smooth, color=colour, lw=1.5, label=label if i == 0 else None)
        ax.set_title(name.replace("reward/", "rollout reward: "))
        ax.set_xlabel("step")
    axes[0][0].legend(fontsize=8)
    fig.tight_layout()
    Path(target).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(target, dpi=80)
    plt.close(fig)


def save_scores(scores: ShapesScores, path: str | Path) -> None:
    Path(path).write_text(json.dumps(scores.to_dict(), indent=2))


# -- the ``shapes`` benchmark of ``deepgen eval`` ------------------------------------------------------------------
# The held-out evaluation above as a benchmark: 64 px, 20 steps, CFG 4.0, and its noise (harness: shapes_eval).
BENCHMARK = Benchmark("shapes", "plain", 1, Protocol(64, 64, 20, 4.0, "docs/shapes.md evaluation: 64 px, 20 steps, "
                      "CFG 4.0"), evaluators=("shapes",), builtin=True, license="generated (this package)",
                      noise="shapes_eval")


def prompt_records() -> list[PromptRecord]:
    """The T2I part of the fixed evaluation set (:func:`eval_set`: 54 prompts of held-out compositions, the 27
    distinct held-out captions twice each with other jitter, then 54 of seen compositions with new jitter), in that
    order, with the categories ``heldout`` and ``seen``."""
    evals = eval_set(edits=0)
    held = len(evals.heldout_prompts)
    return [PromptRecord(i, f"{i:05d}", p, "heldout" if i < held else "seen") for i, p in enumerate(evals.prompts)]


class ShapesEvaluator:
    """``deepgen eval``'s ``shapes`` evaluator: the attribute accuracies of :func:`evaluate_pipeline` (and its
    reward) over a run's images, per category too."""

    name = "shapes"
    ATTRIBUTES = ("color", "shape", "position", "background", "count", "all")

    def __init__(self, **_):
        self.evaluator = ShapesEval()

    def evaluate(self, samples, run_dir) -> EvalResult:
        rows, rewards, per_prompt = [], [], []
        for sample in samples:
            for image in sample.images:
                scores = self.evaluator.score_t2i(image, sample.record.prompt)
                rows.append((sample.record.category, scores))
                rewards.append(self.evaluator.reward(image, sample.record.prompt))
                per_prompt.append({"id": sample.record.id, **{k: bool(v) for k, v in scores.items()}})
        metrics = {f"t2i_{k}": mean([float(s[k]) for _, s in rows]) for k in self.ATTRIBUTES}
        for category in sorted({c for c, _ in rows if c is not None}):
            part = [s for c, s in rows if c == category]
            metrics.update({f"{category}_{k}": mean([float(s[k]) for s in part]) for k in self.ATTRIBUTES})
        metrics["reward"] = mean(rewards)
        categories = by_category([(c, float(s["all"])) for c, s in rows])
        return EvalResult(self.name, metrics["t2i_all"], categories, metrics, per_prompt,
                          "overall = all four attributes right (ShapesEval.score_t2i)")
