"""The distributed story, plainly: one process, or ``torchrun`` with DDP or FSDP2 (``fully_shard``).

``init_distributed()`` reads the torchrun environment (RANK, WORLD_SIZE, LOCAL_RANK); with one process nothing
is initialised. NCCL on CUDA, gloo on CPU (so the multi-process path is testable on a laptop).
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn

__all__ = [
    "DistInfo",
    "all_gather_cat",
    "all_reduce_mean",
    "apply_fsdp",
    "all_reduce_gradients",
    "barrier",
    "broadcast_from_main",
    "cleanup",
    "gather_to_main",
    "init_distributed",
    "seed_rank_rng",
    "wrap_ddp",
]


@dataclass
class DistInfo:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")
    backend: str | None = None
    owns_group: bool = False  # init_distributed() created the process group, so cleanup() destroys it

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1


def init_distributed(device: str = "auto") -> DistInfo:
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device.startswith("cuda"):
        index = local_rank if device == "cuda" else torch.device(device).index
        torch.cuda.set_device(index)
        dev = torch.device("cuda", index)
    else:
        dev = torch.device(device)
    backend, owns_group = None, False
    if world_size > 1:
        backend = "nccl" if dev.type == "cuda" else "gloo"
        if not dist.is_initialized():  # else a caller's group (e.g. several runs in one launch) is used as is
            dist.init_process_group(backend=backend, rank=rank, world_size=world_size)
            owns_group = True
    return DistInfo(rank=rank, world_size=world_size, local_rank=local_rank, device=dev, backend=backend,
                    owns_group=owns_group)


def barrier(info: DistInfo) -> None:
    if info.enabled:
        dist.barrier()


def cleanup(info: DistInfo) -> None:
    if info.enabled and info.owns_group and dist.is_initialized():
        dist.destroy_process_group()


def all_reduce_mean(value: torch.Tensor, info: DistInfo) -> torch.Tensor:
    if not info.enabled:
        return value
    value = value.detach().clone()
    dist.all_reduce(value, op=dist.ReduceOp.SUM)
    return value / info.world_size


def all_gather_cat(value: torch.Tensor, info: DistInfo) -> torch.Tensor:
    """Concatenate a same-shaped tensor from every rank along dim 0 (rank order)."""
    if not info.enabled:
        return value
    parts = [torch.empty_like(value) for _ in range(info.world_size)]
    dist.all_gather(parts, value.contiguous())
    return torch.cat(parts, dim=0)


def all_reduce_gradients(params, info: DistInfo, bucket_bytes: int = 32 * 2**20) -> None:
    """Average the ``.grad`` of ``params`` over ranks in place (what DDP does), in buckets of at most
    ``bucket_bytes`` per dtype: the extra memory is one bucket, never a flat copy of every gradient; a gradient
    larger than a bucket is reduced in place on its own. Parameters without a gradient are passed over (every
    rank must have the same set). The sum of each element is the one a single flat all_reduce gives."""
    if not info.enabled:
        return
    buckets: dict[torch.dtype, list[tuple[int, list[torch.Tensor]]]] = {}  # per dtype: (bytes, gradients)
    for grad in (p.grad for p in params if p.grad is not None):
        size = grad.numel() * grad.element_size()
        if size >= bucket_bytes and grad.is_contiguous():
            dist.all_reduce(grad, op=dist.ReduceOp.SUM)  # alone, in place
            grad.div_(info.world_size)
            continue
        per_dtype = buckets.setdefault(grad.dtype, [(0, [])])
        filled, bucket = per_dtype[-1]
        if bucket and filled + size > bucket_bytes:
            filled, bucket = 0, []
            per_dtype.append((filled, bucket))
        bucket.append(grad)
        per_dtype[-1] = (filled + size, bucket)
    for bucket in (b for per_dtype in buckets.values() for _, b in per_dtype if b):
        flat = torch.cat([g.reshape(-1) for g in bucket])
        dist.all_reduce(flat, op=dist.ReduceOp.SUM)
        flat /= info.world_size
        offset = 0
        for grad in bucket:
            grad.copy_(flat[offset : offset + grad.numel()].view_as(grad))
            offset += grad.numel()


def broadcast_from_main(value, info: DistInfo):
    """The main process's picklable ``value`` on every rank (a collective: every rank calls it)."""
    if not info.enabled:
        return value
    box = [value]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def gather_to_main(value, info: DistInfo) -> list | None:
    """Every rank's picklable ``value`` as a list in rank order on the main process (None on the others);
    ``[value]`` with one process. A collective: every rank must call it."""
    if not info.enabled:
        return [value]
    gathered = [None] * info.world_size if info.is_main else None
    dist.gather_object(value, gathered, dst=0)
    return gathered


def seed_rank_rng(seed: int, info: DistInfo) -> None:
    """Under torchrun, give each rank its own global torch RNG stream, seeded by (seed, rank), once the model
    has been built identically on every rank (FSDP2 shards each rank's own copy, so the initialisation, LoRA
    included, must not differ). Only LoRA dropout draws from it in training: with one shared seed every rank
    would draw the same masks whenever the shapes agree. One process keeps its stream as it is."""
    if info.enabled:
        torch.manual_seed((seed * 1_000_003 + info.rank * 7_919 + 1) % (2**63))


def wrap_ddp(module: nn.Module, info: DistInfo) -> nn.Module:
    """DDP with ``find_unused_parameters=False`` (no extra graph walk each step): every trainable parameter
    must reach the loss on every step. That holds by construction: ``apply_lora`` leaves out the VLM layers
    the bridge never reads (the one place the official model has trainable weights without a gradient)."""
    from torch.nn.parallel import DistributedDataParallel

    device_ids = [info.device.index] if info.device.type == "cuda" else None
    return DistributedDataParallel(module, device_ids=device_ids, broadcast_buffers=False, find_unused_parameters=False)


def apply_fsdp(module: nn.Module, shard_units: list[nn.Module], info: DistInfo, *, param_dtype=None,
               ignored: list[nn.Module] | None = None) -> nn.Module:
    """FSDP2: shard each unit (e.g. each DiT block, each connector layer), then the root. ``ignored`` modules
    stay whole on every rank: those that run outside the wrapped forward (the VAE encodes in prepare_batch)."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    mesh = init_device_mesh(info.device.type, (info.world_size,))
    policy = MixedPrecisionPolicy(param_dtype=param_dtype, reduce_dtype=torch.float32) if param_dtype else MixedPrecisionPolicy()
    for unit in shard_units:
        fully_shard(unit, mesh=mesh, mp_policy=policy)
    ignored_params = {p for m in ignored or [] for p in m.parameters()}
    fully_shard(module, mesh=mesh, mp_policy=policy, ignored_params=ignored_params or None)
    return module
