"""A cache from someone else is untrusted input (issue #13): each attack or accident is refused up
front, naming the sample and the field, by every command that reads a cache."""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
from pathlib import Path

import google_crc32c
import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
from click.testing import CliRunner
from store_synthetic import NV, VOCAB, write_synthetic_store

from alignkd_cache.build import _prepare_store
from alignkd_cache.store.copy import copy_cache
from alignkd_cache.store.info import cache_info
from alignkd_cache.store.location import Location
from alignkd_cache.store.lock import LOCK_NAME, WriterLocked, lock_dir
from alignkd_cache.store.manifest import MANIFEST_KEY, MANIFEST_SCHEMA_4_0, sha256, to_table
from alignkd_cache.store.merge import merge_caches
from alignkd_cache.store.provenance import IncompatibleCache
from alignkd_cache.store.reader import CacheError, CacheReader
from alignkd_cache.store.trust import UntrustedCache
from alignkd_cache.store.verify import verify
from alignkd_cache.train import latest_checkpoint
from cli.cache import main as cache_cli


@pytest.fixture(scope="module")
def good(tmp_path_factory) -> Path:
    url = tmp_path_factory.mktemp("good") / "c.zarr"
    write_synthetic_store(str(url))
    return url


@pytest.fixture
def store(good, tmp_path) -> Path:
    """A fresh copy of the good cache to tamper with."""
    copy = tmp_path / "c.zarr"
    subprocess.run(["cp", "-r", str(good), str(copy)], check=True)
    return copy


def edit_attrs(url: Path, edit) -> None:
    meta = json.loads((url / "zarr.json").read_text())
    edit(meta["attributes"])
    (url / "zarr.json").write_text(json.dumps(meta))


def edit_manifest(url: Path, edit) -> None:
    """Rewrite manifest rows and recompute manifest_sha256, as an attacker would."""
    rows = pq.read_table(url / MANIFEST_KEY).to_pylist()
    edit(rows)
    pq.write_table(to_table(rows), url / MANIFEST_KEY)
    digest = sha256((url / MANIFEST_KEY).read_bytes())
    edit_attrs(url, lambda a: a.update(manifest_sha256=digest))


def edit_array(url: Path, path: str, edit) -> None:
    meta_path = url / path / "zarr.json"
    meta = json.loads(meta_path.read_text())
    edit(meta)
    meta_path.write_text(json.dumps(meta))


def first_image_row(rows) -> dict:
    return next(r for r in rows if r["status"] == "written" and r["images"])


def set_field(name, value):
    return lambda rows: first_image_row(rows).update({name: value})


def set_token(where, value):
    def edit(rows):
        r = first_image_row(rows)
        p = {"text": len(r["input_ids"]) - 1, "visual": r["input_ids"].index(5)}[where]
        r["input_ids"][p] = value

    return edit


def read_every_sample(url: Path) -> None:
    reader = CacheReader(str(url))
    for i in range(len(reader)):
        reader.read_row(reader.row_at(i))


def refusals(url: Path, tmp_path: Path, info: bool = True) -> list[str]:
    """The error of every reading command on url (each must refuse). A reader refuses when it
    opens, or, for a problem inside a block, before it reads that block's first chunk. `info`
    reads no block's metadata: info=False for a problem inside a block that the stat of its chunk
    files does not show."""
    calls = {
        "reader": lambda: read_every_sample(url),
        "info": lambda: cache_info(str(url)),
        "copy": lambda: copy_cache(str(url), str(tmp_path / "copy.zarr")),
        "merge": lambda: merge_caches([str(url), str(url)], str(tmp_path / "merged.zarr")),
    }
    if not info:
        del calls["info"]
    messages = []
    for name, call in calls.items():
        with pytest.raises(UntrustedCache) as e:
            call()
        messages.append(f"{name}: {e.value}")
    report = verify(str(url))
    assert not report.ok
    messages.append("verify: " + " ".join(report.lines()))
    assert not (tmp_path / "copy.zarr" / "zarr.json").exists()
    assert not (tmp_path / "merged.zarr").exists()
    return messages


# ---------------------------------------------------------------------------------------------
# Files leaking out of the reader's machine


