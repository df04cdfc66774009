"""``deepgen eval``: generate a benchmark's prompts in its official layout, score them, write the report.

    deepgen eval --benchmark geneval --preset tiny --limit 8 --out runs/eval_geneval
    torchrun --nproc-per-node 8 -m deepgen_components.cli eval --benchmark dpg --pipeline DIR --device cuda \\
        --protocol official --out runs/dpg

One process or ``torchrun`` (prompts sharded across ranks, rank 0 merges and scores). A rerun with the same
settings resumes: finished prompts are skipped. docs/eval.md has each benchmark end to end.
"""

from __future__ import annotations

import hashlib
import json
import time
from dataclasses import asdict
from pathlib import Path

import deepgen_components.shapes  # noqa: F401  (registers the shapes benchmark and evaluator)
from deepgen_components.cli.args import (
    add_model_args,
    check_output_path,
    image_side,
    int_at_least,
    load_pipeline,
    non_negative_float,
    positive_int,
)
from deepgen_components.denoising import MODES as OPTIMIZE_MODES
from deepgen_components.evaluation.evaluators import Sample, build_evaluator
from deepgen_components.evaluation.harness import generate, resolve_settings, sample_seeds
from deepgen_components.evaluation.layouts import make_layout, write_text_atomic
from deepgen_components.evaluation.prompts import BENCHMARKS, load_prompts
from deepgen_components.evaluation.report import contact_sheet, write_summary

__all__ = ["add_commands", "cmd_eval"]

MODES = ("auto", *OPTIMIZE_MODES)


def add_commands(sub) -> None:
    p = sub.add_parser("eval", help="generate a benchmark (GenEval, DPG-Bench, WISE, CVTG-2K, shapes, ...) in its "
                                    "official layout, score it, write summary.json/md")
    p.add_argument("--benchmark", required=True, choices=sorted(BENCHMARKS), help="the benchmark")
    p.add_argument("--prompts", default=None, help="prompt file (.jsonl / .txt) instead of the shipped set; required "
                                                   "for wise, cvtg, unireditbench, custom")
    p.add_argument("--out", required=True, help="run folder: images/ (the benchmark's layout), run.json, seeds.jsonl, "
                                                "summary.json/md, contact_sheet.png")
    p.add_argument("--limit", type=positive_int, default=None, help="only the first N prompts (a smoke run)")
    p.add_argument("--protocol", choices=("ours", "official"), default="ours",
                   help="official: the benchmark's documented size, steps and CFG; ours (default): the model's size "
                        "and CFG, 30 steps. Explicit flags override either")
    p.add_argument("--samples", type=positive_int, default=None, help="images per prompt (default: the benchmark's: "
                                                                      "GenEval 4, DPG-Bench 4 as a 2x2 grid, else 1)")
    p.add_argument("--height", type=image_side, default=None, help="image height, multiple of 32")
    p.add_argument("--width", type=image_side, default=None, help="image width, multiple of 32")
    p.add_argument("--steps", type=positive_int, default=None, help="denoising steps")
    p.add_argument("--guidance", type=non_negative_float, default=None, help="CFG scale (1 = none)")
    p.add_argument("--negative-prompt", default="", help="negative prompt (default: empty)")
    p.add_argument("--batch-size", type=positive_int, default=4, help="prompts per forward pass (default: 4)")
    p.add_argument("--evaluators", default=None, help="comma list of evaluators (shapes, ocr, clip, judge, scorer) or "
                                                      "'none'; default: the benchmark's own (+ scorer with --scorer-cmd)")
    p.add_argument("--scorer-cmd", default=None, help="official scorer command, {images} = the layout folder, {out} "
                                                      "= the run folder (docs/eval.md)")
    p.add_argument("--clip-model", default=None, help="local CLIP folder for the clip evaluator")
    p.add_argument("--judge-url", default=None, help="OpenAI-compatible endpoint of the judge VLM")
    p.add_argument("--judge-model", default="judge", help="model name served at --judge-url")
    p.add_argument("--contact-sheet", type=int_at_least(0), default=16, help="prompts on the contact sheet (0: none)")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    group = add_model_args(p, title="model (as `deepgen generate`, plus the generator's kind)",
                           seed_help="base seed: sample k of prompt i uses seed + i*samples + k")
    group.add_argument("--onnx", default=None, help="an export folder (`deepgen export`): generate on ONNX Runtime")
    group.add_argument("--optimize", choices=MODES, default="auto", help="pipe.optimize mode (default: auto)")
    p.set_defaults(func=cmd_eval)


