"""Writing one immutable block: its signal arrays first, its manifest part last (the commit mark).

A block holds a fixed range of dataset samples. Its arrays are its own (no chunk is ever shared
with another block or rank, because zarr loses data when two writers touch one chunk), each is
written in one call as a single shard of small CRC-checked chunks, and the Parquet part appears
only after every array is complete. A block directory without its part is an interrupted write:
resume deletes and recomputes it.
"""

from __future__ import annotations

import queue
import threading
from dataclasses import dataclass

import numpy as np
import zarr

from alignkd_cache.data import TokenizedSample
from alignkd_cache.store import codecs
from alignkd_cache.store.location import Location
from alignkd_cache.store.manifest import block_path, part_key, to_table

CHUNK_BYTES = 1 << 18  # small chunks: a random read of one sample decodes little it does not need


@dataclass
class SampleResult:
    """One dataset sample's outcome, in float32, before encoding."""

    index: int
    id: str
    image: str | None = None
    sample: TokenizedSample | None = None  # None when skipped
    skip_reason: str | None = None
    image_key: str | None = None
    attention: np.ndarray | None = None  # (H or 1, |T|, N_v)
    visual: np.ndarray | None = None  # (N_v, D), only on the sample that stores its image's row
    visual_ref: tuple[int, int] | None = None  # (block, row) of its image's visual tokens
    logit_positions: np.ndarray | None = None  # (n,)
    logit_ids: np.ndarray | None = None  # (n, k)
    logit_values: np.ndarray | None = None  # (n, k)
    logit_tail: np.ndarray | None = None  # (n,), top-k only