@pytest.mark.parametrize(
    "target",
    ["blocks/b000001/visual/c/0/0", "blocks/b000001", "manifest.parquet", "blocks/b000001/passwd"],
)
def test_symlinks_are_refused_by_every_command_and_never_read(store, tmp_path, target):
    secret = tmp_path / "secret"
    secret.write_bytes(b"root:x:0:0:SECRET")
    link = store / target
    if link.is_dir():
        outside = tmp_path / "outside"
        os.rename(link, outside)
        link.symlink_to(outside)
    else:
        link.unlink(missing_ok=True)
        link.symlink_to(secret)
    for message in refusals(store, tmp_path, info=not target.endswith("passwd")):
        assert f"{target!r} is a symlink" in message
        assert "SECRET" not in message


def test_a_fifo_is_refused_without_blocking(store, tmp_path):
    os.mkfifo(store / "blocks/b000000/visual/c/0/0.fifo")
    for message in refusals(store, tmp_path, info=False):
        assert "not a regular file" in message


def test_zarr_v2_metadata_is_never_parsed(store, tmp_path):
    # A v2 array document asking for the pickle codec: refused by name, whatever zarr would do.
    v2 = {"zarr_format": 2, "dtype": "|O", "filters": [{"id": "pickle"}], "shape": [1], "chunks": [1]}
    (store / "blocks/b000000/attention/.zarray").write_text(json.dumps(v2))
    for message in refusals(store, tmp_path, info=False):
        assert ".zarray" in message
    (store / "blocks/b000000/attention/.zarray").unlink()
    edit_array(store, "blocks/b000000/attention", lambda m: m.update(zarr_format=2))
    for message in refusals(store, tmp_path, info=False):
        assert "zarr_format is 2" in message


# ---------------------------------------------------------------------------------------------
# Silent wrong training


@pytest.mark.parametrize(
    "edit, field",
    [
        (set_field("attention_offset", -3), "attention_offset"),
        (set_field("logit_offset", 10**6), "logit_offset"),
        (set_token("text", VOCAB), "input_ids"),
        (set_token("text", -1), "input_ids"),
        (set_token("text", 5), "input_ids"),  # the image-token id inside the text
        (set_token("visual", 7), "input_ids"),
        (set_field("block", 99), "block"),
        (set_field("visual_blocks", [99]), "visual_blocks"),
        (set_field("visual_offsets", [7]), "visual token rows"),
        (set_field("num_visual", [4]), "num_visual"),
        (set_field("status", "done"), "status"),
        (lambda rows: first_image_row(rows).update(image_keys=["x"]), "image_keys"),
        (lambda rows: first_image_row(rows).update(images=[]), "per-image lists"),
        (set_field("attention_rows", 2), "attention_rows"),
        (set_field("logit_positions", [0]), "logit_positions"),
        (lambda rows: rows[1].update(id=rows[0]["id"]), "duplicate"),
        (set_field("image_layouts", None), "image_layouts is null"),
        (set_field("image_layouts", []), "per-image lists"),
    ],
)
def test_a_tampered_manifest_with_a_recomputed_hash_is_refused_naming_sample_and_field(
    store, tmp_path, edit, field
):
    edit_manifest(store, edit)
    for message in refusals(store, tmp_path):
        assert field in message
        assert "sample '" in message or field in ("visual token rows",)


def grid(role="grid", rows=3, cols=3):
    return {"role": role, "rows": rows, "cols": cols}


