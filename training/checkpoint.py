"""Training checkpoints: safetensors for every tensor (weights, optimizer moments, RNG states), JSON for the rest.

A checkpoint is a folder ``step_XXXXXXXX/`` holding ``trainable.safetensors`` (the trainable weights, LoRA
included, by parameter name), ``optimizer.safetensors`` + ``state.json`` (optimizer param groups, LR schedule,
sampler position, step, config), and ``rng.safetensors`` (the RNG states of *every* rank, ``rank{r}.*``:
under torchrun each process draws its own LoRA dropout masks, so each must get its own stream back). The main
process writes it all into a temporary folder that is renamed into place (atomic on one filesystem), then
``latest`` is replaced atomically; older checkpoints beyond ``keep_last`` are removed. A run killed at any
moment resumes from the last complete checkpoint.

Sharded (FSDP2 runs): the trainable weights, the optimizer state and the EMA average are not gathered; every rank
writes its own shards with ``torch.distributed.checkpoint`` (DCP) into ``dcp/`` of the same temporary folder
(:func:`stage_checkpoint`, then ``training.state.save_sharded``), and the main process adds the rest and publishes
the folder as above. Such a folder has no ``trainable.safetensors``; :func:`load_checkpoint` reads ``dcp/`` whole
in one process (any tool, any world size), and an FSDP resume reads each rank's shards only.
"""

from __future__ import annotations

import json
import logging
import os
import random
import shutil
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import torch

__all__ = [
    "SHARDED_FOLDER",
    "capture_rng",
    "latest_checkpoint",
    "load_checkpoint",
    "read_sharded",
    "restore_rank_rng",
    "restore_rng",
    "save_checkpoint",
    "stage_checkpoint",
]

logger = logging.getLogger(__name__)

RngState = tuple[dict[str, torch.Tensor], dict]  # (tensors, JSON metadata) of one process
SHARDED_FOLDER = "dcp"  # a checkpoint's torch.distributed.checkpoint folder (FSDP runs)


def capture_rng() -> tuple[dict[str, torch.Tensor], dict]:
    """(tensors, json) snapshot of torch (CPU and CUDA), numpy and Python RNG states."""
    tensors = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        for i, state in enumerate(torch.cuda.get_rng_state_all()):
            tensors[f"cuda.{i}"] = state
    np_state = np.random.get_state()
    tensors["numpy"] = torch.from_numpy(np.asarray(np_state[1], dtype=np.int64))
    py_state = random.getstate()
    meta = {
        "numpy": [np_state[0], int(np_state[2]), int(np_state[3]), float(np_state[4])],
        "python": [py_state[0], list(py_state[1]), py_state[2]],
    }
    return tensors, meta


def restore_rng(tensors: dict[str, torch.Tensor], meta: dict) -> None:
    torch.set_rng_state(tensors["torch"])
    cuda = [tensors[k] for k in sorted(k for k in tensors if k.startswith("cuda."))]
    if cuda and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(cuda[: torch.cuda.device_count()])
    name, pos, has_gauss, cached = meta["numpy"]
    np.random.set_state((name, tensors["numpy"].numpy().astype(np.uint32), pos, has_gauss, cached))
    version, internal, gauss = meta["python"]
    random.setstate((version, tuple(internal), gauss))


def restore_rank_rng(states: list[RngState], rank: int) -> bool:
    """Restore this rank's own RNG states from a checkpoint's per-rank list; False (nothing restored) when the
    checkpoint has none for ``rank`` (saved with fewer processes, or in the old single-state format, which
    held the main process's states only). Exact resume needs the world size the checkpoint was saved with."""
    if rank < len(states):
        restore_rng(*states[rank])
        return True
    logger.warning("checkpoint: no RNG state for rank %d (saved by %d process(es)); this rank keeps a fresh "
                   "stream, so the run continues validly but not bit-identically", rank, len(states))
    return False


def _flatten_optimizer(state: dict) -> tuple[dict[str, torch.Tensor], dict]:
    tensors, meta = {}, {"param_groups": state["param_groups"], "state": {}}
    for index, values in state["state"].items():
        entry = {}
        for name, value in values.items():
            if isinstance(value, torch.Tensor):
                tensors[f"{index}.{name}"] = value.detach().contiguous().cpu()
            else:
                entry[name] = value
        meta["state"][str(index)] = entry
    return tensors, meta


