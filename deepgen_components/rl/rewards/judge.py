"""Pairwise VLM preference reward (reference §4 ``unifiedreward_think``).

The official setup serves ``CodeGoat24/UnifiedReward-Think-qwen3vl-8b`` with vLLM's OpenAI-compatible chat API
(served name ``UnifiedReward``). For each GRPO group of G images that share a prompt, every unordered pair
(i < j, image i shown first, no position swap) is sent as one chat completion holding the two images as JPEG
(quality 95) base64 data URLs and the text ``Compare these two images based on the prompt: {prompt}. Which
image is better?`` at temperature 0. The text inside the (last) ``<answer>…</answer>`` tag decides:
"Image 1 is better" → i wins, "Image 2 is better" → j wins, anything else or no tag → half a win each.
``reward = wins / (G − 1)``: each image plays G − 1 games and the G(G − 1)/2 points sum to exactly half the
games, so the **group mean is always 0.5**.

Differences from the official client:

* only the Python standard library is used (``urllib`` + ``json`` + ``concurrent.futures``);
* the rewards are **not rounded** to 3 decimals (the rounding breaks the exact 0.5 group mean);
* every pair of the whole batch is submitted to one thread pool (``max_workers`` in flight) instead of group
  after group; the results are identical;
* a comparison that still fails after the retries (unreachable server, timeout, HTTP error, malformed JSON)
  counts as a tie, 0.5 each, and one summary warning is logged per ``score`` call: the reward never raises
  because the judge is down. Answers without a decisive tag are ties too, as in the official code, and are
  also reported in that warning. ``last_stats`` holds the counts of the last call.
"""

from __future__ import annotations

import base64
import io
import json
import logging
import re
import time
import urllib.error
import urllib.request
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from itertools import combinations

import torch
from PIL import Image

from .base import ImageBatch, check_batch

__all__ = [
    "JUDGE_QUESTION",
    "JudgeStats",
    "PairwiseJudgeReward",
    "encode_jpeg_data_url",
    "parse_judge_answer",
]

logger = logging.getLogger(__name__)

JUDGE_QUESTION = "Compare these two images based on the prompt: {prompt}. Which image is better?"

_ANSWER = re.compile(r"<answer>(.*?)</answer>", re.DOTALL | re.IGNORECASE)
_WS = re.compile(r"\s+")


def parse_judge_answer(text: str | None) -> float | None:
    """1.0 if the judge prefers image 1, 0.0 if it prefers image 2, ``None`` when undecided.

    Only the text inside the last ``<answer>…</answer>`` tag counts (a reasoning model thinks in ``<think>``
    first); matching is case-insensitive and whitespace-tolerant. A tag naming both or neither image, or no tag
    at all, is undecided.
    """
    if not text:
        return None
    answers = _ANSWER.findall(text)
    if not answers:
        return None
    answer = _WS.sub(" ", answers[-1]).strip().lower()
    first, second = "image 1 is better" in answer, "image 2 is better" in answer
    if first == second:
        return None
    return 1.0 if first else 0.0


def encode_jpeg_data_url(image: Image.Image, quality: int = 95) -> str:
    """``data:image/jpeg;base64,…`` of an RGB image encoded as JPEG at ``quality``."""
    buf = io.BytesIO()
    image.convert("RGB").save(buf, format="JPEG", quality=quality)
    return "data:image/jpeg;base64," + base64.b64encode(buf.getvalue()).decode("ascii")


@dataclass
class JudgeStats:
    """Counts from the last ``score`` call: requests sent (pairs), failed ones (no usable HTTP answer after
    the retries), undecided ones (answered, but no decisive ``<answer>`` tag), and the first error text."""

    pairs: int = 0
    failed: int = 0
    undecided: int = 0
    first_error: str | None = None


class _JudgeError(Exception):
    """A comparison that produced no usable answer; ``retryable`` says whether trying again may help."""

    def __init__(self, message: str, retryable: bool):
        super().__init__(message)
        self.retryable = retryable


