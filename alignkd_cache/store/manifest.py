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
  layer0 cache);
- image_layouts (schema 4.1): per image, how the processor laid its visual tokens out, a list of
  segments {role, rows, cols} in the order the tokens are stored, each rows x cols tokens
  row-major, summing to the image's num_visual (roles: LAYOUT_ROLE; docs/cache-format.md).
Written-sample columns are null for skipped samples. A 4.0 manifest is the same without
image_layouts (`schema_for` its attributes).
"""

from __future__ import annotations

import hashlib
import json
import re
import threading
from collections import OrderedDict
from collections.abc import Iterator
from importlib import resources

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

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
SEGMENT = pa.struct([("role", pa.string()), ("rows", pa.int32()), ("cols", pa.int32())])
LAYOUTS_FIELD = pa.field("image_layouts", pa.list_(pa.list_(SEGMENT)))
MANIFEST_SCHEMA_4_0 = MANIFEST_SCHEMA
MANIFEST_SCHEMA = MANIFEST_SCHEMA_4_0.append(LAYOUTS_FIELD)  # 4.1: the image layouts
# A segment's role (docs/cache-format.md, "Image layouts"): the whole of a fixed or dynamic patch
# grid, LLaVA's CLS token, LLaVA-OneVision's base crop, its unpadded anyres grid whose last column
# is the newline token ending each row, or a multi-image sample's single newline, a crop of a tiled
# image at row r, column c of its crop grid (0-based), InternVL's thumbnail, SmolVLM's global tile.
LAYOUT_ROLE = r"grid|cls|base|anyres_newline|newline|tile_[0-9]{1,4}_[0-9]{1,4}|thumbnail|global"

MANIFEST_KEY = "manifest.parquet"
# Rows per Parquet row group: a reader decodes one group to read one row, and a check streams the
# file group by group, so neither holds the token lists of every sample. 4096 rows of a real
# cache (a few hundred tokens each) decode in milliseconds; smaller groups cost the stream more
# per row (docs/cache-format.md, "Manifest").
ROWS_PER_GROUP = 4096
GROUPS_KEPT = 2  # decoded row groups a reader keeps per process (a sequential reader needs one)


def part_key(block: int) -> str:
    return f"parts/b{block:06d}.parquet"


def block_path(block: int) -> str:
    return f"blocks/b{block:06d}"


def records_layouts(attrs: dict) -> bool:
    """Whether a cache's manifest has the image_layouts column (schema_version 4.1 and later)."""
    major, _, minor = str(attrs.get("schema_version", "")).partition(".")
    return major == "4" and minor.isdigit() and int(minor) >= 1


def schema_for(attrs: dict) -> pa.Schema:
    """The manifest schema of a cache with these attributes."""
    return MANIFEST_SCHEMA if records_layouts(attrs) else MANIFEST_SCHEMA_4_0


def is_layout_role(role) -> bool:
    return isinstance(role, str) and re.fullmatch(LAYOUT_ROLE, role) is not None


def to_table(rows: list[dict], schema: pa.Schema = MANIFEST_SCHEMA) -> pa.Table:
    return pa.Table.from_pylist(rows, schema=schema)


def encode(table: pa.Table) -> bytes:
    """The bytes of manifest.parquet for this table."""
    sink = pa.BufferOutputStream()
    pq.write_table(table, sink, compression="zstd", row_group_size=ROWS_PER_GROUP, write_statistics=False)
    return sink.getvalue().to_pybytes()


class ManifestFile:
    """A manifest's bytes, decoded a batch or a row group at a time, never whole unless asked.
    Pickles as its bytes (a DataLoader worker started by spawn decodes its own groups)."""

    def __init__(self, data: bytes):
        self.data = data
        self._open()

    def _open(self) -> None:
        self.file = pq.ParquetFile(pa.BufferReader(self.data))
        meta = self.file.metadata
        self.num_rows = meta.num_rows
        self.group_starts = np.cumsum([0] + [meta.row_group(g).num_rows for g in range(meta.num_row_groups)])
        self._groups: OrderedDict[int, pa.Table] = OrderedDict()
        self._lock = threading.Lock()

    def __getstate__(self) -> dict:
        return {"data": self.data}

    def __setstate__(self, state: dict) -> None:
        self.data = state["data"]
        self._open()

    @property
    def schema(self) -> pa.Schema:
        return self.file.schema_arrow

    def batches(
        self, batch_size: int, columns: list[str] | None = None
    ) -> Iterator[tuple[int, pa.RecordBatch]]:
        """(first row, batch) over the whole file, in order. A file whose pages hold other rows than
        its footer declares (an edited file) is refused as unreadable, not indexed past its end."""
        start = 0
        for batch in self.file.iter_batches(batch_size=batch_size, columns=columns, use_threads=False):
            if start + batch.num_rows > self.num_rows:
                raise pa.ArrowInvalid(f"it holds more rows than the {self.num_rows} its footer declares")
            yield start, batch
            start += batch.num_rows
        if start != self.num_rows:
            raise pa.ArrowInvalid(f"it holds {start} rows, its footer declares {self.num_rows}")

    def read(self, columns: list[str] | None = None) -> pa.Table:
        """The whole table (or these columns of it): for the commands that rewrite a manifest."""
        return self.file.read(columns=columns, use_threads=False)

    def row(self, r: int) -> dict:
        """Row r as a dict, from its row group (the last GROUPS_KEPT decoded groups are kept)."""
        group = int(np.searchsorted(self.group_starts, r, "right")) - 1
        with self._lock:
            table = self._groups.get(group)
            if table is None:
                table = self._groups[group] = self.file.read_row_group(group, use_threads=False)
                while len(self._groups) > GROUPS_KEPT:
                    self._groups.popitem(last=False)
            self._groups.move_to_end(group)
        return table.slice(r - int(self.group_starts[group]), 1).to_pylist()[0]


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def schema_as_json(schema: pa.Schema = MANIFEST_SCHEMA) -> dict:
    return {
        "description": "Arrow schema of manifest.parquet (one row per dataset sample)",
        "fields": [{"name": f.name, "type": str(f.type), "nullable": f.nullable} for f in schema],
    }


def published_schema() -> dict:
    return json.loads(resources.files("alignkd_cache.schemas").joinpath("manifest.arrow.json").read_text())
