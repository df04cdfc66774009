"""``deepgen shapes``: the laptop-scale proof that DeepGen's three stages learn, in one command.

    deepgen shapes --out runs/shapes                  # base models + stages 1-3 on the CPU at committed budgets
    deepgen shapes --out runs/shapes --quick          # the whole chain at toy budgets in ~15 s (numbers meaningless)
    deepgen shapes --out runs/gpu --device cuda --set base.dit_steps=3000 --set base.dit_batch=128
    deepgen shapes --out runs/p --base-from runs/gpu --install   # reuse a base; ship the result as the preset
    deepgen shapes --out runs/rl --rl-from deepgen-shapes        # stage 3 alone, from a finished pipeline

docs/shapes.md has what the chain measures (on 2 CPU cores, and from a GPU-made base: the shipped
``deepgen-shapes`` preset).

Top to bottom: base models (``shapes.base``: world tokenizer, VAE, DiT pretrained under its own prompt encoder,
VLM LM) -> stage 1 ``align`` and stage 2 ``sft`` with OUR recipe (``trainer.train``) from
``configs/align_shapes.yaml`` / ``sft_shapes.yaml`` -> stage 3 MR-GRPO with ``rl.train_rl`` from
``rl_shapes.yaml`` -> after every stage, the fixed held-out evaluation (``shapes.evaluation``) -> ``report.json``,
``report.md`` (the per-stage table) and image grids. Every part resumes: a finished part (its pipeline folder
exists) is skipped, an interrupted stage resumes from its last checkpoint.
"""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path

import deepgen_components.shapes  # noqa: F401  (registers the shapes world's kinds: data source, teacher, ...)

__all__ = ["QUICK_RL_PAIRS", "add_commands", "install_preset", "parse_sets", "run_shapes"]

logger = logging.getLogger(__name__)

CONFIGS = Path(__file__).resolve().parents[1] / "shapes" / "configs"
STAGES = ("align", "sft", "rl")
QUICK_OVERRIDES = {  # a smoke test of the whole chain in about a minute (numbers meaningless)
    "base": {"t2i_images": 64, "edit_triplets": 32, "vae_steps": 4, "dit_steps": 4, "lm_steps": 2, "dit_batch": 8},
    "stage": ["trainer.max_steps=2", "data.batch_size=2", "rl.prompts_per_step=1", "rl.group_size=2", "rl.num_steps=3",
              "rl.sft_batch_size=2"],
    "eval": {"heldout": 4, "seen": 2, "edits": 3, "pairs": 3, "steps": 2},
}
EVAL_PAIRS = 96  # distinct held-out two-shape captions: stage 3's headroom task
# `--rl-from ... --quick`: a real, short stage 3 that learns (tests/test_shapes_rl.py measures its rewards rise):
# QUICK_RL_PAIRS two-shape training captions, 8 images each per step, 6-step rollouts.
QUICK_RL_PAIRS = 4
QUICK_RL_OVERRIDES = ["trainer.max_steps=12", "trainer.checkpoint_every=12", "rl.prompts_per_step=2",
                      "rl.group_size=8", "rl.num_steps=6", "rl.sft_batch_size=2",
                      f"rl.prompt_source={{kind: shapes, seed: 0, count: 0, pairs: {QUICK_RL_PAIRS}, "
                      "pair_category: pairs}"]


