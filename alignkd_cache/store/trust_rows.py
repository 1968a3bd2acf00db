"""Trust, the manifest's rows: every rule runs on whole columns (numpy over Arrow buffers, a batch
of rows at a time), and only the rows a rule flags go through the per-row checks that word the
problem. The words come from one place (`row_problems`), so a vectorised rule only has to flag
every row the per-row checks refuse; a row it flags in vain costs a per-row check and nothing else.
"""

from __future__ import annotations

import re
from collections import deque
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from alignkd_cache.signal_spec import cache_kind, followed_by_text, stored_heads
from alignkd_cache.store.inspection import Inspection
from alignkd_cache.store.location import Location
from alignkd_cache.store.manifest import (
    LAYOUT_ROLE,
    MANIFEST_KEY,
    is_layout_role,
    records_layouts,
)
from alignkd_cache.store.manifest_index import IndexBuilder

ROWS_PER_BATCH = 1 << 14  # rows decoded and flattened at once: bounds the token lists' memory

WRITTEN_FIELDS = (
    "image_keys",
    "input_ids",
    "num_visual",
    "supervised_positions",
    "logit_positions",
    "attention_offset",
    "attention_rows",
    "logit_offset",
    "logit_rows",
    "visual_blocks",
    "visual_offsets",
)
PER_IMAGE = ("images", "image_keys", "num_visual", "visual_blocks", "visual_offsets")
IMAGE_KEY = "[0-9a-f]{32}"
LAYOUTS = "image_layouts"  # schema 4.1: written rows have it, one layout per image


def written_fields(attrs: dict) -> tuple[str, ...]:
    return WRITTEN_FIELDS + ((LAYOUTS,) if records_layouts(attrs) else ())


def per_image(attrs: dict) -> tuple[str, ...]:
    return PER_IMAGE + ((LAYOUTS,) if records_layouts(attrs) else ())


def check_rows(loc: Location, found: Inspection) -> None:
    """Every row rule, streaming the manifest a batch at a time; the index of what stays in memory
    is built on the way (found.index, once every row passed). The rows a rule flags are worded
    after the stream, in manifest order, each read again from its row group."""
    manifest, attrs = found.manifest, found.attrs
    try:
        ids = manifest.read(["id"]).column("id").combine_chunks()
        duplicate = duplicate_ids(ids)
        flagged = [duplicate | pc.fill_null(pc.equal(ids, ""), True).to_numpy(zero_copy_only=False)]
        del ids  # not kept: the stream decodes every other column
        index = IndexBuilder(manifest.num_rows, attrs["num_blocks"], keep=found.max_problems)
        batches = manifest.batches(ROWS_PER_BATCH, [n for n in manifest.schema.names if n != "id"])
        suspects = []
        for start, batch in _decoded_ahead(batches, depth=2):
            suspects.append(suspect_rows(batch, start, attrs))
            index.add(start, batch)
        flagged.append(np.concatenate(suspects or [np.zeros(0, bool)]))
        for i in np.flatnonzero(flagged[0] | flagged[1]):
            row_problems(int(i), manifest.row(int(i)), bool(duplicate[i]), attrs, found)
            if found.full:
                return
    except (pa.ArrowException, OSError) as e:
        found.add(f"{MANIFEST_KEY}: unreadable Parquet ({e})")
        return
    written = int(index.written.sum())
    want = attrs["counts"]
    got = {"records": manifest.num_rows, "written": written, "skipped": index.skipped}
    if any(want[k] != v for k, v in got.items()):
        found.add(f"attribute counts {want} disagree with the manifest {got}")
    if not found.problems:
        found.index = index.finish()


def _decoded_ahead(batches: Iterator, depth: int) -> Iterator:
    """The batches, each decoded on a thread while this one checks the ones before it (Arrow
    releases the GIL; the checks' numpy temporaries stay on this thread, where the plan reuses
    their memory)."""
    with ThreadPoolExecutor(1) as decoder:
        pending = deque(decoder.submit(next, batches, None) for _ in range(depth))
        while (item := pending.popleft().result()) is not None:
            pending.append(decoder.submit(next, batches, None))
            yield item


def duplicate_ids(ids: pa.Array) -> np.ndarray:
    """Per row: its id was on an earlier row. A stable sort puts equal ids side by side in row
    order (a hash of every id costs about 4x the time and memory here)."""
    order = pc.sort_indices(ids)
    ordered = ids.take(order)
    repeat = pc.fill_null(pc.equal(ordered[1:], ordered[:-1]), False).to_numpy(zero_copy_only=False)
    duplicate = np.zeros(len(ids), bool)
    duplicate[order.to_numpy()[1:][repeat]] = True
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
    if r["images"] is None:
        found.add("images is null; a sample without images has an empty list", sid)
    elif r["status"] == "written":
        _check_written(r, attrs, found)
    elif r["status"] == "skipped":
        if r["skip_reason"] is None or any(r[k] is not None for k in written_fields(attrs)):
            found.add("a skipped row must have skip_reason and no signal fields", sid)
    else:
        found.add(f"status {r['status']!r} is not 'written' or 'skipped'", sid)