def create_array(
    group: zarr.Group, name: str, shape: tuple, dtype, encoding: str | None = None
) -> zarr.Array:
    """An empty block array in the cache's layout (trust.py checks stored metadata against it)."""
    itemsize = np.dtype(dtype).itemsize
    row_bytes = max(1, itemsize * int(np.prod(shape[1:], dtype=np.int64)))
    chunk_rows = 1 if len(shape) == 3 else max(1, min(CHUNK_BYTES // row_bytes, max(1, shape[0])))
    chunks = (chunk_rows, *shape[1:])
    chunks = tuple(max(1, c) for c in chunks)
    shard_rows = max(1, -(-shape[0] // chunk_rows)) * chunk_rows
    return group.create_array(
        name,
        shape=shape,
        dtype=dtype,
        chunks=chunks,
        shards=(shard_rows, *chunks[1:]),
        compressors=codecs.compressors(),
        fill_value=0,
        # Write every chunk, even all-zero ones: a missing chunk must mean damage, never zeros.
        config={"write_empty_chunks": True},
        attributes={"encoding": encoding} if encoding else {},
    )


def _write_array(group: zarr.Group, name: str, data: np.ndarray, encoding: str | None = None) -> int:
    array = create_array(group, name, data.shape, data.dtype, encoding)
    if data.size:
        array[...] = data
    return array.nbytes_stored()  # chunks and metadata: what the build wrote


def write_block(loc: Location, block: int, results: list[SampleResult], layout: dict) -> int:
    """Encode and write one block; returns the bytes it stored. `layout` is the store's attrs."""
    enc = layout["encodings"]
    num_visual, visual_dim = layout["num_visual_tokens"], layout["visual_dim"]
    id_dtype = np.dtype(layout["logit_id_dtype"])
    rows, attn, visual, l_ids, l_vals, l_tail = [], [], [], [], [], []
    attn_offset = logit_offset = 0
    width = max([r.logit_ids.shape[1] for r in results if r.sample is not None] or [1])
    for r in results:
        row = {"id": r.id, "index": r.index, "block": block, "image": r.image}
        if r.sample is None:
            rows.append(row | {"status": "skipped", "skip_reason": r.skip_reason})
            continue
        s = r.sample
        n_attn = 0 if r.attention is None else r.attention.shape[0] * r.attention.shape[1]
        if r.attention is not None:
            attn.append(r.attention.reshape(n_attn, num_visual))
        n_logit = len(r.logit_positions)
        pad = width - r.logit_ids.shape[1]
        l_ids.append(np.pad(r.logit_ids, ((0, 0), (0, pad))))
        l_vals.append(np.pad(r.logit_values, ((0, 0), (0, pad))))
        if r.logit_tail is not None:
            l_tail.append(r.logit_tail)
        if r.visual is not None:
            r.visual_ref = (block, len(visual))
            visual.append(r.visual)
        vb, vr = r.visual_ref if r.visual_ref is not None else (-1, -1)
        rows.append(
            row
            | {
                "status": "written",
                "image_key": r.image_key,
                "input_ids": s.input_ids,
                "visual_start": s.visual_start,
                "num_visual": s.num_visual,
                "supervised_positions": s.supervised_positions,
                "logit_positions": [int(p) for p in r.logit_positions],
                "attention_offset": attn_offset,
                "attention_rows": n_attn,
                "logit_offset": logit_offset,
                "logit_rows": n_logit,
                "visual_block": vb,
                "visual_row": vr,
            }
        )
        attn_offset += n_attn
        logit_offset += n_logit
    cat = lambda parts, shape, dtype: np.concatenate(parts) if parts else np.zeros(shape, dtype)  # noqa: E731
    group = loc.group("a").create_group(block_path(block), overwrite=True)
    stored = 0
    for name, values, kind in (
        ("attention", cat(attn, (0, num_visual), np.float32), "attention"),
        ("visual", cat([v[None] for v in visual], (0, num_visual, visual_dim), np.float32), "visual"),
    ):
        data, scale = codecs.encode(enc[kind], values)
        stored += _write_array(group, name, data, enc[kind])
        if scale is not None:
            stored += _write_array(group, f"{name}_scale", scale)
    stored += _write_array(group, "logit_ids", cat(l_ids, (0, width), np.int64).astype(id_dtype))
    values = cat(l_vals, (0, width), np.float32)
    if layout["logit_targets"] == "topk":
        data, _ = codecs.encode(enc["logprobs"], values)
        stored += _write_array(group, "logit_values", data, enc["logprobs"])
        stored += _write_array(group, "logit_tail", cat(l_tail, (0,), np.float32).astype(np.float32), "f32")
    else:
        stored += _write_array(group, "logit_values", values.astype(np.uint16))
    loc.write_parquet(part_key(block), to_table(rows))  # last: the block now counts as done
    return stored


class BackgroundWriter:
    """Encodes and writes blocks on a thread, so the teacher's next batch runs meanwhile.

    The queue is bounded: if writing falls behind, compute waits instead of piling up blocks in
    memory. A write error is raised at the next submit() or at close().
    """

    def __init__(self, loc: Location, layout: dict, depth: int = 2, on_written=None):
        self.loc, self.layout, self.on_written = loc, layout, on_written
        self.queue: queue.Queue = queue.Queue(maxsize=depth)
        self.error: BaseException | None = None
        self.thread = threading.Thread(target=self._run, name="alignkd-cache-writer", daemon=True)
        self.thread.start()

    def _run(self):
        while (item := self.queue.get()) is not None:
            if self.error is not None:
                continue
            try:
                nbytes = write_block(self.loc, *item, self.layout)
                if self.on_written:
                    self.on_written(item[0], len(item[1]), nbytes)
            except BaseException as e:  # re-raised in the caller's thread
                self.error = e

    def _raise(self):
        if self.error is not None:
            raise RuntimeError(f"writing to {self.loc.url} failed: {self.error}") from self.error

    def submit(self, block: int, results: list[SampleResult]) -> None:
        self._raise()
        self.queue.put((block, results))

    def close(self) -> None:
        self.queue.put(None)
        self.thread.join()
        self._raise()
