"""Training checkpoints: safetensors for every tensor (trainable weights, AdamW moments, RNG states), JSON for
the rest; written into a temporary folder and renamed into place, ``latest`` replaced atomically, only the
newest ``keep_last`` kept. A crash at any moment leaves a resumable folder.
"""

import random

import numpy as np
import pytest
import torch
from deepgen_components.training.checkpoint import (
    capture_rng,
    latest_checkpoint,
    load_checkpoint,
    restore_rank_rng,
    restore_rng,
    save_checkpoint,
)


def weights(seed: int = 0) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return {"bridge.projector.weight": torch.randn(4, 3, generator=gen),
            "bridge.projector.bias": torch.randn(4, generator=gen)}


def trained_adamw(steps: int = 3) -> tuple[list[torch.nn.Parameter], torch.optim.AdamW]:
    torch.manual_seed(0)
    params = [torch.nn.Parameter(torch.randn(4, 3)), torch.nn.Parameter(torch.randn(4))]
    optimizer = torch.optim.AdamW(
        [{"params": params[:1], "weight_decay": 0.05}, {"params": params[1:], "weight_decay": 0.0}],
        lr=1e-2, betas=(0.9, 0.95),
    )
    for _ in range(steps):
        sum((p**2).sum() for p in params).backward()
        optimizer.step()
        optimizer.zero_grad()
    return params, optimizer


def test_a_checkpoint_round_trips_weights_and_state(tmp_path):
    path = save_checkpoint(
        tmp_path, 7, trainable=weights(), scheduler_state={"last_epoch": 7, "base_lrs": [1e-4]},
        sampler_state={"position": 28, "seed": 0, "pattern": ["edit", "t2i", "t2i", "t2i"]}, extra={"stage": "align"},
    )
    assert path == tmp_path / "step_00000007"
    assert sorted(p.name for p in path.iterdir()) == ["rng.safetensors", "state.json", "trainable.safetensors"]
    loaded = load_checkpoint(path)
    assert loaded["step"] == 7 and loaded["extra"] == {"stage": "align"}
    assert loaded["scheduler"] == {"last_epoch": 7, "base_lrs": [1e-4]}
    assert loaded["sampler"]["position"] == 28
    assert loaded["trainable"].keys() == weights().keys()
    assert all(torch.equal(loaded["trainable"][k], v) for k, v in weights().items())
    assert loaded["optimizer"] is None


def test_adamw_state_round_trips_through_safetensors_and_continues_identically(tmp_path):
    params, optimizer = trained_adamw()
    save_checkpoint(tmp_path, 3, trainable={f"p{i}": p for i, p in enumerate(params)},
                    optimizer_state=optimizer.state_dict())
    loaded = load_checkpoint(latest_checkpoint(tmp_path))

    fresh = [torch.nn.Parameter(loaded["trainable"][f"p{i}"].clone()) for i in range(2)]
    restored = torch.optim.AdamW([{"params": fresh[:1]}, {"params": fresh[1:]}], lr=0.5)  # settings come from the file
    restored.load_state_dict(loaded["optimizer"])
    assert restored.param_groups[0]["weight_decay"] == 0.05 and restored.param_groups[1]["weight_decay"] == 0.0
    assert restored.param_groups[0]["lr"] == 1e-2 and tuple(restored.param_groups[0]["betas"]) == (0.9, 0.95)
    for index in (0, 1):
        for name in ("exp_avg", "exp_avg_sq", "step"):
            assert torch.equal(restored.state[fresh[index]][name], optimizer.state[params[index]][name])

    for group in (params, fresh):  # one more step on each: bit-identical
        sum((p**2).sum() for p in group).backward()
    optimizer.step()
    restored.step()
    assert all(torch.equal(a, b) for a, b in zip(params, fresh))


def test_an_optimizer_state_keyed_by_parameter_name_round_trips(tmp_path):
    # FSDP checkpoints hold the gathered optimizer state keyed by fully qualified names (which contain dots).
    state = {
        "state": {"model.bridge.projector.weight": {"step": torch.tensor(3.0), "exp_avg": torch.ones(2, 2)}},
        "param_groups": [{"lr": 1e-4, "params": ["model.bridge.projector.weight"]}],
    }
    save_checkpoint(tmp_path, 1, trainable=weights(), optimizer_state=state)
    loaded = load_checkpoint(tmp_path / "step_00000001")["optimizer"]
    assert loaded["param_groups"] == state["param_groups"]
    entry = loaded["state"]["model.bridge.projector.weight"]
    assert torch.equal(entry["exp_avg"], torch.ones(2, 2)) and torch.equal(entry["step"], torch.tensor(3.0))


def test_rng_states_round_trip():
    torch.manual_seed(1)
    np.random.seed(2)
    random.seed(3)
    np.random.standard_normal()  # leaves a cached gauss in numpy's state
    random.gauss(0, 1)
    tensors, meta = capture_rng()
    first = (torch.rand(5), np.random.standard_normal(5), [random.random() for _ in range(5)], random.gauss(0, 1))
    torch.manual_seed(99)
    np.random.seed(99)
    random.seed(99)
    restore_rng(tensors, meta)
    again = (torch.rand(5), np.random.standard_normal(5), [random.random() for _ in range(5)], random.gauss(0, 1))
    assert torch.equal(first[0], again[0]) and np.array_equal(first[1], again[1])
    assert first[2:] == again[2:]


