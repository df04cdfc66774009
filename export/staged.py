"""``DeepGenPipeline.__call__`` written against exported stages, torch-free: :class:`StagedPipeline`.

The ONNX Runtime and TensorRT pipelines implement the stage call and a few array helpers for their own arrays;
everything else — input checks, the reference rule, the prompt batch, the FlowMatch Euler loop with CFG as one
batched DiT call — is here, in numpy, and draws its rules (sigma grid, guidance, Euler update, CFG batch order,
reference sizes) from ``deepgen_components.conventions``, the torch-free module the PyTorch pipeline follows too.
``tests/test_runtime_mirror.py`` pins this loop to the PyTorch one.

Public per-stage API (the benchmark times single stages with it): :meth:`StagedPipeline.run_stage`,
:meth:`StagedPipeline.prepare_feeds`, :meth:`StagedPipeline.condition_feeds`, :meth:`StagedPipeline.image_features`,
:meth:`StagedPipeline.float_dtype`.
"""

from __future__ import annotations

import time
from abc import ABC, abstractmethod
from dataclasses import dataclass, field

import numpy as np
from deepgen_components.export.manifest import ExportedModel, numpy_dtype
from deepgen_components.export.preprocessing import PromptBatch, PromptProcessor, vision_inputs

from deepgen_components.conventions import (
    cfg_order,
    flow_match_grid,
    guidance,
    limit_long_side_size,
    output_size,
    pixels_to_uint8_array,
    reference_pixels,
    references_per_prompt,
)

__all__ = ["StagedPipeline", "StagedPipelineOutput"]


@dataclass
class StagedPipelineOutput:
    """images: PIL images, float32 (B, H, W, 3) in [0, 1] (``"np"``, as diffusers and ``DeepGenPipeline``), uint8
    (B, H, W, 3) (``"uint8"``, the official rounding), float (B, 3, H, W) in [-1, 1] (``"float"``), or latents;
    timings in seconds."""

    images: object
    timings: dict[str, float] = field(default_factory=dict)


