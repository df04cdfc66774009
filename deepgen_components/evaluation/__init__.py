"""``deepgen eval``: benchmark prompt sets, their official output layouts, a sharded and resumable generation
harness, offline evaluators behind one protocol, and the run report (docs/eval.md).

The prompt data under ``data/`` is vendored with its licenses: GenEval (MIT, djghosh13/geneval) and DPG-Bench
(Apache-2.0, TencentQQGYLab/ELLA).
"""

from deepgen_components.evaluation.evaluators import (
    EvalResult,
    Evaluator,
    Sample,
    available_evaluators,
    build_evaluator,
    cvtg_text_scores,
    parse_geneval_results,
    parse_wise_answer,
    quoted_texts,
    register_evaluator,
)
from deepgen_components.evaluation.harness import (
    GenerationSettings,
    generate,
    initial_noise,
    resolve_settings,
    sample_seeds,
    shard,
)
from deepgen_components.evaluation.layouts import Layout, dpg_crop_boxes, make_layout
from deepgen_components.evaluation.prompts import (
    BENCHMARKS,
    Benchmark,
    PromptRecord,
    load_prompt_file,
    load_prompts,
)
from deepgen_components.evaluation.report import contact_sheet, write_summary

__all__ = [
    "BENCHMARKS",
    "Benchmark",
    "EvalResult",
    "Evaluator",
    "GenerationSettings",
    "Layout",
    "PromptRecord",
    "Sample",
    "available_evaluators",
    "build_evaluator",
    "contact_sheet",
    "cvtg_text_scores",
    "dpg_crop_boxes",
    "generate",
    "initial_noise",
    "load_prompt_file",
    "load_prompts",
    "make_layout",
    "parse_geneval_results",
    "parse_wise_answer",
    "quoted_texts",
    "register_evaluator",
    "resolve_settings",
    "sample_seeds",
    "shard",
    "write_summary",
]
