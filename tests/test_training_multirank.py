"""Every shipped tiny config under ``torchrun --nproc-per-node 2`` (gloo), with DDP and with FSDP2, and exact
resume of a two-rank run killed with SIGKILL.

* Why DDP used to fail at step 2: the bridge stacks hidden states up to ``hidden_states[N-1]``, so the last VLM
  decoder layer's output never reaches the loss and a LoRA on it never gets a gradient. ``apply_lora`` leaves
  such layers out (tested here single-process: every trainable tensor gets a gradient on an edit and a
  text-to-image micro-batch), and a checkpoint of the older layout still loads through ``model.init_from``.
* The matrix: align, sft and rl tiny configs x {ddp, fsdp}, 2 steps each (DDP's error came at step 2) through
  the real ``deepgen train`` entry point, all six in one torchrun launch (a worker creates the process group
  and calls the CLI six times; a run leaves a group it did not create in place). DDP and FSDP2 average the same gradients, so each
  config's two runs agree to float tolerance: a wrong reduction (sum, or no reduction) on one side shows.
* Exact resume on two ranks: each rank saves and restores its own RNG states (LoRA dropout draws from them).
  A stage-2 DDP run with dropout, killed by SIGKILL (torchrun and both ranks) after a checkpoint and started
  again, ends with the same losses and weights, bit for bit, as an uninterrupted two-rank run.
"""

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import deepgen_components.training as training_package
import pytest
import torch
from deepgen_components.training.checkpoint import latest_checkpoint, load_checkpoint, save_checkpoint
from deepgen_components.training.config import LoraConfigSpec, ModelSpec, load_config
from deepgen_components.training.data import build_sources, collate
from deepgen_components.training.metrics import read_metrics
from deepgen_components.training.sampler import MicroBatchPlan
from deepgen_components.training.stage_model import (
    build_model,
    configure_stage,
    load_init_weights,
    unread_decoder_layers,
)
from deepgen_components.training.trainer import FlowMatchingObjective, prepare_batch

import deepgen_components.shapes  # noqa: F401  (registers the shapes world's kinds: `kind: shapes` sources)

CONFIGS = Path(training_package.__file__).parent / "configs"
LORA = LoraConfigSpec(r=4, alpha=8, dropout=0.0, targets=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj",
                                                             "up_proj", "down_proj", "embed_tokens"])


def environment() -> dict:
    return {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}


# -- the root cause, single process ------------------------------------------------------------------------------


def test_no_lora_on_decoder_layers_the_bridge_never_reads():
    model = build_model(ModelSpec(preset="tiny", seed=0))
    assert model.encoder.layers.indices == (3, 2, 1) and model.encoder.num_layers == 4
    assert unread_decoder_layers(model) == [3]  # hidden_states[3] is layer 2's output; layer 3 feeds only [4]
    names = configure_stage(model, "sft", LORA)
    lora = [n for n in names if "lora_" in n]
    assert not [n for n in lora if ".layers.3." in n]
    assert {i for i in range(3) if any(f".layers.{i}." in n for n in lora)} == {0, 1, 2}
    assert any("embed_tokens" in n for n in lora)


@pytest.mark.parametrize("task", ["t2i", "edit"])
def test_every_stage2_trainable_tensor_reaches_the_loss(task):
    # What DDP (find_unused_parameters=False) needs on every step: a gradient for every trainable tensor.
    cfg = load_config(CONFIGS / "sft_tiny.yaml", ["model.condition_dropout=0"])
    model = build_model(cfg.model)
    configure_stage(model, "sft", cfg.lora)
    model.train()
    source = build_sources(cfg)[task]
    batch = collate([source[i] for i in range(2)])
    plan = MicroBatchPlan(source=task, indices=[0, 1], position=0, global_offset=0)
    FlowMatchingObjective(model)(prepare_batch(model, batch, plan, seed=0)).backward()
    missing = [n for n, p in model.named_parameters() if p.requires_grad and p.grad is None]
    assert missing == []


