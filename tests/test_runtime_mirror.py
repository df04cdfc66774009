"""The torch-free sampling loop (``export.staged.StagedPipeline``, numpy) against the PyTorch one, bit for bit.

The exported runtimes cannot import torch, so their loop is a mirror of ``deepgen_components.denoising`` written
against ``deepgen_components.conventions``. These tests pin the two: the same FlowMatch grid (timesteps and
sigmas) for several step counts and shifts, the same guidance combination and Euler update on random arrays, and
the whole loop — timesteps fed to the DiT, CFG batch order, guidance, update — through the ONNX Runtime pipeline
with stand-in stages against a loop built from the PyTorch functions.
"""

import json

import numpy as np
import pytest
import torch
from deepgen_components.export.onnx_pipeline import OnnxDeepGenPipeline
from diffusers import FlowMatchEulerDiscreteScheduler

from deepgen_components import conventions
from deepgen_components.denoising import euler_step, flow_match_sigmas, guidance
from deepgen_components.tiny import tiny_scheduler


def scheduler_with_shift(shift: float):
    scheduler = tiny_scheduler()
    scheduler.register_to_config(shift=shift)
    return type(scheduler).from_config(scheduler.config)


# -- scheduler --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("shift", [1.0, 3.0])
@pytest.mark.parametrize("steps", [1, 2, 7, 28, 50])
def test_numpy_flow_match_grid_equals_diffusers_set_timesteps_bit_for_bit(shift, steps):
    scheduler = scheduler_with_shift(shift)
    timesteps, sigmas = flow_match_sigmas(scheduler, steps)
    np_timesteps, np_sigmas = conventions.flow_match_grid(dict(scheduler.config), steps)
    assert np.array_equal(np_timesteps, timesteps.numpy())
    assert np.array_equal(np_sigmas, sigmas.numpy())


@pytest.mark.parametrize("shift", [0.5, 1.5, 6.0])
@pytest.mark.parametrize("steps", [3, 20, 100])
def test_grids_agree_for_other_shifts_and_train_table_sizes(shift, steps):
    for train_steps in (1000, 500):
        scheduler = FlowMatchEulerDiscreteScheduler(num_train_timesteps=train_steps, shift=shift)
        timesteps, sigmas = flow_match_sigmas(scheduler, steps)
        np_timesteps, np_sigmas = conventions.flow_match_grid(dict(scheduler.config), steps)
        assert np_timesteps.dtype == np.float32 and np_sigmas.dtype == np.float32
        assert np.array_equal(np_timesteps, timesteps.numpy())
        assert np.array_equal(np_sigmas, sigmas.numpy())


def test_flow_match_grid_refuses_dynamic_shifting():
    with pytest.raises(ValueError, match="use_dynamic_shifting"):
        conventions.flow_match_grid({"shift": 3.0, "use_dynamic_shifting": True}, 10)


# -- one step -----------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("scale", [1.0, 4.0, 7.5])
def test_guidance_and_euler_update_equal_the_torch_step_on_random_arrays(scale):
    rng = np.random.default_rng(0)
    x, uncond, cond = (rng.standard_normal((2, 4, 6, 5), dtype=np.float32) for _ in range(3))
    _, sigmas = conventions.flow_match_grid({"shift": 3.0}, 5)
    torch_sigmas = torch.from_numpy(sigmas)
    for i in range(5):
        velocity = conventions.guidance(uncond, cond, scale)
        torch_velocity = guidance(torch.from_numpy(uncond), torch.from_numpy(cond), scale)
        assert np.array_equal(velocity, torch_velocity.numpy())
        got = conventions.euler_update(x, velocity, np.float32(sigmas[i + 1] - sigmas[i]))
        expected = euler_step(torch.from_numpy(x), torch_velocity, torch_sigmas[i], torch_sigmas[i + 1])
        assert got.dtype == np.float32
        assert np.array_equal(got, expected.numpy())


def test_cfg_order_is_the_pipeline_batch_order():
    """Condition rows [prompts; negatives] -> DiT rows [negatives; prompts] (the velocity's first half is the
    unconditional one), as the PyTorch pipeline orders them."""
    for batch in (1, 2, 5):
        expected = torch.cat([torch.arange(batch, 2 * batch), torch.arange(batch)])
        assert np.array_equal(conventions.cfg_order(batch), expected.numpy())


# -- the loop -----------------------------------------------------------------------------------------------------

WIDTH = 4  # stand-in context width
CONTEXT = 3  # stand-in context tokens


def _toy_export(folder, scheduler_config: dict) -> None:
    """An export folder the staged pipeline can load: a manifest and a word-level tokenizer, no ONNX files (the
    stages are stand-ins, see ``StandInStages``)."""
    from tokenizers import Tokenizer, models, pre_tokenizers

    words = ["[UNK]", "<pad>", "a", "red", "cat", "blue", "sea"]
    tokenizer = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="[UNK]"))
    tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer.save(str(folder / "tokenizer.json"))
    template = {"user_turn": "{content}", "t2i_wrapper": "{prompt}", "vision_block": "{pads}", "image_pad": "x"}
    config = {
        "chat_template": template, "image_token_id": 99, "pad_token_id": 1, "num_think_tokens": 2, "pad_position": 1,
        "spatial_merge_size": 2, "vlm_hidden_size": 8, "image_size": 64, "vae_scale_factor": 8, "latent_channels": 4,
        "mask_padding": False, "reference_latents": "mean", "scheduler": scheduler_config,
    }
    stage = {"inputs": [], "dims": {}, "dtype": "float32"}
    manifest = {"format_version": 1, "config": config, "tokenizer": "tokenizer.json", "ranges": {"min_size": 32, "max_size": 256},
                "stages": {"condition_encoder": stage, "dit": stage}}
    (folder / "manifest.json").write_text(json.dumps(manifest))


