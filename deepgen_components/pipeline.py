"""DeepGenPipeline: prompt (+ reference images) -> images, a diffusers ``DiffusionPipeline``.

``__call__`` reads like the algorithm: encode the condition once (prompt and negative prompt in one
left-padded batch, as the official model does) -> prepare latents (and reference latents for editing) ->
FlowMatch Euler loop with classifier-free guidance as one batched DiT call -> VAE decode.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from diffusers import DiffusionPipeline
from diffusers.models.modeling_utils import ModelMixin  # noqa: F401  (see COMPONENT_LIBRARY)

from deepgen_components.bridge import StackedChannelBridge
from deepgen_components.conventions import cfg_order, output_size, references_per_prompt
from deepgen_components.denoising import MODES, DenoiseRunner, flow_match_sigmas
from deepgen_components.layer_selection import LayerSelection
from deepgen_components.model import DeepGenConfig, DeepGenModel
from deepgen_components.pipeline_inputs import check_call_arguments, check_prompts, is_old_callback
from deepgen_components.processing import pixels_to_pil, reference_pixels
from deepgen_components.serialization import COMPONENTS, load_model_folder, replace_folder, save_model_folder
from deepgen_components.think_tokens import ThinkTokens

__all__ = ["COMPONENT_LIBRARY", "PIPELINE_FILE", "DeepGenPipeline", "DeepGenPipelineOutput"]

# The module model_index.json names as the library of think_tokens and bridge. diffusers resolves a custom
# component's class from an imported module (the pipeline file imports this one) and picks its loader by looking
# up ``ModelMixin`` in that same module: this module holds both names.
COMPONENT_LIBRARY = __name__
# The pipeline file saved beside model_index.json: diffusers' DiffusionPipeline.from_pretrained loads the pipeline
# class it names (``_class_name: [module file, class]``).
PIPELINE_FILE = "pipeline_deepgen"
_PIPELINE_SOURCE = '''"""DeepGenPipeline (deepgen-components), for diffusers' DiffusionPipeline.from_pretrained."""
from deepgen_components.pipeline import DeepGenPipeline  # noqa: F401
'''


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


class DeepGenPipeline(DiffusionPipeline):
    """Text-to-image and (multi-reference) editing with a :class:`DeepGenModel`, as a diffusers ``DiffusionPipeline``.

    ``DeepGenPipeline(model)`` wraps a composed model; diffusers builds it from its registered modules instead
    (``vlm``, ``tokenizer``, ``think_tokens``, ``bridge``, ``transformer``, ``vae``, ``scheduler``, plus the
    ``layers`` selection and the :class:`DeepGenConfig` as dicts). Either way ``pipe.model`` is the composed
    :class:`DeepGenModel` (training, export) and holds the very module objects the pipeline registers.
    ``vlm_class`` and ``format_version`` are model_index.json entries for format-2 readers, not used here.
    """

    _callback_tensor_inputs = ["latents", "velocity_uncond", "velocity_cond"]
    _optional_components = ["vlm", "tokenizer", "think_tokens", "bridge", "transformer", "vae", "scheduler"]
    # diffusers' enable_model_cpu_offload chain: each component's hook, when it fires, moves the previous one back
    # to the CPU. The think tokens come first because the VLM calls them in the middle of its own pass (a later
    # place would send the VLM away before its decoder runs); the bridge's hook sends the VLM away, so it has left
    # the accelerator before denoising starts. docs/pipeline.md, "Memory modes".
    model_cpu_offload_seq = "think_tokens->vlm->bridge->transformer->vae"

    def __init__(
        self,
        model: DeepGenModel | None = None,
        *,
        vlm=None,
        tokenizer=None,
        think_tokens: ThinkTokens | None = None,
        bridge: StackedChannelBridge | None = None,
        transformer=None,
        vae=None,
        scheduler=None,
        layers: dict | None = None,
        config: dict | None = None,
        vlm_class: str | None = None,
        format_version: int | None = None,
    ) -> None:
        super().__init__()
        if model is None:
            given = dict(vlm=vlm, tokenizer=tokenizer, think_tokens=think_tokens, bridge=bridge,
                         transformer=transformer, vae=vae, scheduler=scheduler, layers=layers)
            missing = [name for name, value in given.items() if value is None]
            if missing:
                raise ValueError(f"DeepGenPipeline: give a DeepGenModel or every component; missing {missing}")
            tokenizer.padding_side = "left"
            model = DeepGenModel(vlm, think_tokens, LayerSelection.from_dict(layers), bridge, transformer, vae,
                                 scheduler, tokenizer, DeepGenConfig.from_dict(config or {})).eval()
        elif not isinstance(model, DeepGenModel):
            raise TypeError(f"model must be a DeepGenModel, got {type(model).__name__}")
        self.model = model
        self.register_modules(
            vlm=model.vlm, tokenizer=model.tokenizer, think_tokens=model.think_tokens, bridge=model.bridge,
            transformer=model.dit.transformer, vae=model.vae, scheduler=model.scheduler,
        )
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

    def to(self, *args, **kwargs) -> DeepGenPipeline:
        """diffusers' ``to``: ``to(device)``, ``to(dtype)``, ``to(device, dtype)`` (or ``device=`` / ``dtype=``).
        The registered modules move with diffusers; then the composed model, so that what lives on it besides
        them (its training tables) follows."""
        super().to(*args, **kwargs)
        dtype = kwargs.get("dtype", next((a for a in args if isinstance(a, torch.dtype)), None))
        device = kwargs.get("device", next((a for a in args if not isinstance(a, torch.dtype)), None))
        self.model.to(device=device, dtype=dtype)
        return self

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
        """Whether this pipeline's calls run with the Triton kernels switched on (never under sequential offload:
        a kernel reads a module's weights outside that module's forward, where accelerate has not loaded them)."""
        if self._weights_offloaded():
            return False
        return self.mode == "kernels" or (self.mode == "auto" and self.model.device.type == "cuda")

    # -- memory modes (diffusers' enable_model_cpu_offload / enable_sequential_cpu_offload) -----------------
    def _weights_offloaded(self) -> bool:
        """Whether accelerate's per-module hooks (``enable_sequential_cpu_offload``) hold the DiT's weights off the
        execution device between calls of its layers."""
        transformer = self.model.dit.transformer
        if not hasattr(transformer, "_hf_hook"):
            return False
        from accelerate.utils import has_offloaded_params

        return any(has_offloaded_params(module) for module in transformer.modules())

    @staticmethod
    def _onload(component) -> None:
        """Fire ``component``'s offload hook, as its ``forward`` would: the pipeline uses the VLM through its
        decoder and vision tower and the DiT through its blocks, never through their ``forward`` (diffusers'
        ``apply_forward_hook`` does the same for the VAE's ``encode`` / ``decode``). Without hooks: nothing."""
        hook = getattr(component, "_hf_hook", None)
        if hook is not None and hasattr(hook, "pre_forward"):
            hook.pre_forward(component)

    def enable_sequential_cpu_offload(self, *args, **kwargs) -> None:
        """diffusers' sequential offload; on a CPU "accelerator" its hooks run on ``cpu`` rather than ``cpu:0``: torch
        copies a ``Parameter`` moved to ``cpu:0`` into a plain tensor, which accelerate cannot offload again."""
        super().enable_sequential_cpu_offload(*args, **kwargs)
        for component in self.components.values():
            for module in component.modules() if isinstance(component, torch.nn.Module) else ():
                hook = getattr(module, "_hf_hook", None)
                for one in getattr(hook, "hooks", [hook]):
                    device = getattr(one, "execution_device", None)
                    if device is not None and torch.device(device).type == "cpu":
                        one.execution_device = torch.device("cpu")

    def enable_vae_tiling(self) -> None:
        """Decode (and encode references) in overlapping tiles: the VAE's own ``enable_tiling``, for large images
        (the result differs slightly from untiled decoding at the tile seams)."""
        self.model.vae.enable_tiling()

    def disable_vae_tiling(self) -> None:
        self.model.vae.disable_tiling()

    def enable_vae_slicing(self) -> None:
        """Decode a batch one image at a time: the VAE's own ``enable_slicing``."""
        self.model.vae.enable_slicing()

    def disable_vae_slicing(self) -> None:
        self.model.vae.disable_slicing()

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
        self.maybe_free_model_hooks()  # under enable_model_cpu_offload: every component back on the CPU
        return output if return_dict else (output.images,)

    def _generate(
        self, prompt, image, negative_prompt, height, width, num_inference_steps, guidance_scale,
        num_images_per_prompt, generator, latents, output_type, progress, reference_latents, callback_on_step_end,
        tensor_inputs,
    ) -> DeepGenPipelineOutput:
        call = self._check_inputs(prompt, image, negative_prompt, height, width, num_inference_steps, guidance_scale,
                                  num_images_per_prompt, generator, latents, output_type, callback_on_step_end)
        step_callback = self._step_callback(callback_on_step_end, tensor_inputs)
        if self.runner.mode != "plain" and self._weights_offloaded():
            raise ValueError(
                f"optimize({self.runner.mode!r}) cannot run under enable_sequential_cpu_offload (its kernels and "
                "compiled steps read weights that accelerate loads only inside each layer's forward); use "
                "optimize('eager') or 'auto', or enable_model_cpu_offload()"
            )
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
        self._onload(self.model.dit.transformer)  # under model offload: the DiT in, the bridge (and VLM) out
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
        prompts, negatives = check_prompts(prompt, negative_prompt)
        check_call_arguments(
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
        self._onload(self.model.vlm)
        with self._projector_loaded():
            condition = self.model.encode_condition(texts, refs_for_vlm)
        condition = condition.repeat_interleave(call.images_per_prompt)
        if do_cfg:
            condition = condition.select(torch.from_numpy(cfg_order(call.images)))
        return condition

    def _projector_loaded(self):
        """The bridge reads its projector's weight outside the projector's forward (the stacked projection): under
        sequential offload, accelerate's ``align_module_device`` loads it for the bridge's pass."""
        projector = self.model.bridge.projector
        if not hasattr(projector, "_hf_hook"):
            return contextlib.nullcontext()
        from accelerate.utils import align_module_device

        return align_module_device(projector)

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
        """The step indices, through diffusers' progress bar (``set_progress_bar_config``) unless switched off."""
        return self.progress_bar(range(count)) if progress else range(count)

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
        if is_old_callback(callback):
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
    def save_pretrained(self, save_directory: str | os.PathLike, **kwargs) -> None:
        """A folder diffusers reads: one sub-folder per component (each with its own ``save_pretrained``: config +
        safetensors, a LoRA-carrying VLM merged first), diffusers' ``model_index.json`` (each component as
        ``[library, class]``, ``_class_name`` as ``[pipeline file, class]``, plus ``layers`` and ``config``) and the
        pipeline file for ``DiffusionPipeline.from_pretrained``. Written atomically: into a temporary folder beside
        it, then moved in place (a failed save leaves an existing folder untouched). ``kwargs``: diffusers' options
        (``safe_serialization`` is always True; ``push_to_hub`` is not supported)."""
        if kwargs.get("push_to_hub"):
            raise ValueError("push_to_hub: not supported; save to a folder and upload it")
        if kwargs.get("safe_serialization") is False:
            raise ValueError("safe_serialization: DeepGenPipeline writes safetensors only (no pickles)")
        path = Path(save_directory)
        path.parent.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(prefix=f".{path.name}.", dir=path.parent)) / "pipeline"
        try:
            save_model_folder(self.model, staging)  # the components, and the format-2 index rewritten below
            index = json.loads((staging / "model_index.json").read_text())
            (staging / "model_index.json").write_text(json.dumps(self._model_index(index), indent=2) + "\n")
            (staging / f"{PIPELINE_FILE}.py").write_text(_PIPELINE_SOURCE)
            replace_folder(staging, path)
        finally:
            shutil.rmtree(staging.parent, ignore_errors=True)

    def _model_index(self, saved: dict) -> dict:
        """diffusers' model_index.json for this pipeline; ``saved``: the index ``save_model_folder`` wrote."""
        import diffusers

        def entry(module) -> list[str]:
            return [type(module).__module__.split(".")[0], type(module).__name__]

        model = self.model
        return {
            "_class_name": [PIPELINE_FILE, type(self).__name__],
            "_diffusers_version": diffusers.__version__,
            "_library": "deepgen-components",
            "format_version": saved["format_version"],
            "vlm": ["transformers", saved["vlm_class"]],
            "tokenizer": entry(model.tokenizer),
            "think_tokens": [COMPONENT_LIBRARY, type(model.think_tokens).__name__],
            "bridge": [COMPONENT_LIBRARY, type(model.bridge).__name__],
            "transformer": entry(model.dit.transformer),
            "vae": entry(model.vae),
            "scheduler": entry(model.scheduler),
            "layers": saved["layers"],
            "config": saved["config"],
            "vlm_class": saved["vlm_class"],
        }

    @classmethod
    def from_pretrained(
        cls, pretrained_model_name_or_path: str | os.PathLike, *, torch_dtype: torch.dtype | None = None,
        device=None, dtype: torch.dtype | None = None, **kwargs,
    ) -> DeepGenPipeline:
        """The pipeline saved in the folder ``pretrained_model_name_or_path``, in ``torch_dtype``: a folder of
        :meth:`save_pretrained` or one written before the diffusers schema (format 1 and 2). The components load
        through :func:`deepgen_components.serialization.load_model_folder` (each in the target dtype; no code from
        the folder runs); other diffusers options (``kwargs``, e.g. ``device_map``, ``variant``) go to
        ``DiffusionPipeline.from_pretrained`` (a saved folder only; its pipeline file runs with
        ``trust_remote_code=True``). ``device=`` / ``dtype=`` are the old keywords (DeprecationWarning; use
        ``torch_dtype=`` and ``.to(device)``). FileNotFoundError naming the path of a missing folder or component."""
        if device is not None or dtype is not None:
            warnings.warn(
                "DeepGenPipeline.from_pretrained(path, device=, dtype=) is deprecated and will be removed in the next "
                "release; use from_pretrained(path, torch_dtype=...).to(device)", DeprecationWarning, stacklevel=2,
            )
            torch_dtype = torch_dtype if torch_dtype is not None else dtype
        path = Path(pretrained_model_name_or_path)
        if not (path / "model_index.json").is_file():
            raise FileNotFoundError(
                f"pretrained_model_name_or_path: {path / 'model_index.json'} not found (not a DeepGenPipeline folder)"
            )
        for sub in COMPONENTS:
            if not (path / sub).is_dir():
                raise FileNotFoundError(f"pretrained_model_name_or_path: component folder {path / sub} is missing")
        if kwargs:
            pipe = super().from_pretrained(str(path), torch_dtype=torch_dtype, **kwargs)
        else:
            pipe = cls(load_model_folder(path, dtype=torch_dtype))
        return pipe.to(device) if device is not None else pipe