@pytest.mark.parametrize(
    "layout, line",
    [
        (
            [grid(rows=2)],
            "image_layouts[0] (grid 2x3) covers 6 visual tokens, num_visual[0] is 9; a layout must",
        ),
        (
            [grid(rows=3, cols=2), grid("global", 1, 2), grid("tile_0_0", 1, 2)],
            "image_layouts[0] (grid 3x2 + global 1x2 + tile_0_0 1x2) covers 10 visual tokens",
        ),
        (
            [grid(rows=3, cols=3), grid("tile_0_0", 0, 4)],
            "has a tile_0_0 of 0 x 4 tokens; rows and cols must be",
        ),
        ([grid(rows=-3, cols=-3)], "has a grid of -3 x -3 tokens"),
        ([grid(rows=None)], "has a grid of None x 3 tokens"),
        ([grid("pixels")], "has a segment with role 'pixels', not a layout role"),
        ([], "image_layouts[0] has no segments"),
    ],
)
def test_a_tampered_image_layout_is_refused_in_one_line_naming_the_sample(store, tmp_path, layout, line):
    """A layout that does not cover its image's visual tokens, or has a dimension below 1, or an
    unknown role, is refused by every reading command like any other bad row."""
    sample = first_image_row(pq.read_table(store / MANIFEST_KEY).to_pylist())["id"]
    edit_manifest(store, lambda rows: first_image_row(rows)["image_layouts"].__setitem__(0, layout))
    for message in refusals(store, tmp_path):
        assert f"sample {sample!r}: image_layouts[0]" in message and line in message
    with pytest.raises(UntrustedCache) as e:
        CacheReader(str(store))
    assert "\n" not in str(e.value) and str(e.value).endswith("or rebuild it")


def as_schema_4_0(url: Path) -> None:
    """The cache as this tool wrote it before image layouts: no column, schema_version 4.0."""
    table = pq.read_table(url / MANIFEST_KEY)
    pq.write_table(table.drop_columns(["image_layouts"]), url / MANIFEST_KEY)
    digest = sha256((url / MANIFEST_KEY).read_bytes())
    edit_attrs(url, lambda a: a.update(schema_version="4.0", manifest_sha256=digest))


def test_a_schema_4_0_cache_without_layouts_still_reads_verifies_merges_and_copies(good, store, tmp_path):
    as_schema_4_0(store)
    reader, before = CacheReader(str(store)), CacheReader(str(good))
    assert reader.ids == before.ids and "image_layouts" not in reader.row_at(0)
    for sid in reader.ids[:3]:
        a, b = reader.read(sid), before.read(sid)
        assert a.image_keys == b.image_keys and torch.equal(a.logits.ids, b.logits.ids)
    assert verify(str(store)).ok and cache_info(str(store))["counts"] == cache_info(str(good))["counts"]
    copy_cache(str(store), str(tmp_path / "copy.zarr"))
    other = tmp_path / "other.zarr"
    subprocess.run(["cp", "-r", str(store), str(other)], check=True)
    edit_manifest_4_0(other, lambda rows: [r.update(id="b-" + r["id"]) for r in rows])
    merged = merge_caches([str(store), str(other)], str(tmp_path / "merged.zarr"))
    assert merged["schema_version"] == "4.0" and verify(str(tmp_path / "merged.zarr")).ok
    assert "image_layouts" not in pq.read_table(tmp_path / "merged.zarr" / MANIFEST_KEY).column_names
    with pytest.raises(IncompatibleCache, match="schema_version is '4.1', the first cache's '4.0'"):
        merge_caches([str(store), str(good)], str(tmp_path / "mixed.zarr"))
    # A 4.0 manifest under 4.1 attributes, or the reverse, is damage.
    edit_attrs(store, lambda a: a.update(schema_version="4.1"))
    for message in refusals(store, tmp_path / "again"):
        assert "schema differs" in message and "4.1" in message


def edit_manifest_4_0(url: Path, edit) -> None:
    rows = pq.read_table(url / MANIFEST_KEY).to_pylist()
    edit(rows)
    pq.write_table(to_table(rows, MANIFEST_SCHEMA_4_0), url / MANIFEST_KEY)
    edit_attrs(url, lambda a: a.update(manifest_sha256=sha256((url / MANIFEST_KEY).read_bytes())))


@pytest.mark.parametrize(
    "edit, problem",
    [
        (lambda a: a.update(complete="no"), "complete"),
        (lambda a: a.update(logit_targets="sampled"), "logit_targets"),
        (lambda a: a.pop("vocab_size"), "vocab_size"),
        (lambda a: a.update(num_heads="2"), "num_heads"),
        (lambda a: a.update(num_visual_tokens=10**6), "num_visual_tokens"),
        (lambda a: a["counts"].update(written=3), "counts"),
        (lambda a: a["counts"].update(images=1), "counts.images"),
        (lambda a: a.update(manifest_sha256="0" * 64), "sha256"),
    ],
)
def test_tampered_attributes_are_refused(store, tmp_path, edit, problem):
    edit_attrs(store, edit)
    for message in refusals(store, tmp_path):
        assert problem in message


