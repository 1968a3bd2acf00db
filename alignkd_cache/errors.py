"""The project's error for bad input, shared by the data layer and the store (which must not import
the data layer): the CLI turns it into one line and exit code 3."""

from __future__ import annotations


class DataError(ValueError):
    """Bad input. The message names the file, line or sample and says what to fix; `reason` is the
    short kind of problem the pre-flight report counts."""

    def __init__(self, message: str, reason: str = "bad record"):
        super().__init__(message)
        self.reason = reason
