"""The input checks of ``DeepGenPipeline.__call__`` (docs/pipeline.md, "Bad input"): one error per argument that
names it, before any model work; and which form of ``callback_on_step_end`` a callable has."""

from __future__ import annotations

import inspect
import math
import numbers

import torch

__all__ = ["check_call_arguments", "check_prompts", "is_old_callback"]


def check_prompts(prompt, negative_prompt) -> tuple[list[str], list[str]]:
    """``prompt``: a non-empty str or a non-empty list of them; ``negative_prompt``: a str (may be empty) or one per
    prompt."""
    prompts = [prompt] if isinstance(prompt, str) else prompt
    if not isinstance(prompts, (list, tuple)):
        raise TypeError(f"prompt must be a str or a list of str, got {type(prompt).__name__}")
    if not prompts:
        raise ValueError("prompt: give at least one prompt (got an empty list)")
    for i, text in enumerate(prompts):
        where = "prompt" if isinstance(prompt, str) else f"prompt[{i}]"
        if not isinstance(text, str):
            raise TypeError(f"{where} must be a str, got {type(text).__name__}")
        if not text.strip():
            raise ValueError(f"{where} is empty; describe the image (or the edit) in words")
    batch = len(prompts)
    negatives = [negative_prompt] * batch if isinstance(negative_prompt, str) else negative_prompt
    if not isinstance(negatives, (list, tuple)):
        raise TypeError(f"negative_prompt must be a str or a list of str, got {type(negative_prompt).__name__}")
    if len(negatives) != batch:
        raise ValueError(f"negative_prompt: got {len(negatives)} for {batch} prompts")
    for i, text in enumerate(negatives):
        if not isinstance(text, str):
            raise TypeError(f"negative_prompt[{i}] must be a str, got {type(text).__name__}")
    return list(prompts), list(negatives)


def is_old_callback(callback) -> bool:
    """Whether ``callback`` has the old signature ``(step, timestep, latents, velocity_uncond, velocity_cond)``:
    it takes five positional arguments (a callable that takes both four and five, e.g. ``*args``, counts as old,
    as does one whose signature cannot be read); diffusers' ``(pipe, step, timestep, callback_kwargs)`` takes four.
    TypeError naming the argument for a callable that takes neither."""
    try:
        signature = inspect.signature(callback)
    except (TypeError, ValueError):
        return True

    def takes(count: int) -> bool:
        try:
            signature.bind(*range(count))
        except TypeError:
            return False
        return True

    if not (takes(4) or takes(5)):
        raise TypeError(
            f"callback_on_step_end must take (pipe, step, timestep, callback_kwargs), got a callable with signature "
            f"{signature}"
        )
    return takes(5)


def _is_int(value) -> bool:
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def check_call_arguments(
    *, height, width, num_inference_steps, guidance_scale, num_images_per_prompt, generator, latents, output_type,
    callback_on_step_end, max_side: int,
) -> None:
    """The documented ranges of ``__call__`` (docs/pipeline.md, "Bad input"): TypeError for a wrong kind of value,
    ValueError for a value out of range, each naming the argument, before any model work."""
    for name, value in (("height", height), ("width", width)):
        if value is None:
            continue
        if not _is_int(value):
            raise TypeError(f"{name} must be an int (a positive multiple of 32) or None, got {type(value).__name__}")
        if value > max_side:
            raise ValueError(f"{name} must be at most {max_side} (this model's DiT position table), got {value}")
    if not _is_int(num_inference_steps):
        raise TypeError(f"num_inference_steps must be an int >= 1, got {type(num_inference_steps).__name__}")
    if num_inference_steps < 1:
        raise ValueError(f"num_inference_steps must be >= 1, got {num_inference_steps}")
    if not _is_int(num_images_per_prompt):
        raise TypeError(f"num_images_per_prompt must be an int >= 1, got {type(num_images_per_prompt).__name__}")
    if num_images_per_prompt < 1:
        raise ValueError(f"num_images_per_prompt must be >= 1, got {num_images_per_prompt}")
    if guidance_scale is not None:
        if not isinstance(guidance_scale, numbers.Real) or isinstance(guidance_scale, bool):
            raise TypeError(f"guidance_scale must be a number >= 0 (1 = no CFG) or None, got {type(guidance_scale).__name__}")
        if not math.isfinite(guidance_scale) or guidance_scale < 0:
            raise ValueError(f"guidance_scale must be a finite number >= 0 (1 = no CFG), got {guidance_scale}")
    if isinstance(generator, (list, tuple)):
        for i, g in enumerate(generator):
            if not isinstance(g, torch.Generator):
                raise TypeError(f"generator[{i}] must be a torch.Generator, got {type(g).__name__}")
    elif generator is not None and not isinstance(generator, torch.Generator):
        hint = f"; e.g. torch.Generator().manual_seed({generator})" if _is_int(generator) else ""
        raise TypeError(f"generator must be a torch.Generator, a list of them or None, got {type(generator).__name__}{hint}")
    if latents is not None and not isinstance(latents, torch.Tensor):
        raise TypeError(f"latents must be a torch.Tensor or None, got {type(latents).__name__}")
    if output_type not in ("pil", "np", "pt", "latent"):
        raise ValueError(f"output_type must be 'pil', 'np', 'pt' or 'latent', got {output_type!r}")
    if callback_on_step_end is not None and not callable(callback_on_step_end):
        raise TypeError(f"callback_on_step_end must be callable or None, got {type(callback_on_step_end).__name__}")
