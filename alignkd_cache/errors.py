"""The project's own error classes that several layers raise and the CLI words (cli/errors.py):
bad input, shared by the data layer and the store (which must not import the data layer), and a
torchrun rank stopped by another rank's failure. Kept free of torch, so the CLI starts fast."""

from __future__ import annotations


class DataError(ValueError):
    """Bad input. The message names the file, line or sample and says what to fix; `reason` is the
    short kind of problem the pre-flight report counts."""

    def __init__(self, message: str, reason: str = "bad record"):
        super().__init__(message)
        self.reason = reason


class PeerFailed(RuntimeError):
    """Under torchrun: this rank stopped because another rank failed a step that every rank shares
    (distributed.World.agreed); that rank's own error says why."""


class OutputNotEmpty(Exception):
    """A new run's --out already holds something (a finished run, another run's files)."""
