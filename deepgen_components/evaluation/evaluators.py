"""Scoring a finished run: one :class:`Evaluator` protocol and a registry, like the rewards.

An evaluator reads the generated samples of every prompt and returns an :class:`EvalResult` (overall score,
per-category scores, other named metrics). Built in, all offline:

* ``ocr``: text rendering read back by RapidOCR (it ships its models), word accuracy and normalised edit distance;
* ``clip``: mean CLIP score from local CLIP weights (``--clip-model DIR``);
* ``judge``: a VLM judge over an OpenAI-compatible endpoint, WISE-style (consistency, realism, aesthetics, WiScore);
* ``scorer``: an official scorer the user has installed (GenEval, DPG-Bench), run as a command; its output is
  parsed into the summary. Detectors and VQA models are never re-implemented here.

More come through :func:`register_evaluator`: the shapes world registers ``shapes`` (attribute accuracies and reward
of its deterministic evaluator) when ``deepgen_components.shapes`` is imported.
"""

from __future__ import annotations

import json
import re
import shlex
import subprocess
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol, runtime_checkable

from PIL import Image

from deepgen_components.evaluation.prompts import PromptRecord

__all__ = ["EvalResult", "Evaluator", "Sample", "available_evaluators", "build_evaluator", "by_category",
           "cvtg_text_scores", "mean", "parse_geneval_results", "parse_wise_answer", "quoted_texts",
           "register_evaluator"]


@dataclass
class Sample:
    """A finished prompt: its record and its generated images (sample order)."""

    record: PromptRecord
    images: list[Image.Image]


@dataclass
class EvalResult:
    name: str
    overall: float | None
    categories: dict[str, float] = field(default_factory=dict)
    metrics: dict[str, float] = field(default_factory=dict)
    per_prompt: list[dict] = field(default_factory=list)
    notes: str = ""

    def to_dict(self) -> dict:
        return {"name": self.name, "overall": self.overall, "categories": self.categories, "metrics": self.metrics,
                "notes": self.notes}


@runtime_checkable
class Evaluator(Protocol):
    name: str

    def evaluate(self, samples: Sequence[Sample], run_dir: Path) -> EvalResult: ...


_REGISTRY: dict[str, Callable[..., Evaluator]] = {}


def register_evaluator(name: str, factory: Callable[..., Evaluator]) -> None:
    """Make ``--evaluators NAME`` usable: ``factory(**options)`` gets the CLI's scoring options (``clip_model``,
    ``judge_url``, ``judge_model``, ``scorer_cmd``, ``device``) and takes the ones it needs."""
    if name in _REGISTRY and _REGISTRY[name] is not factory:
        raise ValueError(f"register_evaluator: {name!r} is already registered")
    _REGISTRY[name] = factory


def available_evaluators() -> list[str]:
    return sorted(_REGISTRY)


def build_evaluator(name: str, **options) -> Evaluator:
    """Build a registered evaluator; ``options`` are the CLI's (each factory takes the ones it needs)."""
    if name not in _REGISTRY:
        raise ValueError(f"--evaluators: unknown evaluator {name!r}; known: {', '.join(available_evaluators())} (the "
                         "shapes world registers its kinds when deepgen_components.shapes is imported)")
    return _REGISTRY[name](**options)


def mean(values: Sequence[float]) -> float:
    """The mean of ``values`` (nan when empty)."""
    return sum(values) / len(values) if values else float("nan")


def by_category(rows: list[tuple[str | None, float]]) -> dict[str, float]:
    """(category, value) rows -> the mean value per category (rows without a category are left out)."""
    groups: dict[str, list[float]] = {}
    for category, value in rows:
        if category is not None:
            groups.setdefault(category, []).append(value)
    return {c: mean(v) for c, v in sorted(groups.items())}


# -- OCR ------------------------------------------------------------------------------------------------------
_QUOTED = re.compile(r'"([^"]*)"|\u201c([^\u201d]*)\u201d')
_EDGE_PUNCT = re.compile(r"^[^\w]+|[^\w]+$")


