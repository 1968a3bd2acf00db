"""Trust, the plan: each block's row counts from the manifest's columns. Offsets must tile each
block's arrays in manifest order, visual references must be rows 0..n-1 of their block shared by
one image_key, and the image count must be the attributes'. The array metadata is then checked
against the plan (trust_arrays), and verify streams by it."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from alignkd_cache.signals import cache_kind
from alignkd_cache.store.inspection import BlockRows, Inspection
from alignkd_cache.store.layout import logit_width
from alignkd_cache.store.location import Location

SPANS = ("attention", "logit")  # the manifest's (offset, rows) pairs into a block's flat arrays


def written_columns(table: pa.Table, names: list[str]) -> dict[str, np.ndarray]:
    """Columns of the written rows, as numpy arrays (fixed-width columns hold no nulls there)."""
    written = table.filter(pc.equal(table.column("status"), "written"))
    return {name: written.column(name).to_numpy() for name in names}


def check_plan(loc: Location, found: Inspection) -> None:
    attrs, num_blocks = found.attrs, found.attrs["num_blocks"]
    names = ["block", "visual_block", "visual_row"] + [f"{k}_{f}" for k in SPANS for f in ("offset", "rows")]
    cols = written_columns(found.table, names)
    ids = found.table.filter(pc.equal(found.table.column("status"), "written")).column("id")
    row_problems = []  # (written row, order within the row, what): worded in manifest order
    ends = {}
    for order, kind in enumerate(SPANS):
        expected, ends[kind] = _tiling(cols["block"], cols[f"{kind}_rows"], num_blocks)
        offset = cols[f"{kind}_offset"]
        for i in np.flatnonzero(offset != expected):
            what = f"{kind}_offset is {offset[i]}, expected {expected[i]} (rows follow each other)"
            row_problems.append((i, order, what))
    keys = found.table.filter(pc.equal(found.table.column("status"), "written")).column("image_key")
    refs, mismatch = _visual_refs(cols["visual_block"], cols["visual_row"], keys)
    for i in np.flatnonzero(mismatch):
        ref = (int(cols["visual_block"][i]), int(cols["visual_row"][i]))
        row_problems.append((i, len(SPANS), f"shares visual row {ref} with a sample of another image_key"))
    for i, _, what in sorted(row_problems, key=lambda p: p[:2]):
        found.add(what, ids[int(i)].as_py())
    visual = _check_visual_rows(refs, cols["block"], num_blocks, found)
    width = np.full(num_blocks, logit_width(attrs), np.int64)
    found.blocks = BlockRows(ends["attention"], visual, ends["logit"], width)
    images = len(refs[0])
    if cache_kind(attrs) == "layer0":  # counted by content: no visual rows are stored
        images = len(pc.unique(keys.drop_null()))
    if attrs["counts"]["images"] != images:
        found.add(f"attribute counts.images is {attrs['counts']['images']}, the manifest has {images}")


def _tiling(block: np.ndarray, rows: np.ndarray, num_blocks: int) -> tuple[np.ndarray, np.ndarray]:
    """(each row's expected offset: the rows before it in its block, each block's total rows)."""
    order = np.argsort(block, kind="stable")
    rows = rows.astype(np.int64)
    total = np.bincount(block, weights=rows, minlength=num_blocks).astype(np.int64)
    before_block = np.concatenate([[0], np.cumsum(total)[:-1]])
    running = np.cumsum(rows[order]) - rows[order]  # rows before, over the sorted rows
    expected = np.empty(len(block), np.int64)
    expected[order] = running - before_block[block[order]]
    return expected, total


def _visual_refs(vb: np.ndarray, vr: np.ndarray, keys: pa.ChunkedArray) -> tuple[tuple, np.ndarray]:
    """((blocks, rows) of the distinct references, per written row: its key differs from the
    first sample's on the same reference)."""
    uses = np.flatnonzero(vb >= 0)
    ref = vb[uses].astype(np.int64) << 32 | vr[uses].astype(np.int64)
    distinct, first, which = np.unique(ref, return_index=True, return_inverse=True)
    codes = pc.dictionary_encode(keys.take(pa.array(uses))).combine_chunks().indices
    codes = pc.fill_null(codes, -1).to_numpy()
    mismatch = np.zeros(len(vb), bool)
    mismatch[uses] = codes != codes[first][which]
    return (distinct >> 32, distinct & 0xFFFFFFFF), mismatch


def _check_visual_rows(refs: tuple, block: np.ndarray, num_blocks: int, found: Inspection) -> np.ndarray:
    """Each block's stored visual rows: the distinct rows referenced, which must be 0..n-1 and no
    more than the block's samples. Returns the count per block."""
    blocks, rows = refs
    count = np.bincount(blocks, minlength=num_blocks)
    top = np.full(num_blocks, -1, np.int64)
    np.maximum.at(top, blocks, rows)
    samples = np.bincount(block, minlength=num_blocks)  # written rows; skipped ones store no image
    skipped = found.table.filter(pc.equal(found.table.column("status"), "skipped")).column("block").to_numpy()
    samples += np.bincount(skipped, minlength=num_blocks)
    for b in np.flatnonzero((top != count - 1) | (count > samples)):
        listed = sorted(rows[blocks == b].tolist())[:5]
        found.add(f"visual rows {listed} of block {b} are not 0..n-1 stored by its samples")
    return count
