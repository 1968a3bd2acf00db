"""Trust, the manifest's rows: every rule runs on whole columns (numpy over Arrow buffers, a batch
of rows at a time), and only the rows a rule flags go through the per-row checks that word the
problem. The words come from one place (`row_problems`), so a vectorised rule only has to flag
every row the per-row checks refuse; a row it flags in vain costs a per-row check and nothing else.
"""

from __future__ import annotations

import re

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from alignkd_cache.signals import cache_kind, followed_by_text, stored_heads
from alignkd_cache.store.inspection import Inspection
from alignkd_cache.store.location import Location

ROWS_PER_BATCH = 1 << 16  # rows flattened at once: bounds the token arrays' memory, not the result

WRITTEN_FIELDS = (
    "input_ids",
    "visual_start",
    "num_visual",
    "supervised_positions",
    "logit_positions",
    "attention_offset",
    "attention_rows",
    "logit_offset",
    "logit_rows",
    "visual_block",
    "visual_row",
)
IMAGE_KEY = "[0-9a-f]{32}"


def check_rows(loc: Location, found: Inspection) -> None:
    table, attrs = found.table, found.attrs
    duplicate = duplicate_ids(table.column("id"))
    start = 0
    for batch in table.to_batches(max_chunksize=ROWS_PER_BATCH):
        for i in np.flatnonzero(
            suspect_rows(batch, start, attrs) | duplicate[start : start + batch.num_rows]
        ):
            row = batch.slice(int(i), 1).to_pylist()[0]
            row_problems(start + int(i), row, bool(duplicate[start + i]), attrs, found)
            if found.full:
                return
        start += batch.num_rows
    status = table.column("status")
    want = attrs["counts"]
    got = {
        "records": table.num_rows,
        "written": pc.sum(pc.equal(status, "written")).as_py() or 0,
        "skipped": pc.sum(pc.equal(status, "skipped")).as_py() or 0,
    }
    if any(want[k] != v for k, v in got.items()):
        found.add(f"attribute counts {want} disagree with the manifest {got}")


def duplicate_ids(ids: pa.ChunkedArray) -> np.ndarray:
    """Per row: its id was on an earlier row."""
    duplicate = np.zeros(len(ids), bool)
    codes = pc.dictionary_encode(ids).combine_chunks().indices.to_numpy()
    if len(np.unique(codes)) < len(ids):
        _, first = np.unique(codes, return_index=True)
        duplicate[:] = True
        duplicate[first] = False
    return duplicate


def row_problems(i: int, r: dict, duplicate: bool, attrs: dict, found: Inspection) -> None:
    """Every rule on one row, worded (the vectorised rules in `suspect_rows` flag the same rows)."""
    sid = r["id"]
    if duplicate or not sid:
        found.add(f"manifest row {i}: id is {'a duplicate' if sid else 'empty'}", sid)
    if r["index"] != i:
        found.add(f"manifest row {i}: index is {r['index']}, rows must be in dataset order", sid)
    if not 0 <= r["block"] < attrs["num_blocks"]:
        found.add(f"block {r['block']} is not one of the cache's {attrs['num_blocks']} blocks", sid)
    if r["status"] == "written":
        _check_written(r, attrs, found)
    elif r["status"] == "skipped":
        if r["skip_reason"] is None or any(r[k] is not None for k in WRITTEN_FIELDS):
            found.add("a skipped row must have skip_reason and no signal fields", sid)
    else:
        found.add(f"status {r['status']!r} is not 'written' or 'skipped'", sid)


def _tokens_fit(r: dict, attrs: dict, found: Inspection) -> bool:
    """The row's ids, visual run and image key are those of a valid sample of this cache."""
    sid = r["id"]
    ids, vs, nv = r["input_ids"], r["visual_start"], r["num_visual"]
    n = len(ids)
    if not 2 <= n <= attrs["options"]["max_length"]:
        found.add(
            f"input_ids has {n} tokens; the cache's max_length is {attrs['options']['max_length']}", sid
        )
        return False
    image = vs >= 0
    if image and (nv != attrs["num_visual_tokens"] or vs + nv >= n):
        found.add(
            f"visual_start {vs} / num_visual {nv} do not fit {n} tokens of which {attrs['num_visual_tokens']} visual",
            sid,
        )
        return False
    if not image and (vs != -1 or nv != 0):
        found.add(f"visual_start {vs} / num_visual {nv}: a text-only sample has -1 / 0", sid)
        return False
    keyed = isinstance(r["image"], str) and re.fullmatch(IMAGE_KEY, r["image_key"] or "")
    unkeyed = r["image"] is None and r["image_key"] is None
    if not (keyed if image else unkeyed):
        found.add(
            "image / image_key do not match the sample's visual tokens (a 32-hex-digit key per image)", sid
        )
        return False
    image_id, vocab = attrs["image_token_id"], attrs["vocab_size"]
    tokens, is_visual = np.asarray(ids, dtype=np.int64), np.zeros(n, bool)
    is_visual[vs : vs + nv] = image
    bad = ((tokens == image_id) != is_visual) | (~is_visual & ((tokens < 0) | (tokens >= vocab)))
    if bad.any():
        p = int(np.flatnonzero(bad)[0])
        found.add(
            f"input_ids[{p}] is {ids[p]}: text ids must be in 0..{vocab - 1} and the image id {image_id} "
            "must fill exactly the visual positions",
            sid,
        )
        return False
    return True


