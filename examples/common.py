"""What both examples share: their command line and the per-step terms file the tests compare."""

from __future__ import annotations

import argparse
import json
from pathlib import Path


def arguments(description: str, argv=None, **extra: dict) -> argparse.Namespace:
    """--student --cache --image-root --out and the step's shape (as `alignkd-train from-cache`);
    `extra`: more options, name -> add_argument keywords."""
    p = argparse.ArgumentParser(description=description)
    p.add_argument("--student", required=True)
    p.add_argument("--cache", required=True)
    p.add_argument("--image-root", default=None)
    p.add_argument("--out", required=True)
    p.add_argument("--batch-size", type=int, default=2)
    p.add_argument("--grad-accum", type=int, default=1)
    p.add_argument("--max-steps", type=int, default=2)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--cpu", action="store_true")
    for name, kwargs in extra.items():
        p.add_argument(name, **kwargs)
    return p.parse_args(argv)


def write_terms(out: str, steps: list[dict]) -> None:
    """OUT/terms.jsonl: one line per optimizer step, {step, loss, ce, ...} as metrics.jsonl names them."""
    Path(out).mkdir(parents=True, exist_ok=True)
    lines = [json.dumps({"step": i, **terms}) + "\n" for i, terms in enumerate(steps, start=1)]
    (Path(out) / "terms.jsonl").write_text("".join(lines))
