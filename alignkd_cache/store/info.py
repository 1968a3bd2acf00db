"""`alignkd-cache info`: counts, provenance, and bytes per signal per sample against raw fp16.

The raw fp16 baseline charges 2 bytes for every number a sample's signals hold, ids included, and
counts a sample's visual tokens even when its image is shared: it is what a naive cache that wrote
each sample's signals as uncompressed fp16 would store. Stored bytes are the compressed chunk
files' bytes (metadata documents excluded) (shared visual rows are counted once), divided by the written samples.
A layer0 cache's stub is reported on its own (`stub`): it is paid once per cache, not per sample.

`info` reads the root attributes and the manifest (both checked, as every command's open; of the
rows it keeps only the index, and reads the skip reasons' column) and stats every block's chunk
files while the manifest is checked, then refuses a missing or irregular one the manifest's plan
needs; it reads no block's metadata, which `verify` checks.
"""

from __future__ import annotations

import os
import stat
import threading
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
from alignkd_cache.store.trust_rows import ROWS_PER_BATCH
from alignkd_cache.store.trust_tree import irregular

# signal -> the block arrays that hold it (scale arrays included; absent ones count 0 bytes)
SIGNALS: dict[str, list[str]] = {}
for _name, (_field, _) in STORED_ARRAYS.items():
    SIGNALS.setdefault(_field, []).extend([_name, f"{_name}_scale"])
SIGNAL_OF = {array: signal for signal, arrays in SIGNALS.items() for array in arrays}


def cache_info(url: str, storage_options: dict | None = None) -> dict:
    stop, stats = threading.Event(), []
    with ThreadPoolExecutor(1) as pool:  # the chunk stats run while the manifest is checked
        try:
            found = open_cache(
                url,
                storage_options,
                once_attributes=lambda f: stats.append(pool.submit(_stat_chunks, f, stop)),
            )
        except BaseException:
            stop.set()  # the refusal need not wait for the stats
            raise
        sizes = stats[0].result()
    attrs, index = found.attrs, found.index
    # A checked manifest's skip reasons are null exactly on written rows: dropped a batch at a time.
    batches = found.manifest.batches(ROWS_PER_BATCH, ["skip_reason"])
    reasons = pa.chunked_array([pc.drop_null(batch.column(0)) for _, batch in batches], pa.string())
    # "missing image: data.json[3]: ..." and "2049 tokens > max length 2048" count as their kind
    kinds = pc.replace_substring_regex(
        pc.list_element(pc.split_pattern(reasons, ":", max_splits=1), 0), r"\d+", "N"
    )
    counts = pc.value_counts(kinds).to_pylist()  # in order of first appearance, as Counter
    skipped = Counter({c["values"]: c["counts"] for c in counts})
    n = max(1, len(index))
    stored = _stored_bytes(found, sizes)
    logit_rows = int(index.columns["logit_rows"].sum(dtype=np.int64))
    # A sample's attention rows are as wide as its visual tokens (all its images').
    per_sample = index.visual_tokens()
    attention_values = float(np.dot(per_sample, index.columns["attention_rows"]))
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


MISSING, SYMLINK, SPECIAL = -1, -2, -3  # what a chunk file's size says when there is no regular file


def _stat_chunks(found: Inspection, stop: threading.Event) -> dict[str, np.ndarray]:
    """Per block array, each block's chunk file size (or MISSING, SYMLINK, SPECIAL): one stat per
    block and array (an array with rows has exactly one chunk file; see layout.chunking). Nothing
    is read. Runs on a thread while the manifest is checked; the plan then says which must exist."""
    blocks = range(found.attrs["num_blocks"])
    return {
        name: _sizes(found, [block_path(b) + suffix for b in blocks], stop) for name, suffix in _chunks(found)
    }


def _chunks(found: Inspection) -> list[tuple[str, str]]:
    """(array name, its chunk file's key below the block) of every block array."""
    ranks = {name: len(spec.shape) for name, spec in block_specs(found.attrs, 1, 1, 1).items()}
    return [(name, f"/{name}/c/" + "/".join("0" * rank)) for name, rank in ranks.items()]


def _stored_bytes(found: Inspection, sizes: dict[str, np.ndarray]) -> dict[str, int]:
    """Chunk bytes per signal over every block, from the chunk files the plan gives each block; a
    planned chunk file that is missing or not a regular file is refused."""
    plan = found.blocks
    rows = {"attention": plan.attention, "visual": plan.visual, "logits": plan.logit}
    stored = dict.fromkeys(SIGNALS, 0)
    for name, suffix in _chunks(found):
        per_block = sizes[name]
        planned = np.flatnonzero(rows[SIGNAL_OF[name]] > 0)
        bad = planned[per_block[planned] < 0]
        if len(bad):
            key = block_path(int(bad[0])) + suffix
            if per_block[bad[0]] == MISSING:
                raise UntrustedCache(
                    f"{found.url}: {key.rsplit('/c/', 1)[0]}: its chunk file is missing; {FIX}"
                )
            path = os.path.join(found.local_root, key)
            what = irregular(key, path, symlink=per_block[bad[0]] == SYMLINK)
            raise UntrustedCache(f"{found.url}: {what}; {FIX}")
        stored[SIGNAL_OF[name]] += int(per_block[planned].sum())
    return stored


STAT_THREADS = 8
PROBE_STATS = 2000
CACHED_STAT_S = 20e-6


def _sizes(found: Inspection, keys: list[str], stop: threading.Event) -> np.ndarray:
    """The sizes of `keys`' files. Stats the kernel answers from its cache gain nothing from
    threads, which the GIL serialises (337,500 of them took 1.4 s on one thread and 3.5 s on eight
    here); stats that wait on a disk, a network file system or an object store do. So the first
    PROBE_STATS run on this thread, and the rest go to threads only if those were slow."""
    start = time.perf_counter()
    probe = _chunk_sizes(found, keys[:PROBE_STATS], stop)
    rest = keys[PROBE_STATS:]
    if found.local_root is not None and time.perf_counter() - start < CACHED_STAT_S * PROBE_STATS:
        return np.array(probe + _chunk_sizes(found, rest, stop), np.int64)
    with ThreadPoolExecutor(STAT_THREADS) as pool:
        shares = [rest[i::STAT_THREADS] for i in range(STAT_THREADS)]
        sized = list(pool.map(lambda share: _chunk_sizes(found, share, stop), shares))
    sizes = np.empty(len(rest), np.int64)
    for i, share in enumerate(sized):
        sizes[i::STAT_THREADS] = share
    return np.concatenate([np.array(probe, np.int64), sizes])


def _chunk_sizes(found: Inspection, keys: list[str], stop: threading.Event) -> list[int]:
    if found.local_root is None:
        return [_remote_size(found, key) for key in keys if not stop.is_set()]
    sizes, root = [], found.local_root + "/"
    for i, key in enumerate(keys):
        if i % 4096 == 0 and stop.is_set():
            break
        try:
            status = os.lstat(root + key)
        except FileNotFoundError:
            sizes.append(MISSING)
            continue
        if stat.S_ISREG(status.st_mode):
            sizes.append(status.st_size)
        else:
            sizes.append(SYMLINK if stat.S_ISLNK(status.st_mode) else SPECIAL)
    return sizes


def _remote_size(found: Inspection, key: str) -> int:
    try:
        return found.loc.size(key)
    except FileNotFoundError:
        return MISSING
