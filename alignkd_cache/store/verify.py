"""`alignkd-cache verify`: every check of opening a cache, then every chunk, naming bad samples.

The cheap checks are trust.inspect's (tree, attributes, manifest, array metadata), collected
rather than stopping at the first. When they pass, every chunk of every array is read one chunk
at a time (memory stays at one chunk whatever the cache's size): each carries a CRC32C, so a
flipped bit fails its read; decoded values must be finite and logit ids inside the vocabulary.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass, field

import numpy as np
import zarr

from alignkd_cache.signals import STORED_ARRAYS, cache_kind
from alignkd_cache.store import codecs
from alignkd_cache.store.manifest import block_path
from alignkd_cache.store.stub import stub_problems
from alignkd_cache.store.trust import FIX, Inspection, UntrustedCache, chunk_damage, inspect, open_cache

# Which manifest span (attention_* or logit_* rows) each array's rows belong to; visual rows are
# found through visual_block/visual_row instead.
_KIND = {
    f"{name}{suffix}": "attention" if field == "attention" else "logit"
    for name, (field, _) in STORED_ARRAYS.items()
    if field != "visual"
    for suffix in ("", "_scale")
}


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


def verify(url: str, storage_options: dict | None = None, root: bytes | None = None) -> VerifyReport:
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
    _stream(found, report)
    if cache_kind(found.attrs) == "layer0":
        report.problems += stub_problems(found.loc, found.attrs["layer0"])
    report.samples_checked = sum(1 for s in found.table.column("status").to_pylist() if s == "written")
    return report


def open_verified(url: str, storage_options: dict | None = None) -> Inspection:
    """open_cache plus every chunk, for commands that copy a cache's bytes into a new one (merge)."""
    found = open_cache(url, storage_options)
    report = VerifyReport(str(url))
    _stream(found, report)
    if cache_kind(found.attrs) == "layer0":
        report.problems += stub_problems(found.loc, found.attrs["layer0"])
    if not report.ok:
        lines = report.lines()
        more = f" (and {len(lines) - 1} more)" if len(lines) > 1 else ""
        raise UntrustedCache(f"{url}: {lines[0]}{more}; {FIX}")
    return found


def _stream(found: Inspection, report: VerifyReport) -> None:
    for (b, name), spec in found.specs.items():
        array = zarr.open_array(found.loc.store, path=f"{block_path(b)}/{name}", mode="r", zarr_format=3)
        step = array.chunks[0]
        for lo in range(0, array.shape[0], step):
            hi = min(array.shape[0], lo + step)
            try:
                stored = array[lo:hi]
            except Exception as e:  # noqa: BLE001 - a checksum or decode failure: a damaged chunk
                report.problems.append(
                    f"{block_path(b)}/{name}: rows {lo}..{hi - 1} unreadable: {chunk_damage(e)}"
                )
                _blame(found, report, b, name, lo, hi, "are in a damaged chunk")
                continue
            if name == "logit_ids":
                bad = (stored.astype(np.int64) >= found.attrs["vocab_size"]).any(axis=1)
                why = "hold a logit id outside the vocabulary"
            else:
                # Scaled encodings: the scale array is checked on its own, so decode with scale 1.
                unit = np.ones(stored.shape[:-1], np.float32) if spec.encoding in codecs.SCALED else None
                values = codecs.decode(spec.encoding, stored, unit) if spec.encoding else stored
                bad = ~np.isfinite(values.reshape(len(values), -1)).all(axis=1)
                why = "hold NaN/inf"
            for row in np.flatnonzero(bad):
                _blame(found, report, b, name, lo + int(row), lo + int(row) + 1, why)


def _blame(found: Inspection, report: VerifyReport, b: int, name: str, lo: int, hi: int, why: str) -> None:
    """Name every sample whose signals use rows lo..hi-1 of block b's array `name`."""
    where = f"{name} rows {lo}..{hi - 1} of {block_path(b)} {why}"
    if name.startswith("visual"):
        for row in range(lo, hi):
            for sid in found.visual_users.get((b, row), []):
                report.bad_samples[sid].append(where)
        return
    for sid, kind, start, stop in found.spans.get(b, []):
        if kind == _KIND[name] and start < hi and lo < stop:
            report.bad_samples[sid].append(where)
