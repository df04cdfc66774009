"""Benchmark prompt sets: the vendored GenEval and DPG-Bench prompts, registered sets, and user files.

A prompt set is a list of :class:`PromptRecord`. Every record keeps what its benchmark's scorer needs: GenEval's
metadata line exactly as it stands in ``evaluation_metadata.jsonl`` (the official evaluator reads it back from each
prompt folder), DPG-Bench's file stem, a category for per-category scores, and for editing sets the source image.

:data:`BENCHMARKS` describes each benchmark: its layout, samples per prompt, where its prompts come from, the
evaluator that scores it here, and its documented sampling settings (``--protocol official``). More benchmarks come
through :func:`register_benchmark`: the shapes world registers ``shapes`` (its fixed evaluation set) when
``deepgen_components.shapes`` is imported.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from deepgen_components.jsonl import read_objects

__all__ = [
    "BENCHMARKS",
    "DATA_DIR",
    "Benchmark",
    "PromptRecord",
    "Protocol",
    "load_prompt_file",
    "load_prompts",
    "register_benchmark",
]

DATA_DIR = Path(__file__).resolve().parent / "data"


@dataclass(frozen=True)
class Protocol:
    """Sampling settings; ``None`` = the model's own default (its native size, its CFG scale)."""

    height: int | None = None
    width: int | None = None
    steps: int = 30
    guidance: float | None = None
    source: str = "deepgen-components defaults"


@dataclass(frozen=True)
class Benchmark:
    name: str
    layout: str  # "geneval" | "dpg" | "plain"
    samples: int  # images per prompt
    official: Protocol
    evaluators: tuple[str, ...] = ()  # scored here by default
    builtin: bool = False  # prompts ship with the package (else --prompts FILE)
    license: str = ""
    noise: str = "per_sample"  # see harness.initial_noise


# DeepGen 1.0's evaluation settings (reference/deepgen-1.0-architecture.md): 50 Euler steps, CFG 4.0 (DPG-Bench 7.5),
# 512 px as EVAL.md and the model card run them (the scripts' own default is 1024 px: pass --height/--width 1024).
_DEEPGEN_EVAL = "DeepGen 1.0 EVAL.md / model card: 512 px, 50 steps"
BENCHMARKS: dict[str, Benchmark] = {
    "geneval": Benchmark("geneval", "geneval", 4, Protocol(512, 512, 50, 4.0, _DEEPGEN_EVAL + ", CFG 4.0"),
                         builtin=True, license="MIT (djghosh13/geneval)"),
    "dpg": Benchmark("dpg", "dpg", 4, Protocol(512, 512, 50, 7.5, _DEEPGEN_EVAL + ", CFG 7.5"),
                     builtin=True, license="Apache-2.0 (TencentQQGYLab/ELLA)"),
    "wise": Benchmark("wise", "plain", 1, Protocol(512, 512, 50, 4.0, _DEEPGEN_EVAL + " (WISE scripts: 512), CFG 4.0"),
                      evaluators=("judge",)),
    "cvtg": Benchmark("cvtg", "plain", 1, Protocol(512, 512, 50, 4.0, _DEEPGEN_EVAL + ", CFG 4.0"),
                      evaluators=("ocr",)),
    "unireditbench": Benchmark("unireditbench", "plain", 1, Protocol(512, 512, 50, 4.0, _DEEPGEN_EVAL + ", CFG 4.0"),
                               evaluators=("judge",)),
    "custom": Benchmark("custom", "plain", 1, Protocol(source="deepgen-components defaults"), builtin=False),
}


@dataclass
class PromptRecord:
    """One prompt of a set. ``id`` names its output (GenEval: the 5-digit line number; DPG-Bench: the file stem)."""

    index: int
    id: str
    prompt: str
    category: str | None = None
    image: str | None = None  # source image (editing sets), absolute or relative to the prompt file
    source_line: str | None = None  # GenEval: the metadata line verbatim
    metadata: dict = field(default_factory=dict)

    def to_json(self) -> dict:
        row = {"index": self.index, "id": self.id, "prompt": self.prompt}
        if self.category is not None:
            row["category"] = self.category
        if self.image is not None:
            row["image"] = self.image
        if self.metadata:
            row["metadata"] = self.metadata
        return row


def _jsonl_lines(path: Path) -> list[tuple[int, str, dict]]:
    return read_objects(path, argument="--prompts")


