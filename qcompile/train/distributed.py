"""Data parallelism through PyTorch's own engine: ``torchrun`` sets the environment, each process joins the
process group (NCCL on GPUs, gloo on CPU) and trains its shard under DistributedDataParallel."""

from __future__ import annotations

import os
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class DistContext:
    """This process's place in the job: rank, world size, and the device it trains on."""

    rank: int = 0
    world: int = 1
    device: torch.device = torch.device("cpu")

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world > 1

    def barrier(self) -> None:
        if self.distributed:
            dist.barrier()


def default_device(requested: str | None = None) -> torch.device:
    """``requested``, else CUDA when there is a GPU, else the CPU."""
    if requested:
        return torch.device(requested)
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def init_from_env(requested_device: str | None = None) -> DistContext:
    """Join the process group ``torchrun`` describes (``WORLD_SIZE`` > 1), or run as a single process."""
    device = default_device(requested_device)
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return DistContext(device=device)
    local = int(os.environ.get("LOCAL_RANK", "0"))
    if device.type == "cuda":
        device = torch.device("cuda", local)
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        # generous: the other processes wait while the main one lowers, evaluates and verifies a model
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo", timeout=timedelta(hours=2))
    return DistContext(rank=dist.get_rank(), world=dist.get_world_size(), device=device)


def mean_across(value: float, ctx: DistContext) -> float:
    """The mean of a per-process number over the job."""
    if not ctx.distributed:
        return value
    t = torch.tensor([value], dtype=torch.float64, device=ctx.device if ctx.device.type == "cuda" else "cpu")
    dist.all_reduce(t)
    return float(t) / ctx.world
