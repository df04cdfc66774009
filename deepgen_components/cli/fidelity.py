"""Numerical parity with the official DeepGen 1.0 implementation, checked against a golden set.

A golden set (e.g. ``shared/golden/deepgen_tiny_a``) is what the official code computed at a tiny random
size: its weights, the inputs it was given, and every intermediate and output (see the set's ``README.md``
and ``manifest.json``). :func:`compare_golden` imports the weights through our official-weights import
(:func:`~deepgen_components.builders.deepgen_from_official`, official parity mode: no pad masking, every
token reaches the DiT), feeds the recorded inputs through the public API (``DeepGenModel``,
``DeepGenPipeline``, ``processing``, ``sampling``) and returns one :class:`Row` per compared tensor.
``benchmarks/fidelity.py`` prints the rows as a table; ``tests/test_golden_parity.py`` asserts on them.

Everything set-specific (prompts, sizes, steps, seeds, CFG scale, connector heads, layer count) is read
from the manifest, so any set laid out like set A can be checked. Tensors a set does not hold are
skipped; tensors this module does not know get a ``not compared`` row.

Tolerance (the golden README's rule): integer / bool tensors exactly equal; float tensors
``torch.allclose(ours, golden, rtol=1e-4, atol=1e-4)``. Three tensor kinds cannot be recomputed and are
checked differently:

* recorded random *inputs* (noise, clean latents, ``u``, pixels): fed to the model as given (``input``);
* VAE posterior *samples* drawn from the official run's global RNG (``*.ref_latents.*``,
  ``train_edit.x0.*``): our posterior mean is compared where the set stores the official one, and the
  sample must be a plausible draw from *our* posterior, max |z| <= 6 with
  z = (sample / scale + shift - mean) / std (``sample``); the sample itself is then fed to the DiT;
* a generator draw with a known seed (``gen_*.initial_noise``): recomputed with ``torch.randn`` exactly as
  ``DeepGenPipeline`` draws it.
"""

from __future__ import annotations

import contextlib
import inspect
import json
import math
import re
import time
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

__all__ = [
    "ATOL",
    "RTOL",
    "SAMPLE_Z_LIMIT",
    "GoldenSet",
    "Row",
    "compare_golden",
    "format_table",
    "load_golden",
    "load_official_model",
]

RTOL = 1e-4
ATOL = 1e-4
SAMPLE_Z_LIMIT = 6.0  # P(|z| > 6) ~ 2e-9 per element: a real posterior draw never gets near it

_EXACT_DTYPES = (torch.bool, torch.uint8, torch.int8, torch.int16, torch.int32, torch.int64)


