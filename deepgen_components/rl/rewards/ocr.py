"""OCR accuracy reward for text-rendering prompts (reference §4 "OCR reward", §7 first defect).

What it computes, per image:

1. **Target**: the first quoted span of the prompt, ``a sign that says "HELLO 2026"`` → ``HELLO 2026``.
2. **OCR text**: all lines the OCR engine recognises, concatenated in reading order.
3. Both are normalised: every whitespace character removed, lowercased.
4. ``d = 0`` if the target is a substring of the OCR text, else ``min(Levenshtein(ocr, target), len(target))``.
5. ``reward = 1 − d / len(target)`` in [0, 1].

Differences from the official service (Flow-GRPO-style ``ocr_old`` behind a Flask/gunicorn server):

* **Per-image scoring (defect fix).** The official scorer does ``prompt.split('"')[1]`` for every prompt of a
  request; one prompt without a quote raises, the service answers HTTP 500 and the trainer sets OCR = 0 for
  *every* image on that GPU. Since general prompts never contain quotes, any batch that mixes categories
  loses its OCR signal. Here a prompt without a target scores 0.0 for its own image only, and nothing
  raises: an engine failure on one image is logged and scores that image 0.0.
* **Engine.** PaddleOCR 2.9.1 downloads its models on first use and fails offline. We use
  ``rapidocr-onnxruntime``, whose wheel ships the PP-OCRv4 det/rec ONNX models (same PP-OCR family, CPU).
  It is configured like the official ``PaddleOCR(lang='en', use_angle_cls=False)``: no angle classifier,
  detection resized so that the longer side is at most 960 px (PaddleOCR's ``det_limit_side_len=960,
  det_limit_type='max'``; RapidOCR's own default upsamples the shorter side to 736 px, which is slower), and
  recognised lines with confidence < 0.5 dropped (PaddleOCR's ``drop_score``). The PP-OCRv4 ``ch`` recogniser
  reads Latin text and digits as well as Chinese.
* **Images** go to the engine as decoded RGB pixels; the official client re-encodes them as JPEG first.
* **Quotes.** Straight quotes ``"…"`` as in the official code; by default curly quotes ``“…”`` are accepted
  too (whichever opening quote comes first wins; ``curly_quotes=False`` restores straight-only parsing). An
  opening quote without a closing one takes the rest of the prompt, like ``split('"')[1]``. An empty target
  (``""``) scores 0.0 instead of dividing by zero.
* Whitespace removal covers every whitespace character, not only the ASCII space.
"""

from __future__ import annotations

import functools
import logging
import re
from collections.abc import Callable, Sequence
from typing import Any

import torch
from PIL import Image

from .base import ImageBatch, check_batch

__all__ = ["OcrReward", "extract_quoted_target", "normalize_ocr_text", "ocr_accuracy"]

logger = logging.getLogger(__name__)

_WS = re.compile(r"\s+")
_CURLY_PAIRS = {'"': '"', "\u201c": "\u201d"}  # “ → ”


def extract_quoted_target(prompt: str, *, curly_quotes: bool = True) -> str | None:
    """The first quoted span of ``prompt``, or ``None`` when the prompt has no opening quote.

    ``'a sign that says "HELLO 2026" in neon'`` → ``'HELLO 2026'``. With ``curly_quotes`` the span may also be
    delimited by “ and ”. An unclosed quote yields the rest of the prompt (official ``split('"')[1]``).
    """
    openers = _CURLY_PAIRS if curly_quotes else {'"': '"'}
    starts = [(prompt.find(o), o) for o in openers if o in prompt]
    if not starts:
        return None
    start, opener = min(starts)
    rest = prompt[start + 1 :]
    end = rest.find(openers[opener])
    return rest if end < 0 else rest[:end]


def normalize_ocr_text(text: str) -> str:
    """Remove every whitespace character and lowercase (applied to both the OCR text and the target)."""
    return _WS.sub("", text).lower()


def ocr_accuracy(ocr_text: str, target: str) -> float:
    """``1 − d/len(target)`` with ``d`` = 0 for a substring match, else Levenshtein capped at ``len(target)``.

    Both strings are normalised with :func:`normalize_ocr_text` first; an empty target scores 0.0.
    """
    from rapidfuzz.distance import Levenshtein

    ocr_n, tgt_n = normalize_ocr_text(ocr_text), normalize_ocr_text(target)
    if not tgt_n:
        return 0.0
    if tgt_n in ocr_n:
        return 1.0
    d = min(Levenshtein.distance(ocr_n, tgt_n), len(tgt_n))
    return 1.0 - d / len(tgt_n)


