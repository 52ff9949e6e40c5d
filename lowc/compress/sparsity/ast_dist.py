"""Distributed helpers for AST: FSDP2 sharding, sharded <-> full tensors, the per-rank batch split.

When `torch.distributed` is initialised (`torchrun --nproc-per-node G ...`), AST shards the student and the teacher
with FSDP2 (`torch.distributed.fsdp.fully_shard`) one decoder layer at a time, then the root module. Parameters
become DTensors sharded on dim 0 (rows); masks stay full, unsharded buffers (forward sees unsharded weights).
Everything here also works without torch.distributed (world size 1, plain tensors), so single-process AST runs the
same code. FSDP2 runs on CPU with the gloo backend in torch 2.13, which is how the tests exercise this path.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn


def is_distributed() -> bool:
    return dist.is_available() and dist.is_initialized()


def rank() -> int:
    return dist.get_rank() if is_distributed() else 0


def world_size() -> int:
    return dist.get_world_size() if is_distributed() else 1


def barrier() -> None:
    if is_distributed():
        dist.barrier()


def is_dtensor(t: torch.Tensor) -> bool:
    from torch.distributed.tensor import DTensor

    return isinstance(t, DTensor)


def full(t: torch.Tensor) -> torch.Tensor:
    """The whole tensor (all-gathered when sharded: a collective, so every rank must call it in the same order)."""
    return t.full_tensor() if is_dtensor(t) else t


def local(t: torch.Tensor) -> torch.Tensor:
    """This rank's shard of a (possibly sharded) tensor, as a plain tensor that aliases the storage."""
    return t.to_local() if is_dtensor(t) else t


def local_rows(whole: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """The rows of `whole` that this rank holds of a tensor sharded like `like` (FSDP2: torch.chunk on dim 0)."""
    if not is_dtensor(like):
        return whole
    part = torch.chunk(whole, world_size(), dim=0)
    mine = part[rank()] if rank() < len(part) else whole[:0]
    shape = like.to_local().shape
    if tuple(mine.shape) != tuple(shape):
        raise RuntimeError(f"unexpected FSDP shard shape {tuple(shape)} for a tensor of {tuple(whole.shape)}")
    return mine


def assign_full(param: torch.Tensor, value: torch.Tensor) -> None:
    """Copy a full tensor into a (possibly sharded) parameter in place."""
    with torch.no_grad():
        local(param).copy_(local_rows(value.to(local(param).device), param))


def like_param(param: torch.Tensor, value: torch.Tensor) -> torch.Tensor:
    """A tensor placed like `param` (DTensor with the same mesh and placements when sharded) holding full `value`."""
    if not is_dtensor(param):
        return value.to(device=param.device)
    from torch.distributed.tensor import DTensor

    rows = local_rows(value.to(param.to_local().device), param).contiguous()
    return DTensor.from_local(rows, param.device_mesh, param.placements, run_check=False,
                              shape=param.shape, stride=param.stride())


def shard(model: nn.Module, layers: list[nn.Module], device: torch.device) -> None:
    """FSDP2-shard `model` in place: each decoder layer is its own unit, the root holds the rest."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    mesh = init_device_mesh(device.type, (world_size(),))
    for layer in layers:
        fully_shard(layer, mesh=mesh)
    fully_shard(model, mesh=mesh)


def split_batch(indices: torch.Tensor) -> torch.Tensor:
    """This rank's part of a global batch (DistributedSampler's interleaved split: rank r takes r, r+W, ...)."""
    w = world_size()
    if len(indices) % w:
        raise ValueError(f"global batch {len(indices)} is not divisible by the world size {w}")
    return indices[rank()::w]


def mean_across_ranks(values: list[float], device: torch.device) -> list[float]:
    """Average a few scalars over ranks (for logging; every rank gets the result)."""
    if not is_distributed():
        return values
    t = torch.tensor(values, dtype=torch.float64, device=device)
    dist.all_reduce(t)
    return (t / world_size()).tolist()


__all__ = ["is_distributed", "rank", "world_size", "barrier", "full", "local", "local_rows", "assign_full",
           "like_param", "shard", "split_batch", "mean_across_ranks"]
