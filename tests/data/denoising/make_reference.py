"""Writes ``reference.safetensors``: the outputs of the denoising loops as they were before the one-runner redesign
(issue #21, commit c959c70), so that tests/test_denoising_reference.py pins the redesigned runner to them bit for bit
on the CPU. Run from the repository root with the library at that commit:

    python tests/data/denoising/make_reference.py

Every case uses the ``tiny`` preset (seed 3), one thread, two prompts, 4 steps; for each loop it records the final
latents (``output_type="latent"``) of text-to-image with CFG 4, without CFG, and of an edit of a fixed reference
image with CFG 2.5. Two more loops: the shapes world's base-model pipeline (``PromptEncoderPipeline``, its images as
uint8) and the MR-GRPO SDE rollout (final latents and step log-probs, CPS and Flow-GRPO samplers, with CFG).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from PIL import Image
from safetensors.torch import save_file

from deepgen_components import DeepGenPipeline, deepgen_tiny
from deepgen_components.denoising import DenoiseRunner

PROMPTS = ["a red circle on the left", "a blue square"]
# (name, how the pipeline runs the loop): "plain" is the pipeline's own loop (optimize("eager")); the others are the
# precomputing runner in that mode (on a CPU "kernels" dispatches to torch and "compile+graphs" falls back to compile)
LOOPS = ("plain", "eager", "kernels", "compile", "compile+graphs")


def reference_image() -> Image.Image:
    rng = np.random.default_rng(0)
    return Image.fromarray(rng.integers(0, 256, (64, 64, 3), dtype=np.uint8))


def cases(pipe: DeepGenPipeline) -> dict[str, torch.Tensor]:
    def run(**kwargs):
        args = dict(num_inference_steps=4, output_type="latent", progress=False,
                    generator=torch.Generator().manual_seed(0))
        args.update(kwargs)
        return pipe(PROMPTS, **args).images

    image = reference_image()
    return {
        "t2i_cfg": run(guidance_scale=4.0),
        "t2i_nocfg": run(guidance_scale=1.0, num_images_per_prompt=2),
        "edit_cfg": run(image=[image, image], guidance_scale=2.5),
    }


def set_loop(pipe: DeepGenPipeline, loop: str) -> None:
    """The loop selection of the library at c959c70 (a private ``_runner``, None for the plain loop)."""
    if not hasattr(pipe, "_runner"):
        raise SystemExit("run this script with the library at commit c959c70: it records the loops as they were")
    pipe.optimize("eager")
    if loop != "plain":
        pipe._runner = DenoiseRunner(pipe.model, loop)


def other_loops(pipe: DeepGenPipeline) -> dict[str, torch.Tensor]:
    from deepgen_components.rl.grpo import rollout
    from deepgen_components.shapes.base import PromptEncoder, PromptEncoderPipeline

    model = pipe.model
    tensors = {}
    torch.manual_seed(5)
    dit_cfg = model.dit.config
    encoder = PromptEncoder(len(model.tokenizer), dit_cfg.joint_attention_dim, dit_cfg.pooled_projection_dim).eval()
    base = PromptEncoderPipeline(model.dit, encoder, model.tokenizer, model.vae, model.scheduler, 64)
    for name, kwargs in {"t2i": {}, "edit": {"image": [reference_image(), reference_image()]}}.items():
        images = base(PROMPTS, num_inference_steps=4, guidance_scale=4.0, generator=torch.Generator().manual_seed(0),
                      **kwargs).images
        tensors[f"prompt_encoder/{name}"] = torch.from_numpy(np.stack([np.asarray(im) for im in images]))
    with torch.no_grad():
        condition = model.encode_condition(PROMPTS).repeat_interleave(2)
        negative = model.encode_condition(["", ""]).repeat_interleave(2)
    for sampler in ("cps", "flow_grpo"):
        traj = rollout(model, condition, height=64, width=64, num_steps=4, group_size=2, sampler=sampler,
                       generator=torch.Generator().manual_seed(0), negative_condition=negative, guidance_scale=3.0)
        tensors[f"rollout/{sampler}/final"] = traj.final.contiguous()
        tensors[f"rollout/{sampler}/log_probs"] = traj.log_probs.contiguous()
    return tensors


def main() -> None:
    torch.set_num_threads(1)
    pipe = DeepGenPipeline(deepgen_tiny(seed=3))
    tensors = {}
    for loop in LOOPS:
        set_loop(pipe, loop)
        for name, latents in cases(pipe).items():
            tensors[f"{loop}/{name}"] = latents.contiguous()
    tensors.update(other_loops(pipe))
    out = Path(__file__).resolve().parent / "reference.safetensors"
    save_file(tensors, str(out), metadata={"commit": "c959c70", "threads": "1"})
    print(f"wrote {len(tensors)} tensors to {out}")


if __name__ == "__main__":
    main()