OcrEngine = Callable[[Image.Image], Any]
"""An OCR engine: called with one RGB PIL image. It may return a list of recognised line strings, or the
``(result, elapse)`` tuple of a ``rapidocr_onnxruntime.RapidOCR`` instance (``result`` = list of
``[box, text, confidence]`` or ``None``)."""


@functools.lru_cache(maxsize=1)
def _default_engine() -> Any:
    """One shared RapidOCR instance per process (loading the ONNX sessions takes ~0.5 s)."""
    try:
        from rapidocr_onnxruntime import RapidOCR
    except ImportError as e:  # pragma: no cover - depends on the environment
        raise ImportError(
            "OcrReward needs rapidocr-onnxruntime (pip install 'deepgen-components[rewards]')"
        ) from e
    return RapidOCR(use_cls=False, det_limit_side_len=960, det_limit_type="max", text_score=0.5)


def _lines_from_result(result: Any) -> list[str]:
    """Recognised text lines from an engine result (list of str, or RapidOCR's ``(result, elapse)``)."""
    if result is None:
        return []
    if isinstance(result, tuple) and len(result) == 2 and not isinstance(result[0], str):
        result = result[0]  # RapidOCR: (list of [box, text, score] | None, elapse)
        if result is None:
            return []
    lines = []
    for item in result:
        if isinstance(item, str):
            lines.append(item)
        elif isinstance(item, (list, tuple)) and len(item) >= 2 and isinstance(item[1], str):
            lines.append(item[1])
        else:
            raise TypeError(f"unrecognised OCR result entry {item!r}")
    return lines


class OcrReward:
    """OCR accuracy of the prompt's quoted text, in [0, 1], scored per image (see the module docstring).

    Args:
        engine: a callable OCR engine (see :data:`OcrEngine`); ``None`` uses a shared
            ``rapidocr_onnxruntime.RapidOCR`` configured like the official PaddleOCR, created on first use.
        curly_quotes: also accept “…” as the target delimiters.
        no_target_score: the score of an image whose prompt has no quoted target (0.0, as in the reference
            fix; the weight table gives OCR weight 0 to general prompts anyway).

    ``last_texts`` holds the recognised (un-normalised) text of each image of the last ``score`` call, for
    logging and debugging.
    """

    name = "ocr"

    def __init__(
        self, engine: OcrEngine | None = None, *, curly_quotes: bool = True, no_target_score: float = 0.0
    ):
        if engine is not None and not callable(engine):
            raise TypeError(f"OcrReward: engine must be callable or None, got {type(engine).__name__}")
        self._engine = engine
        self.curly_quotes = curly_quotes
        self.no_target_score = float(no_target_score)
        self.last_texts: list[str | None] = []

    @property
    def engine(self) -> OcrEngine:
        if self._engine is None:
            self._engine = _default_engine()
        return self._engine

    def recognize(self, image: Image.Image) -> str:
        """All recognised lines of one image, concatenated in reading order (no separator)."""
        return "".join(_lines_from_result(self.engine(image)))

    def score(self, images: ImageBatch, prompts: Sequence[str]) -> torch.Tensor:
        """OCR accuracy per image, float32 (N,). Never raises for a missing target or an engine failure."""
        pil, prompts = check_batch(images, prompts)
        scores: list[float] = []
        texts: list[str | None] = []
        for i, (img, prompt) in enumerate(zip(pil, prompts)):
            target = extract_quoted_target(prompt, curly_quotes=self.curly_quotes)
            if target is None or not normalize_ocr_text(target):
                scores.append(self.no_target_score)
                texts.append(None)  # no OCR run: nothing to compare against
                continue
            try:
                text = self.recognize(img)
            except Exception as e:  # one bad image must not zero the batch (the defect this class fixes)
                logger.warning(
                    "OcrReward: OCR failed on image %d (%s: %s); scoring it 0.0", i, type(e).__name__, e
                )
                scores.append(0.0)
                texts.append(None)
                continue
            texts.append(text)
            scores.append(ocr_accuracy(text, target))
        self.last_texts = texts
        return torch.tensor(scores, dtype=torch.float32)