def test_init_from_a_checkpoint_with_lora_on_an_unread_layer(tmp_path):
    # The official layout (and ours before): a LoRA on layer 3 too. Those tensors cannot change the bridge's
    # input, so they are dropped; every other tensor loads.
    old = build_model(ModelSpec(preset="tiny", seed=0))
    configure_stage(old, "sft", LORA)
    weights = {n: p.detach().clone() for n, p in old.named_parameters() if p.requires_grad}
    layer3 = {f"encoder.vlm.model.language_model.layers.3.self_attn.q_proj.lora_{ab}.default.weight":
              torch.ones(4, 64) if ab == "A" else torch.zeros(64, 4) for ab in "AB"}
    save_checkpoint(tmp_path, 1, trainable={**weights, **layer3})
    model = build_model(ModelSpec(preset="tiny", seed=1))
    configure_stage(model, "sft", LORA)
    assert load_init_weights(model, tmp_path) == len(weights)
    params = dict(model.named_parameters())
    assert all(torch.equal(params[n], v) for n, v in weights.items())


# -- every tiny config x {ddp, fsdp} under torchrun ------------------------------------------------------------------

# Bookkeeping-sized variants: the rl config with 2 prompts x group 4 and 4 denoising steps.
MATRIX = {
    "align": ("align_tiny.yaml", []),
    "sft": ("sft_tiny.yaml", []),
    "rl": ("rl_tiny.yaml", ["rl.group_size=4", "rl.num_steps=4"]),
}
MATRIX_STEPS = 2


@pytest.fixture(scope="module")
def matrix(tmp_path_factory) -> Path:
    """One torchrun launch that trains every tiny config with DDP and with FSDP2 through ``deepgen train``."""
    root = tmp_path_factory.mktemp("matrix")
    runs = [[f"{name}_{mode}", "train", "--config", str(CONFIGS / config), "--max-steps", str(MATRIX_STEPS),
             "--out", str(root / f"{name}_{mode}"), "trainer.tensorboard=false", f"trainer.distributed={mode}",
             "trainer.checkpoint_every=1", *overrides]
            for name, (config, overrides) in MATRIX.items() for mode in ("ddp", "fsdp")]
    worker = root / "worker.py"
    worker.write_text(textwrap.dedent("""
        import json, sys, torch
        import torch.distributed as dist
        torch.set_num_threads(1)
        from deepgen_components.cli import main

        dist.init_process_group("gloo")
        for label, *argv in json.loads(sys.argv[1]):
            assert main(argv) == 0, label
            assert dist.is_initialized(), label  # not destroyed by a run that did not create it
            print("done", label, flush=True)
        dist.destroy_process_group()
    """))
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
                           str(worker), json.dumps(runs)], env=environment(), capture_output=True, text=True,
                          timeout=500)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return root


@pytest.mark.slow
@pytest.mark.parametrize("name", list(MATRIX))
def test_every_tiny_config_trains_under_ddp_and_fsdp_and_both_agree(matrix, name):
    ddp, fsdp = matrix / f"{name}_ddp", matrix / f"{name}_fsdp"
    for run in (ddp, fsdp):
        rows = read_metrics(run)
        assert [r["step"] for r in rows] == list(range(1, MATRIX_STEPS + 1)), run.name  # only rank 0 logs
        assert all(torch.isfinite(torch.tensor(r["loss"])) for r in rows)
        assert (run / "pipeline" / "model_index.json").is_file()  # FSDP: gathered into a whole model first
    key = "reward" if name == "rl" else "loss"
    for a, b in zip(read_metrics(ddp), read_metrics(fsdp)):
        assert a[key] == pytest.approx(b[key], rel=1e-5)
        assert a["grad_norm"] == pytest.approx(b["grad_norm"], rel=1e-4, abs=1e-7)
    first = load_checkpoint(ddp / "checkpoints" / "step_00000001")["trainable"]
    final_ddp, final_fsdp = (load_checkpoint(latest_checkpoint(r / "checkpoints"))["trainable"] for r in (ddp, fsdp))
    assert final_ddp.keys() == final_fsdp.keys()
    for n, value in final_ddp.items():
        torch.testing.assert_close(final_fsdp[n], value, rtol=1e-4, atol=1e-5, msg=n)
    assert any(not torch.equal(first[n], final_ddp[n]) for n in first)  # the second step did train


