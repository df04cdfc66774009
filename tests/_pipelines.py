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


def call(pipe, prompt="a red cat", seed=0, *, steps: int, output_type: str, **kwargs):
    """One seeded pipeline call; ``kwargs`` may override the generator (``seed``), ``num_inference_steps``
    (``steps``) and ``output_type``. Returns the pipeline's output."""
    kwargs = {"generator": seeded(seed), "num_inference_steps": steps, "output_type": output_type, **kwargs}
    if kwargs["generator"] is None:
        kwargs["generator"] = seeded(seed)
    return pipe(prompt, **kwargs)