def quoted_texts(prompt: str) -> list[str]:
    """Every quoted span of a prompt (straight or curly quotes): the texts a CVTG-2K prompt asks to render."""
    return [a or b for a, b in _QUOTED.findall(prompt) if (a or b).strip()]


def _words(text: str) -> list[str]:
    words = (_EDGE_PUNCT.sub("", w.lower()) for w in text.split())
    return [w for w in words if w]


def cvtg_text_scores(ocr_text: str, targets: Sequence[str]) -> tuple[int, int, float]:
    """(matched words, target words, NED similarity) of one image.

    Word accuracy counts the target words (lowercased, edge punctuation stripped) found among the OCR words, each
    OCR word matching at most once; NED similarity is ``1 - Levenshtein(ocr, target) / max(len)`` over the words
    joined by single spaces (1 = identical; an empty pair scores 1)."""
    from rapidfuzz.distance import Levenshtein

    target_words = [w for t in targets for w in _words(t)]
    available: dict[str, int] = {}
    for word in _words(ocr_text):
        available[word] = available.get(word, 0) + 1
    matched = 0
    for word in target_words:
        if available.get(word, 0) > 0:
            available[word] -= 1
            matched += 1
    got, want = " ".join(_words(ocr_text)), " ".join(target_words)
    longest = max(len(got), len(want))
    ned = 1.0 - Levenshtein.distance(got, want) / longest if longest else 1.0
    return matched, len(target_words), ned


class OcrEvaluator:
    """Text rendering (CVTG-2K style): word accuracy (over all target words of the set) and mean NED similarity.

    Targets are the record's ``metadata["texts"]`` when given, else the prompt's quoted spans. Prompts without a
    target are skipped (counted in ``metrics["skipped"]``)."""

    name = "ocr"

    def __init__(self, **_):
        from deepgen_components.rl.rewards import OcrReward

        self.reader = OcrReward()  # its RapidOCR engine, configured like the official PaddleOCR

    def read(self, image: Image.Image) -> str:
        """All recognised lines, separated by spaces (OcrReward joins them without one)."""
        result, _ = self.reader.engine(image)
        return " ".join(item[1] for item in result or [])

    def evaluate(self, samples, run_dir) -> EvalResult:
        matched = total = skipped = 0
        neds, category_rows, per_prompt = [], [], []
        for sample in samples:
            targets = sample.record.metadata.get("texts") or quoted_texts(sample.record.prompt)
            if not targets:
                skipped += 1
                continue
            for image in sample.images:
                text = self.read(image)
                m, n, ned = cvtg_text_scores(text, targets)
                matched, total = matched + m, total + n
                neds.append(ned)
                category_rows.append((sample.record.category, m / n if n else 0.0))
                per_prompt.append({"id": sample.record.id, "ocr": text, "matched": m, "words": n, "ned": ned})
        word_accuracy = matched / total if total else float("nan")
        metrics = {"word_accuracy": word_accuracy, "ned": mean(neds), "words": total, "skipped": skipped}
        return EvalResult(self.name, word_accuracy, by_category(category_rows), metrics, per_prompt,
                          "overall = word accuracy; ned = mean 1 - normalised edit distance")


# -- CLIP -----------------------------------------------------------------------------------------------------
class ClipEvaluator:
    """Mean CLIP score (:class:`~deepgen_components.rl.rewards.ClipReward`: cosine, no x100) from local weights."""

    name = "clip"

    def __init__(self, *, clip_model: str | None = None, device: str = "cpu", **_):
        from deepgen_components.rl.rewards import ClipReward

        if not clip_model:
            raise ValueError("--clip-model: the clip evaluator needs a local CLIP folder (nothing is downloaded)")
        if not Path(clip_model).is_dir():
            raise FileNotFoundError(f"--clip-model {clip_model}: no such folder")
        self.reward = ClipReward(clip_model, device=device)

    def evaluate(self, samples, run_dir) -> EvalResult:
        rows = [(s.record, image) for s in samples for image in s.images]
        scores = self.reward.score([i for _, i in rows], [r.prompt for r, _ in rows]).tolist() if rows else []
        per_prompt = [{"id": r.id, "clip": v} for (r, _), v in zip(rows, scores)]
        categories = by_category([(r.category, v) for (r, _), v in zip(rows, scores)])
        return EvalResult(self.name, mean(scores), categories, {"mean": mean(scores)}, per_prompt)


