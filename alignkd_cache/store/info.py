"""`alignkd-cache info`: counts, provenance, and bytes per signal per sample against raw fp16.

The raw fp16 baseline charges 2 bytes for every number a sample's signals hold, ids included, and
counts a sample's visual tokens even when its image is shared: it is what a naive cache that wrote
each sample's signals as uncompressed fp16 would store. Stored bytes are the compressed chunk
files' bytes (metadata documents excluded) (shared visual rows are counted once), divided by the written samples.
A layer0 cache's stub is reported on its own (`stub`): it is paid once per cache, not per sample.
"""

from __future__ import annotations

import os
import re
from collections import Counter

import numpy as np
import pyarrow.compute as pc

from alignkd_cache.signals import STORED_ARRAYS, cache_kind
from alignkd_cache.store.trust import open_cache

# signal -> the block arrays that hold it (scale arrays included; absent ones count 0 bytes)
SIGNALS: dict[str, list[str]] = {}
for _name, (_field, _) in STORED_ARRAYS.items():
    SIGNALS.setdefault(_field, []).extend([_name, f"{_name}_scale"])
SIGNAL_OF = {array: signal for signal, arrays in SIGNALS.items() for array in arrays}


def cache_info(url: str, storage_options: dict | None = None) -> dict:
    found = open_cache(url, storage_options)
    loc, attrs, table = found.loc, found.attrs, found.table
    written = table.filter(pc.equal(table.column("status"), "written"))
    reasons = table.filter(pc.equal(table.column("status"), "skipped")).column("skip_reason")
    # "missing image: data.json[3]: ..." and "2049 tokens > max length 2048" count as their kind
    skipped = Counter(re.sub(r"\d+", "N", r.split(":")[0]) for r in reasons.to_pylist())
    n = max(1, written.num_rows)
    stored = _stored_bytes(loc, found.keys)
    logit_rows = pc.sum(written.column("logit_rows")).as_py() or 0
    # A sample's attention rows are as wide as its visual tokens (all its images').
    num_visual = written.column("num_visual").combine_chunks()
    per_sample = np.bincount(
        pc.list_parent_indices(num_visual).to_numpy(),
        weights=pc.list_flatten(num_visual).to_numpy(),
        minlength=written.num_rows,
    )
    attention_values = float(np.dot(per_sample, written.column("attention_rows").to_numpy()))
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


def _stored_bytes(loc, keys) -> dict[str, int]:
    """Chunk bytes per signal over every block (metadata documents excluded), from the files the
    trust check listed: no store listing per block."""
    stored, root = dict.fromkeys(SIGNALS, 0), loc.local_root
    for key in keys:
        parts = key.split("/")
        if len(parts) > 4 and parts[0] == "blocks" and parts[3] == "c":
            size = os.stat(os.path.join(root, key)).st_size if root is not None else loc.size(key)
            stored[SIGNAL_OF[parts[2]]] += size
    return stored
