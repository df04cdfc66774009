"""Helpers the pipeline tests share (a module, not a test file)."""

from __future__ import annotations

import torch

from deepgen_components import DeepGenPipeline, deepgen_tiny


def tiny_pipeline(seed: int = 0) -> DeepGenPipeline:
    """The ``tiny`` preset as a pipeline with its progress bar off."""
    pipeline = DeepGenPipeline(deepgen_tiny(seed=seed))
    pipeline.set_progress_bar_config(disable=True)
    return pipeline


def seeded(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def call(pipe, prompt="a red cat", seed=0, **kwargs):
    """One pipeline call with ``kwargs``; the generator is ``seeded(seed)`` unless ``kwargs`` gives one."""
    kwargs["generator"] = kwargs.get("generator") or seeded(seed)
    return pipe(prompt, **kwargs)
