"""Opening a cache works on the manifest's columns (issue #22): the vectorised row rules refuse
exactly the rows the per-row rules refuse, with the same words; the trainer's normalisers come
from columns; verify with several jobs reports what one job reports; a rank that adopts another
rank's check still refuses a manifest changed since."""

from __future__ import annotations

import copy
import json
import random

import numpy as np
import pyarrow.parquet as pq
import pytest
from store_synthetic import VOCAB, write_synthetic_store

from alignkd_cache.data import TokenizedSample
from alignkd_cache.losses import SampleCounts
from alignkd_cache.signal_spec import followed_by_text
from alignkd_cache.sources import CachedSamples, cache_counts
from alignkd_cache.store import manifest, manifest_index, trust_rows
from alignkd_cache.store.inspection import Inspection
from alignkd_cache.store.location import Location
from alignkd_cache.store.manifest import MANIFEST_KEY, ManifestFile, encode, sha256, to_table
from alignkd_cache.store.manifest_index import ManifestIndex, tile_offsets
from alignkd_cache.store.reader import CacheReader
from alignkd_cache.store.trust import UntrustedCache, open_cache
from alignkd_cache.store.trust_plan import _block_max
from alignkd_cache.store.trust_rows import WRITTEN_FIELDS, check_rows, row_problems
from alignkd_cache.store.verify import verify


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    url = tmp_path_factory.mktemp("columns") / "c.zarr"
    write_synthetic_store(str(url), n=40)
    return url


def per_row_reference(loc, found: Inspection) -> None:
    """The rules row by row, as trust ran them before they ran on columns."""
    rows, seen = found.manifest.read().to_pylist(), set()
    for i, r in enumerate(rows):
        row_problems(i, r, r["id"] in seen, found.attrs, found)
        seen.add(r["id"])
        if found.full:
            return
    statuses = [r["status"] for r in rows]
    got = {"records": len(rows), "written": statuses.count("written"), "skipped": statuses.count("skipped")}
    if any(found.attrs["counts"][k] != v for k, v in got.items()):
        found.add(f"attribute counts {found.attrs['counts']} disagree with the manifest {got}")


def seg(role, rows, cols) -> dict:
    return {"role": role, "rows": rows, "cols": cols}


def tamper(rows: list[dict], rng: random.Random) -> None:
    """One random edit of the kinds an attacker or a bug could make."""
    written = [r for r in rows if r["status"] == "written"]
    r = rng.choice(written if rng.random() < 0.8 else rows)  # most rules are on written rows
    ids = r["input_ids"] or [1, 6]
    n = len(ids)
    same_length = [ids[:-1] + [token] for token in (5, VOCAB, VOCAB + 100, -3)] + [ids[:1] + [6] + ids[2:]]
    edits = {
        "input_ids": [[1], [6] * 70, [1, 6, 400], None, *same_length],
        "num_visual": [[], [0], [8], [10], [9, 9], None],
        "supervised_positions": [
            [],
            [n - 1],
            [n - 3, n - 4],
            [n - 2, n - 3],
            [0],
            [-1],
            [n - 2, n - 2],
            None,
        ],
        "logit_positions": [[], [n - 2], [0, n - 2], None],
        "attention_rows": [0, 1, 7, None],
        "logit_rows": [0, 3, None],
        "attention_offset": [0, 5, -1],
        "logit_offset": [0, 1],
        "visual_blocks": [[], [-1], [0], [1], [99], [0, 0]],
        "visual_offsets": [[], [-1], [0], [9], [5], [0, 9]],
        "status": ["bogus", "skipped", "written"],
        "skip_reason": [None, "x"],
        "images": [None, [], ["img0.png"], ["img0.png", "img1.png"]],
        "image_keys": [None, [], ["XYZ"], ["0" * 32], ["0" * 32, "1" * 32]],
        "image_layouts": [
            None,
            [],
            [None],
            [[]],
            [[None]],
            [[seg("grid", 3, 3)]],
            [[seg("grid", 3, 3)], [seg("grid", 3, 3)]],
            [[seg("grid", 2, 3)]],
            [[seg("grid", 3, 2), seg("global", 1, 3)]],
            [[seg("tile_0_0", 0, 9)]],
            [[seg("grid", -3, -3)]],
            [[seg("grid", None, 9)]],
            [[seg("pixels", 3, 3)]],
            [[seg(None, 3, 3)]],
            [[seg("grid", 2**31 - 1, 2**31 - 1)]],
        ],
        "index": [0, 3],
        "block": [-1, 0, 99],
        "id": ["", rows[0]["id"]],
    }
    name = rng.choice(sorted(edits))
    r[name] = copy.deepcopy(rng.choice(edits[name]))