def visual_layout(ids: list[int], num_visual: list[int], image_token_id: int) -> tuple[int, int]:
    """(first visual position or -1, |T|: the text positions after it)."""
    visual = [p for p, t in enumerate(ids) if t == image_token_id]
    if not visual:
        return -1, 0
    return visual[0], len(ids) - visual[0] - sum(num_visual)


def _tokens_fit(r: dict, attrs: dict, found: Inspection) -> bool:
    """The row's ids, per-image lists and image keys are those of a valid sample of this cache."""
    sid = r["id"]
    ids, nv = r["input_ids"], r["num_visual"]
    n = len(ids)
    if not 2 <= n <= attrs["options"]["max_length"]:
        found.add(
            f"input_ids has {n} tokens; the cache's max_length is {attrs['options']['max_length']}", sid
        )
        return False
    lengths = {name: len(r[name]) for name in per_image(attrs)}
    if len(set(lengths.values())) != 1:
        found.add(f"the per-image lists differ in length ({lengths}); each needs one entry per image", sid)
        return False
    fixed = attrs["num_visual_tokens"]
    if any(k < 1 or (fixed is not None and k != fixed) for k in nv):
        want = f"{fixed} each" if fixed is not None else "at least 1 each"
        found.add(f"num_visual {nv} is not the cache's visual-token count per image ({want})", sid)
        return False
    if not all(isinstance(k, str) and re.fullmatch(IMAGE_KEY, k) for k in r["image_keys"]):
        found.add("image_keys are not one 32-hex-digit content key per image", sid)
        return False
    image_id, vocab = attrs["image_token_id"], attrs["vocab_size"]
    tokens = np.asarray(ids, dtype=np.int64)
    is_visual = tokens == image_id
    bad = ~is_visual & ((tokens < 0) | (tokens >= vocab))
    if bad.any() or int(is_visual.sum()) != sum(nv):
        p = int(np.flatnonzero(bad)[0]) if bad.any() else None
        what = (
            f"input_ids[{p}] is {ids[p]}: text ids must be in 0..{vocab - 1}"
            if p is not None
            else (
                f"input_ids hold {int(is_visual.sum())} image-token ids ({image_id}), num_visual sums to {sum(nv)}"
            )
        )
        found.add(f"{what}; the image id must fill exactly the visual positions", sid)
        return False
    return True


def _check_written(r: dict, attrs: dict, found: Inspection) -> None:
    sid = r["id"]
    missing = [k for k in written_fields(attrs) if r[k] is None]
    if missing:
        found.add(f"{missing[0]} is null in a written row", sid)
        return
    if not _tokens_fit(r, attrs, found):
        return
    if records_layouts(attrs):
        _layouts_fit(r, found)
    ids, nv = r["input_ids"], r["num_visual"]
    image = bool(nv)
    text_next = followed_by_text(ids, attrs["image_token_id"])
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
    queries = visual_layout(ids, nv, attrs["image_token_id"])[1]
    need = {"attention_rows": heads * queries if image_rows else 0, "logit_rows": len(expected)}
    for name, rows in need.items():
        if r[name] != rows:
            found.add(f"{name} is {r[name]}, its positions need {rows}", sid)
    for vb, offset in zip(r["visual_blocks"], r["visual_offsets"], strict=True):
        if (stored and not 0 <= vb < attrs["num_blocks"]) or (not stored and vb != -1):
            found.add(
                f"visual_blocks {r['visual_blocks']} do not match the sample's images (or are not blocks)",
                sid,
            )
            return
        if (stored and offset < 0) or (not stored and offset != -1):
            found.add(f"visual_offsets {r['visual_offsets']} are not token rows", sid)
            return