def _unflatten_optimizer(tensors: dict[str, torch.Tensor], meta: dict) -> dict:
    # Keys are parameter indices (optimizer.state_dict()) or, for a gathered FSDP state, parameter names.
    key_of = lambda index: int(index) if index.isdigit() else index
    state: dict[int | str, dict[str, Any]] = {key_of(k): dict(v) for k, v in meta["state"].items()}
    for key, value in tensors.items():
        index, name = key.rsplit(".", 1)
        state.setdefault(key_of(index), {})[name] = value
    return {"state": state, "param_groups": meta["param_groups"]}


def _write_json(path: Path, data: dict) -> None:
    path.write_text(json.dumps(data, indent=1, sort_keys=True))


def stage_checkpoint(directory: str | Path, step: int) -> Path:
    """A fresh, empty temporary folder for checkpoint ``step`` of ``directory``: written into (e.g. the shards of
    every rank, ``SHARDED_FOLDER``), then published by :func:`save_checkpoint` with ``staged=``. Main process."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    tmp = directory / f".tmp_step_{step:08d}_{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    return tmp


def save_checkpoint(
    directory: str | Path,
    step: int,
    *,
    trainable: dict[str, torch.Tensor] | None,
    optimizer_state: dict | None = None,
    scheduler_state: dict | None = None,
    sampler_state: dict | None = None,
    extra: dict | None = None,
    keep_last: int = 2,
    rng_states: list[RngState] | None = None,
    staged: Path | None = None,
) -> Path:
    """Write checkpoint ``step`` atomically into ``directory`` and prune old ones; returns its folder.

    ``rng_states``: one ``capture_rng()`` per rank, in rank order (gathered to the main process); default:
    this process's states as the only rank. ``staged``: a folder of :func:`stage_checkpoint` that already holds
    part of the checkpoint (the sharded ``SHARDED_FOLDER``, whose weights and optimizer state make ``trainable``
    and ``optimizer_state`` None); it is completed and published."""
    from safetensors.torch import save_file

    if keep_last < 1:  # 0 would delete the checkpoint just written and leave ``latest`` dangling
        raise ValueError(f"keep_last must be >= 1, got {keep_last}")
    sharded = staged is not None and (Path(staged) / SHARDED_FOLDER / ".metadata").is_file()
    if trainable is None and not sharded:
        raise ValueError("save_checkpoint: trainable is None but there is no sharded checkpoint (staged=) to publish")
    directory = Path(directory)
    final = directory / f"step_{step:08d}"
    tmp = Path(staged) if staged is not None else stage_checkpoint(directory, step)
    if trainable is not None:
        save_file({k: v.detach().contiguous().cpu() for k, v in trainable.items()}, str(tmp / "trainable.safetensors"))
    state: dict[str, Any] = {"step": step, "scheduler": scheduler_state, "sampler": sampler_state, "extra": extra or {}}
    if sharded:
        state["sharded"] = SHARDED_FOLDER  # weights, optimizer (and EMA) state: torch.distributed.checkpoint
    if optimizer_state is not None:
        opt_tensors, opt_meta = _flatten_optimizer(optimizer_state)
        save_file(opt_tensors, str(tmp / "optimizer.safetensors"))
        state["optimizer"] = opt_meta
    rng_states = rng_states if rng_states is not None else [capture_rng()]
    rng_tensors = {f"rank{r}.{k}": v.contiguous() for r, (tensors, _) in enumerate(rng_states) for k, v in tensors.items()}
    save_file(rng_tensors, str(tmp / "rng.safetensors"))
    state["rng"] = {"ranks": [meta for _, meta in rng_states]}
    _write_json(tmp / "state.json", state)
    for f in tmp.iterdir():  # make the data durable before the rename publishes it (DCP syncs its own files)
        if f.is_file():
            with f.open("rb") as handle:
                os.fsync(handle.fileno())
    if final.exists():
        shutil.rmtree(final)
    os.replace(tmp, final)
    pointer = directory / ".latest.tmp"
    pointer.write_text(final.name)
    os.replace(pointer, directory / "latest")
    checkpoints = sorted(p for p in directory.glob("step_*") if p.is_dir())
    for old in checkpoints[: max(0, len(checkpoints) - keep_last)]:
        shutil.rmtree(old, ignore_errors=True)
    return final


def latest_checkpoint(directory: str | Path) -> Path | None:
    """The newest complete checkpoint folder in ``directory``, or None."""
    directory = Path(directory)
    pointer = directory / "latest"
    if pointer.is_file():
        candidate = directory / pointer.read_text().strip()
        if (candidate / "state.json").is_file():
            return candidate
    complete = sorted(p for p in directory.glob("step_*") if (p / "state.json").is_file())
    return complete[-1] if complete else None


def read_sharded(folder: str | Path) -> dict[str, Any]:
    """A DCP folder read whole in this process (no collective, any world size): the nested state it was saved
    from, every DTensor as one full tensor (``{"model": ..., "optim": ..., "ema": ...}`` for a training
    checkpoint)."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.default_planner import DefaultLoadPlanner
    from torch.distributed.checkpoint.metadata import TensorStorageMetadata

    reader = dcp.FileSystemReader(str(folder))
    metadata = reader.read_metadata()
    flat: dict[str, Any] = {
        key: torch.empty(meta.size, dtype=meta.properties.dtype) if isinstance(meta, TensorStorageMetadata) else None
        for key, meta in metadata.state_dict_metadata.items()
    }  # None: a non-tensor value (e.g. the optimizer's param_groups), filled in by the planner
    planner = DefaultLoadPlanner(flatten_state_dict=False, flatten_sharded_tensors=False)  # fill ``flat`` itself
    with warnings.catch_warnings():  # "assuming the intent is to load in a single process": it is
        warnings.filterwarnings("ignore", message=".*single process", category=UserWarning)
        dcp.load(flat, storage_reader=reader, planner=planner, no_dist=True)
    # DCP saved the nested dict flattened; planner_data maps each flat key to its path (str: dict key, int: index).
    paths = metadata.planner_data or {key: (key,) for key in flat}
    nested: dict[str, Any] = {}
    for key, value in flat.items():
        _set_path(nested, paths[key], value)
    return nested