def parse_sets(items: list[str] | None) -> tuple[dict, dict[str, list[str]]]:
    """``--set`` items -> (ShapesBaseConfig overrides, per-stage config overrides). ``base.FIELD=VALUE`` sets a
    base-model field (typed like its default; tuples as comma lists); ``align.KEY=VALUE`` / ``sft.`` / ``rl.``
    pass ``KEY=VALUE`` on to that stage's config (e.g. ``align.trainer.max_steps=3000``)."""
    from dataclasses import fields

    from deepgen_components.shapes.base import ShapesBaseConfig

    base_types = {f.name: type(f.default) for f in fields(ShapesBaseConfig)}
    base: dict = {}
    stages: dict[str, list[str]] = {name: [] for name in STAGES}
    for item in items or []:
        target, sep, value = item.partition("=")
        part, dot, key = target.partition(".")
        if not sep or not dot or not key:
            raise ValueError(f"--set: expected PART.KEY=VALUE with PART one of base, {', '.join(STAGES)}; got {item!r}")
        if part == "base":
            if key not in base_types:
                raise ValueError(f"--set base.{key}: unknown base field; known: {', '.join(sorted(base_types))}")
            kind = base_types[key]
            if kind is tuple:
                base[key] = tuple(int(v) for v in value.split(",") if v.strip())
            elif kind is bool:
                base[key] = value.lower() in ("1", "true", "yes")
            else:
                try:
                    base[key] = kind(value)
                except ValueError:
                    raise ValueError(f"--set base.{key}: {value!r} is not a {kind.__name__}") from None
        elif part in stages:
            stages[part].append(f"{key}={value}")
        else:
            raise ValueError(f"--set: PART must be one of base, {', '.join(STAGES)}; got {part!r} in {item!r}")
    return base, stages


def _log(part: str, stats: dict) -> None:
    shown = ", ".join(f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}" for k, v in stats.items())
    print(f"[{part}] {shown}", flush=True)


def _stage_config(name: str, out: Path, base_pipeline: Path, previous: Path | None, extra: list[str], configs: Path):
    from deepgen_components.training.config import load_config

    overrides = [f"model.pipeline={base_pipeline}", f"out={out / name}", "trainer.tensorboard=false"]
    if load_config(configs / f"{name}_shapes.yaml").teacher is not None:  # the teacher is this run's base
        overrides.append(f"teacher.options.base={base_pipeline.parent}")
    if previous is not None:
        overrides.append(f"model.init_from={previous / 'checkpoints'}")
    return load_config(configs / f"{name}_shapes.yaml", overrides + list(extra))


def _table(results: dict) -> str:
    head = ("| model | color | shape | position | background | all 4 (T2I) | held-out all | edit success | reward "
            "| edit reward |\n|---|---|---|---|---|---|---|---|---|---|")
    lines = [head]
    for name, s in results.items():
        t = s["t2i"]
        edit = "—" if s["edit_success"] is None else f"{100 * s['edit_success']:.1f}"
        lines.append(
            f"| {name} | {100 * t['color']:.1f} | {100 * t['shape']:.1f} | {100 * t['position']:.1f} | "
            f"{100 * t['background']:.1f} | {100 * t['all']:.1f} | {100 * s['heldout']['all']:.1f} | {edit} | "
            f"{s['reward']:.3f} | {'—' if s.get('edit_reward') is None else format(s['edit_reward'], '.3f')} |"
        )
    first = next(iter(results.values()))
    distinct = first.get("n_heldout_distinct") or "?"
    lines.append(f"\nn = {first['n_t2i']} T2I prompts ({first['n_heldout']} of held-out compositions: {distinct} "
                 f"distinct captions; the rest seen compositions with new jitter), {first['n_edits']} held-out "
                 f"edits; {first['settings']['steps']} Euler steps, CFG {first['settings']['guidance']} "
                 f"(edits {first['settings']['edit_guidance']}).")
    if first.get("pairs"):
        scales = list(first["pairs"])
        lines.append("\nStage 3's headroom task: " + f"{first['n_pairs']} distinct held-out two-shape captions "
                     "(layout = both shapes drawn, each in its named third, nothing else).\n")
        lines.append("| model | " + " | ".join(f"layout (CFG {s}) | all (CFG {s})" for s in scales)
                     + " | composition | placement error (px) |")
        lines.append("|---" * (1 + 2 * len(scales) + 2) + "|")
        for name, s in results.items():
            if not s.get("pairs"):
                continue
            p = s["pairs"]
            lines.append(f"| {name} | " + " | ".join(f"{100 * p[k]['layout']:.1f} | {100 * p[k]['all']:.1f}"
                                                     for k in scales)
                         + f" | {p[scales[0]]['composition']:.3f} | {p[scales[0]]['placement_px']:.2f} |")
    return "\n".join(lines)


