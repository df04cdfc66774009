"""Frozen weights in the compute dtype, and a ``--dry-run`` that predicts what a run allocates.

Specification:
- ``model.frozen_dtype: auto`` keeps frozen weights (VLM base, VAE, frozen DiT) in bf16 when the run autocasts to
  bf16 and in fp32 otherwise; trainable weights stay fp32; buffers keep their dtype;
- a run writes ``memory.json`` after its first optimizer step: its persistent state (weights, gradients, AdamW
  moments) measured from the live tensors, next to the plan; ``dry_run`` for the same config predicts each part
  within 10 % — a stage-2 run of the ``small`` preset on a CPU (bf16 autocast, so frozen weights in bf16);
- the final pipeline is saved in one dtype and generates.
"""

from pathlib import Path

import deepgen_components.training as training_package
import pytest
import torch
from deepgen_components.training.config import load_config
from deepgen_components.training.memory import cast_frozen, measure_state, plan_memory, resolve_frozen_dtype
from deepgen_components.training.trainer import dry_run, train

import deepgen_components.shapes  # noqa: F401  (registers the shapes data kind the tiny configs use)
from deepgen_components.pipeline import DeepGenPipeline

CONFIGS = Path(training_package.__file__).parent / "configs"
QUIET = ["trainer.log_to=[jsonl]", "trainer.device=cpu"]


def test_the_frozen_dtype_follows_the_compute_dtype_unless_set():
    assert resolve_frozen_dtype("auto", "auto", "cuda") == torch.bfloat16
    assert resolve_frozen_dtype("auto", "auto", "cpu") == torch.float32
    assert resolve_frozen_dtype("auto", "bf16", "cpu") == torch.bfloat16
    assert resolve_frozen_dtype("auto", "fp32", "cuda") == torch.float32
    assert resolve_frozen_dtype("fp16", "fp32", "cpu") == torch.float16
    with pytest.raises(ValueError, match="model.frozen_dtype must be auto, bf16, fp16, fp32; got 'int8'"):
        resolve_frozen_dtype("int8", "auto", "cpu")


def test_cast_frozen_touches_frozen_parameters_only():
    layer = torch.nn.Linear(4, 4)
    layer.register_buffer("table", torch.ones(3))
    layer.bias.requires_grad_(False)
    freed = cast_frozen(layer, torch.bfloat16)
    assert layer.bias.dtype == torch.bfloat16 and freed == 4 * 2
    assert layer.weight.dtype == torch.float32 and layer.table.dtype == torch.float32
    optimizer = torch.optim.AdamW([layer.weight])
    plan = plan_memory(layer, frozen_dtype=torch.bfloat16)
    measured = measure_state(layer, optimizer)
    assert measured["frozen_weights_gib"] == plan["frozen_weights_gib"]
    assert measured["trainable_weights_gib"] == plan["trainable_weights_gib"]
    assert measured["gradients_gib"] == 0.0 and measured["adam_states_gib"] == 0.0  # nothing allocated yet


def test_default_cpu_runs_keep_frozen_weights_in_fp32(tmp_path):
    cfg = load_config(CONFIGS / "align_tiny.yaml", [*QUIET, "trainer.save_pipeline=false"])
    train(cfg, out=tmp_path, max_steps=1)
    import json

    record = json.loads((tmp_path / "memory.json").read_text())
    assert record["frozen_dtype"] == "float32"


@pytest.mark.slow
def test_dry_run_predicts_what_a_small_stage_2_run_allocates(tmp_path):
    """``small`` preset (~1/8 of DeepGen 1.0's width), stage 2 with the VLM LoRA, bf16 autocast on the CPU."""
    import json

    torch.set_num_threads(2)
    overrides = [*QUIET, "model.preset=small", "trainer.precision=bf16", "data.batch_size=1",
                 "trainer.save_pipeline=false", "trainer.checkpoint_every=1000"]
    cfg = load_config(CONFIGS / "sft_tiny.yaml", overrides)
    predicted = dry_run(cfg)
    assert predicted["frozen_dtype"] == "bfloat16"
    train(cfg, out=tmp_path, max_steps=1)
    measured = json.loads((tmp_path / "memory.json").read_text())["measured_gib"]
    for key, value in predicted["memory_per_gpu"].items():
        assert measured[key] == pytest.approx(value, rel=0.10), key
    assert predicted["memory_per_gpu"]["frozen_weights_gib"] > 0.05  # a real VLM + VAE, in bf16


def test_a_run_with_bf16_frozen_weights_saves_a_pipeline_in_one_dtype(tmp_path):
    cfg = load_config(CONFIGS / "sft_tiny.yaml", [*QUIET, "trainer.precision=bf16"])
    result = train(cfg, out=tmp_path, max_steps=1)
    pipe = DeepGenPipeline.from_pretrained(result.pipeline)
    assert {p.dtype for p in pipe.model.parameters()} == {torch.float32}
    images = pipe("a red circle", num_inference_steps=2, output_type="pt",
                  generator=torch.Generator().manual_seed(0)).images
    assert images.shape == (1, 3, 64, 64) and torch.isfinite(images).all()
