"""`alignkd-cache info`: counts, provenance, and bytes per signal per sample against raw fp16.

The raw fp16 baseline charges 2 bytes for every number a sample's signals hold, ids included, and
counts a sample's visual tokens even when its image is shared: it is what a naive cache that wrote
each sample's signals as uncompressed fp16 would store. Stored bytes are the compressed chunk
files' bytes (metadata documents excluded) (shared visual rows are counted once), divided by the written samples.
A layer0 cache's stub is reported on its own (`stub`): it is paid once per cache, not per sample.

`info` reads the root attributes and the manifest (both checked, as every command's open; of the
rows it keeps only the index, and reads the skip reasons' column) and stats the chunk files the
manifest's plan gives each block; it reads no block's metadata, which `verify` checks.
"""

from __future__ import annotations

import os
import stat
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from alignkd_cache.signal_spec import STORED_ARRAYS, cache_kind
from alignkd_cache.store.inspection import Inspection
from alignkd_cache.store.layout import block_specs
from alignkd_cache.store.manifest import block_path
from alignkd_cache.store.trust import FIX, UntrustedCache, open_cache
from alignkd_cache.store.trust_tree import irregular

# signal -> the block arrays that hold it (scale arrays included; absent ones count 0 bytes)
SIGNALS: dict[str, list[str]] = {}
for _name, (_field, _) in STORED_ARRAYS.items():
    SIGNALS.setdefault(_field, []).extend([_name, f"{_name}_scale"])
SIGNAL_OF = {array: signal for signal, arrays in SIGNALS.items() for array in arrays}


def cache_info(url: str, storage_options: dict | None = None) -> dict:
    found = open_cache(url, storage_options)
    attrs, index = found.attrs, found.index
    reasons = found.manifest.read(["skip_reason"]).column("skip_reason").filter(pa.array(~index.written))
    # "missing image: data.json[3]: ..." and "2049 tokens > max length 2048" count as their kind
    kinds = pc.replace_substring_regex(
        pc.list_element(pc.split_pattern(reasons, ":", max_splits=1), 0), r"\d+", "N"
    )
    counts = pc.value_counts(kinds).to_pylist()  # in order of first appearance, as Counter
    skipped = Counter({c["values"]: c["counts"] for c in counts})
    n = max(1, len(index))
    stored = _stored_bytes(found)
    written = index.columns
    logit_rows = int(written["logit_rows"].sum(dtype=np.int64))
    # A sample's attention rows are as wide as its visual tokens (all its images').
    per_sample = index.visual_tokens()
    attention_values = float(np.dot(per_sample, written["attention_rows"]))
    values_per_logit_row = 2 * attrs["topk"] + (1 if attrs["logit_targets"] == "topk" else 0)
    raw = {
        "attention": 2 * attention_values,
        "visual": 2 * float(per_sample.sum()) * attrs["visual_dim"] * (cache_kind(attrs) == "stored"),
        "logits": 2 * logit_rows * values_per_logit_row,
    }
    per_signal = {
        s: {
            "bytes_per_sample": stored[s] / n,
            "raw_fp16_per_sample": raw[s] / n,
            "ratio": raw[s] / max(1, stored[s]),
        }
        for s in SIGNALS
    }
    total_stored, total_raw = sum(stored.values()), sum(raw.values())
    return {
        "url": str(url),
        "counts": attrs["counts"],
        "skipped": dict(skipped.most_common()),
        "provenance": {
            k: attrs[k]
            for k in (
                "schema_version",
                "tool_version",
                "created",
                "teacher",
                "tokenizer_sha256",
                "template",
                "dataset",
                "family",
            )
        }
        | ({"merged_from": attrs["merged_from"]} if "merged_from" in attrs else {}),
        "options": attrs["options"],
        "encodings": attrs["encodings"],
        "kind": cache_kind(attrs),
        # A layer0 cache's stub: paid once per cache, so not in the per-sample bytes.
        "stub": {"bytes": attrs["layer0"]["bytes"], "sha256": attrs["layer0"]["sha256"]}
        if cache_kind(attrs) == "layer0"
        else None,
        "signals": per_signal,
        "total": {
            "bytes_per_sample": total_stored / n,
            "raw_fp16_per_sample": total_raw / n,
            "ratio": total_raw / max(1, total_stored),
        },
    }


def _stored_bytes(found: Inspection) -> dict[str, int]:
    """Chunk bytes per signal over every block: one stat per chunk file the plan gives a block
    (an array with rows has exactly one; see layout.chunking). Nothing is read, so a chunk file
    that is missing or not a regular file is refused here."""
    plan = found.blocks
    rows = {"attention": plan.attention, "visual": plan.visual, "logits": plan.logit}
    ranks = {name: len(spec.shape) for name, spec in block_specs(found.attrs, 1, 1, 1).items()}
    keys: dict[str, list[str]] = {signal: [] for signal in SIGNALS}
    for name, rank in ranks.items():
        signal, suffix = SIGNAL_OF[name], f"/{name}/c/" + "/".join("0" * rank)
        keys[signal] += [block_path(b) + suffix for b in np.flatnonzero(rows[signal] > 0).tolist()]
    return {signal: _sizes(found, signal_keys) for signal, signal_keys in keys.items()}


STAT_THREADS = 8
PROBE_STATS = 2000
CACHED_STAT_S = 20e-6


def _sizes(found: Inspection, keys: list[str]) -> int:
    """The summed sizes of `keys`' files. Stats the kernel answers from its cache gain nothing from
    threads, which the GIL serialises (337,500 of them took 1.4 s on one thread and 3.5 s on eight
    here); stats that wait on a disk, a network file system or an object store do. So the first
    PROBE_STATS run on this thread, and the rest go to threads only if those were slow."""
    start = time.perf_counter()
    total = _chunk_bytes(found, keys[:PROBE_STATS])
    rest = keys[PROBE_STATS:]
    if found.local_root is not None and time.perf_counter() - start < CACHED_STAT_S * PROBE_STATS:
        return total + _chunk_bytes(found, rest)
    with ThreadPoolExecutor(STAT_THREADS) as pool:
        shares = [rest[i::STAT_THREADS] for i in range(STAT_THREADS)]
        return total + sum(pool.map(lambda share: _chunk_bytes(found, share), shares))


def _chunk_bytes(found: Inspection, keys: list[str]) -> int:
    if found.local_root is None:
        return sum(found.loc.size(key) for key in keys)
    total, root = 0, found.local_root + "/"
    for key in keys:
        try:
            status = os.lstat(root + key)
        except FileNotFoundError:
            raise UntrustedCache(
                f"{found.url}: {key.rsplit('/c/', 1)[0]}: its chunk file is missing; {FIX}"
            ) from None
        if not stat.S_ISREG(status.st_mode):
            what = irregular(key, root + key, symlink=stat.S_ISLNK(status.st_mode))
            raise UntrustedCache(f"{found.url}: {what}; {FIX}")
        total += status.st_size
    return total