def test_the_checkpoint_restores_the_rng_of_the_moment_it_was_saved(tmp_path):
    torch.manual_seed(5)
    save_checkpoint(tmp_path, 1, trainable=weights())
    expected = torch.rand(3)
    torch.manual_seed(6)
    (state,) = load_checkpoint(tmp_path / "step_00000001")["rng"]  # one process: one rank's states
    restore_rng(*state)
    assert torch.equal(torch.rand(3), expected)


def _states_of_seeds(*seeds: int) -> tuple[list, list[torch.Tensor]]:
    """One capture_rng() per seed (as ranks 0, 1, ... would send them) and the first draw after each."""
    states, draws = [], []
    for seed in seeds:
        torch.manual_seed(seed)
        np.random.seed(seed)
        random.seed(seed)
        states.append(capture_rng())
        draws.append(torch.rand(4))
    return states, draws


def test_every_rank_gets_its_own_rng_states_back(tmp_path):
    states, draws = _states_of_seeds(10, 11, 12)
    save_checkpoint(tmp_path, 1, trainable=weights(), rng_states=states)
    loaded = load_checkpoint(tmp_path / "step_00000001")["rng"]
    assert len(loaded) == 3
    for rank in (2, 0, 1):
        torch.manual_seed(99)
        assert restore_rank_rng(loaded, rank)
        assert torch.equal(torch.rand(4), draws[rank]), rank
    torch.manual_seed(99)
    fresh = torch.get_rng_state()
    assert not restore_rank_rng(loaded, 3)  # saved by 3 processes, resumed by 4: rank 3 keeps its fresh stream
    assert torch.equal(torch.get_rng_state(), fresh)


def test_a_checkpoint_with_the_old_single_rng_state_still_loads(tmp_path):
    # The format before per-rank states: unprefixed tensors and the metadata directly under "rng".
    import json

    from safetensors.torch import save_file

    save_checkpoint(tmp_path, 1, trainable=weights())
    folder = tmp_path / "step_00000001"
    [(tensors, meta)], _ = _states_of_seeds(7)
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(folder / "rng.safetensors"))
    state = json.loads((folder / "state.json").read_text())
    state["rng"] = meta
    (folder / "state.json").write_text(json.dumps(state))
    loaded = load_checkpoint(folder)["rng"]
    assert len(loaded) == 1
    torch.manual_seed(99)
    assert restore_rank_rng(loaded, 0) and torch.equal(torch.rand(4), _states_of_seeds(7)[1][0])
    assert not restore_rank_rng(loaded, 1)


def test_keep_last_prunes_the_oldest_and_latest_names_the_newest(tmp_path):
    for step in (10, 20, 30, 40):
        save_checkpoint(tmp_path, step, trainable=weights(step), keep_last=2)
    assert sorted(p.name for p in tmp_path.glob("step_*")) == ["step_00000030", "step_00000040"]
    assert (tmp_path / "latest").read_text() == "step_00000040"
    assert latest_checkpoint(tmp_path) == tmp_path / "step_00000040"
    assert torch.equal(load_checkpoint(latest_checkpoint(tmp_path))["trainable"]["bridge.projector.bias"],
                       weights(40)["bridge.projector.bias"])


def test_keep_last_below_one_is_rejected(tmp_path):
    # keep_last=0 would delete the checkpoint just written and leave `latest` pointing at nothing.
    with pytest.raises(ValueError, match="keep_last must be >= 1"):
        save_checkpoint(tmp_path, 1, trainable=weights(), keep_last=0)


def test_leftovers_of_a_crashed_save_are_ignored(tmp_path):
    save_checkpoint(tmp_path, 5, trainable=weights())
    # a save killed before its rename: a temporary folder with partial files
    crashed = tmp_path / ".tmp_step_00000010_12345"
    crashed.mkdir()
    (crashed / "trainable.safetensors").write_bytes(b"\x00" * 10)
    # a step folder without state.json (not a complete checkpoint) and a `latest` pointing at it
    (tmp_path / "step_00000010").mkdir()
    (tmp_path / "latest").write_text("step_00000010")
    assert latest_checkpoint(tmp_path) == tmp_path / "step_00000005"
    with pytest.raises(FileNotFoundError, match="not a complete checkpoint"):
        load_checkpoint(tmp_path / "step_00000010")


def test_saving_a_step_again_replaces_it_and_no_temporary_folder_remains(tmp_path):
    save_checkpoint(tmp_path, 5, trainable=weights(0))
    save_checkpoint(tmp_path, 5, trainable=weights(1))
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []
    assert torch.equal(load_checkpoint(tmp_path / "step_00000005")["trainable"]["bridge.projector.bias"],
                       weights(1)["bridge.projector.bias"])


def test_no_checkpoint_means_none(tmp_path):
    assert latest_checkpoint(tmp_path) is None
    assert latest_checkpoint(tmp_path / "does-not-exist") is None
