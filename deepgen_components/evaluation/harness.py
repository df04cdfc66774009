"""The generation loop of ``deepgen eval``: settings, deterministic noise per (prompt, sample), sharding across
``torchrun`` ranks, prompt batching, resume.

Determinism: the initial noise of sample k of prompt i depends only on the settings (seed, size, noise scheme) and
on i, never on the batch it ran in, the rank that ran it or what was already finished, so a sharded, batched,
resumed run draws exactly the noise of a plain one-process run.

* ``per_sample`` (default): ``torch.Generator().manual_seed(seed + i * samples + k)``, one (C, h, w) draw.
* ``shapes_eval``: the noise of the shapes world's evaluation (``deepgen_components.shapes.evaluation.generate_t2i``:
  rows of one draw per chunk of 64 prompts, seeded ``seed + chunk start``), so the shapes benchmark reproduces the
  shapes evaluation's numbers.

Sharding: the unfinished prompts (listed by every rank before any rank writes) go round-robin, ``pending[rank::
world]``: disjoint, their union complete, the same on every run.
"""

from __future__ import annotations

import logging
import time
from dataclasses import asdict, dataclass, field

import torch

from deepgen_components.evaluation.layouts import Layout
from deepgen_components.evaluation.prompts import Benchmark, PromptRecord

__all__ = ["GenerationSettings", "GenerationStats", "generate", "initial_noise", "model_facts", "resolve_settings",
           "sample_seeds", "shard"]

logger = logging.getLogger(__name__)
SHAPES_EVAL_CHUNK = 64  # deepgen_components.shapes.evaluation.generate_t2i's batch


@dataclass(frozen=True)
class GenerationSettings:
    """Everything that decides the images (beside the model): stored in run.json, compared on resume."""

    benchmark: str
    protocol: str
    samples: int
    height: int
    width: int
    steps: int
    guidance: float
    seed: int
    noise: str
    set_size: int  # prompts in the whole set (the shapes_eval noise depends on it)
    negative_prompt: str = ""

    def to_dict(self) -> dict:
        return asdict(self)


def model_facts(pipe) -> dict:
    """image_size, latent_channels, vae_scale_factor and default CFG scales of a DeepGenPipeline or an exported
    (ONNX Runtime / TensorRT) pipeline."""
    model = getattr(pipe, "model", None)
    if model is not None and hasattr(model, "latent_channels"):
        config = model.config
        return {"image_size": config.image_size, "latent_channels": model.latent_channels,
                "vae_scale_factor": model.vae_scale_factor, "guidance": config.guidance_scale,
                "edit_guidance": config.edit_guidance_scale, "backend": "torch",
                "mask_padding": model.bridge.config.mask_padding}
    config = pipe.config
    return {"image_size": config["image_size"], "latent_channels": config["latent_channels"],
            "vae_scale_factor": config["vae_scale_factor"], "guidance": config.get("guidance_scale", 4.0),
            "edit_guidance": config.get("edit_guidance_scale", 4.0), "backend": "numpy",
            "mask_padding": bool(config.get("mask_padding", True))}


def resolve_settings(benchmark: Benchmark, pipe, *, protocol: str, set_size: int, samples: int | None = None,
                     height: int | None = None, width: int | None = None, steps: int | None = None,
                     guidance: float | None = None, seed: int = 0, negative_prompt: str = "") -> GenerationSettings:
    """The benchmark's documented settings (``official``) or ours, each overridden by an explicit value."""
    from deepgen_components.evaluation.prompts import Protocol

    if protocol not in ("ours", "official"):
        raise ValueError(f"--protocol: expected 'ours' or 'official', got {protocol!r}")
    base = benchmark.official if protocol == "official" else Protocol()
    facts = model_facts(pipe)
    samples = benchmark.samples if samples is None else samples
    if benchmark.layout == "dpg" and samples != 4:
        raise ValueError(f"--samples: DPG-Bench's layout is a 2x2 grid of 4 samples, got {samples}")
    if benchmark.noise == "shapes_eval" and samples != 1:
        raise ValueError(f"--samples: the shapes benchmark draws one sample per prompt (its evaluation's noise), got "
                         f"{samples}")
    height = height or base.height or facts["image_size"]
    width = width or base.width or facts["image_size"]
    guidance = guidance if guidance is not None else base.guidance if base.guidance is not None else facts["guidance"]
    return GenerationSettings(benchmark.name, protocol, samples, height, width, steps or base.steps,
                              float(guidance), seed, benchmark.noise, set_size, negative_prompt)


def sample_seeds(settings: GenerationSettings, index: int) -> list[int]:
    """The generator seed of each sample of prompt ``index`` (``shapes_eval``: the seed of its chunk's draw)."""
    if settings.noise == "shapes_eval":
        rows = [index * settings.samples + k for k in range(settings.samples)]
        return [settings.seed + row - row % SHAPES_EVAL_CHUNK for row in rows]
    return [settings.seed + index * settings.samples + k for k in range(settings.samples)]


