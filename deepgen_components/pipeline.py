"""DeepGenPipeline: prompt (+ reference images) -> images, in the style of diffusers pipelines.

``__call__`` reads like the algorithm: encode the condition once (prompt and negative prompt in one
left-padded batch, as the official model does) -> prepare latents (and reference latents for editing) ->
FlowMatch Euler loop with classifier-free guidance as one batched DiT call -> VAE decode.
"""

from __future__ import annotations

import json
import logging
import math
import numbers
import os
import shutil
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from deepgen_components.bridge import BridgeConfig, StackedChannelBridge
from deepgen_components.conventions import log_reference_resize, output_size, references_per_prompt
from deepgen_components.layer_selection import LayerSelection
from deepgen_components.model import DeepGenConfig, DeepGenModel
from deepgen_components.processing import limit_long_side_size, pil_to_pixels, pixels_to_pil, pixels_to_uint8
from deepgen_components.rl.sampling import euler_step, flow_match_sigmas, guidance
from deepgen_components.think_tokens import ThinkTokens

__all__ = ["DeepGenPipeline", "DeepGenPipelineOutput"]

logger = logging.getLogger(__name__)

FORMAT_VERSION = 1


@dataclass
class DeepGenPipelineOutput:
    """images: list of PIL images, uint8 array (B, H, W, 3), float tensor (B, 3, H, W) in [-1, 1], or latents.
    timings: seconds per stage (condition, denoise, decode, total)."""

    images: list | np.ndarray | torch.Tensor
    timings: dict[str, float] = field(default_factory=dict)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class DeepGenPipeline:
    """Text-to-image and (multi-reference) editing with a :class:`DeepGenModel`."""

    def __init__(self, model: DeepGenModel) -> None:
        self.model = model
        self._progress_config: dict = {}
        self._runner = None
        self.mode = "auto"  # eager PyTorch, plus our Triton kernels on CUDA (see optimize)

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
        kernels switched on for CUDA inference."""
        from deepgen_components.denoising import MODES, DenoiseRunner

        if mode not in (*MODES, "auto"):
            raise ValueError(f"mode must be one of {('auto', *MODES)}, got {mode!r}")
        if dtype is not None:
            self.model.to(dtype=dtype)
        self.mode = mode
        self._runner = None if mode in ("eager", "auto") else DenoiseRunner(self.model, mode)
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
        per_prompt = references_per_prompt(image, batch)
        if per_prompt is None:
            return None
        target = self.model.config.image_size
        out = []
        for refs in per_prompt:
            pixels = []
            for ref in refs:
                if isinstance(ref, torch.Tensor):
                    if ref.dim() != 3 or ref.shape[0] != 3:
                        raise ValueError(f"image: a tensor reference must be (3, H, W) in [-1, 1], got {tuple(ref.shape)}")
                    h, w = limit_long_side_size(ref.shape[-2], ref.shape[-1], target)
                    if (h, w) != tuple(ref.shape[-2:]):
                        ref = torch.nn.functional.interpolate(
                            ref[None].float(), size=(h, w), mode="bicubic", align_corners=False
                        )[0].clamp(-1, 1)
                    pixels.append(ref.float())
                    continue
                if not hasattr(ref, "convert"):
                    hint = " (open files with deepgen_components.processing.load_image)" if isinstance(ref, (str, os.PathLike)) else ""
                    raise ValueError(f"image: expected PIL images or (3, H, W) tensors, got {type(ref).__name__}{hint}")
                if ref.width < 1 or ref.height < 1:
                    raise ValueError(f"image: a reference is {ref.width}x{ref.height} px; give a non-empty image")
                size = limit_long_side_size(ref.height, ref.width, target)
                log_reference_resize(ref, size, target)
                pixels.append(pil_to_pixels(ref, size))
            out.append(pixels)
        return out

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
        generator: torch.Generator | None = None,
        latents: torch.Tensor | None = None,
        output_type: str = "pil",
        progress: bool = True,
        reference_latents=None,
        callback_on_step_end=None,
    ) -> DeepGenPipelineOutput:
        """Generate (``image=None``) or edit (``image``: one image or a list per prompt, several = multi-reference).

        ``guidance_scale``: the CFG scale (1 = no CFG); None takes the model's default for the task,
        ``config.guidance_scale`` for text-to-image and ``config.edit_guidance_scale`` for editing (4.0 unless the
        loaded model says otherwise).

        ``latents``: the initial noise (default: drawn from ``generator``); ``reference_latents``: per prompt, a
        list of precomputed clean reference latents (C, h, w) used instead of VAE-encoding ``image`` for the DiT
        (the VLM still reads ``image``); ``callback_on_step_end(step, timestep, latents, velocity_uncond,
        velocity_cond)`` is called after every Euler step (``velocity_uncond`` is None without CFG).

        Accepted (checked before any model work; docs/pipeline.md, "Bad input"): ``prompt`` a non-blank str or a
        non-empty list of them; ``height`` / ``width`` positive multiples of 32 up to :attr:`max_image_side`;
        ``num_inference_steps`` and ``num_images_per_prompt`` ints >= 1; ``guidance_scale`` a finite number >= 0;
        ``generator`` a ``torch.Generator``. A wrong kind of value raises TypeError, a value out of range ValueError,
        both naming the argument.
        """
        from deepgen_components.triton_kernels import use_kernels

        with use_kernels(self.kernels_active()):
            return self._generate(
                prompt, image, negative_prompt, height, width, num_inference_steps, guidance_scale,
                num_images_per_prompt, generator, latents, output_type, progress, reference_latents,
                callback_on_step_end,
            )

    def _generate(
        self, prompt, image, negative_prompt, height, width, num_inference_steps, guidance_scale,
        num_images_per_prompt, generator, latents, output_type, progress, reference_latents, callback_on_step_end,
    ) -> DeepGenPipelineOutput:
        model = self.model
        device = model.device
        prompts, negatives = _check_prompts(prompt, negative_prompt)
        batch = len(prompts)
        _check_call_arguments(
            height=height, width=width, num_inference_steps=num_inference_steps, guidance_scale=guidance_scale,
            num_images_per_prompt=num_images_per_prompt, generator=generator, latents=latents,
            output_type=output_type, callback_on_step_end=callback_on_step_end, max_side=self.max_image_side,
        )
        num_inference_steps, num_images_per_prompt = int(num_inference_steps), int(num_images_per_prompt)
        height, width = (None if v is None else int(v) for v in (height, width))  # numpy ints welcome
        guidance_scale = None if guidance_scale is None else float(guidance_scale)
        references = self._references(image, batch)
        height, width = self._output_size(height, width, references)
        if max(height, width) > self.max_image_side:  # a reference's processed size may exceed it too
            raise ValueError(
                f"height/width: {height}x{width} exceeds what this model's DiT can place ({self.max_image_side} px "
                "per side)"
            )
        if guidance_scale is None:
            config = model.config
            guidance_scale = config.guidance_scale if references is None else config.edit_guidance_scale
        do_cfg = guidance_scale != 1.0
        timings: dict[str, float] = {}

        # 1. Condition: once per call; prompt and negative prompt share one left-padded batch.
        _sync(device)
        start = time.perf_counter()
        texts = prompts + negatives if do_cfg else prompts
        refs_for_vlm = None if references is None else (references + references if do_cfg else references)
        condition = model.encode_condition(texts, refs_for_vlm)
        condition = condition.repeat_interleave(num_images_per_prompt)
        if do_cfg:  # DiT batch order: [negative; positive]
            half = batch * num_images_per_prompt
            condition = condition.select(torch.cat([torch.arange(half, 2 * half), torch.arange(half)]))
        _sync(device)
        timings["condition"] = time.perf_counter() - start

        # 2. Latents: initial noise from the generator, clean reference latents for editing.
        start = time.perf_counter()
        scale = model.vae_scale_factor
        shape = (batch * num_images_per_prompt, model.latent_channels, height // scale, width // scale)
        if latents is None:
            gen_device = generator.device if generator is not None else torch.device("cpu")
            latents = torch.randn(shape, generator=generator, device=gen_device, dtype=torch.float32)
        elif tuple(latents.shape) != shape:
            raise ValueError(f"latents: expected shape {shape}, got {tuple(latents.shape)}")
        latents = latents.to(device, torch.float32)  # fp32 latents whatever the weights' dtype
        if reference_latents is not None:
            if references is None or len(reference_latents) != batch:
                raise ValueError(
                    f"reference_latents: give one list of latents per prompt ({batch}) together with image"
                )
            encoded = [[r.to(device) for r in refs] for refs in reference_latents]
        elif references is not None:
            encoded = [model.encode_images(refs, generator) for refs in references]
        if references is not None:
            per_image = [refs for refs in encoded for _ in range(num_images_per_prompt)]
            reference_latents = per_image + per_image if do_cfg else per_image
            reference_latents = [[r.to(model.dtype) for r in refs] for refs in reference_latents]

        # 3. Denoising: FlowMatch Euler on diffusers' grid; CFG as one batched DiT call.
        timesteps, sigmas = flow_match_sigmas(model.scheduler, num_inference_steps, device=device)
        steps = range(len(timesteps))
        if progress and not self._progress_config.get("disable", False):
            from tqdm.auto import tqdm

            steps = tqdm(steps, total=len(timesteps), **{k: v for k, v in self._progress_config.items() if k != "disable"})
        uniform_refs = reference_latents is None or len({tuple(tuple(r.shape) for r in refs) for refs in reference_latents}) == 1
        if self._runner is not None and callback_on_step_end is None and uniform_refs:
            # Fast path (pipe.optimize): precomputed embeddings, compiled / graph-captured step. No per-step check
            # there; only when the result is non-finite is the plain loop replayed from the same start to name the step.
            start_latents = latents.clone()
            latents = self._runner(latents, condition, reference_latents, timesteps, sigmas, guidance_scale, do_cfg, steps)
            if not bool(torch.isfinite(latents).all()):
                _, replay_bad = self._plain_loop(start_latents, condition, reference_latents, timesteps, sigmas,
                                                 guidance_scale, do_cfg, range(len(timesteps)), None)
                where = (f"at denoising step {replay_bad} of {len(timesteps)} (found by replaying the eager loop)"
                         if replay_bad >= 0 else f"after the last of {len(timesteps)} denoising steps (the eager "
                         "replay stayed finite: the optimized step itself produced them)")
                raise FloatingPointError(
                    f"non-finite latents (NaN/inf) appeared {where}; mode {self.mode!r}; try float32, a smaller "
                    "guidance_scale or optimize('eager')"
                )
        else:
            latents, bad_step = self._plain_loop(latents, condition, reference_latents, timesteps, sigmas,
                                                 guidance_scale, do_cfg, steps, callback_on_step_end)
            if bad_step >= 0:
                raise FloatingPointError(
                    f"non-finite latents (NaN/inf) appeared at denoising step {bad_step} of {len(timesteps)}; "
                    "try float32 or a smaller guidance_scale"
                )
        _sync(device)
        timings["denoise"] = time.perf_counter() - start

        # 4. Decode.
        start = time.perf_counter()
        if output_type == "latent":
            images = latents
        else:
            pixels = model.decode_latents(latents).float()
            if output_type == "pt":
                images = pixels
            elif output_type == "np":
                images = pixels_to_uint8(pixels).cpu().numpy()
            else:
                images = pixels_to_pil(pixels)
        _sync(device)
        timings["decode"] = time.perf_counter() - start
        timings["total"] = timings["condition"] + timings["denoise"] + timings["decode"]
        return DeepGenPipelineOutput(images=images, timings=timings)

    def _plain_loop(self, latents, condition, reference_latents, timesteps, sigmas, guidance_scale, do_cfg, steps,
                    callback_on_step_end) -> tuple[torch.Tensor, int]:
        """The eager denoising loop; returns (latents, first step with non-finite latents or -1)."""
        model = self.model
        first_bad_step = torch.full((), -1, dtype=torch.long, device=latents.device)
        for i in steps:
            model_input = torch.cat([latents, latents]) if do_cfg else latents
            t = timesteps[i].expand(model_input.shape[0]).to(model.dtype)
            velocity = model.velocity(model_input.to(model.dtype), t, condition, reference_latents)
            velocity_uncond = None
            velocity_cond = velocity
            if do_cfg:
                velocity_uncond, velocity_cond = velocity.chunk(2)
                velocity = guidance(velocity_uncond.float(), velocity_cond.float(), guidance_scale)
            latents = euler_step(latents, velocity, sigmas[i], sigmas[i + 1])
            if callback_on_step_end is not None:
                callback_on_step_end(i, timesteps[i], latents, velocity_uncond, velocity_cond)
            # Record the first non-finite step without a host sync per step.
            bad = ~torch.isfinite(latents).all()
            first_bad_step = torch.where(bad & (first_bad_step < 0), torch.full_like(first_bad_step, i), first_bad_step)
        return latents, int(first_bad_step)

    # -- persistence ------------------------------------------------------------------------------------
    def save_pretrained(self, path: str | os.PathLike) -> None:
        """Our layout: one sub-folder per component with config.json + safetensors, written atomically."""
        from safetensors.torch import save_file

        model = self.model
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", dir=path.parent))
        try:
            vlm = _plain_vlm(model.encoder.vlm)
            vlm.save_pretrained(tmp / "vlm", safe_serialization=True)
            (tmp / "think_tokens").mkdir()
            think = model.think_tokens
            _write_json(tmp / "think_tokens" / "config.json", {"num_tokens": think.num_tokens, "hidden_size": think.hidden_size})
            save_file({"weight": think.weight.detach().contiguous().cpu()}, str(tmp / "think_tokens" / "model.safetensors"))
            (tmp / "bridge").mkdir()
            _write_json(tmp / "bridge" / "config.json", model.bridge.config.to_dict())
            save_file(
                {k: v.detach().contiguous().cpu() for k, v in model.bridge.state_dict().items()},
                str(tmp / "bridge" / "model.safetensors"),
            )
            model.dit.transformer.save_pretrained(tmp / "transformer", safe_serialization=True)
            model.vae.save_pretrained(tmp / "vae", safe_serialization=True)
            model.scheduler.save_pretrained(tmp / "scheduler")
            model.tokenizer.save_pretrained(tmp / "tokenizer")
            _write_json(
                tmp / "model_index.json",
                {
                    "_class_name": "DeepGenPipeline",
                    "_library": "deepgen-components",
                    "format_version": FORMAT_VERSION,
                    "config": model.config.to_dict(),
                    "layers": model.layers.to_dict(),
                    "vlm_class": type(vlm).__name__,
                },
            )
            if path.exists():
                backup = path.with_name(f".{path.name}.old")
                shutil.rmtree(backup, ignore_errors=True)
                os.replace(path, backup)
                os.replace(tmp, path)
                shutil.rmtree(backup, ignore_errors=True)
            else:
                os.replace(tmp, path)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise

    @classmethod
    def from_pretrained(
        cls, path: str | os.PathLike, *, device=None, dtype: torch.dtype | None = None
    ) -> DeepGenPipeline:
        import transformers
        from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel
        from safetensors.torch import load_file
        from transformers import AutoTokenizer

        path = Path(path)
        index_file = path / "model_index.json"
        if not index_file.is_file():
            raise FileNotFoundError(f"path: {index_file} not found (not a DeepGenPipeline folder)")
        index = json.loads(index_file.read_text())
        for sub in ("vlm", "think_tokens", "bridge", "transformer", "vae", "scheduler", "tokenizer"):
            if not (path / sub).is_dir():
                raise FileNotFoundError(f"path: component folder {path / sub} is missing")
        vlm_class = getattr(transformers, index["vlm_class"], None)
        if vlm_class is None:
            raise ValueError(f"path: unknown VLM class {index['vlm_class']!r} in {index_file}")
        kwargs = {"dtype": dtype} if dtype is not None else {}
        vlm = vlm_class.from_pretrained(path / "vlm", attn_implementation="sdpa", **kwargs)
        think_cfg = json.loads((path / "think_tokens" / "config.json").read_text())
        think = ThinkTokens(think_cfg["num_tokens"], think_cfg["hidden_size"])
        think.load_state_dict(load_file(str(path / "think_tokens" / "model.safetensors")))
        bridge = StackedChannelBridge(BridgeConfig.from_dict(json.loads((path / "bridge" / "config.json").read_text())))
        bridge.load_state_dict(load_file(str(path / "bridge" / "model.safetensors")))
        transformer = SD3Transformer2DModel.from_pretrained(path / "transformer", torch_dtype=dtype)
        vae = AutoencoderKL.from_pretrained(path / "vae", torch_dtype=dtype)
        scheduler = FlowMatchEulerDiscreteScheduler.from_pretrained(path / "scheduler")
        tokenizer = AutoTokenizer.from_pretrained(path / "tokenizer")
        tokenizer.padding_side = "left"
        model = DeepGenModel(
            vlm, think, LayerSelection.from_dict(index["layers"]), bridge, transformer, vae, scheduler, tokenizer,
            DeepGenConfig.from_dict(index.get("config", {})),
        )
        if dtype is not None:
            model = model.to(dtype)
        if device is not None:
            model = model.to(device)
        return cls(model.eval())


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
    if generator is not None and not isinstance(generator, torch.Generator):
        hint = f"; e.g. torch.Generator().manual_seed({generator})" if _is_int(generator) else ""
        raise TypeError(f"generator must be a torch.Generator or None, got {type(generator).__name__}{hint}")
    if latents is not None and not isinstance(latents, torch.Tensor):
        raise TypeError(f"latents must be a torch.Tensor or None, got {type(latents).__name__}")
    if output_type not in ("pil", "np", "pt", "latent"):
        raise ValueError(f"output_type must be 'pil', 'np', 'pt' or 'latent', got {output_type!r}")
    if callback_on_step_end is not None and not callable(callback_on_step_end):
        raise TypeError(f"callback_on_step_end must be callable or None, got {type(callback_on_step_end).__name__}")


def _plain_vlm(vlm: torch.nn.Module) -> torch.nn.Module:
    """The VLM as a plain Hugging Face model for saving: a peft wrapper is unwrapped and LoRA layers injected
    into it (e.g. ``deepgen_from_official(merge_lora=False)``, stage-2 training) are merged into a copy.
    Saved unmerged, their weights would be unknown keys to ``from_pretrained`` and the wrapped base weights
    would load as missing (randomly re-initialised)."""
    import copy

    from deepgen_components.lora import lora_module_names, merge_lora

    if type(vlm).__name__.startswith("Peft") and hasattr(vlm, "get_base_model"):
        vlm = vlm.get_base_model()
    if not lora_module_names(vlm):
        return vlm
    merged = copy.deepcopy(vlm)
    count = merge_lora(merged)
    logger.warning("saving the VLM with its %d LoRA layers merged into the weights", count)
    return merged


def _write_json(path: Path, data: dict) -> None:
    path.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")
