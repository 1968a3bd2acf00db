"""What opening an untrusted cache costs at scale: `info`, a reader's open (the full trust check),
`from-cache` start to the end of its first step (tiny student), and `verify` per sample (--jobs 1
and 2), each in a fresh process, timed and with its peak RSS; then the growth exponent of each.

Caches are written through the real writer, block by block (memory: one block), with the
synthetic samples of tests/store_synthetic.py (tiny signal shapes: the cost of opening follows
samples, tokens and blocks, not signal bytes), 64 samples per block as a build's default. Their
images come from a pool of real files, so the trainer can read them; the root attributes carry the
tiny student's tokenizer hash.

    python benchmarks/open_cost.py --dir /tmp/scale --samples 10000 100000 1000000 [--verify-max 100000]
        [--repeats 3] [--before CHECKOUT_OF_EARLIER_CODE]

Each measure runs --repeats times, interleaved over the sizes, and the run with the median CPU
time is reported.

Caches already in --dir are reused, and an interrupted write resumes at its first uncommitted block
(1M samples take about 40 minutes on 2 idle cores).
"""

from __future__ import annotations

import argparse
import json
import math
import multiprocessing
import shutil
import subprocess
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

from store_synthetic import attrs_for, plan_visual_rows, synthetic_results  # noqa: E402

from alignkd_cache.store.finalize import finalize  # noqa: E402
from alignkd_cache.store.location import Location  # noqa: E402
from alignkd_cache.store.manifest import part_key  # noqa: E402
from alignkd_cache.store.writer import write_block  # noqa: E402

BLOCK_SIZE = 64
BASELINE = "baseline: alignkd-cache --version"
IMAGES = 64  # distinct image files; pairs of samples share one, as in store_synthetic
IMAGE_SIDE = 12  # the tiny student's vision input: (12 / 4)^2 = 9 visual tokens, the cache's N_v


def student_and_images(work: Path) -> tuple[Path, Path, list[str], str]:
    """A tiny LLaVA student with the caches' 9 visual tokens, a pool of images and their content
    keys, and the student's tokenizer hash (the caches record it)."""
    from alignkd_cache.backends.checkpoint import tokenizer_sha256
    from alignkd_cache.backends.tokenizer import load_tokenizer
    from alignkd_cache.images import load_image
    from alignkd_cache.tiny import build_tiny_llava, build_tokenizer

    student, root = work / "student", work / "images"
    if not (student / "config.json").exists():
        build_tokenizer(work / "tokenizer")
        build_tiny_llava(student, work / "tokenizer", layers=1, hidden=32, heads=2, image_size=IMAGE_SIDE)
    root.mkdir(parents=True, exist_ok=True)
    rng, keys = np.random.default_rng(0), []
    pad = tuple(attrs_for()["preprocessing"]["image"]["pad_color"])
    for i in range(IMAGES):
        path = root / f"img{i}.png"
        if not path.exists():
            Image.fromarray(rng.integers(0, 256, (IMAGE_SIDE, IMAGE_SIDE, 3), dtype=np.uint8)).save(path)
        keys.append(load_image(path, f"img{i}", pad)[1])
    # A sample's second image is `extra.png`, keyed as the pool's last image (store_synthetic).
    (root / "extra.png").write_bytes((root / f"img{IMAGES - 1}.png").read_bytes())
    return student, root, keys, tokenizer_sha256(load_tokenizer(student))