def _layouts_fit(r: dict, found: Inspection) -> None:
    """Each image's layout: segments with a known role and at least one row and column, covering
    exactly the image's visual tokens (the lists' lengths are checked with the other per-image ones)."""
    sid = r["id"]
    for k, (layout, n) in enumerate(zip(r[LAYOUTS], r["num_visual"], strict=True)):
        if not layout or any(s is None for s in layout):
            found.add(f"{LAYOUTS}[{k}] has no segments (or a null one); each image needs its layout", sid)
            return
        for s in layout:
            if not is_layout_role(s["role"]):
                found.add(f"{LAYOUTS}[{k}] has a segment with role {s['role']!r}, not a layout role", sid)
                return
            if s["rows"] is None or s["cols"] is None or s["rows"] < 1 or s["cols"] < 1:
                found.add(
                    f"{LAYOUTS}[{k}] has a {s['role']} of {s['rows']} x {s['cols']} tokens; "
                    "rows and cols must be at least 1",
                    sid,
                )
                return
        covered = sum(s["rows"] * s["cols"] for s in layout)
        if covered != n:
            shape = " + ".join(f"{s['role']} {s['rows']}x{s['cols']}" for s in layout)
            found.add(
                f"{LAYOUTS}[{k}] ({shape}) covers {covered} visual tokens, num_visual[{k}] is {n}; "
                "a layout must cover its image's visual tokens",
                sid,
            )
            return


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
    fields = written_fields(attrs)
    present = {k: batch.column(k).is_valid().to_numpy(zero_copy_only=False) for k in fields}
    block = ints(batch, "block")
    suspect = ints(batch, "index") != np.arange(start, start + n_rows)
    suspect |= (block < 0) | (block >= attrs["num_blocks"])
    suspect |= batch.column("images").is_null().to_numpy(zero_copy_only=False)
    suspect |= ~(written | skipped)
    suspect |= skipped & (batch.column("skip_reason").is_null().to_numpy(zero_copy_only=False))
    suspect |= skipped & np.any([present[k] for k in fields], axis=0)
    suspect |= written & ~np.all([present[k] for k in fields], axis=0)
    return suspect | (written & _written_suspects(batch, attrs))


def _written_suspects(batch: pa.RecordBatch, attrs: dict) -> np.ndarray:
    """The written-row rules (_tokens_fit, _check_written) on columns; rows with nulls are flagged
    by the caller, and the values computed for them here are meaningless."""
    n_rows = batch.num_rows
    n_ids = _lengths(batch.column("input_ids"))
    n_images = _lengths(batch.column("images"))
    suspect = (n_ids < 2) | (n_ids > attrs["options"]["max_length"])
    for name in per_image(attrs)[1:]:
        suspect |= _lengths(batch.column(name)) != n_images
    nv, nv_row, _ = _flat(batch.column("num_visual"))
    if records_layouts(attrs):
        suspect |= _layouts_suspect(batch, nv, nv_row, attrs)
    fixed = attrs["num_visual_tokens"]
    suspect |= _any_per_row((nv < 1) | ((nv != fixed) if fixed is not None else False), nv_row, n_rows)
    sum_nv = np.bincount(nv_row, weights=nv, minlength=n_rows).astype(np.int64)
    keys = pc.list_flatten(batch.column("image_keys"))
    key_ok = pc.fill_null(pc.match_substring_regex(keys, f"^{IMAGE_KEY}$"), False).to_numpy(
        zero_copy_only=False
    )
    suspect |= _any_per_row(~key_ok, pc.list_parent_indices(batch.column("image_keys")).to_numpy(), n_rows)
    tokens, row, position = _flat(batch.column("input_ids"))
    is_visual = tokens == attrs["image_token_id"]
    out_of_vocab = ~is_visual & ((tokens < 0) | (tokens >= attrs["vocab_size"]))
    suspect |= _any_per_row(out_of_vocab, row, n_rows)
    suspect |= np.bincount(row[is_visual], minlength=n_rows) != sum_nv
    first = np.full(n_rows, np.iinfo(np.int64).max)
    visual_row = row[is_visual]  # rows in order: each row's first visual token opens its run
    opens = np.concatenate([[True], visual_row[1:] != visual_row[:-1]]) if len(visual_row) else []
    first[visual_row[opens]] = position[is_visual][opens]
    image = sum_nv > 0
    starts = np.concatenate([[0], np.cumsum(n_ids)])[:-1]  # each row's first token in `tokens`

    def visual_at(p: np.ndarray, r: np.ndarray) -> np.ndarray:
        """Whether position p of row r holds the image token (False outside the row)."""
        if not len(tokens):
            return np.zeros(len(p), bool)
        at = np.minimum(starts[r] + np.clip(p, 0, np.maximum(n_ids[r] - 1, 0)), len(tokens) - 1)
        return is_visual[at] & (n_ids[r] > 0)

    sup = batch.column("supervised_positions")
    suspect |= _not_increasing_followed_by_text(sup, n_ids, visual_at)
    token0_visual = visual_at(np.zeros(n_rows, np.int64), np.arange(n_rows))
    suspect |= _logit_positions_differ(
        batch, attrs, n_ids, sum_nv, np.asarray(token0_visual, np.int64), visual_at
    )
    stored = cache_kind(attrs) == "stored"
    image_rows = image & stored
    heads = stored_heads(attrs["attn_heads"], attrs["num_heads"])
    queries = np.where(image, n_ids - np.where(image, first, 0) - sum_nv, 0)
    suspect |= ints(batch, "attention_rows") != np.where(image_rows, heads * queries, 0)
    suspect |= ints(batch, "logit_rows") != _lengths(batch.column("logit_positions"))
    vb, vb_row, _ = _flat(batch.column("visual_blocks"))
    vo, vo_row, _ = _flat(batch.column("visual_offsets"))
    bad_block = (vb < 0) | (vb >= attrs["num_blocks"]) if stored else vb != -1
    suspect |= _any_per_row(bad_block, vb_row, n_rows)
    return suspect | _any_per_row(vo < 0 if stored else vo != -1, vo_row, n_rows)