def initial_noise(settings: GenerationSettings, index: int, latent_shape: tuple[int, int, int]) -> torch.Tensor:
    """The initial latents of prompt ``index``, (samples, C, h, w) float32, from its seeds alone."""
    rows = []
    for k, seed in enumerate(sample_seeds(settings, index)):
        generator = torch.Generator().manual_seed(seed)
        if settings.noise == "shapes_eval":
            row = index * settings.samples + k
            start = row - row % SHAPES_EVAL_CHUNK
            count = min(SHAPES_EVAL_CHUNK, settings.set_size * settings.samples - start)
            rows.append(torch.randn((count, *latent_shape), generator=generator)[row - start])
        else:
            rows.append(torch.randn(latent_shape, generator=generator))
    return torch.stack(rows)


def shard(items: list, rank: int, world_size: int) -> list:
    """Round-robin share of ``rank``: disjoint across ranks, their union is ``items``, deterministic."""
    if not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} outside 0..{world_size - 1}")
    return items[rank::world_size]


@dataclass
class GenerationStats:
    prompts: int = 0
    images: int = 0
    seconds: float = 0.0  # wall time of this rank's generation loop (model calls + writing)
    skipped: int = 0  # already finished before this run
    ids: list[str] = field(default_factory=list)  # the prompts this rank generated, in order


def _load_reference(record: PromptRecord):
    from deepgen_components.processing import load_image

    try:
        return load_image(record.image)
    except (FileNotFoundError, ValueError) as err:
        raise type(err)(f"prompt {record.id}: image {err}") from None


def generate(pipe, records: list[PromptRecord], layout: Layout, settings: GenerationSettings, *, batch_size: int = 1,
             rank: int = 0, world_size: int = 1, progress: bool = True, pending: list[PromptRecord] | None = None
             ) -> GenerationStats:
    """Generate this rank's share of the unfinished prompts into ``layout``, ``batch_size`` prompts per call.

    ``pending``: the unfinished prompts, when the caller listed them (under torchrun every rank must list them
    before any rank writes); by default listed here. The pipeline's own per-step progress bar is switched off
    (``pipe.set_progress_bar_config(disable=True)``); ``progress`` is the harness's bar over the prompts.
    """
    if batch_size < 1:
        raise ValueError(f"--batch-size must be >= 1, got {batch_size}")
    pending = [r for r in records if not layout.is_done(r)] if pending is None else pending
    mine = shard(pending, rank, world_size)
    pipe.set_progress_bar_config(disable=True)
    facts = model_facts(pipe)
    scale = facts["vae_scale_factor"]
    latent_shape = (facts["latent_channels"], settings.height // scale, settings.width // scale)
    stats = GenerationStats(skipped=len(records) - len(pending))
    if batch_size > 1 and not facts["mask_padding"] and rank == 0:
        # Official parity: pads are not masked, so a prompt's condition depends on the longest prompt of its batch.
        logger.warning("this model does not mask padding (official parity): with --batch-size %d a prompt's image "
                       "depends on the other prompts of its batch; --batch-size 1 makes every image independent",
                       batch_size)
    bar = None
    if progress and rank == 0 and mine:
        from tqdm.auto import tqdm

        # Rank 0's own share; the other ranks' shares differ from it by at most one prompt.
        bar = tqdm(total=len(mine), unit="prompt", desc=f"{settings.benchmark} (rank 0 of {world_size})")
    started = time.perf_counter()
    # Editing prompts (with a source image) and text-to-image prompts never share a call.
    groups = [[r for r in mine if r.image is None], [r for r in mine if r.image is not None]]
    for group in groups:
        for start in range(0, len(group), batch_size):
            batch = group[start : start + batch_size]
            latents = torch.cat([initial_noise(settings, r.index, latent_shape) for r in batch])
            if facts["backend"] == "numpy":
                latents = latents.numpy()
            images = [_load_reference(r) for r in batch] if batch[0].image is not None else None
            with torch.no_grad():
                result = pipe([r.prompt for r in batch], image=images, negative_prompt=settings.negative_prompt,
                              height=settings.height, width=settings.width, num_inference_steps=settings.steps,
                              guidance_scale=settings.guidance, num_images_per_prompt=settings.samples,
                              latents=latents)
            outputs = result.images  # PIL, prompt-major: the samples of prompt j are outputs[j*S : (j+1)*S]
            for j, record in enumerate(batch):
                layout.write(record, outputs[j * settings.samples : (j + 1) * settings.samples])
            stats.prompts += len(batch)
            stats.ids += [r.id for r in batch]
            stats.images += len(batch) * settings.samples
            if bar is not None:
                bar.update(len(batch))
    stats.seconds = time.perf_counter() - started
    if bar is not None:
        bar.close()
    return stats
