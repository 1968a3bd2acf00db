"""What opening an untrusted cache costs: trust.open_cache (every check short of reading chunks),
the full `verify` (every chunk, streamed), against the number of samples and blocks.

Caches come from tests/store_synthetic.py through the real writer (tiny signal shapes: the up-front
check reads metadata and the manifest only, so its cost follows samples, tokens and blocks, not
signal bytes): a demo-sized one (600 samples in 10 blocks of 64, like the demo's student share)
and a larger one.

    python benchmarks/open_cost.py [--samples 600 20000]
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

from store_synthetic import write_synthetic_store  # noqa: E402

from alignkd_cache.store.trust import open_cache  # noqa: E402
from alignkd_cache.store.verify import verify  # noqa: E402


def best_of(fn, repeats: int = 3) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return min(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--samples", type=int, nargs="+", default=[600, 20000])
    a = parser.parse_args()
    print("| samples | blocks | manifest tokens | open_cache (s) | per sample (us) | verify (s) |")
    print("|---|---|---|---|---|---|")
    for n in a.samples:
        with tempfile.TemporaryDirectory() as tmp:
            url = str(Path(tmp) / "c.zarr")
            results = write_synthetic_store(url, n=n, block_size=64)
            tokens = sum(len(r.sample.input_ids) for r in results if r.sample is not None)
            opened = best_of(lambda: open_cache(url))  # noqa: B023 - called at once
            verified = best_of(lambda: verify(url), repeats=1)  # noqa: B023
            blocks = -(-n // 64)
            print(f"| {n} | {blocks} | {tokens} | {opened:.3f} | {opened / n * 1e6:.0f} | {verified:.2f} |")


if __name__ == "__main__":
    main()
