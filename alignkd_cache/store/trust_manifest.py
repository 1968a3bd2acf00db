"""Trust, the manifest file: present, bounded before it is read, its sha256 the attributes', its
declared size bounded before it is decoded, and its Arrow schema. Its rows are decoded by the row
rules, a batch at a time (trust_rows)."""

from __future__ import annotations

import pyarrow as pa

from alignkd_cache.store.inspection import Inspection
from alignkd_cache.store.location import Location
from alignkd_cache.store.manifest import MANIFEST_KEY, ManifestFile, schema_for, sha256


def check_manifest(loc: Location, found: Inspection) -> None:
    attrs = found.attrs
    if MANIFEST_KEY not in found.keys:
        found.add(f"{MANIFEST_KEY} is missing")
        return
    records, max_length = attrs["counts"]["records"], attrs["options"]["max_length"]
    # Per row: three int32 lists of at most max_length, plus the fixed columns and strings (and
    # the image layouts: a few segments per image, each covering at least one visual position).
    bound = records * (12 * max_length + 4096) + (1 << 20)
    if loc.size(MANIFEST_KEY) > bound:
        found.add(f"{MANIFEST_KEY} is larger than {records} records of at most {max_length} tokens can be")
        return
    data = loc.read_bytes(MANIFEST_KEY)
    if sha256(data) != attrs["manifest_sha256"]:
        found.add(
            f"{MANIFEST_KEY}: sha256 {sha256(data)} differs from the recorded {attrs['manifest_sha256']}"
        )
        return
    try:
        manifest = ManifestFile(data)
        meta = manifest.file.metadata
        declared = sum(meta.row_group(i).total_byte_size for i in range(meta.num_row_groups))
        if meta.num_rows != records or declared > bound:
            found.add(
                f"{MANIFEST_KEY}: declares {meta.num_rows} rows of {declared} bytes; "
                f"the attributes allow {records} rows of at most {bound} bytes"
            )
            return
        schema = manifest.schema
    except (pa.ArrowException, OSError) as e:
        found.add(f"{MANIFEST_KEY}: unreadable Parquet ({e})")
        return
    if not schema.equals(schema_for(attrs)):
        version = attrs["schema_version"]
        found.add(
            f"{MANIFEST_KEY}: schema differs from schemas/manifest.arrow.json (schema_version {version})"
        )
        return
    found.manifest = manifest