def _row_values(rows: int) -> np.ndarray:
    """A different float32 per condition row, so a wrong batch order changes the result."""
    return (np.arange(rows, dtype=np.float32) + np.float32(1)) * np.float32(0.25)


def _toy_velocity(x, pooled, t, step):
    """v = x * pooled[:, 0] - t * 1e-3 (float32 element-wise arithmetic: numpy and torch round it alike)."""
    return x * pooled[:, 0][:, None, None, None] - t[:, None, None, None] * step


class StandInStages(OnnxDeepGenPipeline):
    """The ONNX Runtime pipeline (its arrays, its Euler update) with the two stages replaced by numpy stand-ins."""

    def _run(self, stage: str, feeds: dict) -> dict:
        if stage == "condition_encoder":
            rows = feeds["input_ids"].shape[0]
            value = _row_values(rows)
            return {"context": np.broadcast_to(value[:, None, None], (rows, CONTEXT, WIDTH)).copy(),
                    "pooled": np.stack([value, -value], axis=1), "mask": np.ones((rows, CONTEXT), bool)}
        assert stage == "dit" and feeds["timestep"].dtype == np.float32
        return {"velocity": _toy_velocity(feeds["hidden_states"], feeds["pooled"], feeds["timestep"], np.float32(1e-3))}


def _torch_loop(noise, scheduler, steps: int, scale: float, batch: int) -> torch.Tensor:
    """The PyTorch pipeline's loop on the same stand-in DiT: ``denoising``'s grid, guidance and Euler step, the
    DiT batch ``[negatives; prompts]``."""
    do_cfg = scale != 1.0
    timesteps, sigmas = flow_match_sigmas(scheduler, steps)
    rows = torch.from_numpy(_row_values(2 * batch if do_cfg else batch))
    if do_cfg:
        rows = rows[torch.cat([torch.arange(batch, 2 * batch), torch.arange(batch)])]
    pooled = torch.stack([rows, -rows], dim=1)
    x = torch.from_numpy(noise)
    for i in range(steps):
        model_input = torch.cat([x, x]) if do_cfg else x
        t = timesteps[i].expand(model_input.shape[0])
        velocity = _toy_velocity(model_input, pooled, t, torch.tensor(1e-3, dtype=torch.float32))
        if do_cfg:
            velocity = guidance(*velocity.chunk(2), scale)
        x = euler_step(x, velocity, sigmas[i], sigmas[i + 1])
    return x


@pytest.mark.parametrize("scale", [1.0, 4.0])
@pytest.mark.parametrize("steps, shift", [(1, 3.0), (4, 3.0), (9, 1.0), (28, 6.0)])
def test_staged_loop_equals_the_torch_loop_bit_for_bit(tmp_path, scale, steps, shift):
    scheduler = scheduler_with_shift(shift)
    _toy_export(tmp_path, dict(scheduler.config))
    pipe = StandInStages(tmp_path)
    noise = np.random.default_rng(steps).standard_normal((2, 4, 4, 8), dtype=np.float32)
    out = pipe(["a red cat", "blue sea"], height=32, width=64, num_inference_steps=steps, guidance_scale=scale,
               latents=noise, output_type="latent", progress=False)
    expected = _torch_loop(noise, scheduler, steps, scale, batch=2)
    assert out.images.dtype == np.float32
    assert np.array_equal(out.images, expected.numpy())


# -- reference sizes ----------------------------------------------------------------------------------------------


def _picture(width: int, height: int, seed: int, mode: str = "RGB"):
    from PIL import Image

    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8)).convert(mode)


def test_reference_rule_gives_the_pixels_of_the_torch_pipeline():
    """The staged pipeline's references (``conventions.reference_pixels`` on numpy) equal the PyTorch pipeline's
    (``processing.reference_pixels``): the same sizes (long side <= image_size, multiples of 32), conversion and
    resize."""
    from deepgen_components import processing

    references = [_picture(300, 200, 0), [_picture(64, 64, 1, "L"), _picture(1000, 40, 2, "RGBA")], None]
    ours = conventions.reference_pixels(references, 64, array_type=np.ndarray, from_array=lambda ref, where: ref)
    theirs = processing.reference_pixels(references, 64)
    assert [len(refs) for refs in ours] == [len(refs) for refs in theirs] == [1, 2, 0]
    for mine, torch_refs in zip(ours, theirs):
        for a, b in zip(mine, torch_refs):
            assert a.dtype == np.float32 and np.array_equal(a, b.numpy())


def test_staged_pipeline_takes_array_references_of_the_official_size_only(tmp_path):
    _toy_export(tmp_path, dict(scheduler_with_shift(3.0).config))
    pipe = StandInStages(tmp_path)
    with pytest.raises(ValueError, match=r"image: an array reference of 96x64 would be resized to 64x64 \(long side <= 64"):
        pipe("a cat", image=np.zeros((3, 96, 64), np.float32), num_inference_steps=1, progress=False)
    with pytest.raises(ValueError, match=r"image: an array reference must be \(3, H, W\)"):
        pipe("a cat", image=np.zeros((96, 64), np.float32), num_inference_steps=1, progress=False)
    with pytest.raises(ValueError, match="expected PIL images or \\(3, H, W\\) arrays, got str"):
        pipe("a cat", image="cat.png", num_inference_steps=1, progress=False)
