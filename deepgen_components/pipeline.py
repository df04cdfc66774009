"""DeepGenPipeline: prompt (+ reference images) -> images, in the style of diffusers pipelines.

``__call__`` reads like the algorithm: encode the condition once (prompt and negative prompt in one
left-padded batch, as the official model does) -> prepare latents (and reference latents for editing) ->
FlowMatch Euler loop with classifier-free guidance as one batched DiT call -> VAE decode.
"""

from __future__ import annotations

import inspect
import math
import numbers
import os
import time
import warnings
from dataclasses import dataclass, field

import numpy as np
import torch

from deepgen_components.conventions import cfg_order, output_size, references_per_prompt
from deepgen_components.denoising import MODES, DenoiseRunner, flow_match_sigmas
from deepgen_components.model import DeepGenModel
from deepgen_components.processing import pixels_to_pil, reference_pixels
from deepgen_components.serialization import load_model_folder, save_model_folder

__all__ = ["DeepGenPipeline", "DeepGenPipelineOutput"]


@dataclass
class DeepGenPipelineOutput:
    """images: list of PIL images (``output_type="pil"``), float32 array (B, H, W, 3) in [0, 1] (``"np"``, as
    diffusers), float tensor (B, 3, H, W) in [-1, 1] (``"pt"``), or the final latents (``"latent"``).
    timings: seconds per stage (condition, denoise, decode, total)."""

    images: list | np.ndarray | torch.Tensor
    timings: dict[str, float] = field(default_factory=dict)