def run_shapes(
    out: str | Path,
    *,
    quick: bool = False,
    configs: str | Path | None = None,
    eval_steps: int = 20,
    guidance: float = 4.0,
    edit_guidance: float | None = 1.0,
    grid_rows: int = 8,
    device: str | None = None,
    sets: list[str] | None = None,
    base_from: str | Path | None = None,
    eval_start: bool = False,
    rl_from: str | Path | None = None,
) -> dict:
    """Run (or resume) the whole shapes-world chain into ``out``; returns the report.

    ``device`` (default: the CPU) runs the base models, the stages and the evaluations there (random draws of
    the base models and the evaluation noise stay on the CPU); ``sets`` are ``--set`` overrides (see
    :func:`parse_sets`); ``base_from`` copies the base models of another run (its ``base`` folder, or the run
    folder holding it) instead of making them; ``eval_start`` also evaluates the stage-1 start (the base DiT
    behind a fresh, zero-head SCB: the null condition for every prompt, about 1 min on 2 cores). The overrides,
    the device and the base's origin are recorded in ``report.json``. ``rl_from`` (a pipeline folder, or
    ``deepgen-shapes`` for the shipped preset) runs stage 3 alone from that pipeline, copied into ``out/start``:
    no base models, no stages 1-2, and the starting pipeline evaluated as "before stage 3"."""
    import torch

    from deepgen_components.pipeline import DeepGenPipeline
    from deepgen_components.shapes import evaluation as shapes_eval
    from deepgen_components.shapes.base import ShapesBaseConfig, build_base
    from deepgen_components.shapes.teacher import PromptEncoderPipeline
    from deepgen_components.training.trainer import train

    out = Path(out)
    configs = Path(configs) if configs else CONFIGS
    base_sets, stage_sets = parse_sets(sets)  # bad --set values fail before anything is written
    base_cfg = ShapesBaseConfig(**{**(QUICK_OVERRIDES["base"] if quick else {}), **base_sets})
    out.mkdir(parents=True, exist_ok=True)
    report_path = out / "report.json"
    report = json.loads(report_path.read_text()) if report_path.exists() else {"seconds": {}, "results": {}}
    save = lambda: report_path.write_text(json.dumps(report, indent=2))  # noqa: E731
    started = time.perf_counter()

    stage_extra = list((QUICK_RL_OVERRIDES if rl_from is not None else QUICK_OVERRIDES["stage"]) if quick else [])
    if device is not None:
        stage_extra.append(f"trainer.device={device}")
    report["device"] = str(device or "cpu")
    report["sets"] = list(sets or [])
    eval_kwargs = dict(QUICK_OVERRIDES["eval"]) if quick else {"steps": eval_steps, "pairs": EVAL_PAIRS}
    steps = eval_kwargs.pop("steps")
    evals = shapes_eval.eval_set(**eval_kwargs)
    images: dict[str, dict] = {}

    def evaluate(name: str, pipe) -> None:
        scores, imgs = shapes_eval.evaluate_pipeline(
            pipe, evals, steps=steps, guidance=guidance, edit_guidance=edit_guidance, keep_images=True
        )
        report["results"][name] = scores.to_dict()
        report["seconds"][f"eval {name}"] = scores.seconds
        images[name] = imgs
        t = scores.t2i
        print(f"[eval] {name}: color {t['color']:.3f} shape {t['shape']:.3f} position {t['position']:.3f} "
              f"background {t['background']:.3f} all {t['all']:.3f} edit {scores.edit_success} "
              f"reward {scores.reward:.3f} ({scores.seconds:.0f} s)", flush=True)
        save()

    def load(path):  # eager PyTorch on any device: the evaluation is the same computation everywhere
        return DeepGenPipeline.from_pretrained(path, device=device).optimize("eager")

    def finish() -> dict:
        report["seconds"]["total (this invocation)"] = time.perf_counter() - started
        report["table"] = _table(report["results"])
        save()
        (out / "report.md").write_text(report["table"] + "\n")
        _write_grids(out / "images", evals, images, grid_rows)
        _plot_rewards(out / "rl" / "metrics.jsonl", out / "images" / "rl_rewards.png")
        print(report["table"])
        return report

    if rl_from is not None:  # stage 3 alone, from a finished pipeline
        start = out / "start"
        if not (start / "model_index.json").is_file():
            import shutil

            shutil.copytree(_pipeline_folder(rl_from), start, dirs_exist_ok=True)
            report["rl_from"] = str(rl_from)
            save()
        evaluate("before stage 3 (start)", load(start))
        cfg = _stage_config("rl", out, start, None, stage_extra + stage_sets["rl"], configs)
        cfg.lora = None  # a pipeline folder holds its VLM with the stage-2 LoRA merged
        cfg.model.init_from = None  # ... and every trained weight: nothing to load on top
        _train_rl_once(cfg, out / "rl", report, save)
        torch.manual_seed(0)
        evaluate("after stage 3 (rl)", load(out / "rl" / "pipeline"))
        return finish()

    # 1. Base models (not DeepGen's recipe: its pretrained starting points, made here).
    base_dir = out / "base"
    if base_from is not None and not (base_dir / "pipeline" / "model_index.json").exists():
        import shutil

        source = Path(base_from)
        source = source / "base" if (source / "base" / "pipeline").is_dir() else source
        if not (source / "pipeline" / "model_index.json").is_file() or not (source / "prompt_encoder.pt").is_file():
            raise FileNotFoundError(f"base_from: {source} has no pipeline/model_index.json and prompt_encoder.pt "
                                    "(the base folder of a `deepgen shapes` run)")
        shutil.copytree(source, base_dir, dirs_exist_ok=True)
        report["base_from"] = str(source)
        if (source / "report.json").is_file():
            report["base"] = json.loads((source / "report.json").read_text())
        save()
    if not (base_dir / "pipeline" / "model_index.json").exists():
        t0 = time.perf_counter()
        base_report = build_base(base_cfg, base_dir, log=_log, device=device)
        report["base"] = base_report
        report["seconds"].update({f"base {k}": v for k, v in base_report["seconds"].items()})
        report["seconds"]["base"] = time.perf_counter() - t0
        save()
    base_pipeline = base_dir / "pipeline"

    evaluate("base DiT (own prompt encoder)", PromptEncoderPipeline.from_base(base_dir).to(device or "cpu"))
    if eval_start:
        evaluate("stage-1 start (zero heads)", load(base_pipeline))

    # 2. Stages 1-3 with our recipes.
    previous = None
    for name in STAGES:
        cfg = _stage_config(name, out, base_pipeline, previous, stage_extra + stage_sets[name], configs)
        stage_dir = out / name
        if name == "rl":
            _train_rl_once(cfg, stage_dir, report, save)
        elif not (stage_dir / "pipeline" / "model_index.json").exists():
            t0 = time.perf_counter()
            train(cfg, out=stage_dir)
            report["seconds"][name] = time.perf_counter() - t0
            save()
        torch.manual_seed(0)
        evaluate(f"after stage {STAGES.index(name) + 1} ({name})", load(stage_dir / "pipeline"))
        previous = stage_dir
    return finish()