def as_built_with(rules: str, attrs: dict, rows: list[dict]) -> dict:
    """The attributes and rows of a cache built with these options (so that only the edits are bad)."""
    attrs = dict(attrs)
    for r in (r for r in rows if r["status"] == "written"):
        n_text = len(
            TokenizedSample(r["id"], (), r["input_ids"], [], (), attrs["image_token_id"]).query_positions
        )
        if rules == "text":
            r["logit_positions"] = followed_by_text(r["input_ids"], attrs["image_token_id"])
            r["logit_rows"] = len(r["logit_positions"])
        if rules == "mean heads":
            r["attention_rows"] = n_text
        if rules == "layer0":
            r["attention_rows"] = 0
            r["visual_blocks"] = r["visual_offsets"] = [-1] * len(r["images"])
    attrs |= {"text": {"logit_positions": "text"}, "mean heads": {"attn_heads": "mean"}}.get(rules, {})
    return attrs | ({"signals": "layer0"} if rules == "layer0" else {})


@pytest.mark.parametrize(
    "rules, rows_per_batch", [("answer", 7), ("text", 7), ("mean heads", None), ("layer0", None)]
)
def test_vectorised_row_rules_refuse_what_the_per_row_rules_refuse_in_the_same_words(
    cache, rules, rows_per_batch, monkeypatch
):
    """7 rows a batch: rows and duplicate ids across batches are named as in one batch."""
    if rows_per_batch is not None:
        monkeypatch.setattr(trust_rows, "ROWS_PER_BATCH", rows_per_batch)
    good = open_cache(str(cache))
    built = good.manifest.read().to_pylist()
    attrs = as_built_with(rules, good.attrs, built)
    rng, loc, refused = random.Random(rules), Location(str(cache), read_only=True), 0
    for trial in range(200):
        rows = copy.deepcopy(built)
        for _ in range(trial % 3):  # trial 0: as built, which passes
            tamper(rows, rng)
        manifest = ManifestFile(encode(to_table(rows)))
        columns, reference = (Inspection(str(cache), loc, max_problems=5) for _ in range(2))
        for found in (columns, reference):
            found.attrs, found.manifest = attrs, manifest
        check_rows(loc, columns)
        per_row_reference(loc, reference)
        assert columns.problems == reference.problems, rows
        assert trial % 3 or not reference.problems
        refused += bool(reference.problems)
    assert refused > 80  # the edits do reach the rules


LAYOUT_EDITS = [
    (None, "image_layouts is null"),
    ([], "per-image lists differ"),
    ([None], "image_layouts[0] has no segments"),
    ([[None]], "image_layouts[0] has no segments"),
    ([[seg("grid", 2, 3)]], "covers 6 visual tokens"),
    ([[seg("tile_0_0", 0, 9)]], "of 0 x 9 tokens"),
    ([[seg("grid", None, 9)]], "of None x 9 tokens"),
    ([[seg(None, 3, 3)]], "role None"),
    ([[seg("grid", 2**31 - 1, 2**31 - 1)]], "covers 4611686014132420609 visual tokens"),
    ([[seg("base", 2, 2), seg("anyres_newline", 1, 5)]], None),  # another valid layout of 9 tokens
]


@pytest.mark.parametrize("layouts, words", LAYOUT_EDITS)
def test_a_bad_layout_is_refused_by_the_columns_as_by_the_rows(cache, layouts, words):
    good = open_cache(str(cache))
    rows = good.manifest.read().to_pylist()
    next(r for r in rows if r["status"] == "written" and len(r["images"]) == 1)["image_layouts"] = layouts
    loc = Location(str(cache), read_only=True)
    columns, reference = (Inspection(str(cache), loc, max_problems=5) for _ in range(2))
    for found in (columns, reference):
        found.attrs, found.manifest = good.attrs, ManifestFile(encode(to_table(rows)))
    check_rows(loc, columns)
    per_row_reference(loc, reference)
    assert columns.problems == reference.problems
    if words is None:
        assert not columns.problems
    else:
        assert len(columns.problems) == 1 and words in columns.problems[0][1], columns.problems


