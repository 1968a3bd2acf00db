"""`alignkd-cache merge A B ... --out C`: one cache from several built with the same teacher.

Refused, naming the field, unless teacher, tokenizer, template, signal options and (for layer0
caches) the layer-0 stub agree, and unless
sample ids are disjoint, and unless every source passes `verify` (every chunk read: a merge must
not launder a damaged or edited source into a cache that verifies). Blocks are copied byte for byte and renumbered; the manifest is the
sources' manifests in order (A's samples, then B's, ...), with block references shifted.
"""

from __future__ import annotations

import hashlib

import pyarrow as pa
import pyarrow.compute as pc

from alignkd_cache.store.finalize import commit_manifest
from alignkd_cache.store.location import Location
from alignkd_cache.store.manifest import block_path
from alignkd_cache.store.provenance import IncompatibleCache, check_mergeable, now
from alignkd_cache.store.stub import STUB_DIR
from alignkd_cache.store.verify import open_verified


def merge_caches(sources: list[str], out: str, storage_options: dict | None = None) -> dict:
    if len(sources) < 2:
        raise ValueError("merge needs at least two caches")
    found = [open_verified(s, storage_options) for s in sources]  # never launder a damaged chunk
    attrs = [f.attrs for f in found]
    for url, a in zip(sources[1:], attrs[1:], strict=True):
        check_mergeable(attrs[0], a, url)
    tables = [f.manifest.read() for f in found]
    seen: dict[str, str] = {}
    for url, table in zip(sources, tables, strict=True):
        for sid in table.column("id").to_pylist():
            if sid in seen:
                raise IncompatibleCache(
                    f"cannot merge: sample id {sid!r} is in both {seen[sid]} and {url}; ids must be unique"
                )
            seen[sid] = url
    dst = Location(out, storage_options)
    if not dst.is_empty():
        raise IncompatibleCache(f"{out} is not empty; choose a new --out")
    dst.group("w").require_group("blocks")
    for key in [k for k in found[0].keys if k.startswith(STUB_DIR + "/")]:  # one stub: all are identical
        dst.write_bytes(key, found[0].loc.read_bytes(key))
    parts, block_offset, index_offset = [], 0, 0
    for f, a, table in zip(found, attrs, tables, strict=True):
        for b in range(a["num_blocks"]):
            prefix, new = block_path(b), block_path(b + block_offset)
            for key in f.block_keys[b]:  # checked files only
                dst.write_bytes(new + key[len(prefix) :], f.loc.read_bytes(key))
        table = _shifted(table, "index", index_offset)
        table = _shifted(table, "block", block_offset)
        table = _shifted_blocks(table, "visual_blocks", block_offset)
        parts.append(table)
        block_offset += a["num_blocks"]
        index_offset += table.num_rows
    merged = pa.concat_tables(parts)
    datasets = [a["dataset"] for a in attrs]
    result = attrs[0] | {
        "created": now(),
        "dataset": {
            "file": "+".join(d["file"] for d in datasets),
            "sha256": hashlib.sha256("".join(d["sha256"] for d in datasets).encode()).hexdigest(),
        },
        "merged_from": [
            {
                "url": url,
                "dataset": a["dataset"],
                "manifest_sha256": a["manifest_sha256"],
                "counts": a["counts"],
            }
            for url, a in zip(sources, attrs, strict=True)
        ],
    }
    return commit_manifest(dst, result, merged, block_offset)


def _shifted(table: pa.Table, column: str, by: int) -> pa.Table:
    """Add `by` to a column (keeping its type)."""
    moved = pc.add(table.column(column), pa.scalar(by, table.column(column).type))
    return table.set_column(table.schema.get_field_index(column), column, moved)


def _shifted_blocks(table: pa.Table, column: str, by: int) -> pa.Table:
    """Add `by` to every block of a list column, leaving -1 ("none") alone."""
    lists = table.column(column).combine_chunks()
    values = lists.values
    moved = pc.if_else(pc.greater_equal(values, 0), pc.add(values, pa.scalar(by, values.type)), values)
    shifted = pa.ListArray.from_arrays(lists.offsets, moved, mask=lists.is_null())
    return table.set_column(table.schema.get_field_index(column), column, shifted)