def write_scale_cache(url: str, n: int, image_keys: list[str], tokenizer: str, jobs: int) -> None:
    """n synthetic samples through the real writer, then finalize. Blocks are independent (as a
    multi-rank build's), so `jobs` processes write runs of them, one block in memory at a time."""
    attrs = attrs_for(block_size=BLOCK_SIZE) | {"tokenizer_sha256": tokenizer}
    loc = Location(url)
    loc.group("a").attrs.update(attrs)
    num_blocks = -(-n // BLOCK_SIZE)
    runs = [range(b, min(num_blocks, b + 256)) for b in range(0, num_blocks, 256)]
    with ProcessPoolExecutor(jobs, mp_context=multiprocessing.get_context("spawn")) as pool:
        list(
            pool.map(
                write_blocks,
                [url] * len(runs),
                [n] * len(runs),
                runs,
                [image_keys] * len(runs),
                [attrs] * len(runs),
            )
        )
    finalize(loc, attrs, n, num_blocks)


def write_blocks(url: str, n: int, blocks: range, image_keys: list[str], attrs: dict) -> None:
    loc = Location(url)
    for b in blocks:
        if loc.exists(part_key(b)):  # committed by an earlier, interrupted run
            continue
        start = b * BLOCK_SIZE
        results = synthetic_results(min(BLOCK_SIZE, n - start), seed=b, start=start, image_keys=image_keys)
        plan_visual_rows(results, BLOCK_SIZE)
        write_block(loc, b, results, attrs)


# Runs the command and prints its children's CPU seconds and peak RSS (KiB). A child's peak RSS
# counts the pages of the process that forked it, so the command is started from this small
# interpreter (no site, a few MB), not from the benchmark, which holds torch and a model.
LAUNCHER = (
    "import resource, subprocess, sys\n"
    "code = subprocess.run(sys.argv[1:], stdout=subprocess.DEVNULL).returncode\n"
    "u = resource.getrusage(resource.RUSAGE_CHILDREN)\n"
    "print(u.ru_utime + u.ru_stime, u.ru_maxrss)\n"
    "sys.exit(code)"
)


def measure(command: list[str]) -> tuple[float, float, float]:
    """(wall seconds, CPU seconds, peak RSS in GB) of a fresh process running `command` (with its
    children); it must succeed. CPU time is the figure to compare on a shared, loaded machine."""
    start = time.perf_counter()
    done = subprocess.run([sys.executable, "-S", "-c", LAUNCHER, *command], capture_output=True, text=True)
    seconds = time.perf_counter() - start
    if done.returncode != 0:
        raise RuntimeError(f"{command} failed: {done.stderr[-2000:]}")
    cpu, rss = done.stdout.split()
    return seconds, float(cpu), int(rss) / 2**20  # KiB -> GiB


def commands(url: str, student: Path, images: Path, out: Path) -> dict[str, list[str]]:
    bin_dir = Path(sys.executable).parent
    return {
        BASELINE: [str(bin_dir / "alignkd-cache"), "--version"],
        "info": [str(bin_dir / "alignkd-cache"), "info", url, "--json"],
        "reader open": reader_open(url, Path(__file__).resolve().parents[1]),
        "from-cache to first step": [
            str(bin_dir / "alignkd-train"),
            "from-cache",
            "--student",
            str(student),
            "--cache",
            url,
            "--image-root",
            str(images),
            "--out",
            str(out),
            "--max-steps",
            "1",
            "--batch-size",
            "4",
        ],  # fmt: skip
        "verify --jobs 1": [str(bin_dir / "alignkd-cache"), "verify", url, "--jobs", "1"],
        "verify --jobs 2": [str(bin_dir / "alignkd-cache"), "verify", url, "--jobs", "2"],
    }


def exponent(sizes: list[int], values: list[float]) -> float:
    """The least-squares slope of log(value) on log(size)."""
    return float(np.polyfit(np.log(sizes), np.log(values), 1)[0]) if len(sizes) > 1 else math.nan


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--dir", type=Path, required=True, help="Where caches are written and kept.")
    parser.add_argument("--samples", type=int, nargs="+", default=[10_000, 100_000])
    parser.add_argument("--verify-max", type=int, default=100_000, help="Verify only caches up to this size.")
    parser.add_argument("--write-only", action="store_true")
    parser.add_argument("--write-jobs", type=int, default=2, help="Processes that write a cache's blocks.")
    parser.add_argument(
        "--repeats", type=int, default=3, help="Interleaved runs of each measure (verify: 1)."
    )
    parser.add_argument(
        "--before", type=Path, help="A checkout of earlier code: its reader open is measured alongside."
    )
    parser.add_argument("--before-max", type=int, default=1_000_000, help="Measure --before up to this size.")
    a = parser.parse_args()
    a.dir.mkdir(parents=True, exist_ok=True)
    student, images, keys, tokenizer = student_and_images(a.dir)
    for n in a.samples:
        url = str(a.dir / f"c{n}.zarr")
        if not (Path(url) / "manifest.parquet").exists():
            started = time.perf_counter()
            write_scale_cache(url, n, keys, tokenizer, a.write_jobs)
            print(f"wrote {n} samples in {time.perf_counter() - started:.0f} s", flush=True)
    if a.write_only:
        return
    runs: dict[str, dict[int, list[tuple[float, float, float]]]] = {}
    for repeat in range(a.repeats):  # interleaved: each repeat runs every measure at every size
        for n in a.samples:
            url = str(a.dir / f"c{n}.zarr")
            measures = commands(url, student, images, a.dir / f"run{n}")
            if a.before is not None and n <= a.before_max:
                measures[f"reader open ({a.before.name})"] = reader_open(url, a.before)
            for name, command in measures.items():
                if name.startswith("verify") and (n > a.verify_max or repeat > 0):
                    continue
                shutil.rmtree(a.dir / f"run{n}", ignore_errors=True)  # from-cache's --out: a new run
                runs.setdefault(name, {}).setdefault(n, []).append(measure(command))
                print(name, n, runs[name][n][-1], flush=True)
    manifest_bytes = {n: (a.dir / f"c{n}.zarr" / "manifest.parquet").stat().st_size for n in a.samples}
    report(
        {name: {n: median(values) for n, values in by_size.items()} for name, by_size in runs.items()},
        manifest_bytes,
    )


def reader_open(url: str, tree: Path) -> list[str]:
    code = f"import sys; sys.path.insert(0, {str(tree)!r}); from alignkd_cache.store.reader import CacheReader; CacheReader({url!r})"
    return [sys.executable, "-c", code]


def median(values: list[tuple[float, float, float]]) -> tuple[float, float, float]:
    """The run with the median CPU time (wall, CPU and RSS of one run, not mixed)."""
    return sorted(values, key=lambda v: v[1])[len(values) // 2]


def growth(by_size: dict[int, tuple[float, float, float]], k: int) -> float:
    """The growth exponent of measure k (1: CPU, 2: RSS) above its smallest run, over the larger."""
    first, *larger = sorted(by_size)
    return exponent(larger, [max(1e-3, by_size[n][k] - by_size[first][k]) for n in larger])


def report(results: dict[str, dict[int, tuple[float, float, float]]], manifest_bytes: dict[int, int]) -> None:
    """A markdown table: wall time, CPU time and peak RSS per size (verify: CPU per sample), and the
    growth exponents of CPU time and RSS above each measure's smallest run (its fixed cost: the
    interpreter, its imports, a model), fitted over the larger sizes; then each measure's peak RSS
    per sample from its smallest to its largest run, beyond the manifest file's own bytes."""
    baseline = results.pop(BASELINE, {})
    base_cpu = min((v[1] for v in baseline.values()), default=0.0)
    base_rss = min((v[2] for v in baseline.values()), default=0.0)
    sizes = sorted({n for by_size in results.values() for n in by_size})
    print(f"Baseline (`alignkd-cache --version`): {base_cpu:.1f} s CPU, {base_rss:.2f} GB.\n")
    print("| measure | " + " | ".join(f"{n:,} samples" for n in sizes) + " | exponents: CPU, RSS |")
    print("|---|" + "---|" * (len(sizes) + 1))
    for name, by_size in results.items():
        cells = []
        for n in sizes:
            if n not in by_size:
                cells.append("-")
                continue
            wall, cpu, gb = by_size[n]
            per = f" = {cpu / n * 1e6:.0f} us/sample" if name.startswith("verify") else ""
            cells.append(f"{wall:.1f} s wall, {cpu:.1f} s CPU{per}, {gb:.2f} GB")
        exponents = ", ".join(f"{growth(by_size, k):.2f}" for k in (1, 2))  # CPU, RSS
        print(f"| {name} | " + " | ".join(cells) + f" | {exponents} |")
    print()
    for name, by_size in results.items():
        first, last = min(by_size), max(by_size)
        grown = (by_size[last][2] - by_size[first][2]) * 2**30 - (
            manifest_bytes[last] - manifest_bytes[first]
        )
        print(f"{name}: {grown / (last - first):.0f} B per sample of peak RSS beyond the manifest file's")
    print(json.dumps({name: {str(n): v for n, v in by_size.items()} for name, by_size in results.items()}))


if __name__ == "__main__":
    main()
