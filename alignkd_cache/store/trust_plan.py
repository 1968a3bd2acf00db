"""Trust, the plan: each block's row counts from the manifest's index (manifest_index). Offsets
must tile each block's arrays in manifest order (checked as the index is built), each image's
visual reference must be token rows of its block that follow the block's earlier images from 0,
shared only by samples of one image_key and token count, and the image count must be the
attributes'. The array metadata is then checked against the plan (trust_arrays), and verify
streams by it."""

from __future__ import annotations

import numpy as np

from alignkd_cache.signal_spec import cache_kind
from alignkd_cache.store.inspection import BlockRows, Inspection
from alignkd_cache.store.layout import logit_width
from alignkd_cache.store.location import Location
from alignkd_cache.store.manifest_index import SPANS, ManifestIndex, tile_offsets


def check_plan(loc: Location, found: Inspection) -> None:
    attrs, num_blocks, index = found.attrs, found.attrs["num_blocks"], found.index
    cols = index.columns
    # (written sample, order within the sample, what): worded in manifest order. The offsets were
    # tiled while the rows were streamed (manifest_index.tile_offsets).
    row_problems = [
        (i, order, f"{kind}_offset is {offset}, expected {expected} (rows follow each other)")
        for order, kind in enumerate(SPANS)
        for i, offset, expected in index.misplaced[kind]
    ]
    widths = index.visual_tokens()  # a sample's attention rows are as wide as its visual tokens
    widths[cols["attention_rows"] == 0] = 0
    attention_width = _block_max(cols["block"], widths, num_blocks)
    del widths
    order, heads = _distinct_refs(index)
    for i in np.flatnonzero(_shared_refs(index, order, heads)):
        row_problems.append((i, len(SPANS), "shares visual rows with a sample of another image_key or size"))
    for i, _, what in sorted(row_problems, key=lambda p: p[:2]):
        found.add(what, found.manifest.row(int(index.rows[i]))["id"])
    first_users = order[heads]  # of each distinct reference, sorted by it (the sort is freed here)
    del order, heads
    visual = _check_visual_rows(index, first_users, num_blocks, found)
    width = np.full(num_blocks, logit_width(attrs), np.int64)
    ends = index.block_rows
    found.blocks = BlockRows(ends["attention"], visual, ends["logit"], width, attention_width)
    count = len(first_users)
    if cache_kind(attrs) == "layer0":  # counted by content: no visual rows are stored
        count = len(np.unique(index.image_key))
    if attrs["counts"]["images"] != count:
        found.add(f"attribute counts.images is {attrs['counts']['images']}, the manifest has {count}")


def _distinct_refs(index: ManifestIndex) -> tuple[np.ndarray, np.ndarray]:
    """(the images with a stored reference, sorted by it: a stable sort, so each reference's users
    stay in manifest order; where each distinct reference's first user is in that order): one sort
    for every rule. A reference is block << 40 | first token row, -1 for none (a layer0 cache)."""
    block, offset = index.images["visual_blocks"], index.images["visual_offsets"]
    ref = block.astype(np.int64)  # built in place: one array per image, not one per operation
    ref <<= 40
    ref |= np.maximum(offset, 0)
    ref[block < 0] = -1
    order = np.argsort(ref, kind="stable")[np.count_nonzero(block < 0) :]  # -1 sorts first
    heads, previous = [], None  # where the sorted references change, a slice at a time
    for lo in range(0, len(order), USERS_AT_ONCE):
        sorted_ref = ref[order[lo : lo + USERS_AT_ONCE]]
        change = np.concatenate([[sorted_ref[0] != previous], sorted_ref[1:] != sorted_ref[:-1]])
        heads.append(lo + np.flatnonzero(change))
        previous = sorted_ref[-1]
    return order, np.concatenate(heads) if heads else np.zeros(0, np.int64)


def _block_max(block: np.ndarray, values: np.ndarray, num_blocks: int) -> np.ndarray:
    """Per block, the largest of its rows' values (0 for a block without rows)."""
    out = np.zeros(num_blocks, np.int64)
    if not len(block):
        return out
    if np.all(block[1:] >= block[:-1]):  # blocks in manifest order: one reduction per run
        starts = np.flatnonzero(np.concatenate([[True], block[1:] != block[:-1]]))
        out[block[starts]] = np.maximum.reduceat(values, starts)
        return out
    order = np.lexsort((values, block))  # by block, then value: each block's last is its max
    last = np.concatenate([block[order][1:] != block[order][:-1], [True]])
    out[block[order][last]] = values[order][last]
    return out


USERS_AT_ONCE = 1 << 18  # references compared with their first user per step (bounds the gathers)


def _shared_refs(index: ManifestIndex, order: np.ndarray, heads: np.ndarray) -> np.ndarray:
    """Per written sample: an image of it shares its stored tokens with the first user of that
    reference but not its key or token count."""
    mismatch = np.zeros(len(index), bool)
    key, n = index.image_key, index.images["num_visual"]
    group = np.repeat(np.arange(len(heads), dtype=np.int32), np.diff(np.append(heads, len(order))))
    for lo in range(0, len(order), USERS_AT_ONCE):
        users = order[lo : lo + USERS_AT_ONCE]
        first = order[heads[group[lo : lo + USERS_AT_ONCE]]]
        differ = (key[users] != key[first]) | (n[users] != n[first])
        mismatch[index.sample_of(users[differ])] = True
    return mismatch


def _check_visual_rows(
    index: ManifestIndex, first_users: np.ndarray, num_blocks: int, found: Inspection
) -> np.ndarray:
    """Each block's stored visual tokens: the distinct references (their first users, sorted by
    (block, offset)) must tile its rows from 0, each as long as its image's tokens. Returns the
    token rows per block."""
    block, offset, n = (
        index.images[name][first_users] for name in ("visual_blocks", "visual_offsets", "num_visual")
    )
    total = np.zeros(num_blocks, np.int64)
    expected = tile_offsets(block, n, total)
    for b in np.unique(block[offset != expected]):
        listed = sorted(offset[block == b].tolist())[:5]
        found.add(f"visual token rows starting at {listed} of block {b} do not follow each other from 0")
    return total
