"""Finalizing a build: join the committed block parts into manifest.parquet, in dataset order.

Runs once, on rank 0, after every block is committed. It also checks that samples sharing one
stored visual row (same image path) saw the same image content, records counts and the manifest's
sha256 in the root attributes, marks the cache complete, and deletes the parts, so the manifest is
the only index.
"""

from __future__ import annotations

import pyarrow as pa
import pyarrow.compute  # noqa: F401 - pa.compute

from alignkd_cache.errors import DataError
from alignkd_cache.signal_spec import cache_kind
from alignkd_cache.store.location import Location
from alignkd_cache.store.manifest import MANIFEST_KEY, encode, part_key, schema_for, sha256


def finalize(loc: Location, attrs: dict, num_records: int, num_blocks: int) -> dict:
    """Join the block parts into manifest.parquet (dataset order) and mark the cache complete."""
    missing = [b for b in range(num_blocks) if not loc.exists(part_key(b))]
    if missing:
        raise RuntimeError(f"{loc.url}: blocks {missing[:10]} were not committed; rerun with --resume")
    table = pa.concat_tables([loc.read_parquet(part_key(b)) for b in range(num_blocks)])
    table = table.sort_by("index")
    if table.column("index").to_pylist() != list(range(num_records)):
        raise RuntimeError(f"{loc.url}: block parts do not cover samples 0..{num_records - 1} exactly once")
    shared: dict[tuple[int, int], tuple[str, str]] = {}
    for row in table.select(["id", "status", "image_keys", "visual_blocks", "visual_offsets"]).to_pylist():
        if row["status"] != "written":
            continue
        for key, ref in zip(
            row["image_keys"], zip(row["visual_blocks"], row["visual_offsets"], strict=True), strict=True
        ):
            if ref[0] < 0:
                continue
            first = shared.setdefault(ref, (row["id"], key))
            if first[1] != key:
                raise DataError(
                    f"samples {first[0]!r} and {row['id']!r} name the same image file but its content differs "
                    "(was it replaced during the build?); fix the images and rebuild"
                )
    attrs = commit_manifest(loc, attrs, table, num_blocks)
    loc.delete_dir("parts")  # the manifest now holds them (one source of truth); no empty parts/ stays
    return attrs


def commit_manifest(loc: Location, attrs: dict, table: pa.Table, num_blocks: int) -> dict:
    """Write manifest.parquet and the root attributes that make the cache complete."""
    # Computed columns come back nullable; keep the published schema (of the cache's version: a
    # merge of 4.0 caches writes a 4.0 manifest).
    table = table.cast(schema_for(attrs))
    data = encode(table)
    loc.write_bytes(MANIFEST_KEY, data)
    status = table.column("status").to_pylist()
    written = table.filter(pa.compute.equal(table.column("status"), "written"))
    flat = lambda name: pa.compute.list_flatten(written.column(name)).to_pylist()  # noqa: E731
    images = {(b, o) for b, o in zip(flat("visual_blocks"), flat("visual_offsets"), strict=True) if b >= 0}
    if cache_kind(attrs) == "layer0":  # no stored visual rows: count the distinct images by content
        images = set(flat("image_keys"))
    counts = {
        "records": len(status),
        "written": status.count("written"),
        "skipped": status.count("skipped"),
        "images": len(images),
    }
    attrs = attrs | {
        "complete": True,
        "num_blocks": num_blocks,
        "counts": counts,
        "manifest_sha256": sha256(data),
    }
    loc.group("r+").attrs.update(attrs)
    return attrs