def test_the_manifest_is_decoded_a_row_group_at_a_time(tmp_path, monkeypatch):
    """A reader keeps the index and the file's bytes; a row is decoded from its row group, and at
    most GROUPS_KEPT groups are kept decoded."""
    monkeypatch.setattr(manifest, "ROWS_PER_GROUP", 8)
    url = tmp_path / "c.zarr"
    write_synthetic_store(str(url), n=40)
    reader = CacheReader(str(url))
    assert reader.manifest.file.metadata.num_row_groups == 5
    whole = pq.read_table(url / MANIFEST_KEY).to_pylist()
    rows = list(reader.rows)
    assert rows == [r for r in whole if r["status"] == "written"] and len(rows) == len(reader) > 8
    assert len(reader.manifest._groups) == manifest.GROUPS_KEPT
    assert all(group.num_rows == 8 for group in reader.manifest._groups.values())
    assert reader.skipped == {r["id"]: r["skip_reason"] for r in whole if r["status"] == "skipped"}
    # A DataLoader worker started by spawn gets it through __getstate__/__setstate__, as a copy does.
    spawned = copy.deepcopy(reader.manifest)
    assert spawned.file is not reader.manifest.file and spawned.row(13) == whole[13]


def test_a_manifest_in_one_row_group_opens_and_reads_the_same(tmp_path):
    """Caches written before row groups were bounded hold one group; they read as before."""
    url = tmp_path / "c.zarr"
    write_synthetic_store(str(url), n=40)
    before = list(CacheReader(str(url)).rows)
    table = pq.read_table(url / MANIFEST_KEY)
    pq.write_table(table, url / MANIFEST_KEY, compression="zstd")  # one row group
    root = url / "zarr.json"
    doc = json.loads(root.read_text())
    doc["attributes"]["manifest_sha256"] = sha256((url / MANIFEST_KEY).read_bytes())
    root.write_text(json.dumps(doc))
    reader = CacheReader(str(url))
    assert reader.manifest.file.metadata.num_row_groups == 1 and list(reader.rows) == before


@pytest.mark.parametrize("declared", [39, 41])
def test_a_footer_declaring_other_rows_than_its_pages_hold_is_refused_not_indexed(cache, declared):
    """An edited footer (the pages hold 40 rows): refused as unreadable Parquet, in one problem,
    never indexed past its end."""
    good = open_cache(str(cache))
    found = Inspection(str(cache), Location(str(cache), read_only=True))
    found.attrs, found.manifest = good.attrs, ManifestFile(good.manifest.data)
    found.manifest.num_rows = declared
    check_rows(found.loc, found)
    assert len(found.problems) == 1 and "unreadable Parquet" in found.problems[0][1], found.problems
    assert found.index is None


def test_an_untampered_manifest_passes_the_vectorised_rules(cache):
    found = open_cache(str(cache))
    assert not found.problems and found.blocks.attention.sum() > 0


def test_normalisers_from_columns_equal_those_from_the_samples(cache):
    reader = CacheReader(str(cache))
    counts = cache_counts(reader)
    student = CachedSamples(reader, (7, 4))  # respliced: another image token and visual-token count
    assert len(student) == len(reader) == len(reader.ids)
    reference = SampleCounts.of(list(student))
    assert np.array_equal(counts.tokens, reference.tokens) and np.array_equal(counts.images, reference.images)
    step = [[0, 3, 5], [len(reader) - 1, 2]]
    assert counts.normalisers([i for m in step for i in m]) == reference.normalisers(
        [0, 3, 5, len(reader) - 1, 2]
    )
    assert [reader.row_at(i)["id"] for i in range(len(reader))] == reader.ids


