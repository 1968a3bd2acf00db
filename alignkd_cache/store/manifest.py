"""The Parquet manifest: one row per dataset sample, in dataset order, with where its signals are.

Row layout (schemas/manifest.arrow.json is the published copy of MANIFEST_SCHEMA; a test keeps
them equal):
- id, index (position in the dataset file after --limit), status ("written" | "skipped"),
  skip_reason;
- images (paths relative to the image root, in the order of their <image> markers), image_keys
  (content hash of each padded image);
- input_ids (the teacher's exact tokens); num_visual (per image, how many of the positions holding
  the cache's image_token_id are its visual tokens, image after image: V); supervised_positions (P:
  logits[p] predicts input_ids[p+1]; labels are input_ids at p+1 for p in P, -100 elsewhere),
  logit_positions (where the stored logit targets are: P, or every position followed by text with
  --logit-positions text). T is derived: every non-visual position after the first visual one;
- block, and [offset, offset + rows) into the block's attention rows (heads x |T| rows, head-major,
  each as wide as the block's widest sample: the sample's sum(num_visual) first, zeros after) and
  logit rows (one per logit position);
- visual_blocks, visual_offsets: per image, the block and first token row of its visual tokens in
  that block's (tokens, D) array, stored once per image content; -1 where no tokens are stored (a
  layer0 cache).
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
        pa.field("images", pa.list_(pa.string())),
        pa.field("image_keys", pa.list_(pa.string())),
        pa.field("input_ids", pa.list_(pa.int32())),
        pa.field("num_visual", pa.list_(pa.int32())),
        pa.field("supervised_positions", pa.list_(pa.int32())),
        pa.field("logit_positions", pa.list_(pa.int32())),
        pa.field("block", pa.int32(), nullable=False),
        pa.field("attention_offset", pa.int64()),
        pa.field("attention_rows", pa.int32()),
        pa.field("logit_offset", pa.int64()),
        pa.field("logit_rows", pa.int32()),
        pa.field("visual_blocks", pa.list_(pa.int32())),
        pa.field("visual_offsets", pa.list_(pa.int64())),
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
