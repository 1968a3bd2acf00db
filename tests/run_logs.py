"""Reading what a training run wrote, for the tests that compare runs."""

from __future__ import annotations

import json
import socket
from pathlib import Path

# The fields of a metrics.jsonl row that differ between any two runs (wall clock), and the route
# (a string, which pytest.approx cannot compare with a relative tolerance).
UNTIMED_OUT = ("seconds", "signals_s", "signals_share", "signals_route")


def metrics(out: Path) -> list[dict]:
    return [json.loads(line) for line in (Path(out) / "metrics.jsonl").read_text().splitlines()]


def untimed(row: dict) -> dict:
    return {k: v for k, v in row.items() if k not in UNTIMED_OUT}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def interrupt_when(proc, ready, signum: int, timeout: float = 300) -> str:
    """Send `signum` to the running `proc` once ready() holds; its stderr once it has exited."""
    import time

    deadline = time.time() + timeout
    while not ready() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.01)
    assert proc.poll() is None, "the run ended before the signal: give it more work"
    proc.send_signal(signum)
    return proc.communicate(timeout=timeout)[1]


def resume_command(stderr: str, python: str) -> list[str]:
    """The command the one `Error: stopped by ...` line gives, with `python` for its interpreter."""
    import shlex

    lines = [line for line in stderr.splitlines() if line.startswith("Error: stopped by ")]
    assert len(lines) == 1, stderr
    command = shlex.split(lines[0].split("; continue with: ", 1)[1])
    assert command[:3] == ["python", "-m", command[2]] and command[-1] == "--resume", command
    return [python, *command[1:]]