def _pipeline_folder(name_or_path: str | Path, argument: str = "rl_from") -> Path:
    """``deepgen-shapes`` (the shipped preset) or a pipeline folder (holding ``model_index.json``); ``argument``
    names the option in the error."""
    from deepgen_components.builders import SHAPES_PRESET_DIR

    path = SHAPES_PRESET_DIR if str(name_or_path) == "deepgen-shapes" else Path(name_or_path)
    if not (path / "model_index.json").is_file():
        raise FileNotFoundError(f"{argument} {name_or_path}: no model_index.json there; give a pipeline folder "
                                "(e.g. a run's sft/pipeline) or deepgen-shapes")
    return path


def _train_rl_once(cfg, stage_dir: Path, report: dict, save) -> None:
    """Stage 3 into ``stage_dir`` unless its pipeline exists (an interrupted run resumes from its checkpoint)."""
    from deepgen_components.training.rl import train_rl

    if not (stage_dir / "pipeline" / "model_index.json").exists():
        t0 = time.perf_counter()
        train_rl(cfg, out=stage_dir)
        report["seconds"]["rl"] = time.perf_counter() - t0
        save()


def _plot_rewards(metrics: Path, target: Path) -> None:
    """Stage 3's rollout rewards per step as a PNG, when the run has them and matplotlib is there."""
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        return
    if metrics.is_file():
        from deepgen_components.shapes.evaluation import plot_rewards

        plot_rewards({"stage 3": [metrics]}, target)