def _layouts_suspect(batch: pa.RecordBatch, nv: np.ndarray, nv_row: np.ndarray, attrs: dict) -> np.ndarray:
    """_layouts_fit on columns: per row, an image without segments, a null segment or field, an
    unknown role, a dimension below 1, or segments not covering the image's num_visual."""
    n_rows = batch.num_rows
    layouts = batch.column(LAYOUTS)
    images = pc.list_flatten(layouts)  # one list of segments per image
    image_row = pc.list_parent_indices(layouts).to_numpy()
    suspect = _any_per_row(_lengths(images) < 1, image_row, n_rows)
    segments = pc.list_flatten(images)
    segment_row = image_row[pc.list_parent_indices(images).to_numpy()].astype(np.int64)
    segment_image = pc.list_parent_indices(images).to_numpy()
    role, rows, cols = (pc.struct_field(segments, name) for name in ("role", "rows", "cols"))
    valid = np.asarray(segments.is_valid().to_numpy(zero_copy_only=False), bool)
    for part in (role, rows, cols):
        valid &= part.is_valid().to_numpy(zero_copy_only=False)
    known = pc.fill_null(pc.match_substring_regex(role, f"^({LAYOUT_ROLE})$"), False)
    r, c = (pc.fill_null(x, 0).to_numpy(zero_copy_only=False).astype(np.int64) for x in (rows, cols))
    bad = ~valid | ~known.to_numpy(zero_copy_only=False) | (r < 1) | (c < 1)
    suspect |= _any_per_row(bad, segment_row, n_rows)
    # Tokens covered per image, each segment's count capped (so no sum overflows) above any image's.
    cap = attrs["options"]["max_length"] + 1
    covered = np.bincount(segment_image, weights=np.clip(r * c, 0, cap), minlength=len(images)).astype(
        np.int64
    )
    # Compared image by image on the rows whose lists have one entry per image (others are flagged).
    same = _lengths(layouts) == _lengths(batch.column("num_visual"))
    keep_images, keep_nv = same[image_row], same[nv_row]
    differ = covered[keep_images] != nv[keep_nv]
    return suspect | _any_per_row(differ, image_row[keep_images], n_rows)


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


def _not_increasing_followed_by_text(positions: pa.ListArray, n_ids: np.ndarray, visual_at) -> np.ndarray:
    """Per row: some position is not followed by a text token, or they do not increase."""
    p, row, index = _flat(positions)
    bad = (p < 0) | (p > n_ids[row] - 2)
    bad |= visual_at(p + 1, row)
    bad[1:] |= (index[1:] > 0) & (p[1:] <= p[:-1])
    return _any_per_row(bad, row, len(positions))


def _logit_positions_differ(batch, attrs, n_ids, sum_nv, first_visual, visual_at) -> np.ndarray:
    positions = batch.column("logit_positions")
    if attrs["logit_positions"] == "text":  # all followed-by-text positions, in order
        count = np.maximum(n_ids - 1, 0) - sum_nv + first_visual
        differ = _lengths(positions) != count
        return differ | _not_increasing_followed_by_text(positions, n_ids, visual_at)
    supervised = batch.column("supervised_positions")
    differ = _lengths(positions) != _lengths(supervised)
    same_length = pa.array(~differ)
    a = pc.list_flatten(pc.filter(positions, same_length)).to_numpy(zero_copy_only=False)
    b = pc.list_flatten(pc.filter(supervised, same_length)).to_numpy(zero_copy_only=False)
    rows = np.flatnonzero(~differ)[pc.list_parent_indices(pc.filter(positions, same_length)).to_numpy()]
    differ[rows[a != b]] = True
    return differ
