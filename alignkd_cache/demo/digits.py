"""The demo's question-answering set, built from real scanned handwritten digits.

scikit-learn's `load_digits` holds 1797 real 8x8 scans. Four scans are composed into a 2x2 grid
and each grid gets questions that can only be answered by looking at the right part of the image:
which digit sits at a position, whether a digit is present, how many times a digit occurs.
Answers are one short word ("7", "yes", "2").

The scans are split into train / val / test pools *before* any grid is composed, so no held-out
image contains a scan the training split has seen. Everything is a pure function of the seed.

Output (LLaVA format): `OUT/{split}.json` plus `OUT/images/{split}/NNNNN.png`. Each record also
carries its grid's `labels` (reading order) and source `scans`, which the data layer ignores and
which let tests and per-kind scoring check an answer against the picture.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
from PIL import Image

POSITIONS = ("top-left", "top-right", "bottom-left", "bottom-right")  # reading order of the grid
KINDS = ("position", "presence", "count")
SPLIT_FRACTIONS = {"train": 0.6, "val": 0.2, "test": 0.2}


def position_question(position: str) -> str:
    return f"Which digit is {position}?"


def presence_question(digit: int) -> str:
    return f"Is there a {digit} in the image?"


def count_question(digit: int) -> str:
    return f"How many {digit}s are there?"


def corpus() -> list[str]:
    """Every question and answer the set can contain, for training the demo's tokenizer on."""
    lines = [position_question(p) for p in POSITIONS]
    lines += [presence_question(d) for d in range(10)] + [count_question(d) for d in range(10)]
    return lines + ["yes no 0 1 2 3 4 5 6 7 8 9"]


def load_scans() -> tuple[np.ndarray, np.ndarray]:
    """(1797, 8, 8) ink intensities in [0, 16] and their labels; needs the `demo` extra."""
    try:
        from sklearn.datasets import load_digits
    except ImportError as e:
        raise ImportError("the demo needs scikit-learn: pip install 'alignkd-cache[demo]'") from e
    digits = load_digits()
    return digits.images.astype(np.float32), digits.target.astype(np.int64)


def split_scans(
    labels: np.ndarray, seed: int, fractions: dict[str, float] = SPLIT_FRACTIONS
) -> dict[str, np.ndarray]:
    """Partition scan indices per class (so every split has every digit); disjoint by construction."""
    rng = np.random.default_rng([seed, 0])
    names = list(fractions)
    pools: dict[str, list[int]] = {name: [] for name in names}
    for digit in range(10):
        idx = rng.permutation(np.flatnonzero(labels == digit))
        cuts = np.round(np.cumsum([fractions[n] for n in names]) / sum(fractions.values()) * len(idx)).astype(
            int
        )
        for name, lo, hi in zip(names, [0, *cuts[:-1]], cuts, strict=True):
            pools[name] += idx[lo:hi].tolist()
    return {name: np.array(sorted(pool), dtype=np.int64) for name, pool in pools.items()}


def compose(scans: np.ndarray, cell: int) -> Image.Image:
    """Four 8x8 scans (reading order) -> one RGB image, dark ink on white, `cell` pixels per digit."""
    tiles = [
        Image.fromarray((255 - scan * (255 / 16)).round().astype(np.uint8), mode="L").resize(
            (cell, cell), Image.Resampling.BILINEAR
        )
        for scan in scans
    ]
    canvas = Image.new("L", (2 * cell, 2 * cell), 255)
    for i, tile in enumerate(tiles):
        canvas.paste(tile, ((i % 2) * cell, (i // 2) * cell))
    return canvas.convert("RGB")


def grid_labels(rng: np.random.Generator) -> list[int]:
    """Four digits drawn from a small palette, so repeats (and counts above 1) are common."""
    palette = rng.choice(10, size=int(rng.integers(2, 5)), replace=False)
    return [int(d) for d in rng.choice(palette, size=4)]


def ask(kind: str, labels: list[int], rng: np.random.Generator) -> tuple[str, str]:
    """One question of `kind` about a grid, and its answer. Presence is balanced yes/no."""
    present = sorted(set(labels))
    absent = [d for d in range(10) if d not in present]
    if kind == "position":
        i = int(rng.integers(4))
        return position_question(POSITIONS[i]), str(labels[i])
    if kind == "presence":
        digit = int(rng.choice(present if rng.random() < 0.5 else absent))
        return presence_question(digit), "yes" if digit in labels else "no"
    if kind == "count":
        digit = int(rng.choice(present if rng.random() < 0.8 else absent))
        return count_question(digit), str(labels.count(digit))
    raise ValueError(f"unknown question kind {kind!r}; choose one of {KINDS}")


def build_split(
    name: str,
    pool: np.ndarray,
    scans: np.ndarray,
    labels: np.ndarray,
    out_dir: Path,
    n_images: int,
    seed: int,
    cell: int,
) -> Path:
    """Compose `n_images` grids from `pool` and ask one question of each kind about each."""
    rng = np.random.default_rng([seed, 1, list(SPLIT_FRACTIONS).index(name)])
    by_digit = {d: pool[labels[pool] == d] for d in range(10)}
    image_dir = out_dir / "images" / name
    image_dir.mkdir(parents=True, exist_ok=True)
    records = []
    for i in range(n_images):
        grid = grid_labels(rng)
        chosen = [int(rng.choice(by_digit[d])) for d in grid]
        rel = f"images/{name}/{i:05d}.png"
        compose(scans[chosen], cell).save(out_dir / rel)
        for kind in KINDS:
            question, answer = ask(kind, grid, rng)
            records.append(
                {
                    "id": f"{name}-{i:05d}-{kind}",
                    "image": rel,
                    "conversations": [
                        {"from": "human", "value": f"<image>\n{question}"},
                        {"from": "gpt", "value": answer},
                    ],
                    "kind": kind,
                    "labels": grid,
                    "scans": chosen,
                }
            )
    path = out_dir / f"{name}.json"
    path.write_text(json.dumps(records, indent=1))
    return path


def build_digits_vqa(
    out_dir: str | Path, sizes: dict[str, int], seed: int = 0, cell: int = 16
) -> dict[str, Path]:
    """Write the set; `sizes` maps split name (train, val, test) to its number of images."""
    unknown = set(sizes) - set(SPLIT_FRACTIONS)
    if unknown:
        raise ValueError(f"unknown splits {sorted(unknown)}; choose from {list(SPLIT_FRACTIONS)}")
    out_dir = Path(out_dir)
    scans, labels = load_scans()
    pools = split_scans(labels, seed)
    return {
        name: build_split(name, pools[name], scans, labels, out_dir, n, seed, cell)
        for name, n in sizes.items()
    }