# -- the judge ------------------------------------------------------------------------------------------------
WISE_QUESTION = (
    "You are judging a generated image against the prompt it was made from.\n"
    "Prompt: {prompt}\n{explanation}"
    "Score three things, each 0, 1 or 2: Consistency (does the image show what the prompt means, including the "
    "knowledge it implies), Realism, Aesthetic Quality. Answer exactly in this form:\n"
    "Consistency: N\nRealism: N\nAesthetic Quality: N"
)
_JUDGE_SCORE = re.compile(r"(?i)(consistency|realism|aesthetic quality)\s*[:=]\s*\**\s*([0-2](?:\.\d+)?)")


def parse_wise_answer(text: str) -> dict[str, float] | None:
    """``{"consistency", "realism", "aesthetic"}`` from a judge's answer, or None when one is missing."""
    found = {name.lower().split()[0]: float(value) for name, value in _JUDGE_SCORE.findall(text or "")}
    return found if {"consistency", "realism", "aesthetic"} <= found.keys() else None


class JudgeEvaluator:
    """WISE-style scores from a VLM behind an OpenAI-compatible ``/v1/chat/completions``: consistency, realism and
    aesthetic quality (0-2 each) per image, ``WiScore = (0.7 C + 0.2 R + 0.1 A) / 2`` in [0, 1]. An image whose
    answer cannot be parsed after the retries is left out and counted (``metrics["unparsed"]``)."""

    name = "judge"

    def __init__(self, *, judge_url: str | None = None, judge_model: str = "judge", judge_timeout: float = 60,
                 judge_retries: int = 2, **_):
        if not judge_url or not judge_url.startswith(("http://", "https://")):
            raise ValueError(f"--judge-url: an http(s) OpenAI-compatible endpoint is needed, got {judge_url!r}")
        self.url = judge_url.rstrip("/").removesuffix("/v1") + "/v1/chat/completions"
        self.model, self.timeout, self.retries = judge_model, float(judge_timeout), int(judge_retries)

    def ask(self, image: Image.Image, record: PromptRecord) -> str:
        import urllib.request

        from deepgen_components.rl.rewards import encode_jpeg_data_url

        explanation = record.metadata.get("explanation") or record.metadata.get("Explanation")
        question = WISE_QUESTION.format(prompt=record.prompt,
                                        explanation=f"What it should show: {explanation}\n" if explanation else "")
        body = {"model": self.model, "temperature": 0.0, "max_tokens": 512, "messages": [{"role": "user", "content": [
            {"type": "image_url", "image_url": {"url": encode_jpeg_data_url(image)}},
            {"type": "text", "text": question}]}]}
        request = urllib.request.Request(self.url, data=json.dumps(body).encode(), method="POST",
                                         headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(request, timeout=self.timeout) as response:
            content = json.loads(response.read())["choices"][0]["message"]["content"]
        return content if isinstance(content, str) else "".join(p.get("text", "") for p in content)

    def evaluate(self, samples, run_dir) -> EvalResult:
        rows, per_prompt, unparsed = [], [], 0
        for sample in samples:
            for image in sample.images:
                scores = None
                for _ in range(self.retries + 1):
                    try:
                        scores = parse_wise_answer(self.ask(image, sample.record))
                    except (OSError, ValueError, KeyError, IndexError, TypeError):
                        scores = None
                    if scores is not None:
                        break
                if scores is None:
                    unparsed += 1
                    continue
                wiscore = (0.7 * scores["consistency"] + 0.2 * scores["realism"] + 0.1 * scores["aesthetic"]) / 2
                rows.append((sample.record.category, wiscore, scores))
                per_prompt.append({"id": sample.record.id, "wiscore": wiscore, **scores})
        metrics = {k: mean([s[k] for _, _, s in rows]) for k in ("consistency", "realism", "aesthetic")}
        metrics["unparsed"] = unparsed
        overall = mean([w for _, w, _ in rows])
        return EvalResult(self.name, overall, by_category([(c, w) for c, w, _ in rows]), metrics, per_prompt,
                          "overall = mean WiScore (0.7 consistency + 0.2 realism + 0.1 aesthetic) / 2")


# -- official scorers run as commands -------------------------------------------------------------------------
def parse_geneval_results(path: Path) -> EvalResult:
    """GenEval's ``results.jsonl`` (one line per image with ``tag`` and ``correct``): per-tag accuracy over images
    and the overall score as GenEval's summary reports it, the mean of the tag accuracies."""
    per_tag: dict[str, list[float]] = {}
    for number, line in enumerate(path.read_text().splitlines(), 1):
        if line.strip():
            row = json.loads(line)
            if "tag" not in row or "correct" not in row:
                raise ValueError(f"{path}:{number}: a GenEval result line needs 'tag' and 'correct'")
            per_tag.setdefault(row["tag"], []).append(float(bool(row["correct"])))
    categories = {tag: mean(v) for tag, v in sorted(per_tag.items())}
    return EvalResult("scorer", mean(list(categories.values())) if categories else None, categories,
                      {"images": sum(len(v) for v in per_tag.values())}, notes=f"GenEval {path.name}")


_SCORE_LINE = re.compile(r"(?i)\b(?:overall|score)\b[^0-9\-]*(-?\d+(?:\.\d+)?)")


class ScorerCommand:
    """Runs ``--scorer-cmd`` with ``{images}`` (the layout folder) and ``{out}`` (the run folder) filled in.

    The output is parsed into the summary: a GenEval ``results.jsonl`` under ``{out}`` when the command wrote one,
    else the last ``score`` / ``overall`` number it printed (DPG-Bench prints its score). The full output is kept in
    ``scorer_output.txt``."""

    name = "scorer"

    def __init__(self, *, scorer_cmd: str | None = None, **_):
        if not scorer_cmd or "{images}" not in scorer_cmd:
            raise ValueError("--scorer-cmd: give the official scorer's command with {images} where the image folder "
                             "goes (and {out} for the run folder), e.g. 'python evaluation/evaluate_images.py {images} "
                             "--outfile {out}/results.jsonl --model-path DETECTOR'")
        self.command = scorer_cmd

    def evaluate(self, samples, run_dir) -> EvalResult:
        images = run_dir / "images"
        argv = [part.replace("{images}", str(images)).replace("{out}", str(run_dir)) for part in shlex.split(self.command)]
        done = subprocess.run(argv, capture_output=True, text=True)
        output = done.stdout + done.stderr
        (run_dir / "scorer_output.txt").write_text(output)
        if done.returncode != 0:
            raise ChildProcessError(f"--scorer-cmd exited {done.returncode}; see {run_dir / 'scorer_output.txt'}: "
                               f"{output.strip().splitlines()[-1] if output.strip() else ''}")
        results = run_dir / "results.jsonl"
        if results.is_file():
            return parse_geneval_results(results)
        found = _SCORE_LINE.findall(output)
        overall = float(found[-1]) if found else None
        return EvalResult(self.name, overall, notes="parsed from the scorer's output" if found else
                          "no score found in the scorer's output (scorer_output.txt)")


register_evaluator("ocr", OcrEvaluator)
register_evaluator("clip", ClipEvaluator)
register_evaluator("judge", JudgeEvaluator)
register_evaluator("scorer", ScorerCommand)
