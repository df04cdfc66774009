"""Stage 3's prompts: inline prompts, prompt files and registered prompt sources, drawn with weights.

A prompt is a dict: ``text``, ``category`` (which reward weights apply), ``weight`` (its drawing weight), and for an
edit prompt ``image`` (a path or a PIL image: the rollout reads it) and ``reward_prompt`` (what the rewards score
the image against; default ``text``). A prompt source is a registered kind (``rl.prompt_source: {kind: KIND,
...}``) whose factory returns such dicts; the shapes world registers ``shapes`` when ``deepgen_components.shapes``
is imported.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Mapping
from pathlib import Path

from deepgen_components.training.config import RLConfig
from deepgen_components.training.registry import Registry

from deepgen_components.jsonl import read_objects

__all__ = ["PromptPool", "PromptSourceFactory", "available_prompt_sources", "read_prompt_file",
           "register_prompt_source"]

PromptSourceFactory = Callable[[Mapping, int], list[dict]]  # (rl.prompt_source without kind, image size) -> prompts
_PROMPT_SOURCES: Registry[PromptSourceFactory] = Registry("prompt source kind")


def register_prompt_source(kind: str, factory: PromptSourceFactory, *, overwrite: bool = False) -> PromptSourceFactory:
    """Make ``rl.prompt_source: {kind: KIND, ...}`` usable: ``factory(options, image_size)`` gets the other keys of
    the mapping and returns the prompts (dicts as in the module docstring)."""
    return _PROMPT_SOURCES.register(kind, factory, overwrite=overwrite)


def available_prompt_sources() -> list[str]:
    """The registered prompt source kinds, sorted."""
    return _PROMPT_SOURCES.kinds()


def read_prompt_file(path: Path) -> list[dict]:
    """Prompts of one file: ``.txt`` (one per line) or ``.jsonl`` (objects with ``prompt`` / ``text`` and an
    optional ``category``); blank lines are skipped."""
    if not path.is_file():
        raise FileNotFoundError(f"rl.prompt_files: {path} does not exist")
    if path.suffix == ".jsonl":
        items = [_jsonl_item(path, n, record) for n, _, record in read_objects(path, argument="rl.prompt_files")]
    else:
        items = [{"text": line.strip()} for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    if not items:
        raise ValueError(f"rl.prompt_files: {path} holds no prompt")
    return items


def _jsonl_item(path: Path, number: int, record: dict) -> dict:
    text = record.get("prompt", record.get("text"))
    if not isinstance(text, str):
        raise ValueError(f"rl.prompt_files {path}:{number}: a .jsonl prompt needs a 'prompt' or 'text' string")
    item = {"text": text}
    if "category" in record:
        item["category"] = record["category"]
    if record.get("image") is not None:  # an edit prompt: the instruction applies to this image
        image = Path(record["image"])
        item["image"] = image if image.is_absolute() else path.parent / image
    if record.get("reward_prompt") is not None:
        item["reward_prompt"] = str(record["reward_prompt"])
    return item


class PromptPool:
    """Prompts with categories and sampling weights; each step draws ``prompts_per_step`` per rank with
    replacement, seeded by (seed, step, rank).

    Sources: ``rl.prompts`` (inline ``{text, category, weight}``), ``rl.prompt_files`` (``{path, category,
    weight}``: every prompt of the file gets the file's weight, so a file is drawn with probability
    proportional to N_file * weight, the official ``sample_proportional``), ``rl.prompt_source`` (a registered
    prompt source, e.g. the shapes world's ``count`` captions and ``edits`` editing tasks).

    An item with an ``image`` (a path or a PIL image) is an edit prompt: the rollout reads that image (VLM and
    reference latents) and ``text`` is the instruction. ``reward_prompt`` (default ``text``) is what the rewards
    score the image against. Editing prompts in stage 3 are our extension: DeepGen's MR-GRPO draws text-to-image
    prompts only."""

    def __init__(self, rl: RLConfig, image_size: int) -> None:
        items = [dict(p) for p in rl.prompts]
        for i, spec in enumerate(rl.prompt_files):
            spec = dict(spec)
            if "path" not in spec:
                raise ValueError(f"rl.prompt_files[{i}]: needs 'path'")
            for item in read_prompt_file(Path(spec["path"])):
                item.setdefault("category", spec.get("category", "general"))
                item["weight"] = float(spec.get("weight", 1.0))
                items.append(item)
        source = dict(rl.prompt_source or {})
        if source:
            kind = source.pop("kind", None)
            items += _PROMPT_SOURCES.lookup(kind, "rl.prompt_source.kind")(source, image_size)
        if not items:
            raise ValueError("rl: give prompts (rl.prompts, rl.prompt_files) or a prompt source (rl.prompt_source)")
        for i, item in enumerate(items):
            if "text" not in item:
                raise ValueError(f"rl.prompts[{i}]: needs 'text'")
            item.setdefault("category", "general")
            item["weight"] = float(item.get("weight", 1.0))
            if not item["weight"] >= 0:
                raise ValueError(f"rl.prompts[{i}]: weight must be >= 0, got {item['weight']}")
        self.items = items
        weights = [item["weight"] for item in items]
        if sum(weights) <= 0:
            raise ValueError("rl: every prompt has weight 0")
        self.weights = None if len(set(weights)) == 1 else weights

    def draw(self, count: int, seed: int, step: int, rank: int) -> list[dict]:
        rng = random.Random(seed * 1_000_003 + step * 7_919 + rank)
        if self.weights is None:
            return [rng.choice(self.items) for _ in range(count)]
        return rng.choices(self.items, weights=self.weights, k=count)