# -- golden set ---------------------------------------------------------------------------------------
@dataclass
class GoldenSet:
    """A golden set on disk: ``manifest.json``, ``tensors.safetensors`` and the component folders."""

    path: Path
    manifest: dict
    tensors: dict[str, torch.Tensor]

    def __contains__(self, name: str) -> bool:
        return name in self.tensors

    def __getitem__(self, name: str) -> torch.Tensor:
        return self.tensors[name]

    def indexed(self, prefix: str) -> list[torch.Tensor]:
        """``prefix.0``, ``prefix.1``, ... for as long as they exist."""
        out = []
        while f"{prefix}.{len(out)}" in self.tensors:
            out.append(self.tensors[f"{prefix}.{len(out)}"])
        return out

    @property
    def prompts(self) -> dict:
        return self.manifest.get("prompts", {})

    @property
    def generation(self) -> dict:
        return self.manifest.get("generation", {})

    @property
    def connector_heads(self) -> int | None:
        return self.manifest.get("configs", {}).get("connector", {}).get("num_attention_heads")

    @property
    def vae_shift_scale(self) -> tuple[float, float]:
        vae = self.manifest.get("configs", {}).get("vae", {})
        return float(vae.get("shift_factor") or 0.0), float(vae.get("scaling_factor", 1.0))

    def seed(self, task: str) -> int | None:
        """The generator seed of ``generate()`` for ``task`` ("t2i" / "edit"): a structured manifest entry
        (``generation.seeds[task]`` or ``generation.seed_<task>``) or, as in set A, the README sentence
        "seeded with 1245 (T2I) and 1255 (edit)" kept in ``generation.initial_noise``."""
        gen = self.generation
        if isinstance(gen.get("seeds"), dict) and task in gen["seeds"]:
            return int(gen["seeds"][task])
        if f"seed_{task}" in gen:
            return int(gen[f"seed_{task}"])
        match = re.search(rf"(\d+)\s*\({re.escape(task)}\)", str(gen.get("initial_noise", "")), re.IGNORECASE)
        return int(match.group(1)) if match else None

    def references_per_sample(self, num_samples: int) -> list[list[int]]:
        """Indices of ``edit.ref_pixels.*`` belonging to each edit sample (consecutive, equal split unless the
        manifest gives ``images.edit_references_per_sample``)."""
        num_refs = len(self.indexed("edit.ref_pixels"))
        counts = self.manifest.get("images", {}).get("edit_references_per_sample")
        if counts is None:
            if num_samples == 0 or num_refs % num_samples:
                raise ValueError(
                    f"golden set: {num_refs} edit references for {num_samples} edit prompts; add "
                    "images.edit_references_per_sample to the manifest"
                )
            counts = [num_refs // num_samples] * num_samples
        starts = [sum(counts[:i]) for i in range(len(counts))]
        return [list(range(s, s + c)) for s, c in zip(starts, counts)]


def load_golden(golden_dir: str | Path) -> GoldenSet:
    from safetensors.torch import load_file

    path = Path(golden_dir)
    for name in ("manifest.json", "tensors.safetensors", "official_state_dict.safetensors"):
        if not (path / name).is_file():
            raise FileNotFoundError(
                f"golden_dir: no {name} in {path} (expected a golden set like deepgen_tiny_a)"
            )
    manifest = json.loads((path / "manifest.json").read_text())
    return GoldenSet(path=path, manifest=manifest, tensors=load_file(str(path / "tensors.safetensors")))


def load_official_model(golden: GoldenSet, *, mask_padding: bool = False, tokens: str = "all"):
    """The golden set's weights imported through ``deepgen_from_official`` (original checkpoint layout plus
    the tiny Qwen2.5-VL folder), float32. Parity mode unless ``mask_padding`` / ``tokens`` say otherwise."""
    from deepgen_components.builders import deepgen_from_official
    from deepgen_components.model import DeepGenConfig

    kwargs = golden.manifest.get("model_kwargs", {})
    config = DeepGenConfig(
        max_length=int(kwargs.get("max_length", 1024)),
        condition_dropout=float(kwargs.get("unconditional", 0.1)),
    )
    p = golden.path
    return deepgen_from_official(
        p / "qwen2_5_vl",
        p / "official_state_dict.safetensors",
        vae_path=p / "vae",
        transformer_config=p / "transformer",
        scheduler_path=p / "scheduler",
        tokenizer_path=p / "tokenizer",
        connector_heads=golden.connector_heads,
        dtype=torch.float32,
        mask_padding=mask_padding,
        tokens=tokens,
        config=config,
    )


# -- rows -----------------------------------------------------------------------------------------------
@dataclass
class Row:
    """One compared tensor.

    check: ``exact`` (integers / bools), ``allclose`` (floats), ``sample`` (random posterior draw: max |z|),
    ``input`` (recorded input, fed as given) or ``not compared``.
    max_abs: max |ours - golden|; max_rel: max_abs / max |golden| (the README's "rel");
    tol_used: max |ours - golden| / (atol + rtol |golden|), <= 1 passes (allclose); for ``sample`` rows
    max |z| / SAMPLE_Z_LIMIT.
    """

    name: str
    via: str
    check: str
    shape: tuple[int, ...]
    max_abs: float | None
    max_rel: float | None
    tol_used: float | None
    tolerance: str
    passed: bool
    note: str = ""

    def to_dict(self) -> dict:
        data = asdict(self)
        data["shape"] = list(self.shape)
        return data


class _Recorder:
    def __init__(self, golden: GoldenSet, rtol: float, atol: float) -> None:
        self.golden = golden
        self.rtol = rtol
        self.atol = atol
        self.rows: list[Row] = []

    def compare(
        self, name: str, ours, via: str, *, expected: torch.Tensor | None = None, note: str = ""
    ) -> None:
        """Row ``name``: ours vs the golden tensor (or ``expected``, a tensor derived from the golden set)."""
        if name not in self.golden:
            return
        golden = self.golden[name] if expected is None else expected
        ours = torch.as_tensor(ours).detach().cpu()
        shape = tuple(golden.shape)
        if golden.dtype in _EXACT_DTYPES:
            if tuple(ours.shape) != shape or ours.is_floating_point():
                note = f"ours is {tuple(ours.shape)} {ours.dtype}, golden {shape} {golden.dtype}"
                self.rows.append(Row(name, via, "exact", shape, math.inf, None, None, "exact", False, note))
                return
            diff = (ours.long() - golden.long()).abs()
            max_abs = float(diff.max()) if diff.numel() else 0.0
            passed = bool(torch.equal(ours.to(golden.dtype), golden))
            self.rows.append(Row(name, via, "exact", shape, max_abs, None, None, "exact", passed, note))
            return
        tolerance = f"rtol={self.rtol:g} atol={self.atol:g}"
        if tuple(ours.shape) != shape:
            note = f"ours has shape {tuple(ours.shape)}"
            self.rows.append(
                Row(name, via, "allclose", shape, math.inf, math.inf, math.inf, tolerance, False, note)
            )
            return
        g, o = golden.double(), ours.double()
        diff = (o - g).abs()
        max_abs = float(diff.max()) if diff.numel() else 0.0
        scale = float(g.abs().max()) if g.numel() else 0.0
        max_rel = max_abs / scale if scale > 0 else (0.0 if max_abs == 0 else math.inf)
        tol_used = float((diff / (self.atol + self.rtol * g.abs())).max()) if diff.numel() else 0.0
        passed = bool(torch.allclose(o, g, rtol=self.rtol, atol=self.atol))
        self.rows.append(
            Row(name, via, "allclose", shape, max_abs, max_rel, tol_used, tolerance, passed, note)
        )

    def sample(self, name: str, mean: torch.Tensor, std: torch.Tensor, via: str) -> None:
        """``name`` holds (z - shift) * scale for a draw z ~ N(mean, std^2) of our VAE posterior."""
        if name not in self.golden:
            return
        shift, scale = self.golden.vae_shift_scale
        golden = self.golden[name].double()
        z = ((golden / scale + shift) - mean.detach().cpu().double()) / std.detach().cpu().double()
        max_z = float(z.abs().max())
        self.rows.append(
            Row(
                name,
                via,
                "sample",
                tuple(golden.shape),
                None,
                None,
                max_z / SAMPLE_Z_LIMIT,
                f"|z|<={SAMPLE_Z_LIMIT:g}",
                max_z <= SAMPLE_Z_LIMIT,
                f"max|z|={max_z:.2f}, mean z={float(z.mean()):+.3f}, std z={float(z.std()):.3f}",
            )
        )

    def input(self, name: str, via: str = "recorded input, fed as given") -> None:
        if name in self.golden:
            shape = tuple(self.golden[name].shape)
            self.rows.append(Row(name, via, "input", shape, None, None, None, "-", True))


@contextlib.contextmanager
def _config_override(config, **values) -> Iterator[None]:
    old = {k: getattr(config, k) for k in values}
    for k, v in values.items():
        setattr(config, k, v)
    try:
        yield
    finally:
        for k, v in old.items():
            setattr(config, k, v)


def _cfg_order(condition, batch: int):
    """A ``[prompts; cfg prompts]`` condition reordered to the pipeline's DiT batch ``[cfg prompts; prompts]``."""
    from deepgen_components.bridge import BridgeOutput

    index = torch.cat([torch.arange(batch, 2 * batch), torch.arange(batch)]).to(condition.context.device)
    return BridgeOutput(
        context=condition.context[index], pooled=condition.pooled[index], mask=condition.mask[index]
    )


def _pipeline_takes_reference_latents() -> bool:
    from deepgen_components.pipeline import DeepGenPipeline

    return "reference_latents" in inspect.signature(DeepGenPipeline.__call__).parameters


def _table_indices(golden: GoldenSet, name: str, table: torch.Tensor) -> torch.Tensor:
    """The training-table indices a direct DiT test used: "timesteps[[200, 800]]" in the manifest, else the
    nearest table entries."""
    meaning = golden.manifest.get("tensors", {}).get(name, {}).get("meaning", "")
    match = re.search(r"timesteps\[\[([\d,\s]+)\]\]", meaning)
    if match:
        return torch.tensor([int(v) for v in match.group(1).split(",")])
    return (table.cpu()[None, :] - golden[name][:, None]).abs().argmin(1)


# -- sections ---------------------------------------------------------------------------------------------
def _check_condition(model, rec: _Recorder, prefix: str, texts: Sequence[str], references=None):
    """VLM + think tokens + SCB on one batch: every intermediate the set records under ``prefix``."""
    batch = model.prepare_prompts(texts, references)
    condition, hidden = model.encode_tokens(batch, return_intermediates=True)
    api = "DeepGenModel.encode_tokens(prepare_prompts(...))"
    rec.compare(f"{prefix}.input_ids", batch.input_ids, "DeepGenModel.prepare_prompts")
    rec.compare(f"{prefix}.attention_mask", batch.attention_mask, "DeepGenModel.prepare_prompts")
    rec.compare(
        f"{prefix}.vlm_attention_mask", hidden.attention_mask, f"{api}: VLMHiddenStates.attention_mask"
    )
    rec.compare(f"{prefix}.position_ids", hidden.position_ids, f"{api}: VLMHiddenStates.position_ids")
    rec.compare(f"{prefix}.inputs_embeds", hidden.inputs_embeds, f"{api}: VLMHiddenStates.inputs_embeds")
    if hidden.all_hidden_states is not None:
        rec.compare(
            f"{prefix}.hidden_states_all", torch.stack(hidden.all_hidden_states), f"{api}: all_hidden_states"
        )
    rec.compare(
        f"{prefix}.selected_hidden_states", torch.stack(hidden.hidden_states), f"{api}: hidden_states"
    )
    rec.compare(
        f"{prefix}.stacked", torch.cat(hidden.hidden_states, dim=-1), f"{api}: cat(hidden_states, -1)"
    )
    inter = condition.intermediates or {}
    for ours, theirs in (
        ("projector_out", "projector_1_out"),
        ("connector_out", "connector_out"),
        ("connector_mean", "connector_mean"),
    ):
        if ours in inter:
            rec.compare(f"{prefix}.{theirs}", inter[ours], f"{api}: BridgeOutput.intermediates[{ours!r}]")
    rec.compare(f"{prefix}.pooled", condition.pooled, f"{api}: BridgeOutput.pooled")
    rec.compare(f"{prefix}.context", condition.context, f"{api}: BridgeOutput.context")
    return condition, batch


def _check_references(model, golden: GoldenSet, rec: _Recorder, refs: list[torch.Tensor]) -> None:
    """Reference images: ViT preprocessing and tokens, the VAE posterior, the recorded posterior samples."""
    from deepgen_components.processing import vision_patches, vit_resize

    shift, scale = golden.vae_shift_scale
    for j, ref in enumerate(refs):
        rec.input(f"edit.ref_pixels.{j}")
        patches, grid = vision_patches(ref)
        rec.compare(f"edit.vit_patches.{j}", patches, "processing.vision_patches(ref_pixels)")
        rec.compare(f"edit.image_grid_thw.{j}", grid, "processing.vision_patches(ref_pixels)")
        if f"edit.vit_resized.{j}" in golden:
            rec.compare(f"edit.vit_resized.{j}", vit_resize(ref), "processing.vit_resize(ref_pixels)")
        features = model.encoder.image_features(patches.to(model.device), grid.to(model.device))
        rec.compare(
            f"edit.image_embeds.{j}", features, "ThinkTokenVLM.image_features(vision_patches(ref_pixels))"
        )
        posterior = model.vae.encode(ref[None].to(model.device, model.vae.dtype)).latent_dist
        name = f"edit.ref_latent_dist_mean.{j}"
        if name in golden:
            rec.compare(
                name,
                model.encode_images(ref[None], mode="mean")[0],
                "DeepGenModel.encode_images(mode='mean') vs (golden mean - shift) * scale",
                expected=(golden[name] - shift) * scale,
            )
        rec.compare(
            f"edit.ref_latent_dist_std.{j}", posterior.std[0], "DeepGenModel.vae.encode(ref).latent_dist.std"
        )
        rec.sample(
            f"edit.ref_latents.{j}",
            posterior.mean[0],
            posterior.std[0],
            "draw of DeepGenModel.vae's posterior (global RNG); fed to the DiT as recorded",
        )


@dataclass
class _Task:
    """What the generation check needs from a VLM section."""

    prompts: list[str]
    negatives: list[str]
    images: list[list[torch.Tensor]] | None = None  # reference pixels per prompt
    reference_latents: list[list[torch.Tensor]] | None = None  # golden reference latents per prompt
    groups: list[list[int]] | None = None  # indices of the golden references of each prompt


def _check_t2i(model, golden: GoldenSet, rec: _Recorder) -> _Task | None:
    prompts = list(golden.prompts.get("t2i") or [])
    if not prompts:
        return None
    negatives = list(golden.prompts.get("t2i_cfg_prompts") or [])
    _check_condition(model, rec, "t2i", prompts + negatives)
    return _Task(prompts, negatives)


def _check_edit(model, golden: GoldenSet, rec: _Recorder) -> _Task | None:
    prompts = list(golden.prompts.get("edit") or [])
    refs = golden.indexed("edit.ref_pixels")
    if not prompts or not refs:
        return None
    negatives = list(golden.prompts.get("edit_cfg_prompts") or [])
    groups = golden.references_per_sample(len(prompts))
    images = [[refs[j] for j in group] for group in groups]
    reference_latents = None
    if all(f"edit.ref_latents.{j}" in golden for j in range(len(refs))):
        reference_latents = [[golden[f"edit.ref_latents.{j}"] for j in group] for group in groups]
    _check_references(model, golden, rec, refs)
    # The cfg prompt gets the same image block as its prompt (official).
    _, batch = _check_condition(model, rec, "edit", prompts + negatives, images + images[: len(negatives)])
    if batch.image_grid_thw is not None:
        # One row per reference; the cfg half of our batch repeats the prompt half's grids.
        rec.compare(
            "edit.image_grid_thw",
            batch.image_grid_thw[: len(refs)],
            "DeepGenModel.prepare_prompts(...).image_grid_thw (prompt half)",
        )
    return _Task(prompts, negatives, images, reference_latents, groups)


def _golden_condition(golden: GoldenSet, prefix: str, rows):
    from deepgen_components.bridge import BridgeOutput

    context, pooled = golden[f"{prefix}.context"][rows], golden[f"{prefix}.pooled"][rows]
    return BridgeOutput(context=context, pooled=pooled, mask=torch.ones(context.shape[:2], dtype=torch.bool))


def _check_dit(model, golden: GoldenSet, rec: _Recorder, edit: _Task | None) -> None:
    """Direct DiT calls on recorded noisy latents with the recorded (golden) condition: the DiT isolated."""
    device = model.device
    for task in ("t2i", "edit"):
        prefix = f"dit_{task}"
        if f"{prefix}.timesteps" not in golden or f"{task}.context" not in golden:
            continue
        index = _table_indices(golden, f"{prefix}.timesteps", model.train_timesteps)
        timesteps, sigmas = model.train_timesteps[index.to(device)], model.train_sigmas[index.to(device)]
        rec.compare(f"{prefix}.timesteps", timesteps, f"DeepGenModel.train_timesteps[{index.tolist()}]")
        rec.compare(f"{prefix}.sigmas", sigmas, f"DeepGenModel.train_sigmas[{index.tolist()}]")
        if task == "t2i":
            if "dit_t2i.noisy_latents" not in golden:
                continue
            x0, noise, noisy = golden["dit_t2i.x0"], golden["dit_t2i.noise"], golden["dit_t2i.noisy_latents"]
            x0, noise, noisy = list(x0), list(noise), list(noisy)
        else:
            x0, noise, noisy = (
                golden.indexed("dit_edit.x0"),
                golden.indexed("dit_edit.noise"),
                golden.indexed("dit_edit.noisy_latents"),
            )
        batch = len(noisy)
        names = (
            ["dit_t2i.x0", "dit_t2i.noise"]
            if task == "t2i"
            else [f"dit_edit.{k}.{i}" for i in range(batch) for k in ("x0", "noise")]
        )
        for name in names:
            rec.input(name)
        # No public noising helper (FlowMatchingOutput does not return the noisy latents): the formula
        # x_sigma = (1 - sigma) x0 + sigma * noise with our sigma table checks the recorded DiT input.
        ours_noisy = [(1 - s) * a + s * b for a, b, s in zip(x0, noise, sigmas.cpu().tolist())]
        formula = "(1 - sigma) * x0 + sigma * noise with our sigma"
        if task == "t2i":
            rec.compare("dit_t2i.noisy_latents", torch.stack(ours_noisy), formula)
        else:
            for i, z in enumerate(ours_noisy):
                rec.compare(f"dit_edit.noisy_latents.{i}", z, formula)
        condition = _golden_condition(golden, task, slice(0, batch))
        latents = [z.to(device) for z in noisy]
        api = f"DeepGenModel.velocity(list of golden noisy latents, golden {task}.context/pooled[:B]"
        velocity = model.velocity(latents, timesteps, condition)
        if task == "t2i":
            rec.compare("dit_t2i.velocity", torch.stack(velocity), api + ")")
            continue
        for i, v in enumerate(velocity):
            rec.compare(f"dit_edit.velocity_noref.{i}", v, api + ")")
        if edit is not None and edit.reference_latents is not None:
            refs = [[r.to(device) for r in group] for group in edit.reference_latents[:batch]]
            velocity = model.velocity(latents, timesteps, condition, refs)
            for i, v in enumerate(velocity):
                rec.compare(f"dit_edit.velocity_ref.{i}", v, api + ", golden edit.ref_latents)")


def _check_generation(model, golden: GoldenSet, rec: _Recorder, task: str, spec: _Task) -> None:
    """Sampling: scheduler grid, each step isolated (golden step latents -> DiT -> CFG -> Euler), then the
    whole generation end to end (the pipeline, or the model API where the pipeline cannot take the inputs)."""
    from deepgen_components.pipeline import DeepGenPipeline
    from deepgen_components.rl.sampling import euler_step, flow_match_sigmas, guidance

    prefix = f"gen_{task}"
    if f"{prefix}.initial_noise" not in golden:
        return
    device = model.device
    gen = golden.generation
    steps = int(
        gen.get("num_steps")
        or sum(1 for k in golden.tensors if re.fullmatch(rf"{prefix}\.step\d+\.latents", k))
    )
    scale = float(gen.get("cfg_scale", 4.0))
    height, width = golden.manifest.get("images", {}).get(f"{task}_output_hw", (None, None))
    batch = len(spec.prompts)
    do_cfg = scale != 1.0

    timesteps, sigmas = flow_match_sigmas(model.scheduler, steps, device=device)
    rec.compare(f"{prefix}.scheduler_timesteps", timesteps, "sampling.flow_match_sigmas(model.scheduler, N)")
    rec.compare(f"{prefix}.scheduler_sigmas", sigmas, "sampling.flow_match_sigmas(model.scheduler, N)")

    noise = golden[f"{prefix}.initial_noise"]
    seed = golden.seed(task)
    drawn = noise
    if seed is not None:
        drawn = torch.randn(
            tuple(noise.shape), generator=torch.Generator().manual_seed(seed), dtype=torch.float32
        )
        rec.compare(
            f"{prefix}.initial_noise",
            drawn,
            f"torch.randn(generator seed {seed}) as DeepGenPipeline draws it",
        )
    else:
        rec.input(f"{prefix}.initial_noise")

    # Per step, isolated: the recorded latents and the recorded condition in the pipeline's CFG order.
    rows = torch.cat([torch.arange(batch, 2 * batch), torch.arange(batch)]) if do_cfg else torch.arange(batch)
    condition = _golden_condition(golden, task, rows) if f"{task}.context" in golden else None
    references = None
    if spec.reference_latents is not None:
        per_image = [[r.to(device) for r in group] for group in spec.reference_latents]
        references = per_image + per_image if do_cfg else per_image
    api = "DeepGenModel.velocity(cat([x, x]), t, golden condition [cfg; prompt]"
    api += ", golden ref latents)" if references is not None else ")"
    for k in range(steps):
        name = f"{prefix}.step{k}"
        if f"{name}.latents" not in golden or condition is None:
            continue
        x = golden[f"{name}.latents"].to(device)
        model_input = torch.cat([x, x]) if do_cfg else x
        t = timesteps[k].expand(model_input.shape[0]).to(model.dtype)
        rec.compare(f"{name}.timestep", t, "flow_match_sigmas(...)[0][k], one per DiT row")
        if k == 0:
            rec.compare(f"{name}.latents", drawn, "the initial noise draw above")
        velocity = model.velocity(model_input, t, condition, references)
        rec.compare(f"{name}.dit_out", velocity, api)
        if do_cfg:
            velocity = guidance(*velocity.chunk(2), scale)
        x_next = euler_step(x, velocity, sigmas[k], sigmas[k + 1])
        via = f"sampling.euler_step(golden step{k} latents, sampling.guidance(dit_out))"
        target = f"{prefix}.step{k + 1}.latents" if k + 1 < steps else f"{prefix}.final_latents"
        rec.compare(target, x_next, via)

    # End to end from the prompts.
    pipe = DeepGenPipeline(model)
    common = dict(
        negative_prompt=spec.negatives if do_cfg else "",
        height=height,
        width=width,
        num_inference_steps=steps,
        guidance_scale=scale,
    )
    if spec.images is not None:
        if spec.reference_latents is None:
            return  # the DiT's reference latents are random posterior draws: not reproducible without them
        common["image"] = spec.images if batch > 1 else spec.images[0]
    if spec.images is None or _pipeline_takes_reference_latents():
        if spec.images is not None:
            common["reference_latents"] = spec.reference_latents
        call = f"DeepGenPipeline(prompts, latents=initial_noise, {steps} steps, cfg {scale:g}"
        final = pipe(spec.prompts, latents=noise, output_type="latent", progress=False, **common).images
        rec.compare(f"{prefix}.final_latents", final, call + ", output_type='latent')")
        pixels = pipe(spec.prompts, latents=noise, output_type="pt", progress=False, **common).images
        rec.compare(f"{prefix}.pixels", pixels, call + ", output_type='pt')")
        if seed is not None:
            final = pipe(
                spec.prompts,
                generator=torch.Generator().manual_seed(seed),
                output_type="latent",
                progress=False,
                **common,
            ).images
            rec.compare(
                f"{prefix}.final_latents",
                final,
                f"DeepGenPipeline(prompts, generator=Generator().manual_seed({seed}), output_type='latent')",
            )
        return
    # DeepGenPipeline draws reference latents from the VAE itself and cannot take the recorded posterior
    # samples: run the same algorithm from the model API (encode_condition -> velocity/guidance/euler_step ->
    # decode_latents) with our own condition and latents at every step.
    texts = spec.prompts + (spec.negatives if do_cfg else [])
    images = spec.images + (spec.images if do_cfg else [])
    condition = model.encode_condition(texts, images)
    if do_cfg:
        condition = _cfg_order(condition, batch)
    x = noise.to(device)
    for k in range(steps):
        model_input = torch.cat([x, x]) if do_cfg else x
        velocity = model.velocity(
            model_input, timesteps[k].expand(model_input.shape[0]), condition, references
        )
        if do_cfg:
            velocity = guidance(*velocity.chunk(2), scale)
        x = euler_step(x, velocity, sigmas[k], sigmas[k + 1])
    via = "model API chain: encode_condition -> velocity/guidance/euler_step (pipeline takes no reference latents)"
    rec.compare(f"{prefix}.final_latents", x, via)
    rec.compare(
        f"{prefix}.pixels", model.decode_latents(x), "DeepGenModel.decode_latents(final latents of the chain)"
    )


def _check_training(model, golden: GoldenSet, rec: _Recorder, task: str, edit: _Task | None) -> None:
    """``DeepGenModel.flow_matching_loss`` with the recorded clean latents, noise and u (condition dropout 0)."""
    prefix = f"train_{task}"
    x0 = golden.indexed(f"{prefix}.x0")
    if not x0 or f"{prefix}.u" not in golden:
        return
    noise = golden.indexed(f"{prefix}.noise")
    batch = {
        "latents": [x.to(model.device) for x in x0],
        "noise": [n.to(model.device) for n in noise],
        "u": golden[f"{prefix}.u"],
    }
    for i in range(len(x0)):
        if task == "t2i":  # editing targets are VAE posterior samples: checked as such below
            rec.input(f"{prefix}.x0.{i}")
        rec.input(f"{prefix}.noise.{i}")
    rec.input(f"{prefix}.u")
    references = None
    if task == "t2i":
        prompts = list(golden.prompts.get("train_t2i_texts_used") or golden.prompts.get("t2i") or [])
    else:
        if edit is None:
            return
        prompts = list(golden.prompts.get("train_edit_texts_used") or edit.prompts)
        references = edit.images[: len(x0)]
        batch["reference_pixels"] = references
        ref_latents = golden.indexed(f"{prefix}.ref_latents")
        groups = edit.groups[: len(x0)]
        if len(ref_latents) == sum(len(g) for g in groups):
            starts = [sum(len(g) for g in groups[:i]) for i in range(len(groups))]
            batch["reference_latents"] = [
                [ref_latents[s + j].to(model.device) for j in range(len(g))] for s, g in zip(starts, groups)
            ]
            # The recorded reference / target latents are VAE posterior samples of the official run.
            flat_refs = [r for group in references for r in group]
            for j, ref in enumerate(flat_refs):
                posterior = model.vae.encode(ref[None].to(model.device)).latent_dist
                rec.sample(
                    f"{prefix}.ref_latents.{j}",
                    posterior.mean[0],
                    posterior.std[0],
                    "draw of our VAE posterior of edit.ref_pixels; fed as reference_latents",
                )
        for i, pixels in enumerate(golden.indexed(f"{prefix}.target_pixels")):
            rec.input(f"{prefix}.target_pixels.{i}")
            posterior = model.vae.encode(pixels[None].to(model.device)).latent_dist
            rec.sample(
                f"{prefix}.x0.{i}",
                posterior.mean[0],
                posterior.std[0],
                "draw of our VAE posterior of target_pixels; fed as latents",
            )
    batch["prompts"] = prompts

    # The same tokenization and condition flow_matching_loss computes internally.
    prepared = model.prepare_prompts(prompts, references)
    condition, hidden = model.encode_tokens(prepared)
    api = "DeepGenModel.encode_tokens(prepare_prompts(training texts))"
    rec.compare(f"{prefix}.input_ids", prepared.input_ids, "DeepGenModel.prepare_prompts(training texts)")
    rec.compare(
        f"{prefix}.attention_mask", prepared.attention_mask, "DeepGenModel.prepare_prompts(training texts)"
    )
    rec.compare(f"{prefix}.position_ids", hidden.position_ids, api + ": position_ids")
    rec.compare(f"{prefix}.context", condition.context, api + ": context")
    rec.compare(f"{prefix}.pooled", condition.pooled, api + ": pooled")

    if task == "edit" and "reference_latents" not in batch:
        return  # the DiT's reference latents are random posterior draws: not reproducible without them
    # The recorded texts are the ones left after the official dropout draw: no second dropout here.
    with _config_override(model.config, condition_dropout=0.0):
        out = model.flow_matching_loss(batch)
    api = "DeepGenModel.flow_matching_loss(latents, noise, u" + (
        ", reference_latents)" if task == "edit" else ")"
    )
    rec.compare(f"{prefix}.timesteps", out.timesteps, api + ".timesteps")
    rec.compare(f"{prefix}.sigmas", out.sigmas, api + ".sigmas")
    for i, pred in enumerate(out.prediction):
        rec.compare(f"{prefix}.model_pred.{i}", pred, api + ".prediction")
    for i, noisy in enumerate(out.noisy_latents):
        rec.compare(f"{prefix}.noisy_latents.{i}", noisy, api + ".noisy_latents")
    rec.compare(f"{prefix}.loss", out.loss.reshape(1), api + ".loss")


# -- entry points --------------------------------------------------------------------------------------------
def compare_golden(
    golden: str | Path | GoldenSet,
    model=None,
    *,
    rtol: float = RTOL,
    atol: float = ATOL,
    timings: dict[str, float] | None = None,
) -> list[Row]:
    """Reproduce every tensor of a golden set through our public API; one :class:`Row` per comparison.

    ``model``: a model from :func:`load_official_model` (built here when None). Golden tensors no check
    covers get a ``not compared`` row (passed, but listed so that a new set's extra tensors are visible).
    ``timings`` (optional) receives seconds per section.
    """
    if not isinstance(golden, GoldenSet):
        golden = load_golden(golden)
    timings = {} if timings is None else timings
    clock = time.perf_counter()
    if model is None:
        model = load_official_model(golden)
        timings["load model"] = time.perf_counter() - clock
    rec = _Recorder(golden, rtol, atol)
    expected = golden.manifest.get("selected_layers")
    if expected is not None:
        ours = list(model.layers.indices)
        rec.rows.append(
            Row(
                "selected_layers (manifest)",
                "DeepGenModel.layers (official rule range(N-1, 0, -6))",
                "exact",
                (len(expected),),
                0.0 if ours == expected else math.inf,
                None,
                None,
                "exact",
                ours == expected,
                "" if ours == expected else f"ours {ours}",
            )
        )

    def section(name: str, fn, *args):
        start = time.perf_counter()
        with torch.no_grad():
            result = fn(*args)
        timings[name] = time.perf_counter() - start
        return result

    t2i = section("t2i VLM+SCB", _check_t2i, model, golden, rec)
    edit = section("edit VLM+SCB+refs", _check_edit, model, golden, rec)
    section("direct DiT", _check_dit, model, golden, rec, edit)
    if t2i is not None:
        section("generation t2i", _check_generation, model, golden, rec, "t2i", t2i)
    if edit is not None:
        section("generation edit", _check_generation, model, golden, rec, "edit", edit)
    section("training t2i", _check_training, model, golden, rec, "t2i", edit)
    section("training edit", _check_training, model, golden, rec, "edit", edit)

    covered = {row.name for row in rec.rows}
    for name in sorted(set(golden.tensors) - covered):
        shape = tuple(golden[name].shape)
        rec.rows.append(
            Row(name, "-", "not compared", shape, None, None, None, "-", True, "no check defined")
        )
    return rec.rows


def _fmt(value: float | None, digits: str = ".1e") -> str:
    if value is None:
        return "-"
    if math.isinf(value):
        return "inf"
    return "0" if value == 0 else format(value, digits)


def format_table(rows: Sequence[Row], *, with_via: bool = True) -> str:
    """The rows as a Markdown table."""
    header = ["tensor", "shape", "check", "max abs", "max rel", "tol used", "tolerance", "ok"]
    if with_via:
        header.append("computed by (public API)")
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for r in rows:
        cells = [
            f"`{r.name}`",
            "×".join(str(s) for s in r.shape) or "()",
            r.check,
            _fmt(r.max_abs),
            _fmt(r.max_rel),
            _fmt(r.tol_used, ".2f"),
            r.tolerance,
            "yes" if r.passed else "**NO**",
        ]
        if with_via:
            cells.append(r.via + (f"; {r.note}" if r.note else ""))
        lines.append("| " + " | ".join(cell.replace("|", "\\|") for cell in cells) + " |")
    return "\n".join(lines)