class PairwiseJudgeReward:
    """Win rate of each image against the rest of its group, judged pairwise by an OpenAI-compatible VLM.

    Args:
        base_url: the server root, e.g. ``http://127.0.0.1:18087`` (``/v1/chat/completions`` is appended; a
            trailing ``/v1`` is tolerated).
        model: the served model name (``UnifiedReward`` in the official launch).
        timeout: socket timeout in seconds for each HTTP attempt (connect and each read).
        retries: extra attempts after a failed one (so at most ``1 + retries`` requests per pair).
        max_workers: requests in flight.
        group_size: images per prompt (G); the batch is cut into consecutive groups of this size.
        api_key: sent as ``Authorization: Bearer …`` when given.
        backoff: seconds before the first retry, doubled for each further one.
        max_tokens: the completion budget (4096 as in the official client; the judge thinks first).
        jpeg_quality: JPEG quality of the transmitted images (95 as in the official client).
    """

    name = "judge"

    def __init__(
        self,
        base_url: str,
        model: str = "UnifiedReward",
        timeout: float = 30,
        retries: int = 3,
        max_workers: int = 8,
        group_size: int = 8,
        api_key: str | None = None,
        *,
        backoff: float = 0.5,
        max_tokens: int = 4096,
        jpeg_quality: int = 95,
    ):
        if not isinstance(base_url, str) or not base_url.startswith(("http://", "https://")):
            raise ValueError(f"PairwiseJudgeReward: base_url must be an http(s) URL, got {base_url!r}")
        if group_size < 2:
            raise ValueError(
                f"PairwiseJudgeReward: group_size must be >= 2 (pairs within a group), got {group_size}"
            )
        if timeout <= 0:
            raise ValueError(f"PairwiseJudgeReward: timeout must be > 0 seconds, got {timeout}")
        if retries < 0:
            raise ValueError(f"PairwiseJudgeReward: retries must be >= 0, got {retries}")
        if max_workers < 1:
            raise ValueError(f"PairwiseJudgeReward: max_workers must be >= 1, got {max_workers}")
        if backoff < 0:
            raise ValueError(f"PairwiseJudgeReward: backoff must be >= 0, got {backoff}")
        root = base_url.rstrip("/")
        if root.endswith("/v1"):
            root = root[: -len("/v1")]
        self.base_url = root
        self.url = root + "/v1/chat/completions"
        self.model = model
        self.timeout = float(timeout)
        self.retries = int(retries)
        self.max_workers = int(max_workers)
        self.group_size = int(group_size)
        self.api_key = api_key
        self.backoff = float(backoff)
        self.max_tokens = int(max_tokens)
        self.jpeg_quality = int(jpeg_quality)
        self.last_stats = JudgeStats()

    # ----------------------------------------------------------------------------------------- requests

    def _payload(self, url_1: str, url_2: str, prompt: str) -> bytes:
        body = {
            "model": self.model,
            "messages": [
                {
                    "role": "user",
                    "content": [
                        {"type": "image_url", "image_url": {"url": url_1}},
                        {"type": "image_url", "image_url": {"url": url_2}},
                        {"type": "text", "text": JUDGE_QUESTION.format(prompt=prompt)},
                    ],
                }
            ],
            "temperature": 0.0,
            "max_tokens": self.max_tokens,
        }
        return json.dumps(body).encode("utf-8")

    def _post_once(self, payload: bytes) -> str:
        headers = {"Content-Type": "application/json"}
        if self.api_key:
            headers["Authorization"] = f"Bearer {self.api_key}"
        req = urllib.request.Request(self.url, data=payload, headers=headers, method="POST")
        try:
            with urllib.request.urlopen(req, timeout=self.timeout) as resp:
                raw = resp.read()
        except urllib.error.HTTPError as e:
            retryable = e.code >= 500 or e.code in (408, 429)
            raise _JudgeError(f"HTTP {e.code} from {self.url}", retryable) from e
        except OSError as e:  # URLError, TimeoutError, ConnectionError, ...
            reason = getattr(e, "reason", e)
            raise _JudgeError(f"no answer from {self.url}: {type(reason).__name__}: {reason}", True) from e
        try:
            message = json.loads(raw)["choices"][0]["message"]
            content = message["content"]
        except (ValueError, KeyError, IndexError, TypeError) as e:
            raise _JudgeError(f"malformed chat-completion JSON from {self.url}: {raw[:200]!r}", True) from e
        if isinstance(content, list):  # content parts
            content = "".join(p.get("text", "") for p in content if isinstance(p, dict))
        if not isinstance(content, str):
            raise _JudgeError(f"chat-completion content is {type(content).__name__}, not text", True)
        return content

    def _compare(self, payload: bytes) -> tuple[float | None, str | None]:
        """One pair: (1.0 | 0.0 | None, error text or None). Never raises."""
        error = None
        for attempt in range(self.retries + 1):
            if attempt:
                time.sleep(self.backoff * 2 ** (attempt - 1))
            try:
                return parse_judge_answer(self._post_once(payload)), None
            except _JudgeError as e:
                error = str(e)
                if not e.retryable:
                    break
            except Exception as e:  # never let one comparison crash the reward
                error = f"{type(e).__name__}: {e}"
        logger.debug("judge comparison failed after %d attempt(s): %s", attempt + 1, error)
        return None, error or "unknown error"

    # ------------------------------------------------------------------------------------------- score

    def score(self, images: ImageBatch, prompts: Sequence[str]) -> torch.Tensor:
        """Per-image win rate within its group of ``group_size``: float32 CPU tensor (N,), group mean 0.5.

        Raises ``ValueError`` if N is not a multiple of ``group_size`` or a group mixes prompts; judge failures
        never raise (ties + a warning).
        """
        pil, prompts = check_batch(images, prompts)
        n, g = len(pil), self.group_size
        if n % g:
            raise ValueError(f"PairwiseJudgeReward: got {n} images, not a multiple of group_size={g}")
        for s in range(0, n, g):
            if len(set(prompts[s : s + g])) != 1:
                raise ValueError(
                    f"PairwiseJudgeReward: group {s // g} (images {s}..{s + g - 1}) mixes prompts; the images of "
                    f"a group must share one prompt (group_size={g})"
                )
        urls = [encode_jpeg_data_url(im, self.jpeg_quality) for im in pil]
        pairs = [(s + i, s + j) for s in range(0, n, g) for i, j in combinations(range(g), 2)]
        stats = JudgeStats(pairs=len(pairs))
        wins = [0.0] * n
        if pairs:
            with ThreadPoolExecutor(max_workers=min(self.max_workers, len(pairs))) as pool:
                results = list(
                    pool.map(
                        lambda p: self._compare(self._payload(urls[p[0]], urls[p[1]], prompts[p[0]])), pairs
                    )
                )
            for (i, j), (verdict, error) in zip(pairs, results):
                if verdict is None:
                    wins[i] += 0.5
                    wins[j] += 0.5
                    if error is not None:
                        stats.failed += 1
                        stats.first_error = stats.first_error or error
                    else:
                        stats.undecided += 1
                else:
                    wins[i] += verdict
                    wins[j] += 1.0 - verdict
        self.last_stats = stats
        if stats.failed or stats.undecided:
            logger.warning(
                "PairwiseJudgeReward: %d of %d comparisons failed and %d were undecided; scored as ties (0.5)%s",
                stats.failed,
                stats.pairs,
                stats.undecided,
                f"; first error: {stats.first_error}" if stats.first_error else "",
            )
        return torch.tensor(wins, dtype=torch.float32) / (g - 1)