def _set_path(nested: dict, path: tuple, value: Any) -> None:
    node: Any = nested
    for depth, part in enumerate(path):
        if isinstance(node, list) and len(node) <= part:
            node.extend(None for _ in range(part + 1 - len(node)))
        if depth == len(path) - 1:
            node[part] = value
            return
        child = node[part] if isinstance(node, list) else node.get(part)
        if child is None:
            child = [] if isinstance(path[depth + 1], int) else {}
            node[part] = child
        node = child


def load_checkpoint(path: str | Path, *, tensors: bool = True) -> dict:
    """Read a checkpoint folder: trainable weights, optimizer/scheduler/sampler state, extra, and ``rng``: a list
    of (tensors, metadata) per rank (one entry for a checkpoint of the old single-state format).

    A sharded checkpoint (``sharded``: its DCP folder, else None) is read whole (:func:`read_sharded`; the
    optimizer state keyed by parameter name, and ``ema``, the average, when it was saved); ``tensors=False``
    leaves its weights, optimizer state and average out (None), for ``training.state.load_sharded``."""
    from safetensors.torch import load_file

    path = Path(path)
    if not (path / "state.json").is_file():
        raise FileNotFoundError(f"checkpoint: {path} has no state.json (not a complete checkpoint)")
    state = json.loads((path / "state.json").read_text())
    sharded = path / state["sharded"] if state.get("sharded") else None
    out = {
        "step": state["step"],
        "trainable": None,
        "scheduler": state.get("scheduler"),
        "sampler": state.get("sampler"),
        "extra": state.get("extra", {}),
        "optimizer": None,
        "ema": None,
        "rng": None,
        "sharded": sharded,
    }
    if sharded is not None:
        if tensors:
            whole = read_sharded(sharded)
            out.update(trainable=whole["model"], optimizer=whole.get("optim"), ema=whole.get("ema"))
    else:
        out["trainable"] = load_file(str(path / "trainable.safetensors"))
    if "optimizer" in state and (path / "optimizer.safetensors").is_file():
        out["optimizer"] = _unflatten_optimizer(load_file(str(path / "optimizer.safetensors")), state["optimizer"])
    if (path / "rng.safetensors").is_file():
        rng_tensors, meta = load_file(str(path / "rng.safetensors")), state["rng"]
        if "ranks" not in meta:  # the old format: the main process's states only, unprefixed
            out["rng"] = [(rng_tensors, meta)]
        else:
            per_rank: list[dict[str, torch.Tensor]] = [{} for _ in meta["ranks"]]
            for key, value in rng_tensors.items():
                rank, name = key.split(".", 1)
                per_rank[int(rank.removeprefix("rank"))][name] = value
            out["rng"] = list(zip(per_rank, meta["ranks"]))
    return out
