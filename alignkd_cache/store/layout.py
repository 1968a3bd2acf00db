"""One block's arrays, derived once: names, dtypes, shapes, encodings, chunking and metadata document.

The writer creates arrays through `create_array` with `block_specs`; trust checks every stored
`zarr.json` against `array_document`, the document `create_array` makes for that spec, so nothing
else is ever handed to a zarr codec.
"""

from __future__ import annotations

import functools
import json
import math
from dataclasses import dataclass

import numpy as np
import zarr
from zarr.core.buffer import default_buffer_prototype
from zarr.core.sync import sync
from zarr.storage import MemoryStore

from alignkd_cache.signal_spec import array_encoding, stored_arrays
from alignkd_cache.store import codecs

CHUNK_BYTES = 1 << 18  # small chunks: a random read of one sample decodes little it does not need


@dataclass
class ArraySpec:
    """What one block array must be: its dtype, shape (for logits, the widest allowed) and encoding."""

    dtype: str
    shape: tuple
    encoding: str | None = None

    @property
    def values_dtype(self) -> str:
        """The dtype the writer concatenates before encoding (encodings take float32)."""
        return self.dtype if self.encoding is None else "float32"


def logit_width(attrs: dict) -> int:
    """The widest logit row a block may hold: k for top-k targets, the draws for sampled ones."""
    return attrs["topk"] if attrs["logit_targets"] == "topk" else attrs["options"]["draws"]


def block_specs(
    attrs: dict,
    attention_rows: int,
    visual_rows: int,
    logit_rows: int,
    width: int | None = None,
    attention_width: int = 0,
) -> dict[str, ArraySpec]:
    """Every array of a block with these row counts (scale arrays after their array), in write order.
    `visual_rows` counts visual tokens; `attention_width` is the block's widest sample's visual
    tokens (sum over its images)."""
    width = logit_width(attrs) if width is None else width
    shapes = {
        "attention": (attention_rows, attention_width),
        "visual": (visual_rows, attrs["visual_dim"]),
        "logit_ids": (logit_rows, width),
        "logit_values": (logit_rows, width),
        "logit_tail": (logit_rows,),
    }
    specs = {}
    for name in stored_arrays(attrs):
        encoding = array_encoding(name, attrs)
        dtype = codecs.STORED_DTYPE[encoding] if encoding else codecs.RAW_DTYPE
        specs[name] = ArraySpec(
            attrs["logit_id_dtype"] if name == "logit_ids" else dtype, shapes[name], encoding
        )
        if encoding in codecs.SCALED:
            specs[f"{name}_scale"] = ArraySpec("float32", shapes[name][:1])
    return specs


def chunking(shape: tuple, dtype) -> tuple[tuple, tuple]:
    """(inner chunk shape, shard shape): one shard per array, chunks of about CHUNK_BYTES."""
    row_bytes = max(1, _itemsize(dtype) * math.prod(shape[1:]))
    chunk_rows = max(1, min(CHUNK_BYTES // row_bytes, max(1, shape[0])))
    chunks = tuple(max(1, c) for c in (chunk_rows, *shape[1:]))
    shard_rows = max(1, -(-shape[0] // chunk_rows)) * chunk_rows
    return chunks, (shard_rows, *chunks[1:])


def create_array(
    group: zarr.Group, name: str, shape: tuple, dtype, encoding: str | None = None
) -> zarr.Array:
    """An empty block array in the cache's layout."""
    chunks, shards = chunking(shape, dtype)
    return group.create_array(
        name,
        shape=shape,
        dtype=dtype,
        chunks=chunks,
        shards=shards,
        compressors=codecs.compressors(),
        fill_value=0,
        # Write every chunk, even all-zero ones: a missing chunk must mean damage, never zeros.
        config={"write_empty_chunks": True},
        attributes={"encoding": encoding} if encoding else {},
    )


def array_document(spec: ArraySpec, shape: list) -> dict:
    """The zarr.json `create_array` writes for this spec at this shape."""
    template = _template(spec.dtype, len(spec.shape), spec.encoding)
    chunks, shards = chunking(tuple(shape), spec.dtype)
    sharding = template["codecs"][0]
    return template | {
        "shape": list(shape),
        "chunk_grid": {"name": "regular", "configuration": {"chunk_shape": list(shards)}},
        "codecs": [
            sharding | {"configuration": sharding["configuration"] | {"chunk_shape": list(chunks)}},
            *template["codecs"][1:],
        ],
    }


@functools.cache
def group_document() -> dict:
    """The zarr.json of a group without attributes (blocks/ and each block)."""
    store = MemoryStore()
    zarr.open_group(store, mode="w")
    return _document(store, "zarr.json")


def _document(store: MemoryStore, key: str) -> dict:
    return json.loads(sync(store.get(key, prototype=default_buffer_prototype())).to_bytes())


@functools.cache
def _template(dtype: str, ndim: int, encoding: str | None) -> dict:
    store = MemoryStore()
    create_array(zarr.open_group(store, mode="w"), "a", (1,) * ndim, dtype, encoding)
    return _document(store, "a/zarr.json")


@functools.cache
def _itemsize(dtype) -> int:
    return np.dtype(dtype).itemsize
