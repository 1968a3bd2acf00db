"""`alignkd-cache verify`: every check of opening a cache, then every chunk, naming bad samples.

The cheap checks are trust.inspect's (tree, attributes, manifest, every block's files and array
metadata), collected rather than stopping at the first. When they pass, every chunk of every
array is read one chunk at a time (memory stays at one chunk per job whatever the cache's size): each carries a CRC32C,
so a flipped bit fails its read; decoded values must be finite and logit ids inside the
vocabulary. With jobs > 1, worker processes stream runs of blocks; the samples to blame for a bad
row are found afterwards from the manifest's columns.
"""

from __future__ import annotations

import multiprocessing
from collections import defaultdict
from collections.abc import Iterator
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field

import numpy as np
import zarr

from alignkd_cache.signal_spec import STORED_ARRAYS, cache_kind
from alignkd_cache.store import codecs
from alignkd_cache.store.inspection import Inspection
from alignkd_cache.store.layout import ArraySpec
from alignkd_cache.store.location import Location
from alignkd_cache.store.manifest import block_path
from alignkd_cache.store.manifest_index import SPANS, tile_offsets
from alignkd_cache.store.stub import stub_problems
from alignkd_cache.store.trust import FIX, UntrustedCache, chunk_damage, inspect, open_cache

# Which manifest span (attention_* or logit_* rows) each array's rows belong to; visual rows are
# found through each image's visual_blocks/visual_offsets/num_visual instead.
_KIND = {
    f"{name}{suffix}": "attention" if field == "attention" else "logit"
    for name, (field, _) in STORED_ARRAYS.items()
    if field != "visual"
    for suffix in ("", "_scale")
}
BLOCKS_PER_TASK = 64  # a worker's unit of work: small enough to balance, large enough to amortise


@dataclass
class VerifyReport:
    url: str
    problems: list[str] = field(default_factory=list)  # store-level problems
    bad_samples: dict[str, list[str]] = field(default_factory=lambda: defaultdict(list))
    samples_checked: int = 0

    @property
    def ok(self) -> bool:
        return not self.problems and not self.bad_samples

    def lines(self) -> list[str]:
        out = [f"problem: {p}" for p in self.problems]
        out += [f"bad sample {sid!r}: {'; '.join(why)}" for sid, why in self.bad_samples.items()]
        return out


@dataclass
class BadRows:
    """Rows lo..hi-1 of a block's array that failed: `problem` is the store-level line, if any."""

    block: int
    name: str
    lo: int
    hi: int
    why: str
    problem: str | None = None


def verify(
    url: str, storage_options: dict | None = None, root: bytes | None = None, jobs: int = 1
) -> VerifyReport:
    """`root`: check this root zarr.json instead of the stored one (see copy)."""
    report = VerifyReport(str(url))
    found = inspect(url, storage_options, root)
    for sample, what in found.problems:
        if sample is None:
            report.problems.append(what)
        else:
            report.bad_samples[sample].append(what)
    if found.problems:  # shapes and offsets are not to be trusted: read no chunk
        return report
    _stream(found, report, jobs)
    if cache_kind(found.attrs) == "layer0":
        report.problems += stub_problems(found.loc, found.attrs["layer0"])
    report.samples_checked = int(found.index.written.sum())
    return report


def open_verified(url: str, storage_options: dict | None = None) -> Inspection:
    """open_cache plus every chunk, for commands that copy a cache's bytes into a new one (merge)."""
    found = open_cache(url, storage_options, every_block=True)
    report = VerifyReport(str(url))
    _stream(found, report)
    if cache_kind(found.attrs) == "layer0":
        report.problems += stub_problems(found.loc, found.attrs["layer0"])
    if not report.ok:
        lines = report.lines()
        more = f" (and {len(lines) - 1} more)" if len(lines) > 1 else ""
        raise UntrustedCache(f"{url}: {lines[0]}{more}; {FIX}")
    return found


def _stream(found: Inspection, report: VerifyReport, jobs: int = 1) -> None:
    tasks = [
        (found.url, found.loc.storage_options, found.attrs["vocab_size"], _specs(found, first))
        for first in range(0, found.attrs["num_blocks"], BLOCKS_PER_TASK)
    ]
    blame = Blame(found)
    for bad in _run(tasks, jobs):
        if bad.problem is not None:
            report.problems.append(bad.problem)
        where = f"{bad.name} rows {bad.lo}..{bad.hi - 1} of {block_path(bad.block)} {bad.why}"
        for sid in blame.samples(bad):
            report.bad_samples[sid].append(where)