def test_logit_targets_sampled_on_a_topk_cache_is_refused_even_when_options_agree(store, tmp_path):
    def edit(a):
        a["logit_targets"] = a["options"]["logit_targets"] = "sampled"

    edit_attrs(store, edit)
    for message in refusals(store, tmp_path, info=False):
        assert "logit_values" in message or "logit_tail" in message


@pytest.mark.parametrize(
    "path, edit, problem",
    [
        ("blocks/b000000/attention", lambda m: m["attributes"].update(encoding="f32"), "encoding"),
        ("blocks/b000000/attention", lambda m: m.update(data_type="float32"), "dtype"),
        ("blocks/b000000/logit_ids", lambda m: m.update(data_type="int64"), "dtype"),
        ("blocks/b000000/visual", lambda m: m.update(shape=[2, 10**8, 96]), "shape"),
        ("blocks/b000000/attention", lambda m: m.update(shape=[10**8, NV]), "shape"),
        (
            "blocks/b000000/attention",
            lambda m: m["codecs"][0]["configuration"].update(chunk_shape=[1, 1]),
            "chunk",
        ),
        ("blocks/b000000/attention", lambda m: m["codecs"][0]["configuration"]["codecs"].pop(2), "layout"),
    ],
)
def test_array_metadata_must_match_the_attributes_before_anything_is_allocated(
    store, tmp_path, path, edit, problem
):
    edit_array(store, path, edit)
    for message in refusals(store, tmp_path, info=False):
        assert path in message and problem in message


def test_a_reader_checks_each_block_before_its_first_chunk_and_reads_the_others(store, tmp_path):
    """Opening checks the root, the attributes, the manifest and the block directories; the files
    and metadata inside a block are checked when it is first read, so opening a large cache does
    not walk every block, and a bad block is refused before any of its chunks is read."""
    secret = tmp_path / "secret"
    secret.write_bytes(b"root:x:0:0:SECRET")
    link = store / "blocks/b000001/logit_ids/c/0/0"
    link.unlink()
    link.symlink_to(secret)
    edit_array(store, "blocks/b000001/visual", lambda m: m.update(shape=[10**8, 96]))
    reader = CacheReader(str(store))
    assert reader._found.block_keys == {}
    good = [r for r in reader.rows if r["block"] == 0]
    for row in good:
        reader.read_row(row)
    assert set(reader._found.block_keys) == {0}
    bad = next(r for r in reader.rows if r["block"] == 1)
    with pytest.raises(UntrustedCache) as e:
        reader.read_row(bad)
    message = str(e.value)
    assert "'blocks/b000001/logit_ids/c/0/0' is a symlink" in message and "2 more problem(s)" in message
    assert set(reader._found.block_keys) == {0}
    assert "SECRET" not in message and "\n" not in message
    with pytest.raises(UntrustedCache) as again:  # a refused block stays refused
        reader.read_row(bad)
    assert str(again.value) == message
    assert torch.equal(
        reader.read_row(good[0]).logits.ids, CacheReader(str(store)).read_row(good[0]).logits.ids
    )


def test_a_huge_token_list_in_a_tiny_manifest_is_refused_before_decoding(store, tmp_path):
    edit_manifest(store, set_field("input_ids", [6] * 10**6))
    assert (store / MANIFEST_KEY).stat().st_size < 100_000
    for message in refusals(store, tmp_path):
        assert "max_length" in message


def test_merge_of_a_source_with_a_stale_manifest_hash_is_refused(store, good, tmp_path):
    rows = pq.read_table(store / MANIFEST_KEY).to_pylist()
    first_image_row(rows)["attention_offset"] = 0
    pq.write_table(to_table(rows), store / MANIFEST_KEY)  # hash not recomputed
    with pytest.raises(UntrustedCache, match="sha256"):
        merge_caches([str(good), str(store)], str(tmp_path / "m.zarr"))


