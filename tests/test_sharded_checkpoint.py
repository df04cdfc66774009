"""FSDP2 checkpoints written sharded with ``torch.distributed.checkpoint`` (issue #27), and the RL gradient average
in bounded buckets instead of one flat copy of every gradient.

* One process: a DCP folder published by ``save_checkpoint(staged=...)`` reads back whole (weights, the optimizer
  state keyed by parameter name, the EMA average), and its optimizer state loads into an unsharded run.
* Two gloo processes: ``all_reduce_gradients`` gives the gradients one flat all_reduce gives, bit for bit.
* Two gloo processes, FSDP2: each rank's shards of the weights, the optimizer state and the EMA average round-trip.
* The ``torchrun`` stage-2 FSDP2 run (every rank writes only its own shards; a restart from the older checkpoint
  repeats its steps, weights and AdamW state exactly) is in tests/test_training_distributed.py.
"""

import json
from pathlib import Path

import deepgen_components.training as training_package
import pytest
import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
import torch.multiprocessing as mp
from deepgen_components.training.checkpoint import (
    SHARDED_FOLDER,
    latest_checkpoint,
    load_checkpoint,
    read_sharded,
    save_checkpoint,
    stage_checkpoint,
)
from deepgen_components.training.distributed import DistInfo, all_reduce_gradients
from deepgen_components.training.state import load_optimizer
from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict

CONFIGS = Path(training_package.__file__).parent / "configs"


def trained_linear(seed: int) -> tuple[torch.nn.Module, torch.optim.Optimizer]:
    torch.manual_seed(seed)
    module = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.Linear(3, 2))
    optimizer = torch.optim.AdamW(module.parameters(), lr=1e-2)
    module(torch.randn(5, 4)).square().mean().backward()
    optimizer.step()
    return module, optimizer


# -- one process ---------------------------------------------------------------------------------------------------


def test_a_sharded_checkpoint_reads_back_whole_in_one_process(tmp_path):
    module, optimizer = trained_linear(0)
    weights = {name: p.detach().clone() for name, p in module.named_parameters()}
    average = {name: value * 0.5 for name, value in weights.items()}
    staged = stage_checkpoint(tmp_path, 3)
    dcp.save({"model": weights, "optim": get_optimizer_state_dict(module, optimizer), "ema": average},
             checkpoint_id=str(staged / SHARDED_FOLDER), no_dist=True)
    assert latest_checkpoint(tmp_path) is None  # staged, not published: a save killed here leaves no checkpoint
    path = save_checkpoint(tmp_path, 3, trainable=None, scheduler_state={"last_epoch": 3}, staged=staged)
    assert latest_checkpoint(tmp_path) == path and not staged.exists()
    assert sorted(p.name for p in path.iterdir()) == [SHARDED_FOLDER, "rng.safetensors", "state.json"]
    assert json.loads((path / "state.json").read_text())["sharded"] == SHARDED_FOLDER

    loaded = load_checkpoint(path)
    assert loaded["sharded"] == path / SHARDED_FOLDER and loaded["scheduler"] == {"last_epoch": 3}
    assert loaded["trainable"].keys() == weights.keys()
    assert all(torch.equal(loaded["trainable"][n], v) for n, v in weights.items())
    assert all(torch.equal(loaded["ema"][n], v) for n, v in average.items())
    groups = loaded["optimizer"]["param_groups"]
    assert len(groups) == 1 and groups[0]["lr"] == 1e-2 and groups[0]["params"] == list(weights)
    for name, param in module.named_parameters():
        for key, value in optimizer.state[param].items():
            assert torch.equal(loaded["optimizer"]["state"][name][key], value), (name, key)

    # The state keyed by parameter name goes into an unsharded optimizer of the same model (a DDP resume).
    other, fresh = trained_linear(1)
    other.load_state_dict(module.state_dict())
    fresh.state.clear()
    load_optimizer(other, fresh, loaded["optimizer"], sharded=False)
    for (_, p), (_, q) in zip(module.named_parameters(), other.named_parameters()):
        assert all(torch.equal(fresh.state[q][k], v) for k, v in optimizer.state[p].items())

    lazy = load_checkpoint(path, tensors=False)  # an FSDP resume reads its own shards (training.state)
    assert lazy["trainable"] is None and lazy["optimizer"] is None and lazy["sharded"] == path / SHARDED_FOLDER


def test_publishing_nothing_is_an_error(tmp_path):
    with pytest.raises(ValueError, match="trainable is None"):
        save_checkpoint(tmp_path, 1, trainable=None)


