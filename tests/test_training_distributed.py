"""Multi-process training on CPU (gloo): ``torchrun --nproc-per-node 2`` with per-process batch b reproduces one
process with batch 2b, step for step. By design (sampler and trainer docstrings) micro-batch k is one global
batch of the source stream sliced across ranks, and every per-sample random draw is seeded by the sample's
position in that stream, so the world size changes neither the data nor the noise. DDP averages gradients over
ranks; FSDP2 (``fully_shard``) shards the DiT blocks, the connector layers and the rest of the model (the VAE,
which encodes latents outside the wrapped forward, stays whole), and each rank saves its own shards of the
weights and AdamW state into its checkpoints (``torch.distributed.checkpoint``), read back whole by
``load_checkpoint``.

Caveat (documented in docs/training.md): LoRA dropout masks come from each process's global RNG, so stage-2
parity holds with ``lora.dropout=0``; with dropout the runs are equally valid but not identical.
"""

import os
import shutil
import subprocess
import sys
from pathlib import Path

import deepgen_components.training as training_package
import pytest
import torch
import torch.distributed.checkpoint as dcp
from deepgen_components.training.checkpoint import SHARDED_FOLDER, latest_checkpoint, load_checkpoint
from deepgen_components.training.config import load_config
from deepgen_components.training.metrics import read_metrics
from deepgen_components.training.trainer import train

import deepgen_components.shapes  # noqa: F401  (registers the shapes world's kinds: `kind: shapes` sources)

torch.set_num_threads(1)

CONFIGS = Path(training_package.__file__).parent / "configs"
pytestmark = pytest.mark.slow


def torchrun(config: str, out: Path, steps: int, *overrides: str) -> subprocess.CompletedProcess:
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
               "-m", "deepgen_components.cli", "train", "--config", str(CONFIGS / config), "--max-steps", str(steps),
               "--out", str(out), "trainer.tensorboard=false", *overrides]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    result = subprocess.run(command, env=env, capture_output=True, text=True, timeout=400)
    assert result.returncode == 0, result.stderr[-4000:]
    return result


def single_process(config: str, out: Path, steps: int, *overrides: str) -> None:
    train(load_config(CONFIGS / config, ["trainer.tensorboard=false", *overrides]), out=out, max_steps=steps)


def final_weights(out: Path) -> dict[str, torch.Tensor]:
    return load_checkpoint(latest_checkpoint(out / "checkpoints"))["trainable"]


def assert_same_run(multi: Path, single: Path) -> None:
    """Per-step losses and the final trainable weights agree up to float reduction order."""
    got, expected = read_metrics(multi), read_metrics(single)
    assert [row["step"] for row in got] == [row["step"] for row in expected]
    assert [row["task"] for row in got] == [row["task"] for row in expected]
    for row, ref in zip(got, expected):
        assert row["loss"] == pytest.approx(ref["loss"], rel=1e-5)
        assert row["grad_norm"] == pytest.approx(ref["grad_norm"], rel=1e-4, abs=1e-7)
    weights, reference = final_weights(multi), final_weights(single)
    assert weights.keys() == reference.keys()
    for name, value in reference.items():
        torch.testing.assert_close(weights[name], value, rtol=1e-4, atol=1e-5, msg=name)


def test_ddp_with_two_processes_matches_one_process_with_the_global_batch(tmp_path):
    # stage 1, accumulation over one 1 edit : 3 t2i cycle (DDP's no_sync on all but the last micro-batch)
    common = ("optim.grad_accum=4", "trainer.save_pipeline=false")
    torchrun("align_tiny.yaml", tmp_path / "ddp", 3, "data.batch_size=2", "trainer.distributed=ddp", *common)
    single_process("align_tiny.yaml", tmp_path / "single", 3, "data.batch_size=4", *common)
    assert_same_run(tmp_path / "ddp", tmp_path / "single")
    assert len(read_metrics(tmp_path / "ddp")) == 3  # only rank 0 logs


def test_fsdp2_with_two_processes_matches_one_process_and_resumes_exactly(tmp_path):
    # stage 2: the DiT blocks and connector layers are FSDP units, the LoRA sits in the root unit
    common = ("lora.dropout=0", "trainer.checkpoint_every=2", "trainer.keep_last=2")
    fsdp = tmp_path / "fsdp"
    torchrun("sft_tiny.yaml", fsdp, 4, "data.batch_size=2", "trainer.distributed=fsdp", *common)
    single_process("sft_tiny.yaml", tmp_path / "single", 4, "data.batch_size=4", "trainer.save_pipeline=false", *common)
    assert_same_run(fsdp, tmp_path / "single")

    # the checkpoint is sharded (torch.distributed.checkpoint): each rank wrote its own file, every weight of >= 2
    # rows as two row shards; read back whole, the AdamW state is keyed by parameter name
    folder = fsdp / "checkpoints" / "step_00000004"
    assert sorted(p.name for p in folder.iterdir()) == [SHARDED_FOLDER, "rng.safetensors", "state.json"]
    saved = load_checkpoint(folder)
    metadata = dcp.FileSystemReader(str(folder / SHARDED_FOLDER)).read_metadata()
    assert {item.relative_path for item in metadata.storage_data.values()} == {"__0_0.distcp", "__1_0.distcp"}
    for name, value in saved["trainable"].items():
        chunks = metadata.state_dict_metadata[f"model.{name}"].chunks
        assert value.shape[0] < 2 or sorted(c.offsets[0] for c in chunks) == [0, (value.shape[0] + 1) // 2], name
    optimizer = saved["optimizer"]
    assert "model.dit.transformer.proj_out.weight" in optimizer["state"]
    assert optimizer["state"]["model.dit.transformer.proj_out.weight"]["exp_avg"].shape == (16 * 4, 32)
    # the pipeline is saved from the gathered weights
    from deepgen_components.pipeline import DeepGenPipeline

    saved = DeepGenPipeline.from_pretrained(fsdp / "pipeline").model
    weights = final_weights(fsdp)
    assert all(torch.equal(p, weights[f"dit.{n}"]) for n, p in saved.dit.named_parameters())

    # a crash after step 2: the resumed FSDP run repeats steps 3-4 exactly
    expected = read_metrics(fsdp)
    shutil.rmtree(fsdp / "checkpoints" / "step_00000004")
    shutil.rmtree(fsdp / "pipeline")
    (fsdp / "checkpoints" / "latest").write_text("step_00000002")
    resumed = torchrun("sft_tiny.yaml", fsdp, 4, "data.batch_size=2", "trainer.distributed=fsdp", *common)
    assert "resuming from" in resumed.stderr
    assert [row["loss"] for row in read_metrics(fsdp)] == [row["loss"] for row in expected]
    assert all(final_weights(fsdp)[n].equal(v) for n, v in weights.items())
    again = load_checkpoint(folder)["optimizer"]["state"]
    for name, state in optimizer["state"].items():
        assert all(again[name][k].equal(v) for k, v in state.items()), name