def test_verify_names_a_logit_id_outside_the_vocabulary_in_a_chunk(store):
    # Valid metadata, valid CRC (rewritten through zarr), a wrong value: only streaming sees it.
    import zarr

    array = zarr.open_array(str(store / "blocks/b000000/logit_ids"), mode="r+")
    ids = array[...]
    ids[0, 0] = VOCAB + 1
    array[...] = ids
    report = verify(str(store))
    assert any("outside the vocabulary" in " ".join(w) for w in report.bad_samples.values())


def test_the_cli_prints_one_error_line_naming_the_sample(store):
    edit_manifest(store, set_field("attention_offset", -3))
    sid = first_image_row(pq.read_table(store / MANIFEST_KEY).to_pylist())["id"]
    # info refuses the cache (exit 4); verify reports it as damage found (exit 1): README "Exit codes".
    for args, code in ((["info", str(store)], 4), (["verify", str(store)], 1)):
        result = CliRunner().invoke(cache_cli, args)
        assert result.exit_code == code and "Traceback" not in result.output
        assert sid in result.output and "attention_offset" in result.output


# ---------------------------------------------------------------------------------------------
# One writer at a time; writers delete and mark only what they should


def test_a_second_writer_is_refused_naming_the_holder(tmp_path):
    with lock_dir(tmp_path / "out", "a test"), pytest.raises(WriterLocked, match=f"pid {os.getpid()}"):
        lock_dir(tmp_path / "out", "a test")
    assert not (tmp_path / "out" / LOCK_NAME).exists()
    lock = lock_dir(tmp_path / "out", "a test")  # released: free again
    (tmp_path / "out" / LOCK_NAME).unlink()  # its directory cleaned up under it: release still works
    lock.release()


def test_a_lock_left_by_a_killed_process_is_taken_over(tmp_path):
    code = "import sys, time; from alignkd_cache.store.lock import lock_dir; l = lock_dir(sys.argv[1], 'x'); print(1, flush=True); time.sleep(60)"
    holder = subprocess.Popen([sys.executable, "-c", code, str(tmp_path)], stdout=subprocess.PIPE)
    try:
        assert holder.stdout.readline().strip() == b"1"
        with pytest.raises(WriterLocked, match=f"pid {holder.pid}"):
            lock_dir(tmp_path, "a test")
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait()
    assert (tmp_path / LOCK_NAME).exists()  # the killed holder's file stays behind ...
    with lock_dir(tmp_path, "a test"):  # ... and is taken over
        assert f"pid {os.getpid()}" in (tmp_path / LOCK_NAME).read_text()


def test_a_build_takes_the_lock_and_deletes_nothing_it_did_not_create(tmp_path):
    attrs = {"schema_version": "1.0"}
    out = tmp_path / "out"
    (out / "empty").mkdir(parents=True)
    (out / "link").symlink_to(tmp_path)
    os.mkfifo(out / "fifo")
    with pytest.raises(ValueError, match="not empty"):
        _prepare_store(Location(str(out)), attrs, resume=False)
    assert sorted(os.listdir(out)) == ["empty", "fifo", "link"]
    real = tmp_path / "real"
    real.mkdir()
    (tmp_path / "symlinked").symlink_to(real)
    _, lock = _prepare_store(Location(str(tmp_path / "symlinked")), attrs, resume=False)
    with pytest.raises(WriterLocked, match="host"):
        _prepare_store(Location(str(real)), attrs, resume=True)
    lock.release()
    assert sorted(os.listdir(real)) == ["zarr.json"]