# -- two gloo processes: the RL gradient average -------------------------------------------------------------------


def _average_gradients(rank: int, store: str, results: str) -> None:
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=2)
    torch.manual_seed(rank)
    shapes = [(3, 5), (7,), (64, 33), (2, 2, 2), (300,), (1,)]  # 64 x 33 fp32 > the 4 KiB bucket: in place
    params = [torch.nn.Parameter(torch.zeros(s)) for s in shapes]
    for i, p in enumerate(params):
        p.grad = None if i == 3 else torch.randn(p.shape)  # a parameter without a gradient is passed over
    grads = [p.grad for p in params if p.grad is not None]
    flat = torch.cat([g.reshape(-1) for g in grads])  # the old way: one flat copy of every gradient
    dist.all_reduce(flat, op=dist.ReduceOp.SUM)
    flat /= 2
    all_reduce_gradients(params, DistInfo(rank=rank, world_size=2), bucket_bytes=4096)
    got = torch.cat([g.reshape(-1) for g in grads])
    torch.save({"equal": torch.equal(got, flat), "changed": not torch.equal(got, grads[0].new_zeros(0))},
               f"{results}.{rank}")
    dist.destroy_process_group()


def test_bucketed_gradient_average_equals_one_flat_all_reduce(tmp_path):
    results = str(tmp_path / "result")
    mp.start_processes(_average_gradients, args=(str(tmp_path / "store"), results), nprocs=2, start_method="spawn")
    for rank in range(2):
        assert torch.load(f"{results}.{rank}") == {"equal": True, "changed": True}


# -- two gloo processes: FSDP2 shards of the weights, the optimizer and the EMA average ------------------------------


def _save_and_load_shards(rank: int, store: str, folder: str, results: str) -> None:
    from deepgen_components.training.config import EMAConfig
    from deepgen_components.training.distributed import apply_fsdp
    from deepgen_components.training.ema import EMA
    from deepgen_components.training.state import load_sharded, save_sharded

    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=2)
    info = DistInfo(rank=rank, world_size=2)

    def build():
        torch.manual_seed(0)
        module = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.Linear(16, 4))
        apply_fsdp(module, [module[0]], info)
        optimizer = torch.optim.AdamW(module.parameters(), lr=1e-2)
        return module, optimizer, EMA(module, EMAConfig(decay=0.5, every=1, start=0))

    module, optimizer, ema = build()
    for step in (1, 2):
        torch.manual_seed(10 + rank + step)
        module(torch.randn(3, 8)).square().mean().backward()
        optimizer.step()
        optimizer.zero_grad()
        ema.update(step)
    save_sharded(folder, module=module, model=module, optimizer=optimizer, average=ema.shadow)
    fresh, fresh_optimizer, fresh_ema = build()
    had_average = load_sharded(folder, module=fresh, model=fresh, optimizer=fresh_optimizer, average=fresh_ema.shadow)
    local = lambda t: t.to_local()  # noqa: E731  (this rank's shard)
    same = had_average and all(local(p).equal(local(q)) for p, q in zip(module.parameters(), fresh.parameters()))
    same &= all(local(ema.shadow[n]).equal(local(fresh_ema.shadow[n])) for n in ema.shadow)
    for p, q in zip(module.parameters(), fresh.parameters()):
        a, b = optimizer.state[p], fresh_optimizer.state[q]
        same &= a.keys() == b.keys() and all(local(a[k]).equal(local(b[k])) if k != "step" else a[k].equal(b[k])
                                             for k in a)
    torch.save({"same": bool(same), "shard": local(next(module.parameters())).shape[0]}, f"{results}.{rank}")
    dist.destroy_process_group()


def test_fsdp2_shards_of_weights_optimizer_and_average_round_trip(tmp_path):
    results = str(tmp_path / "result")
    mp.start_processes(_save_and_load_shards, args=(str(tmp_path / "store"), str(tmp_path / "dcp"), results),
                       nprocs=2, start_method="spawn")
    assert [torch.load(f"{results}.{rank}") for rank in range(2)] == [{"same": True, "shard": 8}] * 2
    whole = read_sharded(tmp_path / "dcp")  # one process reads the two ranks' files whole
    assert whole["model"]["0.weight"].shape == (16, 8) and whole["ema"]["0.weight"].shape == (16, 8)
    assert whole["optim"]["state"]["0.weight"]["exp_avg"].shape == (16, 8)
