"""Every denoising loop reproduces, bit for bit, the outputs it gave before the one-runner redesign (issue #21).

``tests/data/denoising/reference.safetensors`` was written by ``tests/data/denoising/make_reference.py`` at commit
c959c70 (CPU, one thread). Here the same cases run again on the CPU with one thread and must be ``torch.equal``
to the stored tensors, no tolerance: the pipeline's plain loop and the precomputing runner in each mode (on a CPU
``kernels`` dispatches to the torch references and ``compile+graphs`` falls back to ``compile``), for text-to-image
with and without CFG and an edit with CFG; and the MR-GRPO SDE rollouts (CPS and Flow-GRPO, with CFG).

(The shapes world's base-model pipeline, ``prompt_encoder/*`` in the file, is checked where that pipeline lives.)
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from deepgen_components import DeepGenPipeline, deepgen_tiny
from deepgen_components.denoising import DenoiseRunner

DATA = Path(__file__).resolve().parent / "data" / "denoising"


def _script():
    spec = importlib.util.spec_from_file_location("denoising_make_reference", DATA / "make_reference.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


script = _script()


@pytest.fixture(scope="module")
def reference() -> dict[str, torch.Tensor]:
    return load_file(str(DATA / "reference.safetensors"))


@pytest.fixture(scope="module")
def pipe():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as the script ran
    yield DeepGenPipeline(deepgen_tiny(seed=3))
    torch.set_num_threads(threads)


def set_loop(pipe: DeepGenPipeline, loop: str) -> None:
    """``script.set_loop``: "plain" is the pipeline's default loop, the others the precomputing runner."""
    pipe.optimize("eager")
    if loop != "plain":
        pipe.runner = DenoiseRunner(pipe.model, loop)


@pytest.mark.parametrize("loop", script.LOOPS)
def test_pipeline_loops_are_bit_identical_to_the_recorded_outputs(pipe, reference, loop):
    set_loop(pipe, loop)
    try:
        outputs = script.cases(pipe)
    finally:
        pipe.optimize("eager")
    assert sorted(outputs) == ["edit_cfg", "t2i_cfg", "t2i_nocfg"]
    for name, latents in outputs.items():
        expected = reference[f"{loop}/{name}"]
        assert latents.dtype == expected.dtype and latents.shape == expected.shape, name
        assert torch.equal(latents, expected), f"{loop}/{name}: max |diff| {(latents - expected).abs().max()}"


@pytest.mark.parametrize("sampler", ["cps", "flow_grpo"])
def test_rollouts_are_bit_identical_to_the_recorded_outputs(pipe, reference, sampler):
    """``script.other_loops``' rollout part: CFG 3 with an empty negative prompt, 4 steps, groups of 2."""
    from deepgen_components.rl.grpo import rollout

    model = pipe.model
    prompts = script.PROMPTS
    with torch.no_grad():
        condition = model.encode_condition(prompts).repeat_interleave(2)
        negative = model.encode_condition(["", ""]).repeat_interleave(2)
    traj = rollout(model, condition, height=64, width=64, num_steps=4, group_size=2, sampler=sampler,
                   generator=torch.Generator().manual_seed(0), negative_condition=negative, guidance_scale=3.0)
    assert torch.equal(traj.final, reference[f"rollout/{sampler}/final"])
    assert torch.equal(traj.log_probs, reference[f"rollout/{sampler}/log_probs"])