def _check_written(r: dict, attrs: dict, found: Inspection) -> None:
    sid = r["id"]
    missing = [k for k in WRITTEN_FIELDS if r[k] is None]
    if missing:
        found.add(f"{missing[0]} is null in a written row", sid)
        return
    if not _tokens_fit(r, attrs, found):
        return
    ids, vs, nv = r["input_ids"], r["visual_start"], r["num_visual"]
    n, image = len(ids), vs >= 0
    text_next = followed_by_text(n, vs, nv)
    sup, pos = r["supervised_positions"], r["logit_positions"]
    if not set(sup) <= set(text_next) or sup != sorted(set(sup)):
        found.add("supervised_positions are not increasing positions followed by a text token", sid)
    expected = sup if attrs["logit_positions"] == "answer" else text_next
    if pos != expected:
        found.add(
            f"logit_positions differ from the {attrs['logit_positions']!r} positions of its tokens", sid
        )
    heads = stored_heads(attrs["attn_heads"], attrs["num_heads"])
    stored = cache_kind(attrs) == "stored"  # a layer0 cache stores no attention and no visual rows
    image_rows = image and stored
    need = {"attention_rows": heads * (n - vs - nv) if image_rows else 0, "logit_rows": len(expected)}
    for name, rows in need.items():
        if r[name] != rows:
            found.add(f"{name} is {r[name]}, its positions need {rows}", sid)
    if image_rows != (r["visual_block"] >= 0) or (
        image_rows and not 0 <= r["visual_block"] < attrs["num_blocks"]
    ):
        found.add(
            f"visual_block {r['visual_block']} does not match the sample's image (or is not a block)", sid
        )
    elif image_rows and r["visual_row"] < 0 or not image_rows and r["visual_row"] != -1:
        found.add(f"visual_row {r['visual_row']} is not a row", sid)


# ---------------------------------------------------------------------------------------------
# The same rules on whole columns


def ints(batch: pa.RecordBatch, name: str) -> np.ndarray:
    """A fixed-width column as int64, nulls as 0 (null rows are flagged on their own)."""
    return pc.fill_null(batch.column(name), 0).to_numpy().astype(np.int64)


def suspect_rows(batch: pa.RecordBatch, start: int, attrs: dict) -> np.ndarray:
    """Per row of the batch: some rule may refuse it (every row `row_problems` refuses is flagged)."""
    n_rows = batch.num_rows
    status = batch.column("status")
    written = pc.fill_null(pc.equal(status, "written"), False).to_numpy(zero_copy_only=False)
    skipped = pc.fill_null(pc.equal(status, "skipped"), False).to_numpy(zero_copy_only=False)
    present = {k: batch.column(k).is_valid().to_numpy(zero_copy_only=False) for k in WRITTEN_FIELDS}
    block = ints(batch, "block")
    suspect = ints(batch, "index") != np.arange(start, start + n_rows)
    suspect |= (block < 0) | (block >= attrs["num_blocks"])
    suspect |= pc.fill_null(pc.equal(batch.column("id"), ""), True).to_numpy(zero_copy_only=False)
    suspect |= ~(written | skipped)
    suspect |= skipped & (batch.column("skip_reason").is_null().to_numpy(zero_copy_only=False))
    suspect |= skipped & np.any([present[k] for k in WRITTEN_FIELDS], axis=0)
    suspect |= written & ~np.all([present[k] for k in WRITTEN_FIELDS], axis=0)
    return suspect | (written & _written_suspects(batch, attrs))