def test_a_copy_that_fails_verification_is_never_marked_complete(store, tmp_path):
    chunk = store / "blocks/b000001/attention/c/0/0"
    data = bytearray(chunk.read_bytes())
    data[len(data) // 3] ^= 0xFF
    chunk.write_bytes(bytes(data))
    with pytest.raises(UntrustedCache, match="failed verification"):
        copy_cache(str(store), str(tmp_path / "dst.zarr"))
    assert not (tmp_path / "dst.zarr" / "zarr.json").exists()
    with pytest.raises(UntrustedCache):
        CacheReader(str(tmp_path / "dst.zarr"))


def test_resume_picks_the_newest_complete_checkpoint(tmp_path):
    path = tmp_path / "checkpoint"
    for name, step in (("checkpoint.old", 4), ("checkpoint.tmp", 6)):  # killed between the renames
        (tmp_path / name).mkdir()
        (tmp_path / name / "state.json").write_text(json.dumps({"step": step}))
    assert latest_checkpoint(path) == tmp_path / "checkpoint.tmp"
    (tmp_path / "checkpoint.tmp" / "state.json").write_text('{"step": 8')  # torn write: incomplete
    assert latest_checkpoint(path) == tmp_path / "checkpoint.old"


def test_a_damaged_chunk_met_while_reading_names_the_sample_and_merge_refuses_it(store, tmp_path):
    chunk = store / "blocks/b000001/attention/c/0/0"
    data = bytearray(chunk.read_bytes())
    data[len(data) // 3] ^= 0xFF
    chunk.write_bytes(bytes(data))
    reader = CacheReader(str(store))  # the metadata is intact: only reading the chunk shows it
    sid = next(r["id"] for r in reader.rows if r["block"] == 1 and r["attention_rows"])
    with pytest.raises(CacheError, match=f"sample '{sid}'.*damaged"):
        reader.read(sid)
    with pytest.raises(UntrustedCache, match="unreadable"):
        merge_caches([str(store), str(store)], str(tmp_path / "merged.zarr"))
    assert not (tmp_path / "merged.zarr").exists()


def zstd_bomb_frame(stated: int) -> bytes:
    """A 12-byte zstd frame (RFC 8878) that states `stated` decoded bytes: single segment, an 8-byte
    content size, and one RLE block repeating a zero byte once."""
    header = (0b11 << 6 | 0x20).to_bytes(1, "little") + stated.to_bytes(8, "little")
    block = (1 | 1 << 1 | 1 << 3).to_bytes(3, "little") + b"\0"  # last block, RLE, size 1
    return b"\x28\xb5\x2f\xfd" + header + block


def with_checksum(data: bytes) -> bytes:
    return data + np.uint32(google_crc32c.value(data)).tobytes()


def forge_first_chunk(shard_path: Path, chunks_in_shard: int, chunk: bytes) -> None:
    """Replace the shard's first inner chunk by `chunk` with a valid CRC32C, and rewrite the shard's
    index (offset, length pairs, then its own CRC32C) to match: every checksum passes."""
    shard = shard_path.read_bytes()
    index_bytes = chunks_in_shard * 16
    index = np.frombuffer(shard[-index_bytes - 4 : -4], "<u8").reshape(chunks_in_shard, 2)
    parts = [with_checksum(chunk)] + [bytes(shard[o : o + n]) for o, n in index[1:]]
    offsets = np.cumsum([0] + [len(p) for p in parts[:-1]], dtype="<u8")
    new_index = np.stack([offsets, [len(p) for p in parts]], axis=1).astype("<u8").tobytes()
    shard_path.write_bytes(b"".join(parts) + with_checksum(new_index))


def test_a_forged_chunk_stating_a_huge_size_is_refused_before_it_is_allocated(store):
    """A chunk whose zstd frame states 1 TiB, with every CRC32C valid: zarr's own decoder would try to
    allocate 1 TiB (a MemoryError at best); ours refuses it as damage, naming the sample."""
    array = store / "blocks/b000001/attention"
    meta = json.loads((array / "zarr.json").read_text())
    inner = meta["codecs"][0]["configuration"]["chunk_shape"]
    chunks_in_shard = math.prod(-(-s // c) for s, c in zip(meta["shape"], inner, strict=True))
    forge_first_chunk(array / "c/0/0", chunks_in_shard, zstd_bomb_frame(1 << 40))
    reader = CacheReader(str(store))
    sid = next(r["id"] for r in reader.rows if r["block"] == 1 and r["attention_rows"])
    with pytest.raises(
        CacheError, match=f"sample '{sid}'.*states 1099511627776 decoded bytes where the chunk holds"
    ):
        reader.read(sid)
    report = verify(str(store))
    assert not report.ok and any("states 1099511627776 decoded bytes" in p for p in report.problems)
