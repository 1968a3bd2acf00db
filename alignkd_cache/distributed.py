"""One process, or one rank of a torchrun job: the process group, this rank's device, rank helpers.

Shared by the build and the trainer. On CUDA the group is "cpu:gloo,cuda:nccl": DDP's gradient
buckets (CUDA tensors) go over nccl, while small CPU-side agreements (`World.agreed`'s "did every
rank succeed" flag) still work over gloo.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Callable
from dataclasses import dataclass
from datetime import timedelta
from typing import TypeVar

import torch
import torch.distributed as dist

from alignkd_cache.errors import PeerFailed

# A collective waits this long for the slowest rank before failing. Training ranks stay in step;
# build ranks meet only at the start and the end, hours apart on a large dataset.
TRAIN_TIMEOUT = timedelta(minutes=30)
BUILD_TIMEOUT = timedelta(hours=12)
PEER_EXIT_WAIT = timedelta(minutes=1)

T = TypeVar("T")


@dataclass(frozen=True)
class World:
    rank: int = 0
    size: int = 1
    device: torch.device = torch.device("cpu")

    @property
    def main(self) -> bool:
        return self.rank == 0

    def agreed(self, what: str, step: Callable[[], T] | None) -> T | None:
        """step() on this rank (None: nothing to do here), then every rank learns whether all
        succeeded. Returns step's result (None where there was no step). A rank that failed raises
        its own error and the others raise PeerFailed, so that no rank waits in a later collective
        for one that has stopped (it would wait out the timeout, or die with a transport traceback)."""
        error, result = None, None
        try:
            if step is not None:
                result = step()
        except Exception as e:
            error = e
        failed = error is not None
        if self.size > 1:
            flag = torch.tensor([int(failed)])  # a CPU tensor: gloo carries it, even beside nccl
            dist.all_reduce(flag)
            failed = bool(flag)
        if error is not None:
            raise error
        if failed:
            self._outlive_failed_rank()
            raise PeerFailed(f"rank {self.rank}: another rank failed {what}; that rank's error says why")
        return result

    @staticmethod
    def _outlive_failed_rank() -> None:
        """Wait until a failed rank has exited, so that it prints its error first: torchrun stops
        every rank as soon as one exits. The failed rank never joins this collective, which ends when
        its process does (gloo sees the connection close), or after PEER_EXIT_WAIT."""
        with contextlib.suppress(RuntimeError):  # the expected end: the peer has gone
            dist.all_reduce(torch.zeros(1), async_op=True).wait(timeout=PEER_EXIT_WAIT)


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