class StagedPipeline(ABC):
    """``DeepGenPipeline.__call__`` over exported stages. Subclasses run the stages and provide array helpers.

    Stage calls take and return the subclass's arrays. Backend hooks: ``_run(stage, feeds) -> {output name:
    array}``, ``_asarray(numpy)``, ``_numpy(array)``, ``_cat(arrays)``, ``_take(array, numpy index)``,
    ``_cast(array, dtype)``, ``_finite_flag(array)``, ``_first_false(flags)``, ``_euler(latents, velocity, dt)``.
    """

    output_types = ("pil", "np", "uint8", "float", "latent")

    def __init__(self, exported: ExportedModel) -> None:
        self.exported = exported
        self.config = exported.config
        self.processor = PromptProcessor(self.config, exported.path / exported.manifest["tokenizer"])
        self._progress_config: dict = {}

    # -- backend hooks ---------------------------------------------------------------------------------
    @abstractmethod
    def _run(self, stage: str, feeds: dict) -> dict:
        """Backend hook (see the class docstring)."""

    @abstractmethod
    def _asarray(self, array: np.ndarray):
        """Backend hook (see the class docstring)."""

    @abstractmethod
    def _numpy(self, array) -> np.ndarray:
        """Backend hook (see the class docstring)."""

    @abstractmethod
    def _cat(self, arrays: list):
        """Backend hook (see the class docstring)."""

    @abstractmethod
    def _take(self, array, index: np.ndarray):
        """Backend hook (see the class docstring)."""

    @abstractmethod
    def _cast(self, array, dtype: str):
        """The array in the manifest dtype ``dtype`` ("float32", "float16", "bfloat16"), on the same device."""

    @abstractmethod
    def _finite_flag(self, array):
        """Whether every element is finite, as a backend scalar: no host sync (the loop reads all flags once)."""

    @abstractmethod
    def _first_false(self, flags: list) -> int:
        """Index of the first false flag of :meth:`_finite_flag`'s results, or -1 (one host sync for the loop)."""

    @abstractmethod
    def _euler(self, latents, velocity, dt: np.float32):
        """``conventions.euler_update`` on float32 latents and velocity, in float32 (``denoising.euler_step``)."""

    # -- stages --------------------------------------------------------------------------------------------
    def float_dtype(self, stage: str) -> np.dtype:
        """numpy dtype of the stage's float inputs (bf16 through ml_dtypes)."""
        return numpy_dtype(self.exported.stage(stage)["dtype"])

    def run_stage(self, stage: str, feeds: dict) -> dict:
        """One stage call on the backend's arrays, after checking the shapes against the exported ranges."""
        self.exported.check_shapes(stage, {k: tuple(v.shape) for k, v in feeds.items()})
        return self._run(stage, feeds)

    def prepare_feeds(self, stage: str, feeds: dict) -> dict:
        """``feeds`` for :meth:`run_stage`: numpy arrays cast to the dtype the stage declares for that input (float
        inputs in the stage's dtype, the DiT timestep in float32) and moved to the backend; the backend's own
        arrays (e.g. another stage's outputs) pass through as they are."""
        declared = {spec["name"]: spec["dtype"] for spec in self.exported.stage(stage)["inputs"]}
        out = {}
        for name, value in feeds.items():
            if isinstance(value, np.ndarray):
                if name in declared:
                    value = value.astype(numpy_dtype(declared[name]), copy=False)
                value = self._asarray(value)
            out[name] = value
        return out

    def image_features(self, batch: PromptBatch) -> np.ndarray:
        """(B, L, D): each reference's vision-tower features at its image-token slots, zeros elsewhere."""
        cfg = self.config
        width = cfg["vlm_hidden_size"]
        features = np.zeros((*batch.input_ids.shape, width), dtype=np.float32)
        if not batch.grids:
            return features
        if not self.exported.has_stage("vision_encoder"):
            self.exported.stage("vision_encoder")  # raises, with the reason it was not exported
        per_image = []
        for patches, grid in zip(batch.patches, batch.grids):
            feeds, restore = vision_inputs(
                patches, grid, merge_size=cfg["spatial_merge_size"], window_size=cfg["vision_window_size"],
                patch_size=cfg["patch_size"],
            )
            out = self.run_stage("vision_encoder", self.prepare_feeds("vision_encoder", feeds))["features"]
            per_image.append(self._numpy(out).astype(np.float32)[restore])
        slots = batch.input_ids == cfg["image_token_id"]
        stacked = np.concatenate(per_image)
        if int(slots.sum()) != stacked.shape[0]:
            raise ValueError(
                f"input_ids hold {int(slots.sum())} image tokens but the references give {stacked.shape[0]} features"
            )
        features[slots] = stacked  # row-major order = the order the references were tokenized in
        return features

    def condition_feeds(self, batch: PromptBatch) -> dict:
        """The condition encoder's prepared feeds for a prompt batch (the vision encoder runs here for references)."""
        feeds = {
            "input_ids": batch.input_ids,
            "attention_mask": batch.attention_mask,
            "position_ids": batch.position_ids,
            "image_features": self.image_features(batch),
        }
        return self.prepare_feeds("condition_encoder", feeds)

    def set_progress_bar_config(self, **kwargs) -> None:
        """tqdm options for the denoising loop, e.g. ``disable=True``."""
        self._progress_config = dict(kwargs)

    # -- inputs ------------------------------------------------------------------------------------------
    def _references(self, image, batch: int) -> list[list[np.ndarray]] | None:
        """Per prompt, the list of reference pixels (3, H, W) in [-1, 1], resized by the official rule."""
        target = self.config["image_size"]
        return reference_pixels(references_per_prompt(image, batch), target, array_type=np.ndarray,
                                from_array=lambda ref, where: _array_reference(ref, target, where), log=True)

    def _output_size(self, height, width, references) -> tuple[int, int]:
        sizes = None if references is None else [[tuple(r.shape[-2:]) for r in refs] for refs in references]
        height, width = output_size(height, width, sizes, self.config["image_size"])
        ranges = self.exported.manifest["ranges"]
        for name, value in (("height", height), ("width", width)):
            if not ranges["min_size"] <= value <= ranges["max_size"]:
                raise ValueError(
                    f"{name}={value} is outside the exported resolution range {ranges['min_size']}..{ranges['max_size']} "
                    "px; re-export with --min-size/--max-size covering it"
                )
        return height, width

    def _reference_latents(self, references, generator: np.random.Generator, mode: str) -> list[list]:
        """Per prompt, each reference's clean latents (1, C, h, w): the VAE posterior mean, or mean + std * noise."""
        out = []
        for refs in references:
            encoded = []
            for ref in refs:
                result = self.run_stage("vae_encoder", self.prepare_feeds("vae_encoder", {"pixels": ref[None]}))
                latent = result["mean"]
                if mode == "sample":
                    noise = generator.standard_normal(tuple(latent.shape), dtype=np.float32)
                    latent = latent + result["std"] * self._asarray(noise.astype(self.float_dtype("vae_encoder")))
                encoded.append(latent)
            out.append(encoded)
        return out

    # -- the algorithm -----------------------------------------------------------------------------------
    def __call__(
        self,
        prompt: str | list[str],
        image=None,
        negative_prompt: str | list[str] = "",
        height: int | None = None,
        width: int | None = None,
        num_inference_steps: int = 50,
        guidance_scale: float = 4.0,
        num_images_per_prompt: int = 1,
        generator: np.random.Generator | int | None = None,
        latents=None,
        output_type: str = "pil",
        progress: bool = True,
        reference_latents: str | None = None,
    ) -> StagedPipelineOutput:
        """Same arguments and steps as ``DeepGenPipeline.__call__``. ``generator`` is a numpy Generator or seed: its
        noise differs from torch's, so pass ``latents`` for runs that must match PyTorch. ``reference_latents``
        ("mean" / "sample") overrides the exported model's rule for editing."""
        cfg = self.config
        prompts = [prompt] if isinstance(prompt, str) else list(prompt)
        if not prompts:
            raise ValueError("prompt: give at least one prompt")
        batch = len(prompts)
        negatives = [negative_prompt] * batch if isinstance(negative_prompt, str) else list(negative_prompt)
        if len(negatives) != batch:
            raise ValueError(f"negative_prompt: got {len(negatives)} for {batch} prompts")
        if output_type not in self.output_types:
            raise ValueError(f"output_type must be one of {', '.join(map(repr, self.output_types))}, got {output_type!r}")
        if num_images_per_prompt < 1:
            raise ValueError(f"num_images_per_prompt must be >= 1, got {num_images_per_prompt}")
        mode = reference_latents or cfg["reference_latents"]
        if mode not in ("mean", "sample"):
            raise ValueError(f"reference_latents must be 'mean' or 'sample', got {mode!r}")
        if not isinstance(generator, np.random.Generator):
            generator = np.random.default_rng(generator)
        references = self._references(image, batch)
        if references is not None:
            counts = {len(refs) for refs in references}
            sizes = {tuple(ref.shape[-2:]) for refs in references for ref in refs}
            if counts != {1} or len(sizes) != 1:
                raise ValueError(
                    "image: the exported DiT (dit_edit) takes exactly one reference per prompt, all of one size; got "
                    f"{sorted(counts)} references per prompt and sizes {sorted(sizes)}. Use the PyTorch pipeline for "
                    "multi-reference or mixed-size editing"
                )
        height, width = self._output_size(height, width, references)
        do_cfg = guidance_scale != 1.0
        timings: dict[str, float] = {}

        # 1. Condition: once per call; prompt and negative prompt share one left-padded batch.
        start = time.perf_counter()
        texts = prompts + negatives if do_cfg else prompts
        refs_for_vlm = None if references is None else (references + references if do_cfg else references)
        condition = self.run_stage("condition_encoder", self.condition_feeds(self.processor(texts, refs_for_vlm)))
        index = np.repeat(np.arange(len(texts)), num_images_per_prompt)
        if do_cfg:  # DiT batch order: [negative; positive]
            index = index[cfg_order(batch * num_images_per_prompt)]
        condition = {name: self._take(value, index) for name, value in condition.items()}
        timings["condition"] = self._synced(start)

        # 2. Latents: the given initial noise or the generator's; clean reference latents for editing.
        start = time.perf_counter()
        scale = cfg["vae_scale_factor"]
        shape = (batch * num_images_per_prompt, cfg["latent_channels"], height // scale, width // scale)
        if latents is None:
            latents = generator.standard_normal(shape, dtype=np.float32)
        else:
            latents = self._numpy(latents) if not isinstance(latents, np.ndarray) else latents
            if tuple(latents.shape) != shape:
                raise ValueError(f"latents: expected shape {shape}, got {tuple(latents.shape)}")
        stage = "dit"
        feeds = {"encoder_hidden_states": condition["context"], "pooled": condition["pooled"]}
        if references is not None:
            encoded = self._reference_latents(references, generator, mode)
            per_image = [refs[0] for refs in encoded for _ in range(num_images_per_prompt)]
            feeds["reference_latents"] = self._cat(per_image + per_image if do_cfg else per_image)
            stage = "dit_edit"
        if cfg["mask_padding"]:
            feeds["context_mask"] = condition["mask"]

        # 3. Denoising: FlowMatch Euler on diffusers' grid; CFG as one batched DiT call.
        timesteps, sigmas = flow_match_grid(cfg["scheduler"], num_inference_steps)
        latents = self.denoise(latents.astype(np.float32), stage, feeds, timesteps, sigmas, guidance_scale, progress)
        timings["denoise"] = self._synced(start)

        # 4. Decode.
        start = time.perf_counter()
        if output_type == "latent":
            images = latents
        else:
            decoder_input = self._cast(latents, self.exported.stage("vae_decoder")["dtype"])
            pixels = self.run_stage("vae_decoder", {"latents": decoder_input})["pixels"]
            images = self._convert_pixels(pixels, output_type)
        timings["decode"] = self._synced(start)
        timings["total"] = timings["condition"] + timings["denoise"] + timings["decode"]
        return StagedPipelineOutput(images=images, timings=timings)

    def denoise(
        self,
        latents: np.ndarray,
        stage: str,
        feeds: dict,
        timesteps: np.ndarray,
        sigmas: np.ndarray,
        guidance_scale: float,
        progress: bool = True,
    ):
        """The sampling loop: float32 initial noise (B, C, h, w) -> final float32 latents (backend array).

        As in ``denoising.denoise_loop``: the latents, the CFG combination and the Euler update stay float32
        whatever the DiT's dtype; only the DiT input is cast to it. Per step one ``stage`` call ("dit" /
        "dit_edit") on ``[latents; latents]`` under CFG (the condition ``feeds`` already in the DiT batch order
        ``[negative; positive]``, :func:`~conventions.cfg_order`), the guidance combination and the Euler update of
        ``conventions``. Finiteness is recorded per step without a host sync; non-finite latents raise after the
        loop with the first step they appeared at."""
        do_cfg = guidance_scale != 1.0
        dit_dtype = self.exported.stage(stage)["dtype"]
        latents = self._asarray(latents.astype(np.float32))
        steps = range(len(timesteps))
        if progress and not self._progress_config.get("disable", False):
            from tqdm.auto import tqdm

            steps = tqdm(steps, total=len(timesteps), **{k: v for k, v in self._progress_config.items() if k != "disable"})
        flags = []
        for i in steps:
            model_input = self._cast(self._cat([latents, latents]) if do_cfg else latents, dit_dtype)
            t = self._asarray(np.full((model_input.shape[0],), timesteps[i], dtype=np.float32))
            velocity = self.run_stage(stage, {"hidden_states": model_input, "timestep": t, **feeds})["velocity"]
            velocity = self._cast(velocity, "float32")
            if do_cfg:
                half = velocity.shape[0] // 2
                velocity = guidance(velocity[:half], velocity[half:], guidance_scale)
            latents = self._euler(latents, velocity, np.float32(sigmas[i + 1] - sigmas[i]))
            flags.append(self._finite_flag(latents))
        first_bad_step = self._first_false(flags)
        if first_bad_step >= 0:
            raise FloatingPointError(
                f"non-finite latents (NaN/inf) appeared at denoising step {first_bad_step} of {len(timesteps)}; "
                "try float32 or a smaller guidance_scale"
            )
        return latents

    def _synced(self, start: float) -> float:
        return time.perf_counter() - start

    def _convert_pixels(self, pixels, output_type: str):
        array = self._numpy(pixels).astype(np.float32)
        if output_type == "float":
            return array
        if output_type == "np":  # diffusers' convention, as DeepGenPipeline: float32 (B, H, W, 3) in [0, 1]
            return np.clip(array / 2 + 0.5, 0.0, 1.0).transpose(0, 2, 3, 1)
        uint8 = pixels_to_uint8_array(array)
        if output_type == "uint8":
            return uint8
        from PIL import Image

        return [Image.fromarray(a) for a in uint8]


def _array_reference(ref: np.ndarray, target: int, where: str) -> np.ndarray:
    """An array reference as it is, when it has the official size: the torch-free runtime resizes PIL images only."""
    if ref.ndim != 3 or ref.shape[0] != 3:
        raise ValueError(f"{where}: an array reference must be (3, H, W) in [-1, 1], got {tuple(ref.shape)}")
    size = limit_long_side_size(ref.shape[-2], ref.shape[-1], target)
    if size != tuple(ref.shape[-2:]):
        raise ValueError(
            f"{where}: an array reference of {ref.shape[-2]}x{ref.shape[-1]} would be resized to "
            f"{size[0]}x{size[1]} (long side <= {target}, sides multiples of 32); the torch-free "
            "runtime resizes PIL images only: pass a PIL image or an array of that size"
        )
    return ref.astype(np.float32)
