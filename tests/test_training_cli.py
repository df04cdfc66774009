"""``deepgen train --config FILE [--max-steps N] [--out DIR] [--dry-run] [key=value ...]``: a run writes
metrics.jsonl (one JSON object per step), checkpoints and a ``pipeline/`` folder; ``--dry-run`` prints the
parameter counts and a memory estimate without data (DeepGen 1.0 shapes are built on the meta device); a bad
config key is a one-line error that names it.
"""

import json
import math
from pathlib import Path

import deepgen_components.training as training_package
import pytest
import torch

from deepgen_components.cli import main

torch.set_num_threads(1)

CONFIGS = Path(training_package.__file__).parent / "configs"
GIB = 1024**3


def test_train_writes_metrics_checkpoints_and_a_pipeline(tmp_path, capsys):
    out = tmp_path / "run"
    code = main(["train", "--config", str(CONFIGS / "align_tiny.yaml"), "--max-steps", "3", "--out", str(out),
                 "trainer.tensorboard=false"])
    assert code == 0
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [row["step"] for row in rows] == [1, 2, 3]
    assert all(isinstance(row["loss"], float) and math.isfinite(row["loss"]) for row in rows)
    assert (out / "checkpoints" / "latest").read_text() == "step_00000003"
    assert (out / "checkpoints" / "step_00000003" / "trainable.safetensors").is_file()
    assert (out / "pipeline" / "model_index.json").is_file()
    assert (out / "config.yaml").is_file()
    printed = capsys.readouterr().out
    assert "finished 3 steps" in printed and str(out / "pipeline") in printed


def test_key_value_overrides_reach_the_run(tmp_path):
    out = tmp_path / "run"
    code = main(["train", "--config", str(CONFIGS / "align_tiny.yaml"), "--out", str(out), "trainer.max_steps=2",
                 "data.batch_size=2", "optim.lr=0.5", "optim.schedule=constant", "optim.warmup_ratio=0",
                 "trainer.save_pipeline=false", "trainer.tensorboard=false"])
    assert code == 0
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [row["lr"] for row in rows] == [0.5, 0.5]
    assert [row["samples_per_s"] > 0 for row in rows] == [True, True]
    assert not (out / "pipeline").exists()
    import yaml

    saved = yaml.safe_load((out / "config.yaml").read_text())
    assert saved["data"]["batch_size"] == 2 and saved["optim"]["lr"] == 0.5


def test_overrides_may_come_before_and_after_options(tmp_path):
    code = main(["train", "--config", str(CONFIGS / "align_tiny.yaml"), "--dry-run", "data.batch_size=2",
                 "--world-size", "2", "trainer.seed=3"])
    assert code == 0


@pytest.mark.parametrize(
    ("override", "named"),
    [("optim.learnig_rate=1e-4", "unknown keys ['learnig_rate']"), ("trainer.max_step=3", "unknown keys ['max_step']")],
)
def test_a_bad_config_key_is_a_clear_error_naming_it(tmp_path, capsys, override, named):
    code = main(["train", "--config", str(CONFIGS / "align_tiny.yaml"), "--out", str(tmp_path), override])
    err = capsys.readouterr().err
    assert code == 2
    assert err.startswith("deepgen train: error: ") and named in err and "Traceback" not in err
    assert not (tmp_path / "metrics.jsonl").exists()


def test_a_missing_config_file_is_a_clear_error(tmp_path, capsys):
    assert main(["train", "--config", str(tmp_path / "nope.yaml")]) == 2
    assert "config not found" in capsys.readouterr().err


def test_dry_run_prints_parameter_counts_and_memory_per_gpu(capsys):
    assert main(["train", "--config", str(CONFIGS / "sft_tiny.yaml"), "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("stage sft: ")
    for part in ("vlm", "think_tokens", "bridge", "dit", "vae"):
        assert f"  {part} " in out
    assert "memory per GPU" in out and "total_without_activations_gib" in out


def test_dry_run_memory_estimate_follows_its_formula(capsys):
    # frozen weights in bf16 (2 B: the dry run plans a GPU, where precision auto autocasts to bf16); trainable
    # weights, gradients (fp32, 4 B each) and two AdamW moments (8 B); under FSDP everything but the VAE (which FSDP
    # ignores) divided by the world size. Activations are not included.
    for distributed, world in (("ddp", 1), ("fsdp", 4)):
        assert main(["train", "--config", str(CONFIGS / "sft_tiny.yaml"), "--dry-run", "--json", "--world-size", "4",
                     f"trainer.distributed={distributed}"]) == 0
        report = json.loads(capsys.readouterr().out)
        counts = report["parameters"]
        trainable = sum(c["trainable"] for c in counts.values())
        total = sum(c["total"] for c in counts.values())
        assert report["trainable"] == trainable and report["frozen"] == total - trainable
        assert report["sharded_over"] == world
        mem = report["memory_per_gpu"]
        vae = counts["vae"]["total"]
        assert report["frozen_dtype"] == "bfloat16"
        assert mem["frozen_weights_gib"] == pytest.approx((vae + (total - trainable - vae) / world) * 2 / GIB)
        assert mem["trainable_weights_gib"] == pytest.approx(trainable * 4 / GIB / world)
        assert mem["gradients_gib"] == pytest.approx(trainable * 4 / GIB / world)
        assert mem["adam_states_gib"] == pytest.approx(trainable * 8 / GIB / world)
        assert mem["total_without_activations_gib"] == pytest.approx(
            sum(v for k, v in mem.items() if k != "total_without_activations_gib"))
        assert counts["vae"]["trainable"] == 0 and counts["dit"]["trainable"] == counts["dit"]["total"]


@pytest.mark.slow
@pytest.mark.parametrize(
    ("name", "trainable_vlm", "trainable_dit"),
    [("align_deepgen1", 0, 0), ("sft_deepgen1", 126_263_296, 2_243_171_520)],
)
def test_dry_run_of_the_deepgen1_configs_counts_the_real_model_on_meta(capsys, name, trainable_vlm, trainable_dit):
    # No weights are read (the config's /path/to/... do not exist): the DeepGen 1.0 shapes are built on meta.
    assert main(["train", "--config", str(CONFIGS / f"{name}.yaml"), "--dry-run", "--json", "--world-size", "8"]) == 0
    report = json.loads(capsys.readouterr().out)
    counts = report["parameters"]
    assert counts["think_tokens"] == {"total": 262_144, "trainable": 262_144}  # 128 x 2048
    assert counts["bridge"]["total"] == counts["bridge"]["trainable"] == 432_187_388  # reference: ~432.4M with queries
    assert counts["dit"]["total"] == 2_243_171_520  # SD3.5-Medium, ~2.243B
    assert counts["vae"]["total"] == 83_819_683 and counts["vae"]["trainable"] == 0
    # r=64 LoRA on the LM linears of layers 0-34 (116.4M; layer 35 is never read, see apply_lora) + embed_tokens (9.9M)
    assert counts["vlm"]["trainable"] == trainable_vlm
    assert counts["dit"]["trainable"] == trainable_dit
    assert report["sharded_over"] == (8 if name == "sft_deepgen1" else 1)
    assert 3.7e9 < counts["vlm"]["total"] - trainable_vlm < 3.8e9  # Qwen2.5-VL-3B, ~3.755B
