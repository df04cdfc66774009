"""The shapes world as training data: a data source for stages 1-2 (and stage 3's SFT batch), and the prompt
source of stage 3.

``deepgen_components.shapes`` registers both under the kind ``shapes``: :func:`source_from_config` with
``training.data.register_source`` (``data.sources: [{kind: shapes, task, seed, options: {length,
foreground_weight, edit_kinds}}]``) and :func:`rl_prompts` with ``training.prompts.register_prompt_source``
(``rl.prompt_source: {kind: shapes, seed, count, category, edits, edit_category, edit_weight, pairs,
pair_category, pair_weight}``).
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
import torch.nn.functional as F

from deepgen_components.processing import pil_to_pixels
from deepgen_components.shapes.world import EDIT_KINDS, ShapesWorld, caption
from deepgen_components.training.config import SourceConfig
from deepgen_components.training.data import Sample, SkipCounter
from deepgen_components.training.registry import check_options

__all__ = ["ShapesSource", "foreground_mask", "rl_prompts", "source_from_config"]

SOURCE_OPTIONS = ("length", "foreground_weight", "edit_kinds")
PROMPT_SOURCE_KEYS = ("seed", "count", "category", "edits", "edit_category", "edit_weight", "pairs", "pair_category",
                      "pair_weight")


class ShapesSource:
    """The synthetic shapes world as an indexable source of a given task.

    ``foreground_weight`` w > 0 gives every sample a loss weight of 1 + w on the target's shape pixels, dilated
    by 4 px (one latent cell of a 4x-down VAE), 1 elsewhere: a shape covers ~5-10 % of an image, so under the
    plain mean the background dominates the flow-matching loss and colour / shape are learned last.
    ``edit_kinds`` restricts an edit source to those instruction kinds (default: all of ``EDIT_KINDS``)."""

    def __init__(self, task: str = "t2i", image_size: int = 64, seed: int = 0, length: int = 100_000,
                 foreground_weight: float = 0.0, edit_kinds=None):
        if task not in ("t2i", "edit"):
            raise ValueError(f"task must be 't2i' or 'edit', got {task!r}")
        if foreground_weight < 0:
            raise ValueError(f"foreground_weight must be >= 0, got {foreground_weight}")
        self.task = task
        self.foreground_weight = float(foreground_weight)
        kinds = tuple(edit_kinds) if edit_kinds else EDIT_KINDS
        if not set(kinds) <= set(EDIT_KINDS):
            raise ValueError(f"edit_kinds must be a subset of {EDIT_KINDS}, got {list(kinds)}")
        self.world = ShapesWorld(image_size=image_size, seed=seed, edit_kinds=kinds)
        self.length = length
        self.skipped = SkipCounter()

    def __len__(self) -> int:
        return self.length

    def __getitem__(self, index: int) -> Sample:
        if self.task == "t2i":
            image, text = self.world.t2i_sample(index)
            return self._weighted(Sample("t2i", text, pil_to_pixels(image)))
        source, instruction, target = self.world.edit_sample(index)
        return self._weighted(Sample("edit", instruction, pil_to_pixels(target), [pil_to_pixels(source)]))

    def _weighted(self, sample: Sample) -> Sample:
        if self.foreground_weight > 0:
            sample.loss_weight = 1.0 + self.foreground_weight * foreground_mask(sample.target, dilate=4)
        return sample


def foreground_mask(pixels: torch.Tensor, dilate: int = 0) -> torch.Tensor:
    """1.0 where a shapes image differs from its top-left (background) colour, dilated by ``dilate`` pixels:
    (3, H, W) -> (1, H, W), or a batch (B, 3, H, W) -> (B, 1, H, W)."""
    corner = pixels[..., :, :1, :1]
    mask = ((pixels - corner).abs().sum(-3, keepdim=True) > 0.1).float()
    if dilate > 0:
        mask = F.max_pool2d(mask, 2 * dilate + 1, stride=1, padding=dilate)
    return mask


def source_from_config(spec: SourceConfig, image_size: int) -> ShapesSource:
    """The ``kind: shapes`` entry of ``data.sources``: its task and seed, and ``options`` ``length`` (samples per
    epoch, default 100,000), ``foreground_weight`` (default 0) and ``edit_kinds`` (default: all)."""
    check_options(f"data.sources[{spec.name}].options", spec.options, SOURCE_OPTIONS)
    return ShapesSource(spec.task, image_size, seed=spec.seed, **spec.options)


def rl_prompts(options: Mapping, image_size: int) -> list[dict]:
    """The ``kind: shapes`` prompt source of stage 3: ``count`` training captions (default 512) in ``category``,
    ``pairs`` distinct two-shape training captions (default 0) in ``pair_category`` with weight ``pair_weight``,
    and ``edits`` training editing tasks (default 0) in ``edit_category`` with weight ``edit_weight``, from the
    world of seed ``seed``. An edit item carries its source image and, as ``reward_prompt``, the caption of the
    scene the edit should produce; held-out compositions are never drawn."""
    check_options("rl.prompt_source", options, PROMPT_SOURCE_KEYS)
    world = ShapesWorld(image_size=image_size, seed=int(options.get("seed", 0)))
    count, edits, pairs = (int(options.get(key, default)) for key, default in (("count", 512), ("edits", 0),
                                                                                ("pairs", 0)))
    if min(count, edits, pairs) < 0 or count + edits + pairs == 0:
        raise ValueError("rl.prompt_source: count, pairs and edits must be >= 0 and not all 0, "
                         f"got {count}, {pairs}, {edits}")
    category = options.get("category", "general")
    items = [{"text": world.t2i_sample(i)[1], "category": category} for i in range(count)]
    items += [{"text": caption(scene), "category": options.get("pair_category", category),
               "weight": float(options.get("pair_weight", 1.0))}
              for scene in (world.pair_scenes(pairs, heldout=False) if pairs else [])]
    for i in range(edits):
        scene, instruction, target = world.edit_triplet(i)
        items.append({"text": instruction, "image": world.render(scene), "reward_prompt": caption(target),
                      "category": options.get("edit_category", category),
                      "weight": float(options.get("edit_weight", 1.0))})
    return items
