"""One process, or one rank of a torchrun job: the process group, this rank's device, rank helpers.

Shared by the build and the trainer. On CUDA the group is "cpu:gloo,cuda:nccl": DDP's gradient
buckets (CUDA tensors) go over nccl, while small CPU-side agreements (the build's "did every rank
succeed" flag) still work over gloo.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist

# A collective waits this long for the slowest rank before failing. Training ranks stay in step;
# build ranks meet only at the start and the end, hours apart on a large dataset.
TRAIN_TIMEOUT = timedelta(minutes=30)
BUILD_TIMEOUT = timedelta(hours=12)


@dataclass(frozen=True)
class World:
    rank: int = 0
    size: int = 1
    device: torch.device = torch.device("cpu")

    @property
    def main(self) -> bool:
        return self.rank == 0

    def barrier(self) -> None:
        if self.size > 1:
            dist.barrier()


def init(device: str | None = None, timeout: timedelta = TRAIN_TIMEOUT) -> World:
    """This process's place: WORLD_SIZE and LOCAL_RANK come from torchrun. `device` None means CUDA
    when there is one; with several ranks on CUDA each takes the GPU of its LOCAL_RANK."""
    size = int(os.environ.get("WORLD_SIZE", "1"))
    cuda = torch.cuda.is_available() if device is None else device.startswith("cuda")
    if size == 1:
        return World(0, 1, torch.device(device or ("cuda" if cuda else "cpu")))
    local = int(os.environ.get("LOCAL_RANK", "0"))
    if cuda:
        torch.cuda.set_device(local)
    if not dist.is_initialized():
        dist.init_process_group("cpu:gloo,cuda:nccl" if cuda else "gloo", timeout=timeout)
    return World(dist.get_rank(), size, torch.device(f"cuda:{local}" if cuda else "cpu"))
