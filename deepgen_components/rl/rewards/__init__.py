"""Reward models for MR-GRPO (DeepGen 1.0 stage 3, reference ``mr-grpo.md`` §4).

Every reward follows the :class:`Reward` protocol: ``score(images, prompts) -> float32 tensor (N,)``, where
``images`` is a list of PIL images, a uint8 array (N, H, W, 3) or a float tensor (N, 3, H, W) in [-1, 1]
(converted by :func:`to_pil_list`).

* ``"clip"`` → :class:`ClipReward`: cosine of L2-normalised CLIP text/image embeddings, no logit scale;
* ``"ocr"`` → :class:`OcrReward`: OCR accuracy of the prompt's quoted text (RapidOCR), scored per image;
* ``"judge"`` → :class:`PairwiseJudgeReward`: pairwise VLM win rate within each group (OpenAI-compatible HTTP);
* ``"color"`` → :class:`MeanColorReward` (a toy signal).

The shapes world registers ``"shapes"`` (``deepgen_components.shapes.reward.ShapesReward``) when
``deepgen_components.shapes`` is imported.

The official names ``clip_sim`` and ``unifiedreward_think`` are registered as aliases. More rewards can be
added with :func:`register_reward` and built from configs with :func:`build_reward`. The per-category weights
(:data:`OFFICIAL_CATEGORY_WEIGHTS`) become the per-image (N, R) weight matrix of the advantage computation
through :func:`reward_weights`.

The heavy dependencies (transformers, rapidocr) are imported only when a reward that needs them is built.
"""

from .base import (
    ImageBatch,
    Reward,
    RewardFactory,
    available_rewards,
    build_reward,
    check_batch,
    register_reward,
    to_pil_list,
)
from .clip import ClipReward
from .judge import JUDGE_QUESTION, JudgeStats, PairwiseJudgeReward, encode_jpeg_data_url, parse_judge_answer
from .ocr import OcrReward, extract_quoted_target, normalize_ocr_text, ocr_accuracy
from .simple import MeanColorReward
from .weights import OFFICIAL_CATEGORY_WEIGHTS, CategoryWeights, reward_weights

register_reward("clip", ClipReward)
register_reward("ocr", OcrReward)
register_reward("judge", PairwiseJudgeReward)
register_reward("clip_sim", ClipReward)
register_reward("unifiedreward_think", PairwiseJudgeReward)
register_reward("color", MeanColorReward)

__all__ = [
    "JUDGE_QUESTION",
    "OFFICIAL_CATEGORY_WEIGHTS",
    "CategoryWeights",
    "ClipReward",
    "ImageBatch",
    "JudgeStats",
    "MeanColorReward",
    "OcrReward",
    "PairwiseJudgeReward",
    "Reward",
    "RewardFactory",
    "available_rewards",
    "build_reward",
    "check_batch",
    "encode_jpeg_data_url",
    "extract_quoted_target",
    "normalize_ocr_text",
    "ocr_accuracy",
    "parse_judge_answer",
    "register_reward",
    "reward_weights",
    "to_pil_list",
]
