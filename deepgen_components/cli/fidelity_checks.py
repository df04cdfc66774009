"""The sections of the golden-set comparison (:func:`deepgen_components.cli.fidelity.compare_golden`): each one
feeds a part of a golden set's recorded inputs through the public API and records one row per compared tensor on
the recorder it is given (``fidelity``'s ``compare`` / ``sample`` / ``input``).

* :func:`check_t2i`, :func:`check_edit` — VLM + think tokens + SCB on the recorded prompts (and references: ViT
  preprocessing, vision features, the VAE posterior); they return the :class:`Task` the later sections need;
* :func:`check_dit` — direct DiT calls on recorded noisy latents with the recorded condition;
* :func:`check_generation` — the scheduler grid, each sampling step isolated, then the pipeline end to end;
* :func:`check_training` — ``DeepGenModel.flow_matching_loss`` on the recorded latents, noise and ``u``.
"""

from __future__ import annotations

import contextlib
import re
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import torch

from deepgen_components.conventions import cfg_order

__all__ = ["Task", "check_dit", "check_edit", "check_generation", "check_t2i", "check_training"]


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


def _table_indices(golden, name: str, table: torch.Tensor) -> torch.Tensor:
    """The training-table indices a direct DiT test used: "timesteps[[200, 800]]" in the manifest, else the
    nearest table entries."""
    meaning = golden.manifest.get("tensors", {}).get(name, {}).get("meaning", "")
    match = re.search(r"timesteps\[\[([\d,\s]+)\]\]", meaning)
    if match:
        return torch.tensor([int(v) for v in match.group(1).split(",")])
    return (table.cpu()[None, :] - golden[name][:, None]).abs().argmin(1)


# -- sections ---------------------------------------------------------------------------------------------
def _check_condition(model, rec, prefix: str, texts: Sequence[str], references=None):
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


def _check_references(model, golden, rec, refs: list[torch.Tensor]) -> None:
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
class Task:
    """What the generation check needs from a VLM section."""

    prompts: list[str]
    negatives: list[str]
    images: list[list[torch.Tensor]] | None = None  # reference pixels per prompt
    reference_latents: list[list[torch.Tensor]] | None = None  # golden reference latents per prompt
    groups: list[list[int]] | None = None  # indices of the golden references of each prompt


def check_t2i(model, golden, rec) -> Task | None:
    prompts = list(golden.prompts.get("t2i") or [])
    if not prompts:
        return None
    negatives = list(golden.prompts.get("t2i_cfg_prompts") or [])
    _check_condition(model, rec, "t2i", prompts + negatives)
    return Task(prompts, negatives)


def check_edit(model, golden, rec) -> Task | None:
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
    return Task(prompts, negatives, images, reference_latents, groups)


def _golden_condition(golden, prefix: str, rows):
    from deepgen_components.bridge import BridgeOutput

    context, pooled = golden[f"{prefix}.context"][rows], golden[f"{prefix}.pooled"][rows]
    return BridgeOutput(context=context, pooled=pooled, mask=torch.ones(context.shape[:2], dtype=torch.bool))


def check_dit(model, golden, rec, edit: Task | None) -> None:
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


def check_generation(model, golden, rec, task: str, spec: Task) -> None:
    """Sampling: scheduler grid, each step isolated (golden step latents -> DiT -> CFG -> Euler), then the
    whole generation end to end through the pipeline (for editing with the recorded reference latents)."""
    from deepgen_components.denoising import euler_step, flow_match_sigmas, guidance
    from deepgen_components.pipeline import DeepGenPipeline

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
    rec.compare(f"{prefix}.scheduler_timesteps", timesteps, "denoising.flow_match_sigmas(model.scheduler, N)")
    rec.compare(f"{prefix}.scheduler_sigmas", sigmas, "denoising.flow_match_sigmas(model.scheduler, N)")

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
    rows = torch.from_numpy(cfg_order(batch)) if do_cfg else torch.arange(batch)
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
        via = f"denoising.euler_step(golden step{k} latents, denoising.guidance(dit_out))"
        target = f"{prefix}.step{k + 1}.latents" if k + 1 < steps else f"{prefix}.final_latents"
        rec.compare(target, x_next, via)

    # End to end from the prompts.
    pipe = DeepGenPipeline(model)
    pipe.set_progress_bar_config(disable=True)
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
        common["reference_latents"] = spec.reference_latents  # the recorded posterior draws, not our VAE's
    call = f"DeepGenPipeline(prompts, latents=initial_noise, {steps} steps, cfg {scale:g}"
    final = pipe(spec.prompts, latents=noise, output_type="latent", **common).images
    rec.compare(f"{prefix}.final_latents", final, call + ", output_type='latent')")
    pixels = pipe(spec.prompts, latents=noise, output_type="pt", **common).images
    rec.compare(f"{prefix}.pixels", pixels, call + ", output_type='pt')")
    if seed is not None:
        final = pipe(
            spec.prompts,
            generator=torch.Generator().manual_seed(seed),
            output_type="latent",
            **common,
        ).images
        rec.compare(
            f"{prefix}.final_latents",
            final,
            f"DeepGenPipeline(prompts, generator=Generator().manual_seed({seed}), output_type='latent')",
        )


def check_training(model, golden, rec, task: str, edit: Task | None) -> None:
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