def _specs(found: Inspection, first: int) -> list[tuple[int, dict[str, ArraySpec]]]:
    last = min(found.attrs["num_blocks"], first + BLOCKS_PER_TASK)
    return [(b, found.block_specs(b)) for b in range(first, last)]


def _run(tasks: list, jobs: int) -> Iterator[BadRows]:
    """Every task's bad rows, in task order."""
    if jobs <= 1:
        for task in tasks:
            yield from stream_blocks(*task)
        return
    # spawn: a forked child would inherit zarr's event-loop thread state without the thread.
    with ProcessPoolExecutor(jobs, mp_context=multiprocessing.get_context("spawn")) as pool:
        for found in pool.map(stream_blocks, *zip(*tasks, strict=True)):
            yield from found


def stream_blocks(url: str, storage_options, vocab_size: int, blocks: list) -> list[BadRows]:
    """Read every chunk of these blocks' arrays (one chunk in memory at a time); the bad rows."""
    loc, bad = Location(url, storage_options, read_only=True), []
    for b, specs in blocks:
        for name, spec in specs.items():
            array = zarr.open_array(loc.store, path=f"{block_path(b)}/{name}", mode="r", zarr_format=3)
            bad += _stream_array(array, b, name, spec, vocab_size)
    return bad


def _stream_array(array, b: int, name: str, spec: ArraySpec, vocab_size: int) -> list[BadRows]:
    bad, step = [], array.chunks[0]
    for lo in range(0, array.shape[0], step):
        hi = min(array.shape[0], lo + step)
        try:
            stored = array[lo:hi]
        except Exception as e:  # noqa: BLE001 - a checksum or decode failure: a damaged chunk
            problem = f"{block_path(b)}/{name}: rows {lo}..{hi - 1} unreadable: {chunk_damage(e)}"
            bad.append(BadRows(b, name, lo, hi, "are in a damaged chunk", problem))
            continue
        if name == "logit_ids":
            rows = (stored.astype(np.int64) >= vocab_size).any(axis=1)
            why = "hold a logit id outside the vocabulary"
        else:
            # Scaled encodings: the scale array is checked on its own, so decode with scale 1.
            unit = np.ones(stored.shape[:-1], np.float32) if spec.encoding in codecs.SCALED else None
            values = codecs.decode(spec.encoding, stored, unit) if spec.encoding else stored
            rows = ~np.isfinite(values.reshape(len(values), -1)).all(axis=1)
            why = "hold NaN/inf"
        bad += [BadRows(b, name, lo + int(r), lo + int(r) + 1, why) for r in np.flatnonzero(rows)]
    return bad


class Blame:
    """Which samples use rows of a block's array, from the manifest's index (sorted by block once)."""

    def __init__(self, found: Inspection):
        self.cols, self.manifest, self.rows = dict(found.index.columns), found.manifest, found.index.rows
        for kind in SPANS:  # a checked manifest's offsets are the tiling of its rows
            running = np.zeros(found.attrs["num_blocks"], np.int64)
            self.cols[f"{kind}_offset"] = tile_offsets(self.cols["block"], self.cols[f"{kind}_rows"], running)
        self.by_block = np.argsort(self.cols["block"], kind="stable")
        self.images, self.image_sample = found.index.images, found.index.image_sample()

    def samples(self, bad: BadRows) -> list[str]:
        """The ids whose signals use rows bad.lo..bad.hi-1 of its array, in manifest order."""
        if bad.name.startswith("visual"):
            im = self.images
            start, stop = im["visual_offsets"], im["visual_offsets"] + im["num_visual"]
            used = (im["visual_blocks"] == bad.block) & (start < bad.hi) & (bad.lo < stop)
            hit = np.unique(self.image_sample[used])
        else:
            rows, kind = self._of(self.by_block, "block", bad.block), _KIND[bad.name]
            start, count = self.cols[f"{kind}_offset"][rows], self.cols[f"{kind}_rows"][rows]
            hit = rows[(start < bad.hi) & (bad.lo < start + count)]
        return [self.manifest.row(int(self.rows[i]))["id"] for i in hit]

    def _of(self, order: np.ndarray, column: str, block: int) -> np.ndarray:
        """The written rows (ascending) whose `column` is `block`."""
        values = self.cols[column][order]
        lo, hi = np.searchsorted(values, block, "left"), np.searchsorted(values, block, "right")
        return order[lo:hi]