def _load_generator(args, device) -> tuple[object, dict]:
    """The pipeline (PyTorch in any optimize mode, or ONNX Runtime) and its identity for the report."""
    if args.onnx:
        if args.preset or args.pipeline or args.vlm or args.weights:
            raise ValueError("--onnx: choose one model source (--onnx replaces --preset/--pipeline/--vlm)")
        from deepgen_components.export.onnx_pipeline import OnnxDeepGenPipeline

        providers = ["CUDAExecutionProvider", "CPUExecutionProvider"] if device.type == "cuda" else None
        pipe = OnnxDeepGenPipeline(args.onnx, providers=providers)
        return pipe, {"source": f"onnx:{args.onnx}", "pipeline": "OnnxDeepGenPipeline", "mode": "onnxruntime",
                      "dtype": "as exported", "device": str(device)}
    args.device = str(device)  # under torchrun: this rank's own device
    pipe = load_pipeline(args)
    if args.pipeline:
        source = args.pipeline
    elif args.vlm:
        source = f"official:{args.weights}"
    else:
        source = f"preset:{args.preset or args.default_preset}"
    if args.optimize != "auto":
        pipe.optimize(args.optimize)
    parameters = sum(p.numel() for p in pipe.model.parameters())
    return pipe, {"source": source, "pipeline": "DeepGenPipeline", "mode": pipe.mode, "dtype": args.dtype,
                  "device": str(device), "parameters": parameters}


def _prompts_digest(records) -> str:
    text = "\n".join(f"{r.id}\t{r.prompt}\t{r.image or ''}" for r in records)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def _check_resume(out: Path, identity: dict) -> None:
    """A rerun may only add to a folder made with the same settings, prompts and model."""
    path = out / "run.json"
    if not path.is_file():
        return
    previous = json.loads(path.read_text())
    for key in ("settings", "prompts_digest", "model_source"):
        if previous.get(key) != identity[key]:
            raise ValueError(f"--out {out}: holds a run with different {key.replace('_', ' ')} ({previous.get(key)} "
                             f"vs now {identity[key]}); use another --out or delete it")


def _evaluator_names(args, benchmark) -> list[str]:
    if args.evaluators is not None:
        names = [] if args.evaluators == "none" else [n.strip() for n in args.evaluators.split(",") if n.strip()]
    else:
        names = list(benchmark.evaluators)
    if args.scorer_cmd and "scorer" not in names:
        names.append("scorer")
    return names


class _LazySamples:
    """The finished prompts' samples, read from the layout when an evaluator iterates (not all held in memory)."""

    def __init__(self, layout, records):
        self.layout, self.records = layout, records

    def __len__(self) -> int:
        return len(self.records)

    def __iter__(self):
        for record in self.records:
            yield Sample(record, self.layout.read(record))


def cmd_eval(args) -> int:
    from deepgen_components.training.distributed import barrier, cleanup, gather_to_main, init_distributed

    benchmark = BENCHMARKS[args.benchmark]
    out = check_output_path(args.out, folder=True)
    all_records = load_prompts(benchmark.name, args.prompts)
    records = all_records[: args.limit] if args.limit else all_records
    names = _evaluator_names(args, benchmark)
    options = {"clip_model": args.clip_model, "judge_url": args.judge_url, "judge_model": args.judge_model,
               "scorer_cmd": args.scorer_cmd, "device": args.device}
    info = init_distributed(args.device)
    try:
        # Scoring runs on rank 0 only; bad scoring flags fail there before any model loads (torchrun then stops the
        # other ranks).
        evaluators = [build_evaluator(name, **options) for name in names] if info.is_main else []
        pipe, model = _load_generator(args, info.device)
        settings = resolve_settings(benchmark, pipe, protocol=args.protocol, set_size=len(all_records),
                                    samples=args.samples, height=args.height, width=args.width, steps=args.steps,
                                    guidance=args.guidance, seed=args.seed, negative_prompt=args.negative_prompt)
        layout = make_layout(benchmark.layout, out, settings.samples)
        identity = {"settings": settings.to_dict(), "prompts_digest": _prompts_digest(all_records),
                    "model_source": model["source"]}
        _check_resume(out, identity)
        barrier(info)
        if info.is_main:
            layout.clear_partial()  # what a killed run left half-written
            layout.prepare()
            write_text_atomic(out / "run.json", json.dumps({**identity, "model": model}, indent=2) + "\n")
        barrier(info)
        pending = [r for r in records if not layout.is_done(r)]
        barrier(info)  # every rank listed the same unfinished prompts before anyone writes
        stats = generate(pipe, records, layout, settings, batch_size=args.batch_size, rank=info.rank,
                         world_size=info.world_size, progress=not args.quiet, pending=pending)
        barrier(info)
        gathered = gather_to_main(asdict(stats), info)
        if info.is_main:
            _merge(args, out, records, layout, settings, benchmark, model, gathered, evaluators, info.world_size)
    finally:
        cleanup(info)
    return 0