def _write_grids(folder: Path, evals, images: dict, rows: int) -> None:
    """Held-out T2I (ground truth | each model) and edits (source | target | each model), 64 px tiles."""
    from deepgen_components.shapes import ShapesWorld, parse_caption
    from deepgen_components.shapes.evaluation import image_grid

    if not images:
        return
    folder.mkdir(parents=True, exist_ok=True)
    world = ShapesWorld(evals.image_size)
    names = list(images)
    count = min(rows, len(evals.heldout_prompts))
    t2i_rows = [[world.render(parse_caption(evals.prompts[i]))] + [images[n]["t2i"][i] for n in names]
                for i in range(count)]
    image_grid(t2i_rows).save(folder / "t2i_heldout.png", optimize=True)
    count = min(rows, len(evals.edits))
    edit_rows = [[images[names[0]]["edit_sources"][i], world.render(evals.edits[i].target)]
                 + [images[n]["edits"][i] for n in names] for i in range(count)]
    image_grid(edit_rows).save(folder / "edits_heldout.png", optimize=True)
    legend = {"t2i_heldout.png": ["ground truth"] + names, "edits_heldout.png": ["source", "target"] + names,
              "t2i_prompts": evals.prompts[: rows], "edit_instructions": [e.instruction for e in evals.edits[:rows]]}
    if evals.pair_prompts:  # stage 3's headroom task, at each evaluated guidance scale
        for scale in images[names[0]].get("pairs", {}):
            count = min(rows, len(evals.pair_prompts))
            pair_rows = [[world.render(parse_caption(evals.pair_prompts[i]))] + [images[n]["pairs"][scale][i]
                                                                                   for n in names]
                         for i in range(count)]
            image_grid(pair_rows).save(folder / f"pairs_heldout_cfg{float(scale):g}.png", optimize=True)
            legend[f"pairs_heldout_cfg{float(scale):g}.png"] = ["ground truth"] + names
        legend["pair_prompts"] = evals.pair_prompts[:rows]
    (folder / "legend.json").write_text(json.dumps(legend, indent=2))


def install_preset(run: str | Path, package_dir: str | Path | None = None) -> Path:
    """Copy a finished run's final pipeline (``run/rl/pipeline``) into the package as the ``deepgen-shapes`` preset
    (``deepgen_components/shapes/preset``), with the run's per-stage results beside it. The preset's
    default CFG scales (``guidance_scale``, ``edit_guidance_scale`` in model_index.json) become those of the run's
    final evaluation, so that a user samples the way the reported numbers were measured."""
    import shutil

    from deepgen_components.builders import SHAPES_PRESET_DIR

    source = Path(run) / "rl" / "pipeline"
    if not (source / "model_index.json").is_file():
        raise FileNotFoundError(f"run: {source} has no final pipeline; run `deepgen shapes --out {run}` first")
    target = Path(package_dir) / "deepgen-shapes" if package_dir is not None else SHAPES_PRESET_DIR
    staging = target.with_name(target.name + ".tmp")
    shutil.rmtree(staging, ignore_errors=True)
    shutil.copytree(source, staging)
    report = Path(run) / "report.json"
    if report.is_file():
        data = json.loads(report.read_text())
        keep = {k: data[k] for k in ("results", "seconds", "sets", "device", "base_from") if k in data}
        (staging / "training_report.json").write_text(json.dumps(keep, indent=2))
        final = data.get("results", {}).get(f"after stage {len(STAGES)} ({STAGES[-1]})")
        if final is not None:
            index_path = staging / "model_index.json"
            index = json.loads(index_path.read_text())
            settings = final["settings"]
            index["config"].update(guidance_scale=float(settings["guidance"]),
                                   edit_guidance_scale=float(settings["edit_guidance"]))
            index_path.write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")
    shutil.rmtree(target, ignore_errors=True)
    staging.rename(target)
    return target