@dataclass
class _Call:
    """One call's checked settings."""

    prompts: list[str]
    negatives: list[str]
    references: list[list[torch.Tensor]] | None  # per prompt, reference pixels (3, H, W) in [-1, 1]
    height: int
    width: int
    steps: int
    images_per_prompt: int
    guidance_scale: float

    @property
    def do_cfg(self) -> bool:
        return self.guidance_scale != 1.0

    @property
    def images(self) -> int:
        return len(self.prompts) * self.images_per_prompt


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class DeepGenPipeline:
    """Text-to-image and (multi-reference) editing with a :class:`DeepGenModel`."""

    _callback_tensor_inputs = ["latents", "velocity_uncond", "velocity_cond"]

    def __init__(self, model: DeepGenModel) -> None:
        self.model = model
        self._progress_config: dict = {}
        self.mode = "auto"  # eager PyTorch, plus our Triton kernels on CUDA (see optimize)
        self.runner = DenoiseRunner(model, "plain")

    # -- construction -------------------------------------------------------------------------------
    @classmethod
    def from_preset(cls, name: str = "tiny", **kwargs) -> DeepGenPipeline:
        from deepgen_components.builders import build_preset

        return cls(build_preset(name, **kwargs))

    @property
    def device(self) -> torch.device:
        return self.model.device

    def to(self, device=None, dtype: torch.dtype | None = None) -> DeepGenPipeline:
        self.model.to(device=device, dtype=dtype)
        return self

    def set_progress_bar_config(self, **kwargs) -> None:
        """tqdm options for the denoising loop, e.g. ``disable=True``."""
        self._progress_config = dict(kwargs)

    def optimize(self, mode: str = "compile+graphs", *, dtype: torch.dtype | None = None) -> DeepGenPipeline:
        """Pick the inference path: ``eager`` (plain PyTorch, SDPA) | ``kernels`` (our Triton kernels) | ``compile``
        | ``compile+graphs`` (see ``deepgen_components.denoising``), optionally casting the weights (e.g.
        ``torch.bfloat16`` on GPUs; the latents, the CFG combination and the Euler update stay fp32). Results match
        eager within the tolerance stated in docs/benchmarks.md. The default, ``auto``, is eager with the Triton
        kernels switched on for CUDA inference. The calls run ``self.runner``, a ``denoising.DenoiseRunner``: its
        plain loop for ``eager`` and ``auto``, else its fast path in ``mode``."""
        if mode not in (*MODES, "auto"):
            raise ValueError(f"mode must be one of {('auto', *MODES)}, got {mode!r}")
        if dtype is not None:
            self.model.to(dtype=dtype)
        self.mode = mode
        self.runner = DenoiseRunner(self.model, "plain" if mode in ("eager", "auto") else mode)
        return self

    @property
    def max_image_side(self) -> int:
        """The largest height / width (px) the DiT's position table covers: pos_embed_max_size x patch x VAE factor."""
        config = self.model.dit.transformer.config
        return config.pos_embed_max_size * config.patch_size * self.model.vae_scale_factor

    def kernels_active(self) -> bool:
        """Whether this pipeline's calls run with the Triton kernels switched on."""
        return self.mode == "kernels" or (self.mode == "auto" and self.model.device.type == "cuda")

    # -- inputs ---------------------------------------------------------------------------------------
    def _references(self, image, batch: int) -> list[list[torch.Tensor]] | None:
        """Per prompt, the list of reference pixels (3, H, W) in [-1, 1], resized by the official rule."""
        return reference_pixels(references_per_prompt(image, batch), self.model.config.image_size, log=True)

    def _output_size(self, height, width, references) -> tuple[int, int]:
        sizes = None if references is None else [[tuple(r.shape[-2:]) for r in refs] for refs in references]
        return output_size(height, width, sizes, self.model.config.image_size)

    # -- the algorithm ------------------------------------------------------------------------------
    @torch.no_grad()
    def __call__(
        self,
        prompt: str | list[str],
        image=None,
        negative_prompt: str | list[str] = "",
        height: int | None = None,
        width: int | None = None,
        num_inference_steps: int = 50,
        guidance_scale: float | None = None,
        num_images_per_prompt: int = 1,
        generator: torch.Generator | list[torch.Generator] | None = None,
        latents: torch.Tensor | None = None,
        output_type: str = "pil",
        return_dict: bool = True,
        reference_latents=None,
        callback_on_step_end=None,
        callback_on_step_end_tensor_inputs: list[str] | tuple[str, ...] = ("latents",),
        progress: bool | None = None,
    ) -> DeepGenPipelineOutput | tuple:
        """Generate (``image=None``) or edit (``image``: one image or a list per prompt, several = multi-reference).

        ``guidance_scale``: the CFG scale (1 = no CFG); None takes the model's default for the task,
        ``config.guidance_scale`` for text-to-image and ``config.edit_guidance_scale`` for editing (4.0 unless the
        loaded model says otherwise).

        diffusers' call contract (docs/pipeline.md): ``output_type`` "pil" | "np" (float32 (B, H, W, 3) in [0, 1])
        | "pt" (float (B, 3, H, W) in [-1, 1]) | "latent"; ``return_dict=False`` returns the tuple ``(images,)``;
        ``generator`` one ``torch.Generator`` or a list of them, one per image (``len(prompt) *
        num_images_per_prompt``); ``callback_on_step_end(pipe, step, timestep, callback_kwargs) -> dict`` is called
        after every Euler step with ``callback_kwargs`` holding the tensors named in
        ``callback_on_step_end_tensor_inputs`` (of :attr:`_callback_tensor_inputs`: "latents", "velocity_uncond"
        (None without CFG), "velocity_cond"); a ``"latents"`` entry in the returned dict replaces the current
        latents. Progress bars: :meth:`set_progress_bar_config`.

        ``latents``: the initial noise (default: drawn from ``generator``); ``reference_latents``: per prompt, a
        list of precomputed clean reference latents (C, h, w) used instead of VAE-encoding ``image`` for the DiT
        (the VLM still reads ``image``; the VAE posterior of ``image`` is sampled with each prompt's first
        generator).

        Deprecated, for one release (``DeprecationWarning``): ``progress=False`` (use ``set_progress_bar_config(
        disable=True)``) and the old callback ``callback_on_step_end(step, timestep, latents, velocity_uncond,
        velocity_cond)`` (told apart by its five positional parameters; its return value is ignored).

        Accepted (checked before any model work; docs/pipeline.md, "Bad input"): ``prompt`` a non-blank str or a
        non-empty list of them; ``height`` / ``width`` positive multiples of 32 up to :attr:`max_image_side`;
        ``num_inference_steps`` and ``num_images_per_prompt`` ints >= 1; ``guidance_scale`` a finite number >= 0;
        ``generator`` a ``torch.Generator`` or a list of one per image. A wrong kind of value raises TypeError, a
        value out of range ValueError, both naming the argument.
        """
        from deepgen_components.triton_kernels import use_kernels

        if progress is not None:
            warnings.warn(
                "DeepGenPipeline(progress=...) is deprecated and will be removed in the next release; use "
                "pipe.set_progress_bar_config(disable=True)", DeprecationWarning, stacklevel=2,
            )
        with use_kernels(self.kernels_active()):
            output = self._generate(
                prompt, image, negative_prompt, height, width, num_inference_steps, guidance_scale,
                num_images_per_prompt, generator, latents, output_type, progress is not False, reference_latents,
                callback_on_step_end, callback_on_step_end_tensor_inputs,
            )
        return output if return_dict else (output.images,)

    def _generate(
        self, prompt, image, negative_prompt, height, width, num_inference_steps, guidance_scale,
        num_images_per_prompt, generator, latents, output_type, progress, reference_latents, callback_on_step_end,
        tensor_inputs,
    ) -> DeepGenPipelineOutput:
        call = self._check_inputs(prompt, image, negative_prompt, height, width, num_inference_steps, guidance_scale,
                                  num_images_per_prompt, generator, latents, output_type, callback_on_step_end)
        step_callback = self._step_callback(callback_on_step_end, tensor_inputs)
        model = self.model
        device = model.device
        timings: dict[str, float] = {}

        # 1. Condition: once per call; prompt and negative prompt share one left-padded batch.
        _sync(device)
        start = time.perf_counter()
        condition = self._condition(call)
        _sync(device)
        timings["condition"] = time.perf_counter() - start

        # 2. Latents: initial noise from the generator, clean reference latents for editing.
        start = time.perf_counter()
        latents = self._initial_latents(call, latents, generator)
        reference_latents = self._reference_latents(call, reference_latents, generator)

        # 3. Denoising: FlowMatch Euler on diffusers' grid; CFG as one batched DiT call (the runner).
        timesteps, sigmas = flow_match_sigmas(model.scheduler, call.steps, device=device)
        latents = self.runner(latents, condition, reference_latents, timesteps, sigmas, call.guidance_scale,
                              call.do_cfg, self._progress(len(timesteps), progress),
                              callback_on_step_end=step_callback)
        _sync(device)
        timings["denoise"] = time.perf_counter() - start

        # 4. Decode.
        start = time.perf_counter()
        images = self._decode(latents, output_type)
        _sync(device)
        timings["decode"] = time.perf_counter() - start
        timings["total"] = timings["condition"] + timings["denoise"] + timings["decode"]
        return DeepGenPipelineOutput(images=images, timings=timings)

    def _check_inputs(
        self, prompt, image, negative_prompt, height, width, num_inference_steps, guidance_scale,
        num_images_per_prompt, generator, latents, output_type, callback_on_step_end,
    ) -> _Call:
        """The documented checks (docs/pipeline.md, "Bad input"), then the call's settings: the references'
        pixels, the output size, the CFG scale (the model's default for the task when None)."""
        prompts, negatives = _check_prompts(prompt, negative_prompt)
        _check_call_arguments(
            height=height, width=width, num_inference_steps=num_inference_steps, guidance_scale=guidance_scale,
            num_images_per_prompt=num_images_per_prompt, generator=generator, latents=latents,
            output_type=output_type, callback_on_step_end=callback_on_step_end, max_side=self.max_image_side,
        )
        height, width = (None if v is None else int(v) for v in (height, width))  # numpy ints welcome
        references = self._references(image, len(prompts))
        height, width = self._output_size(height, width, references)
        if max(height, width) > self.max_image_side:  # a reference's processed size may exceed it too
            raise ValueError(
                f"height/width: {height}x{width} exceeds what this model's DiT can place ({self.max_image_side} px "
                "per side)"
            )
        if isinstance(generator, (list, tuple)) and len(generator) != len(prompts) * num_images_per_prompt:
            raise ValueError(
                f"generator: a list needs one torch.Generator per image ({len(prompts)} prompts x "
                f"{num_images_per_prompt} images per prompt = {len(prompts) * num_images_per_prompt}), got "
                f"{len(generator)}"
            )
        if guidance_scale is None:
            config = self.model.config
            guidance_scale = config.guidance_scale if references is None else config.edit_guidance_scale
        return _Call(prompts, negatives, references, height, width, int(num_inference_steps),
                     int(num_images_per_prompt), float(guidance_scale))

    def _condition(self, call: _Call):
        """The DiT condition, one row per image, in DiT-batch order ([negative; positive] with CFG)."""
        references, do_cfg = call.references, call.do_cfg
        texts = call.prompts + call.negatives if do_cfg else call.prompts
        refs_for_vlm = None if references is None else (references + references if do_cfg else references)
        condition = self.model.encode_condition(texts, refs_for_vlm).repeat_interleave(call.images_per_prompt)
        if do_cfg:
            condition = condition.select(torch.from_numpy(cfg_order(call.images)))
        return condition

    def _initial_latents(self, call: _Call, latents, generator) -> torch.Tensor:
        """The given initial noise (checked) or the generator's, as fp32 on the model's device."""
        model = self.model
        scale = model.vae_scale_factor
        shape = (call.images, model.latent_channels, call.height // scale, call.width // scale)
        if latents is None and isinstance(generator, (list, tuple)):  # one draw per image, each from its generator
            latents = torch.cat([
                torch.randn((1, *shape[1:]), generator=g, device=g.device, dtype=torch.float32).to(model.device)
                for g in generator
            ])
        elif latents is None:
            gen_device = generator.device if generator is not None else torch.device("cpu")
            latents = torch.randn(shape, generator=generator, device=gen_device, dtype=torch.float32)
        elif tuple(latents.shape) != shape:
            raise ValueError(f"latents: expected shape {shape}, got {tuple(latents.shape)}")
        return latents.to(model.device, torch.float32)  # fp32 latents whatever the weights' dtype

    def _reference_latents(self, call: _Call, given, generator):
        """Per DiT row, the clean reference latents (the given ones or the VAE's), or None for text-to-image."""
        model, references, batch = self.model, call.references, len(call.prompts)
        if given is not None:
            if references is None or len(given) != batch:
                raise ValueError(
                    f"reference_latents: give one list of latents per prompt ({batch}) together with image"
                )
            encoded = [[r.to(model.device) for r in refs] for refs in given]
        elif references is not None:
            per_prompt = call.images_per_prompt
            generators = (generator[::per_prompt] if isinstance(generator, (list, tuple))
                          else [generator] * len(references))  # a list: each prompt's first image's generator
            encoded = [model.encode_images(refs, g) for refs, g in zip(references, generators)]
        if references is None:
            return None
        per_image = [refs for refs in encoded for _ in range(call.images_per_prompt)]
        rows = per_image + per_image if call.do_cfg else per_image
        return [[r.to(model.dtype) for r in refs] for refs in rows]

    def _progress(self, count: int, progress: bool):
        steps = range(count)
        if progress and not self._progress_config.get("disable", False):
            from tqdm.auto import tqdm

            steps = tqdm(steps, total=count, **{k: v for k, v in self._progress_config.items() if k != "disable"})
        return steps

    def _decode(self, latents: torch.Tensor, output_type: str):
        if output_type == "latent":
            return latents
        pixels = self.model.decode_latents(latents).float()
        if output_type == "pt":
            return pixels
        if output_type == "np":  # diffusers' convention: float32 (B, H, W, 3) in [0, 1]
            return (pixels / 2 + 0.5).clamp(0, 1).permute(0, 2, 3, 1).cpu().numpy()
        return pixels_to_pil(pixels)

    # -- the step callback ------------------------------------------------------------------------------
    def _step_callback(self, callback, tensor_inputs):
        """The denoising runner's per-step callback ``(step, timestep, latents, velocity_uncond, velocity_cond)``
        for the user's ``callback_on_step_end``: diffusers' ``callback(pipe, step, timestep, callback_kwargs) ->
        dict`` (a returned ``"latents"`` is written into the runner's latents), or the old five-argument form,
        passed through with a DeprecationWarning."""
        if callback is None:
            return None
        if _old_callback(callback):
            warnings.warn(
                "callback_on_step_end(step, timestep, latents, velocity_uncond, velocity_cond) is deprecated and will "
                "be removed in the next release; use diffusers' callback_on_step_end(pipe, step, timestep, "
                "callback_kwargs) -> dict with callback_on_step_end_tensor_inputs", DeprecationWarning, stacklevel=4,
            )
            return callback
        names = list(getattr(callback, "tensor_inputs", None) or tensor_inputs or [])
        unknown = [n for n in names if n not in self._callback_tensor_inputs]
        if unknown:
            raise ValueError(
                f"callback_on_step_end_tensor_inputs: {unknown} not available; choose from {self._callback_tensor_inputs}"
            )

        def on_step_end(step, timestep, latents, velocity_uncond, velocity_cond):
            tensors = {"latents": latents, "velocity_uncond": velocity_uncond, "velocity_cond": velocity_cond}
            outputs = callback(self, step, timestep, {n: tensors[n] for n in names})
            if outputs is None:
                return
            if not isinstance(outputs, dict):
                raise TypeError(
                    f"callback_on_step_end must return a dict (e.g. callback_kwargs), got {type(outputs).__name__}"
                )
            new = outputs.get("latents")
            if new is not None and new is not latents:
                if tuple(new.shape) != tuple(latents.shape):
                    raise ValueError(
                        f"callback_on_step_end returned latents of shape {tuple(new.shape)}, expected "
                        f"{tuple(latents.shape)}"
                    )
                latents.copy_(new)  # the runner's loop continues from these latents

        return on_step_end

    # -- persistence ------------------------------------------------------------------------------------
    def save_pretrained(self, path: str | os.PathLike) -> None:
        """Our layout: one sub-folder per component with config.json + safetensors, written atomically
        (:func:`deepgen_components.serialization.save_model_folder`)."""
        save_model_folder(self.model, path)

    @classmethod
    def from_pretrained(
        cls, path: str | os.PathLike, *, device=None, dtype: torch.dtype | None = None
    ) -> DeepGenPipeline:
        """A pipeline around the model saved in ``path`` (:func:`deepgen_components.serialization.load_model_folder`)."""
        return cls(load_model_folder(path, device=device, dtype=dtype))


def _check_prompts(prompt, negative_prompt) -> tuple[list[str], list[str]]:
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


def _old_callback(callback) -> bool:
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


def _check_call_arguments(
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
