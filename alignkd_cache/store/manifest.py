"""The Parquet manifest: one row per dataset sample, in dataset order, with where its signals are.

Row layout (schemas/manifest.arrow.json is the published copy of MANIFEST_SCHEMA; a test keeps
them equal):
- id, index (position in the dataset file after --limit), status ("written" | "skipped"),
  skip_reason;
- image (path relative to the image root), image_key (content hash of the padded image);
- input_ids (the teacher's exact tokens), visual_start (-1 without image), num_visual;
  supervised_positions (P: logits[p] predicts input_ids[p+1]; labels are input_ids at p+1 for p in
  P, -100 elsewhere), logit_positions (where the stored logit targets are: P, or every text
  position with --logit-positions text). T is derived: visual_start + num_visual .. len(input_ids);
- block, and [offset, offset + rows) into the block's flat attention rows (heads x |T| rows of N_v
  keys, head-major) and logit rows (one per logit position);
- visual_block, visual_row: the visual tokens of this sample's image, stored once per image.
Written-sample columns are null for skipped samples.
"""

from __future__ import annotations

import hashlib
import json
from importlib import resources

import pyarrow as pa

MANIFEST_SCHEMA = pa.schema(
    [
        pa.field("id", pa.string(), nullable=False),
        pa.field("index", pa.int64(), nullable=False),
        pa.field("status", pa.string(), nullable=False),
        pa.field("skip_reason", pa.string()),
        pa.field("image", pa.string()),
        pa.field("image_key", pa.string()),
        pa.field("input_ids", pa.list_(pa.int32())),
        pa.field("visual_start", pa.int32()),
        pa.field("num_visual", pa.int32()),
        pa.field("supervised_positions", pa.list_(pa.int32())),
        pa.field("logit_positions", pa.list_(pa.int32())),
        pa.field("block", pa.int32(), nullable=False),
        pa.field("attention_offset", pa.int64()),
        pa.field("attention_rows", pa.int32()),
        pa.field("logit_offset", pa.int64()),
        pa.field("logit_rows", pa.int32()),
        pa.field("visual_block", pa.int32()),
        pa.field("visual_row", pa.int32()),
    ]
)

MANIFEST_KEY = "manifest.parquet"


def part_key(block: int) -> str:
    return f"parts/b{block:06d}.parquet"


def block_path(block: int) -> str:
    return f"blocks/b{block:06d}"


def to_table(rows: list[dict]) -> pa.Table:
    return pa.Table.from_pylist(rows, schema=MANIFEST_SCHEMA)


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def schema_as_json(schema: pa.Schema = MANIFEST_SCHEMA) -> dict:
    return {
        "description": "Arrow schema of manifest.parquet (one row per dataset sample)",
        "fields": [{"name": f.name, "type": str(f.type), "nullable": f.nullable} for f in schema],
    }


def published_schema() -> dict:
    return json.loads(resources.files("alignkd_cache.schemas").joinpath("manifest.arrow.json").read_text())
