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

from alignkd_cache.signal_spec import STORED_ARRAYS, stored_arrays
from alignkd_cache.signals import TeacherSignal
from alignkd_cache.store import codecs
from alignkd_cache.store.layout import ArraySpec, block_specs, create_array
from alignkd_cache.store.location import Location
from alignkd_cache.store.manifest import block_path, part_key, to_table


@dataclass
class SampleResult:
    """One dataset sample's manifest row and teacher signal (CPU tensors, before encoding).

    `sample` is the teacher's tokenized sample (its input_ids, num_visual, image_layouts and
    supervised_positions go into the manifest); None, with a skip_reason, when skipped. An image's visual tokens are set
    only on the sample that stores them; the others' signal has None there and visual_refs points
    at the stored rows.
    """

    index: int
    id: str
    images: tuple[str, ...] = ()
    sample: object | None = None
    skip_reason: str | None = None
    signal: TeacherSignal | None = None
    visual_refs: list[tuple[int, int] | None] | None = None  # per image: (block, first token row)


def _write_array(group: zarr.Group, name: str, data: np.ndarray, encoding: str | None = None) -> int:
    array = create_array(group, name, data.shape, data.dtype, encoding)
    if data.size:
        array[...] = data
    return array.nbytes_stored()  # chunks and metadata: what the build wrote


def write_block(loc: Location, block: int, results: list[SampleResult], layout: dict) -> int:
    """Encode and write one block; returns the bytes it stored. `layout` is the store's attrs."""
    signals = [r.signal for r in results if r.signal is not None]
    width = max([t.logits.ids.shape[1] for t in signals] or [1])
    # The widest sample that stores attention rows (trust_plan derives the same from the manifest).
    attention_width = max(
        [t.attention.shape[-1] for t in signals if t.attention is not None and t.attention[0].numel()] or [0]
    )
    parts: dict[str, list[np.ndarray]] = {name: [] for name in STORED_ARRAYS}
    store_visual = "visual" in stored_arrays(layout)
    rows = [_row(r, block, parts, width, attention_width, store_visual) for r in results]
    group = loc.group("a").create_group(block_path(block), overwrite=True)
    stored, specs = 0, block_specs(layout, 0, 0, 0, width, attention_width)
    for name in stored_arrays(layout):
        encoding = specs[name].encoding
        values = _concat(parts[name], specs[name])
        data, scale = codecs.encode(encoding, values) if encoding else (values, None)
        stored += _write_array(group, name, data, encoding)
        if scale is not None:
            stored += _write_array(group, f"{name}_scale", scale)
    loc.write_parquet(part_key(block), to_table(rows))  # last: the block now counts as done
    return stored


def _row(
    r: SampleResult, block: int, parts: dict, width: int, attention_width: int, store_visual: bool
) -> dict:
    """r's manifest row. Its signal's array rows are appended to `parts`, after the rows already there."""
    row = {"id": r.id, "index": r.index, "block": block, "images": list(r.images)}
    if r.signal is None:
        return row | {"status": "skipped", "skip_reason": r.skip_reason}
    s, t, logits = r.sample, r.signal, r.signal.logits
    attn_offset = sum(len(a) for a in parts["attention"])
    logit_offset = sum(len(a) for a in parts["logit_ids"])
    n_attn = 0
    if t.attention is not None:
        n_attn = t.attention.shape[0] * t.attention.shape[1]
        flat = t.attention.numpy().reshape(n_attn, t.attention.shape[-1])
        parts["attention"].append(np.pad(flat, ((0, 0), (0, attention_width - flat.shape[1]))))
    pad = ((0, 0), (0, width - logits.ids.shape[1]))
    parts["logit_ids"].append(np.pad(logits.ids.numpy(), pad))
    parts["logit_values"].append(np.pad(logits.values.float().numpy(), pad))
    if logits.tail is not None:
        parts["logit_tail"].append(logits.tail.float().numpy())
    refs = list(r.visual_refs or [None] * len(t.visual)) if store_visual else [None] * len(t.visual)
    for k, visual in enumerate(t.visual):
        if visual is not None and store_visual:
            refs[k] = (block, sum(len(v) for v in parts["visual"]))
            parts["visual"].append(visual.numpy())
    refs = [ref if ref is not None else (-1, -1) for ref in refs]
    if s.image_layouts is None and s.images:
        raise ValueError(f"sample {r.id!r}: no image layout; the backend's image_layouts records it")
    layouts = s.image_layouts or ()
    return row | {
        "status": "written",
        "image_keys": list(t.image_keys),
        "input_ids": s.input_ids,
        "num_visual": list(s.num_visual),
        "supervised_positions": s.supervised_positions,
        "logit_positions": logits.positions.tolist(),
        "attention_offset": attn_offset,
        "attention_rows": n_attn,
        "logit_offset": logit_offset,
        "logit_rows": len(logits.positions),
        "visual_blocks": [b for b, _ in refs],
        "visual_offsets": [o for _, o in refs],
        "image_layouts": [[dict(segment) for segment in layout] for layout in layouts],
    }


def _concat(parts: list[np.ndarray], empty: ArraySpec) -> np.ndarray:
    """One block array from its per-sample parts, in its values dtype before encoding (`empty`: the
    array's spec with no rows)."""
    values = np.concatenate(parts) if parts else np.zeros(empty.shape, empty.values_dtype)
    return values.astype(empty.values_dtype)


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
