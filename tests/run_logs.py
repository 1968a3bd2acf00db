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
