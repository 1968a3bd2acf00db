"""Ctrl-C (SIGINT) and a scheduler's pre-emption (SIGTERM) stop a long run where it can resume.

While a build or a training loop runs, either signal only records itself; the loop checks at its next
safe point (a training step, a cache block), saves what it has, and raises Interrupted, which the CLI
prints as one line with the command that resumes the run and exits 128 + the signal's number (130,
143), as a shell reports a process killed by it. A second Ctrl-C while saving stops at once.
"""

from __future__ import annotations

import shlex
import signal
import sys
import threading
from contextlib import contextmanager
from pathlib import Path

STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)


class Interrupted(Exception):
    """A run stopped by a signal after saving its state; `exit_code` is 128 + the signal's number."""

    def __init__(self, signum: int, message: str):
        super().__init__(message)
        self.exit_code = 128 + signum


class StopRequest:
    """The first stop signal received, if any (a signal number, or 0)."""

    def __init__(self):
        self.signum = 0

    def _record(self, signum, _frame):
        if self.signum == signal.SIGINT and signum == signal.SIGINT:
            raise KeyboardInterrupt  # asked twice: stop now
        self.signum = self.signum or signum

    def agreed(self, world) -> int:
        """The signal any rank received (every rank must stop at the same step)."""
        if world.size == 1:
            return self.signum
        import torch  # here: the CLI imports this module to word its errors, and starts without torch
        import torch.distributed as dist

        flag = torch.tensor([self.signum])  # a CPU tensor: gloo carries it, even beside nccl
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        return int(flag)


@contextmanager
def stop_requests():
    """A StopRequest that SIGINT and SIGTERM set while the block runs (handlers restored after). Off
    the main thread, where Python cannot take signals, it never fires."""
    request = StopRequest()
    if threading.current_thread() is not threading.main_thread():
        yield request
        return
    previous = {s: signal.signal(s, request._record) for s in STOP_SIGNALS}
    try:
        yield request
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)


def interrupted(signum: int, where: str, saved: str) -> Interrupted:
    """The error a stopped run raises: which signal, where it stopped, what was saved, how to resume."""
    return Interrupted(
        signum,
        f"stopped by {signal.Signals(signum).name} {where}; {saved}; continue with: {resume_command()}",
    )


def resume_command() -> str:
    """This process's command line with --resume (once)."""
    spec = getattr(sys.modules["__main__"], "__spec__", None)
    program = ["python", "-m", spec.name] if spec is not None else [Path(sys.argv[0]).name]  # -m or a script
    args = [*program, *sys.argv[1:]]
    return shlex.join(args if "--resume" in args else [*args, "--resume"])