# -- exact resume of a two-rank run killed with SIGKILL ----------------------------------------------------------

RESUME_STEPS = 12


def launch(out: Path, log: Path) -> subprocess.Popen:
    """The stage-2 DDP run, stderr to ``log`` (a file: a pipe nobody reads could fill up and block it)."""
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
               "-m", "deepgen_components.cli", "train", "--config", str(CONFIGS / "sft_tiny.yaml"),
               "--max-steps", str(RESUME_STEPS), "--out", str(out), "trainer.distributed=ddp",
               "trainer.checkpoint_every=2", "trainer.tensorboard=false", "trainer.save_pipeline=false",
               "data.batch_size=2"]  # lora.dropout stays 0.05: its masks come from each rank's global RNG
    with log.open("w") as stderr:
        return subprocess.Popen(command, env=environment(), stdout=subprocess.DEVNULL, stderr=stderr)


def descendants(pid: int) -> list[int]:
    """Every process below ``pid`` (Linux /proc). torchrun starts each rank in a session of its own, so killing
    torchrun's process group would leave the ranks running."""
    parents = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        parents.setdefault(int(fields[1]), []).append(int(stat.parent.name))
    found, todo = [], [pid]
    while todo:
        children = parents.get(todo.pop(), [])
        found += children
        todo += children
    return found


def alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


def checkpoint_step(out: Path) -> int:
    try:
        return int((out / "checkpoints" / "latest").read_text().strip().removeprefix("step_"))
    except (OSError, ValueError):
        return 0


@pytest.mark.slow
def test_two_ranks_killed_with_sigkill_resume_bit_exactly(tmp_path):
    reference_out, out = tmp_path / "reference", tmp_path / "run"
    reference = launch(reference_out, tmp_path / "reference.log")
    victim = launch(out, tmp_path / "victim.log")
    ranks = []
    try:
        deadline = time.monotonic() + 300
        while checkpoint_step(out) < 2 and victim.poll() is None and time.monotonic() < deadline:
            time.sleep(0.01)
        ranks = descendants(victim.pid)
        for pid in [victim.pid, *ranks]:  # kill -9 of the whole job: torchrun and both ranks
            os.kill(pid, signal.SIGKILL)
        victim.wait(30)
    finally:
        if victim.poll() is None:
            victim.kill()
    assert victim.returncode == -signal.SIGKILL and len(ranks) >= 2
    deadline = time.monotonic() + 30
    while any(alive(pid) for pid in ranks) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not any(alive(pid) for pid in ranks)
    killed_at = checkpoint_step(out)  # it really died mid-run: after a checkpoint, before the last step
    assert 2 <= killed_at < RESUME_STEPS and len(read_metrics(out)) < RESUME_STEPS
    assert not (out / "checkpoints" / f"step_{RESUME_STEPS:08d}").exists()

    # the checkpoint holds each rank's own RNG states, and they differ (each rank its own dropout stream)
    states = load_checkpoint(latest_checkpoint(out / "checkpoints"))["rng"]
    assert len(states) == 2 and not torch.equal(states[0][0]["torch"], states[1][0]["torch"])

    resumed = launch(out, tmp_path / "resumed.log")
    assert resumed.wait(300) == 0, (tmp_path / "resumed.log").read_text()[-3000:]
    assert f"resuming from {out / 'checkpoints' / f'step_{killed_at:08d}'}" in (tmp_path / "resumed.log").read_text()
    assert reference.wait(300) == 0, (tmp_path / "reference.log").read_text()[-3000:]

    expected, got = read_metrics(reference_out), read_metrics(out)
    assert [row["step"] for row in got] == list(range(1, RESUME_STEPS + 1))
    assert [row["loss"] for row in got] == [row["loss"] for row in expected]  # the same floats
    assert [row["grad_norm"] for row in got] == [row["grad_norm"] for row in expected]
    final, final_expected = (load_checkpoint(latest_checkpoint(o / "checkpoints"))["trainable"]
                             for o in (out, reference_out))
    assert final.keys() == final_expected.keys()
    assert all(final[name].equal(value) for name, value in final_expected.items())