def _geneval(path: Path) -> list[PromptRecord]:
    records = []
    for number, line, row in _jsonl_lines(path):
        if not isinstance(row.get("prompt"), str) or "tag" not in row:
            raise ValueError(f"--prompts {path}:{number}: a GenEval line needs 'prompt' and 'tag'")
        index = len(records)
        records.append(PromptRecord(index, f"{index:05d}", row["prompt"], row["tag"], source_line=line,
                                    metadata=row))
    return records


def load_prompt_file(path: str | os.PathLike, *, benchmark: str = "custom") -> list[PromptRecord]:
    """A user's prompt file: ``.txt`` (one prompt a line) or ``.jsonl`` with ``prompt`` and optional ``id``,
    ``category`` (``tag`` for GenEval files), ``image`` (a source image for editing) and any other keys (kept as
    metadata). A GenEval-format file keeps its lines verbatim for the GenEval layout."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"--prompts {path}: no such file")
    if benchmark == "geneval":
        return _geneval(path)
    records: list[PromptRecord] = []
    if path.suffix == ".txt":
        lines = [line.strip() for line in path.read_text(encoding="utf-8").splitlines()]
        records = [PromptRecord(i, f"{i:05d}", p) for i, p in enumerate(line for line in lines if line)]
    elif path.suffix == ".jsonl":
        for number, _, row in _jsonl_lines(path):
            prompt = row.get("prompt", row.get("instruction"))
            if not isinstance(prompt, str) or not prompt.strip():
                raise ValueError(f"--prompts {path}:{number}: needs a non-empty 'prompt' string")
            index = len(records)
            ident = str(row.get("id", f"{index:05d}"))
            if not ident or "/" in ident or ident.startswith("."):
                raise ValueError(f"--prompts {path}:{number}: id {ident!r} cannot name a file")
            image = row.get("image")
            if image is not None:
                image = str(image if Path(image).is_absolute() else path.parent / image)
            extra = {k: v for k, v in row.items() if k not in ("id", "prompt", "instruction", "category", "tag", "image")}
            category = row.get("category", row.get("tag"))
            records.append(PromptRecord(index, ident, prompt, None if category is None else str(category), image,
                                        metadata=extra))
    else:
        raise ValueError(f"--prompts {path}: expected a .jsonl or .txt file")
    if not records:
        raise ValueError(f"--prompts {path}: no prompts in it")
    ids = [r.id for r in records]
    if len(set(ids)) != len(ids):
        duplicate = next(i for i in ids if ids.count(i) > 1)
        raise ValueError(f"--prompts {path}: id {duplicate!r} appears more than once")
    return records


# The prompt sets that ship with the package (or are made by a registered benchmark): benchmark -> its loader.
_PROMPT_SETS: dict[str, Callable[[], list[PromptRecord]]] = {
    "geneval": lambda: _geneval(DATA_DIR / "geneval" / "evaluation_metadata.jsonl"),
    "dpg": lambda: load_prompt_file(DATA_DIR / "dpg_bench" / "prompts.jsonl", benchmark="dpg"),
}


def register_benchmark(benchmark: Benchmark, prompts: Callable[[], list[PromptRecord]] | None = None) -> None:
    """Make ``--benchmark NAME`` usable: ``benchmark`` describes it; ``prompts()`` returns its own prompt set (needed
    when ``benchmark.builtin``; without it the set comes from ``--prompts FILE``)."""
    if benchmark.builtin and prompts is None:
        raise ValueError(f"register_benchmark: {benchmark.name!r} is builtin, so it needs its prompts loader")
    if BENCHMARKS.get(benchmark.name, benchmark) != benchmark:
        raise ValueError(f"register_benchmark: another benchmark named {benchmark.name!r} is already registered")
    BENCHMARKS[benchmark.name] = benchmark
    if prompts is not None:
        _PROMPT_SETS[benchmark.name] = prompts


def load_prompts(benchmark: str, path: str | os.PathLike | None = None) -> list[PromptRecord]:
    """The prompts of ``benchmark``: ``path`` when given, else the set shipped with the package."""
    if benchmark not in BENCHMARKS:
        raise ValueError(f"--benchmark: unknown benchmark {benchmark!r}; known: {', '.join(BENCHMARKS)} (the shapes "
                         "world registers its kinds when deepgen_components.shapes is imported)")
    if path is not None:
        return load_prompt_file(path, benchmark=benchmark)
    if benchmark in _PROMPT_SETS:
        return _PROMPT_SETS[benchmark]()
    raise ValueError(
        f"--prompts: benchmark {benchmark!r} ships no prompts (its set is not public or too large to vendor); give "
        "a .jsonl file with one {\"id\", \"prompt\", \"category\"?, \"image\"?} object a line (docs/eval.md)"
    )