def cmd_shapes(args) -> int:
    import torch

    from deepgen_components.cli.args import check_device, check_output_path

    if not args.install_only:  # every flag checked before the run folder is made
        check_output_path(args.out, folder=True)
        if args.device is not None:
            check_device(args.device)
        configs = Path(args.configs) if args.configs else CONFIGS
        missing = [f"{name}_shapes.yaml" for name in STAGES if not (configs / f"{name}_shapes.yaml").is_file()]
        if missing:
            raise FileNotFoundError(f"--configs {configs}: missing {', '.join(missing)}")
        _, stage_sets = parse_sets(args.set)
        from deepgen_components.training.config import load_config

        for name in STAGES:  # a bad stage override fails now, not after the base models are made
            try:
                load_config(configs / f"{name}_shapes.yaml", stage_sets[name])
            except ValueError as err:
                message = str(err)  # "override 'KEY=VALUE': ..." -> "--set 'STAGE.KEY=VALUE': ..."
                prefix = "override '"
                raise ValueError(f"--set '{name}.{message[len(prefix):]}" if message.startswith(prefix)
                                 else f"--set {name}.*: {message}") from None
        if args.base_from is not None and not Path(args.base_from).is_dir():
            raise FileNotFoundError(f"--base-from {args.base_from}: no such folder")
        if args.rl_from is not None:
            if args.base_from is not None or args.eval_start:
                raise ValueError("--rl-from runs stage 3 alone: it takes no --base-from or --eval-start")
            if any(item.split("=", 1)[0].split(".", 1)[0] != "rl" for item in args.set):
                raise ValueError("--rl-from runs stage 3 alone: only --set rl.KEY=VALUE applies")
            _pipeline_folder(args.rl_from, "--rl-from")
    if args.threads:
        torch.set_num_threads(args.threads)
    if not args.install_only:
        run_shapes(args.out, quick=args.quick, configs=args.configs, eval_steps=args.eval_steps,
                   guidance=args.guidance, edit_guidance=args.edit_guidance, device=args.device, sets=args.set,
                   base_from=args.base_from, eval_start=args.eval_start, rl_from=args.rl_from)
    if args.install or args.install_only:
        target = install_preset(args.out)
        size = sum(p.stat().st_size for p in target.rglob("*") if p.is_file())
        print(f"installed {target} ({size / 1e6:.1f} MB)")
    return 0


def add_commands(sub) -> None:
    from deepgen_components.cli.args import non_negative_float, positive_int

    p = sub.add_parser("shapes", help="shapes world: base models + stages 1-3 + held-out evals, one command")
    p.add_argument("--out", default="runs/shapes", help="run folder (default: runs/shapes); resumes")
    p.add_argument("--threads", type=positive_int, default=None, help="torch threads (default: torch's)")
    p.add_argument("--configs", default=None, help="folder with {align,sft,rl}_shapes.yaml (default: packaged)")
    p.add_argument("--eval-steps", type=positive_int, default=20, help="Euler steps of the evaluations (default: 20)")
    p.add_argument("--guidance", type=non_negative_float, default=4.0, help="CFG scale of the T2I evaluations (default: 4)")
    p.add_argument("--edit-guidance", type=non_negative_float, default=1.0,
                   help="CFG scale of the edit evaluations (default: 1, no CFG, the preset's edit default)")
    p.add_argument("--device", default=None, help="where to train and evaluate, e.g. cuda (default: the CPU)")
    p.add_argument("--set", action="append", default=[], metavar="PART.KEY=VALUE",
                   help="override a budget: base.FIELD=V (ShapesBaseConfig), align./sft./rl.KEY=V (stage config); "
                        "repeatable, e.g. --set base.dit_steps=8000 --set align.trainer.max_steps=3000")
    p.add_argument("--eval-start", action="store_true",
                   help="also evaluate the stage-1 start (zero-head SCB: every prompt is the null condition)")
    p.add_argument("--base-from", default=None, metavar="DIR",
                   help="copy the base models of another run (its folder or its base/ folder) instead of making them")
    p.add_argument("--rl-from", default=None, metavar="PIPELINE",
                   help="run stage 3 alone from a pipeline folder, or deepgen-shapes (the shipped preset)")
    p.add_argument("--quick", action="store_true", help="tiny budgets: a smoke test of the chain (numbers meaningless)")
    p.add_argument("--install", action="store_true",
                   help="then copy the final pipeline into the package as the deepgen-shapes preset")
    p.add_argument("--install-only", action="store_true", help="only install an existing run's final pipeline")
    p.set_defaults(func=cmd_shapes)
