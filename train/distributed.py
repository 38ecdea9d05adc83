"""torch.distributed set-up for `torchrun`: NCCL on GPUs, gloo on CPU; helpers that are no-ops when alone."""
from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class DistInfo:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def init_distributed(device: torch.device) -> tuple[DistInfo, torch.device]:
    """Join the process group `torchrun` describes (RANK, WORLD_SIZE, LOCAL_RANK); alone otherwise.

    On CUDA each process takes the GPU of its local rank.
    """
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if world_size == 1:
        return DistInfo(), device
    info = DistInfo(int(os.environ["RANK"]), world_size, int(os.environ.get("LOCAL_RANK", "0")))
    if device.type == "cuda":
        device = torch.device("cuda", info.local_rank)
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return info, device


def all_agree(flag: bool, info: DistInfo, device: torch.device) -> bool:
    """True only if `flag` holds on every rank (so all ranks take the same branch)."""
    if not info.enabled:
        return flag
    t = torch.tensor([1 if flag else 0], device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MIN)
    return bool(t.item())


def all_sum(values: list[int], info: DistInfo, device: torch.device) -> list[int]:
    """Element-wise sum of `values` over the ranks (one small all-reduce)."""
    if not info.enabled:
        return list(values)
    t = torch.tensor(values, dtype=torch.int64, device=device)
    dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t.tolist()


def all_mean(t: torch.Tensor, info: DistInfo) -> torch.Tensor:
    """Element-wise mean of the float tensor `t` over the ranks (a detached copy); `t` itself when alone.

    No gradient flows through the all-reduce: for normalisers and logged values."""
    if not info.enabled:
        return t
    t = t.detach().clone()
    dist.all_reduce(t, op=dist.ReduceOp.SUM)  # gloo has no AVG
    return t / info.world_size


def gather_lists(items: list, info: DistInfo) -> list:
    """Concatenation of every rank's `items` (on every rank)."""
    if not info.enabled:
        return items
    parts = [None] * info.world_size
    dist.all_gather_object(parts, items)
    return [x for part in parts for x in part]


def broadcast(obj, info: DistInfo):
    """Rank 0's `obj` on every rank."""
    if not info.enabled:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def cleanup(info: DistInfo) -> None:
    if info.enabled and dist.is_initialized():
        dist.destroy_process_group()