def _merge(args, out, records, layout, settings, benchmark, model, gathered, evaluators, world_size) -> None:
    missing = [r.id for r in records if not layout.is_done(r)]
    if missing:
        raise RuntimeError(f"{len(missing)} prompt(s) unfinished after generation (first: {missing[0]})")
    seeds = {r.index: sample_seeds(settings, r.index) for r in records}
    write_text_atomic(out / "seeds.jsonl", "".join(
        json.dumps({"index": r.index, "id": r.id, "seeds": seeds[r.index]}) + "\n" for r in records))
    layout.finish(records, seeds)
    shards = [{"rank": rank, "generated": g["ids"]} for rank, g in enumerate(gathered)]
    write_text_atomic(out / "shards.json", json.dumps({"world_size": world_size, "ranks": shards}) + "\n")
    layout.clear_partial()
    seconds = max(g["seconds"] for g in gathered)
    generated = sum(g["images"] for g in gathered)
    started = time.perf_counter()
    scores = []
    for evaluator in evaluators:
        result = evaluator.evaluate(_LazySamples(layout, records), out)
        scores.append(result.to_dict())
        if result.per_prompt:
            write_text_atomic(out / f"scores_{result.name}.jsonl",
                              "".join(json.dumps(row, ensure_ascii=False) + "\n" for row in result.per_prompt))
    scoring = time.perf_counter() - started
    sheet = None
    if args.contact_sheet:
        step = max(1, len(records) // args.contact_sheet)
        chosen = records[::step][: args.contact_sheet]
        contact_sheet([layout.read(r)[0] for r in chosen], [r.id for r in chosen]).save(out / "contact_sheet.png")
        sheet = "contact_sheet.png"
    rule = ("shapes evaluation noise: row i of randn(chunk of 64) seeded seed + chunk start"
            if settings.noise == "shapes_eval" else "torch.Generator().manual_seed(seed + index * samples + k)")
    summary = {
        "benchmark": benchmark.name,
        "layout": benchmark.layout,
        "prompts": len(records),
        "images": len(records) * settings.samples,
        "settings": settings.to_dict(),
        "protocol_source": benchmark.official.source if settings.protocol == "official" else "our defaults: the "
                           "model's size and CFG, 30 steps",
        "seeds": {"base": settings.seed, "rule": rule, "file": "seeds.jsonl"},
        "model": model,
        "prompt_source": args.prompts or f"shipped ({benchmark.license})",
        "scores": scores,
        "timing": {"generation_seconds": seconds, "generated_images": generated,
                   "generated_prompts": sum(g["prompts"] for g in gathered),
                   "skipped_prompts": gathered[0]["skipped"], "world_size": world_size,
                   "images_per_second": generated / seconds if seconds > 0 and generated else None,
                   "scoring_seconds": scoring},
        "contact_sheet": sheet,
    }
    write_summary(out, summary)
    print(f"wrote {out / 'summary.json'} and {out / 'summary.md'}; images in {layout.images} "
          f"({summary['timing']['generated_prompts']} prompts generated, {gathered[0]['skipped']} already finished)")
    for result in scores:
        print(f"{result['name']}: overall {result['overall']}")
