"""Trust, the plan: each block's row counts from the manifest's index (manifest_index). Offsets must tile each
block's arrays in manifest order, each image's visual reference must be token rows of its block
that follow the block's earlier images from 0, shared only by samples of one image_key and token
count, and the image count must be the attributes'. The array metadata is then checked
against the plan (trust_arrays), and verify streams by it."""

from __future__ import annotations

import numpy as np

from alignkd_cache.signals import cache_kind
from alignkd_cache.store.inspection import BlockRows, Inspection
from alignkd_cache.store.layout import logit_width
from alignkd_cache.store.location import Location
from alignkd_cache.store.manifest_index import ManifestIndex

SPANS = ("attention", "logit")  # the manifest's (offset, rows) pairs into a block's flat arrays


def check_plan(loc: Location, found: Inspection) -> None:
    attrs, num_blocks, index = found.attrs, found.attrs["num_blocks"], found.index
    cols = index.columns
    row_problems = []  # (written row, order within the row, what): worded in manifest order
    ends = {}
    for order, kind in enumerate(SPANS):
        expected, ends[kind] = _tiling(cols["block"], cols[f"{kind}_rows"], num_blocks)
        offset = cols[f"{kind}_offset"]
        for i in np.flatnonzero(offset != expected):
            what = f"{kind}_offset is {offset[i]}, expected {expected[i]} (rows follow each other)"
            row_problems.append((i, order, what))
    images = image_columns(index)
    distinct = _distinct_refs(images)
    mismatch = _shared_refs(images, distinct)
    for i in np.flatnonzero(mismatch):
        row_problems.append((i, len(SPANS), "shares visual rows with a sample of another image_key or size"))
    for i, _, what in sorted(row_problems, key=lambda p: p[:2]):
        found.add(what, index.ids[int(i)].as_py())
    visual = _check_visual_rows(images, distinct, num_blocks, found)
    width = np.full(num_blocks, logit_width(attrs), np.int64)
    attention_width = _block_max(
        cols["block"], np.where(cols["attention_rows"] > 0, images["sum"], 0), num_blocks
    )
    found.blocks = BlockRows(ends["attention"], visual, ends["logit"], width, attention_width)
    count = len(distinct[1])
    if cache_kind(attrs) == "layer0":  # counted by content: no visual rows are stored
        count = len(np.unique(index.image_key))
    if attrs["counts"]["images"] != count:
        found.add(f"attribute counts.images is {attrs['counts']['images']}, the manifest has {count}")


def image_columns(index: ManifestIndex) -> dict[str, np.ndarray]:
    """The written samples' images: each one's sample, token count, key and stored reference
    (block << 40 | first token row; -1 for none), and per sample the sum of its counts."""
    n, block, offset = (index.images[name] for name in ("num_visual", "visual_blocks", "visual_offsets"))
    running = np.concatenate([[0], np.cumsum(n, dtype=np.int64)])
    ref = block.astype(np.int64)  # built in place: one array per image, not one per operation
    ref <<= 40
    ref |= np.maximum(offset, 0)
    ref[block < 0] = -1
    return {
        "row": index.image_sample(),
        "n": n,
        "key": index.image_key,
        "block": block,
        "offset": offset,
        "ref": ref,
        "sum": running[index.image_start[1:]] - running[index.image_start[:-1]],
    }


def _distinct_refs(images: dict) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(the images with a stored reference, the first of them to use each distinct reference in
    reference order, and which distinct reference each one uses): one sort for every rule."""
    uses = np.flatnonzero(images["ref"] >= 0)
    _, first, which = np.unique(images["ref"][uses], return_index=True, return_inverse=True)
    return uses, first, which


def _block_max(block: np.ndarray, values: np.ndarray, num_blocks: int) -> np.ndarray:
    """Per block, the largest of its rows' values (0 for a block without rows)."""
    out = np.zeros(num_blocks, np.int64)
    if len(block):
        order = np.lexsort((values, block))  # by block, then value: each block's last is its max
        last = np.concatenate([block[order][1:] != block[order][:-1], [True]])
        out[block[order][last]] = values[order][last]
    return out


def _tiling(block: np.ndarray, rows: np.ndarray, num_blocks: int) -> tuple[np.ndarray, np.ndarray]:
    """(each row's expected offset: the rows before it in its block, each block's total rows)."""
    rows = rows.astype(np.int64)
    total = np.bincount(block, weights=rows, minlength=num_blocks).astype(np.int64)
    before_block = np.concatenate([[0], np.cumsum(total)[:-1]])
    if np.all(block[1:] >= block[:-1]):  # blocks in manifest order, as writers and merges leave them
        return np.cumsum(rows) - rows - before_block[block], total
    order = np.argsort(block, kind="stable")
    running = np.cumsum(rows[order]) - rows[order]  # rows before, over the sorted rows
    expected = np.empty(len(block), np.int64)
    expected[order] = running - before_block[block[order]]
    return expected, total


def _shared_refs(images: dict, distinct: tuple) -> np.ndarray:
    """Per written row: an image of it shares its stored tokens with the first user of that
    reference but not its key or token count."""
    mismatch = np.zeros(len(images["sum"]), bool)
    uses, first, which = distinct
    for name in ("key", "n"):
        values = images[name][uses]
        mismatch[images["row"][uses][values != values[first][which]]] = True
    return mismatch


def _check_visual_rows(images: dict, distinct: tuple, num_blocks: int, found: Inspection) -> np.ndarray:
    """Each block's stored visual tokens: the distinct references must tile its rows from 0, each
    as long as its image's tokens. Returns the token rows per block."""
    uses, first, _ = distinct
    distinct = uses[first]  # sorted by (block, offset)
    block, offset, n = images["block"][distinct], images["offset"][distinct], images["n"][distinct]
    total = np.bincount(block, weights=n, minlength=num_blocks).astype(np.int64)
    expected, _ = _tiling(block, n, num_blocks)
    for b in np.unique(block[offset != expected]):
        listed = sorted(offset[block == b].tolist())[:5]
        found.add(f"visual token rows starting at {listed} of block {b} do not follow each other from 0")
    return total