def test_verify_with_two_jobs_reports_what_one_job_reports(tmp_path):
    url = tmp_path / "c.zarr"
    write_synthetic_store(str(url), n=300)
    shard = url / "blocks" / "b000003" / "attention" / "c" / "0" / "0"
    data = bytearray(shard.read_bytes())
    data[len(data) // 2] ^= 0xFF
    shard.write_bytes(bytes(data))
    one, two = verify(str(url)), verify(str(url), jobs=2)
    assert not one.ok and one.bad_samples
    assert (one.problems, dict(one.bad_samples), one.samples_checked) == (
        two.problems,
        dict(two.bad_samples),
        two.samples_checked,
    )


def test_a_rank_adopting_the_check_refuses_a_manifest_changed_since(tmp_path):
    url = tmp_path / "c.zarr"
    write_synthetic_store(str(url))
    assert CacheReader(str(url), checked=True).ids == CacheReader(str(url)).ids
    table = pq.read_table(url / MANIFEST_KEY)
    pq.write_table(table.slice(1), url / MANIFEST_KEY)
    with pytest.raises(UntrustedCache, match="changed after another rank checked it"):
        CacheReader(str(url), checked=True)


def test_written_fields_are_the_null_columns_of_a_skipped_row(cache):
    table = open_cache(str(cache)).manifest.read()
    skipped = [r for r in table.to_pylist() if r["status"] == "skipped"]
    assert skipped and all(r[k] is None for r in skipped for k in WRITTEN_FIELDS)


@pytest.mark.parametrize("in_order", [True, False])
def test_the_plans_per_block_sums_match_a_loop_over_rows_in_any_block_order(in_order):
    """Offsets expected per row and per-block totals and maxima, with blocks in manifest order (a
    build's or a merge's) or interleaved, against the plain loop over rows they replace; the offsets
    tiled 37 rows at a time, as the check streams the manifest."""
    rng = np.random.default_rng(0)
    block = np.sort(rng.integers(0, 7, 500)) if in_order else rng.integers(0, 7, 500)
    rows, values = rng.integers(0, 5, 500), rng.integers(0, 100, 500)
    total = np.zeros(8, np.int64)
    expected = np.concatenate(
        [tile_offsets(block[a : a + 37], rows[a : a + 37], total) for a in range(0, 500, 37)]
    )
    before, want_total, want_max = {}, np.zeros(8, np.int64), np.zeros(8, np.int64)
    for i, b in enumerate(block.tolist()):
        assert expected[i] == before.get(b, 0)
        before[b] = before.get(b, 0) + rows[i]
        want_total[b] += rows[i]
        want_max[b] = max(want_max[b], values[i])
    assert total.tolist() == want_total.tolist()
    assert _block_max(block, values, 8).tolist() == want_max.tolist()
    none = np.zeros(0, np.int64)
    untouched = np.array([5, 0, 2])
    assert tile_offsets(none, none, untouched).tolist() == [] and untouched.tolist() == [5, 0, 2]
    assert _block_max(none, none, 3).tolist() == [0, 0, 0]


@pytest.mark.parametrize("counts", [[2, 0], [0, 2, 0, 1, 0], [0, 0], [1], [3, 1, 0, 0]])
def test_the_index_sums_each_samples_visual_tokens_over_its_images(counts, monkeypatch):
    """Samples without images anywhere, the last ones among them (where a reduction by image start
    would run past the images), summed two samples at a time."""
    monkeypatch.setattr(manifest_index, "SAMPLES_AT_ONCE", 2)
    counts = np.array(counts)
    tokens = np.arange(1, counts.sum() + 1, dtype=np.int32) * 7
    start = np.concatenate([[0], np.cumsum(counts)]).astype(np.int32)
    index = ManifestIndex(
        written=np.ones(len(counts), bool),
        rows=np.arange(len(counts)),
        columns={},
        block_rows={},
        misplaced={},
        image_start=start,
        images={"num_visual": tokens},
        image_key=np.zeros(0, "V16"),
    )
    want = [int(tokens[a:b].sum()) for a, b in zip(start[:-1], start[1:], strict=True)]
    assert index.visual_tokens().tolist() == want
    assert index.image_sample().tolist() == [i for i, c in enumerate(counts) for _ in range(c)]
