"""Data-parallel plumbing: the same training code runs alone or under ``torchrun``.

Under ``torchrun`` (WORLD_SIZE > 1) each process joins a process group (gloo on CPU, NCCL on
CUDA), wraps its model in DistributedDataParallel and trains on its own shard of every epoch's
seeded permutation. Gradients are averaged by DDP, so every rank holds identical weights.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import numpy as np
import torch
import torch.distributed as dist


@dataclass(frozen=True)
class Distributed:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def shard(self, permutation: np.ndarray) -> np.ndarray:
        """This rank's slice of a permutation; every rank gets the same number of rows (DDP needs
        the same number of steps), so up to world_size - 1 trailing rows are dropped."""
        per_rank = permutation.size // self.world_size
        return permutation[self.rank * per_rank:(self.rank + 1) * per_rank]

    def wrap(self, model: torch.nn.Module, device: torch.device) -> torch.nn.Module:
        if not self.enabled:
            return model
        ids = [device.index] if device.type == "cuda" else None
        return torch.nn.parallel.DistributedDataParallel(model, device_ids=ids)

    def all_reduce_mean(self, value: float) -> float:
        if not self.enabled:
            return value
        tensor = torch.tensor([value], dtype=torch.float64)
        dist.all_reduce(tensor)
        return float(tensor.item()) / self.world_size

    def barrier(self) -> None:
        if self.enabled:
            dist.barrier()


def init_distributed(device: torch.device) -> Distributed:
    """Joins the process group when launched by torchrun; a no-op for a single process."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if world_size <= 1:
        return Distributed()
    if not dist.is_initialized():
        dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo")
    return Distributed(rank=dist.get_rank(), world_size=dist.get_world_size(),
                       local_rank=int(os.environ.get("LOCAL_RANK", "0")))


def shutdown_distributed(ctx: Distributed) -> None:
    if ctx.enabled and dist.is_initialized():
        dist.destroy_process_group()


def resolve_device(name: str, ctx_local_rank: int = 0) -> torch.device:
    """``cpu``, ``cuda`` (fails when absent) or ``auto`` (CUDA when present)."""
    if name == "cuda" or (name == "auto" and torch.cuda.is_available()):
        if not torch.cuda.is_available():
            raise ValueError("run.device is 'cuda' but torch sees no CUDA device; use 'cpu' or 'auto'")
        return torch.device("cuda", ctx_local_rank)
    return torch.device("cpu")