def _written_suspects(batch: pa.RecordBatch, attrs: dict) -> np.ndarray:
    """The written-row rules (_tokens_fit, _check_written) on columns; rows with nulls are flagged
    by the caller, and the values computed for them here are meaningless."""
    n_ids = _lengths(batch.column("input_ids"))
    vs, nv = ints(batch, "visual_start"), ints(batch, "num_visual")
    image = vs >= 0
    suspect = (n_ids < 2) | (n_ids > attrs["options"]["max_length"])
    suspect |= image & ((nv != attrs["num_visual_tokens"]) | (vs + nv >= n_ids))
    suspect |= ~image & ((vs != -1) | (nv != 0))
    has_image = batch.column("image").is_valid().to_numpy(zero_copy_only=False)
    key = pc.fill_null(batch.column("image_key"), "")
    keyed = has_image & pc.match_substring_regex(key, f"^{IMAGE_KEY}$").to_numpy(zero_copy_only=False)
    unkeyed = ~has_image & batch.column("image_key").is_null().to_numpy(zero_copy_only=False)
    suspect |= np.where(image, ~keyed, ~unkeyed)
    vis = (vs, nv, image)
    suspect |= _bad_tokens(batch.column("input_ids"), vis, attrs)
    sup = batch.column("supervised_positions")
    suspect |= _not_increasing_followed_by_text(sup, n_ids, vis)
    suspect |= _logit_positions_differ(batch, n_ids, vis, attrs)
    stored = cache_kind(attrs) == "stored"
    image_rows = image & stored
    heads = stored_heads(attrs["attn_heads"], attrs["num_heads"])
    suspect |= ints(batch, "attention_rows") != np.where(image_rows, heads * (n_ids - vs - nv), 0)
    suspect |= ints(batch, "logit_rows") != _lengths(batch.column("logit_positions"))
    vb, vr = ints(batch, "visual_block"), ints(batch, "visual_row")
    suspect |= image_rows != (vb >= 0)
    suspect |= image_rows & (vb >= attrs["num_blocks"])
    return suspect | np.where(image_rows, vr < 0, vr != -1)


def _lengths(lists: pa.ListArray) -> np.ndarray:
    return pc.fill_null(pc.list_value_length(lists), 0).to_numpy().astype(np.int64)


def _flat(lists: pa.ListArray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(values, their row, their position in the row) of a list column."""
    values = pc.list_flatten(lists).to_numpy(zero_copy_only=False).astype(np.int64)
    row = pc.list_parent_indices(lists).to_numpy()
    first = np.cumsum(np.concatenate([[0], _lengths(lists)]))[:-1]
    return values, row, np.arange(len(values)) - first[row]


def _any_per_row(bad: np.ndarray, row: np.ndarray, n_rows: int) -> np.ndarray:
    return np.bincount(row[bad], minlength=n_rows) > 0


def _is_visual(position: np.ndarray, row: np.ndarray, vis: tuple) -> np.ndarray:
    vs, nv, image = vis
    return image[row] & (position >= vs[row]) & (position < vs[row] + nv[row])


def _bad_tokens(input_ids: pa.ListArray, vis: tuple, attrs: dict) -> np.ndarray:
    tokens, row, position = _flat(input_ids)
    is_visual = _is_visual(position, row, vis)
    out_of_vocab = (tokens < 0) | (tokens >= attrs["vocab_size"])
    bad = ((tokens == attrs["image_token_id"]) != is_visual) | (~is_visual & out_of_vocab)
    return _any_per_row(bad, row, len(input_ids))


def _not_increasing_followed_by_text(positions: pa.ListArray, n_ids: np.ndarray, vis: tuple) -> np.ndarray:
    """Per row: some position is not followed by a text token, or they do not increase."""
    p, row, index = _flat(positions)
    bad = (p < 0) | (p > n_ids[row] - 2) | _is_visual(p + 1, row, vis)
    bad[1:] |= (index[1:] > 0) & (p[1:] <= p[:-1])
    return _any_per_row(bad, row, len(positions))


def _logit_positions_differ(batch: pa.RecordBatch, n_ids: np.ndarray, vis: tuple, attrs: dict) -> np.ndarray:
    positions = batch.column("logit_positions")
    if attrs["logit_positions"] == "text":  # all followed-by-text positions, in order
        vs, nv, image = vis
        visual_after_0 = np.where(image, nv - (vs == 0), 0)
        count = np.maximum(n_ids - 1, 0) - visual_after_0
        differ = _lengths(positions) != count
        return differ | _not_increasing_followed_by_text(positions, n_ids, vis)
    supervised = batch.column("supervised_positions")
    differ = _lengths(positions) != _lengths(supervised)
    same_length = pa.array(~differ)
    a = pc.list_flatten(pc.filter(positions, same_length)).to_numpy(zero_copy_only=False)
    b = pc.list_flatten(pc.filter(supervised, same_length)).to_numpy(zero_copy_only=False)
    rows = np.flatnonzero(~differ)[pc.list_parent_indices(pc.filter(positions, same_length)).to_numpy()]
    differ[rows[a != b]] = True
    return differ
