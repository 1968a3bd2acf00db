"""Store format on synthetic signals: codecs, writer -> reader round trips, manifest schema, verify."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
from store_synthetic import NV, H, write_synthetic_store

from alignkd_cache.sources import tokenized_from_row
from alignkd_cache.store import codecs
from alignkd_cache.store.info import cache_info
from alignkd_cache.store.jsonschema_lite import attrs_schema, validate
from alignkd_cache.store.manifest import MANIFEST_SCHEMA, published_schema, schema_as_json
from alignkd_cache.store.reader import CacheDataset, CacheReader
from alignkd_cache.store.trust import UntrustedCache
from alignkd_cache.store.verify import verify

rng = np.random.default_rng(0)


def probabilities(shape):
    x = np.exp(rng.normal(size=shape) * 4)
    return (x / x.sum(-1, keepdims=True) * 0.8).astype(np.float32)


@pytest.mark.parametrize(
    "encoding, data, max_error",
    [
        ("f32", rng.normal(size=(7, 5)).astype(np.float32), 0),
        ("f16", rng.normal(size=(7, 5)).astype(np.float32), 1e-3),
        ("bf16", rng.normal(size=(7, 5)).astype(np.float32), 1e-2),
        ("fixed_u16", probabilities((7, 9)), 0.5 / 65535 + 1e-9),
        ("sqrt_u8", probabilities((7, 9)), 4e-3),
        ("fp8_row", (rng.normal(size=(3, 4, 16)) * 1000).astype(np.float32), 0.07),
    ],
)
def test_codec_round_trip_within_documented_error(encoding, data, max_error):
    stored, scale = codecs.encode(encoding, data)
    back = codecs.decode(encoding, stored, scale)
    assert back.dtype == np.float32 and back.shape == data.shape
    if encoding == "fp8_row":  # relative to each row's peak
        err = np.abs(back - data) / np.abs(data).max(-1, keepdims=True)
    else:
        err = np.abs(back - data)
    assert err.max() <= max_error
    if encoding != "f32":
        assert stored.nbytes < data.nbytes


def test_fixed_point_clamps_instead_of_wrapping():
    stored, _ = codecs.encode("fixed_u16", np.array([-0.2, 1.5, 0.5], np.float32))
    assert codecs.decode("fixed_u16", stored).tolist() == pytest.approx([0.0, 1.0, 0.5], abs=1e-4)


def test_fp8_keeps_values_beyond_the_fp8_range():
    x = np.array([[1000.0, -3000.0, 0.5, 0.0]], np.float32)
    back = codecs.decode("fp8_row", *codecs.encode("fp8_row", x))
    assert np.isfinite(back).all() and abs(back[0, 1] + 3000) < 3000 * 0.07


def test_published_manifest_schema_matches_code():
    assert published_schema() == schema_as_json(MANIFEST_SCHEMA)


def test_attrs_schema_is_valid_json_schema():
    jsonschema = pytest.importorskip("jsonschema")
    jsonschema.Draft202012Validator.check_schema(attrs_schema())


@pytest.mark.parametrize("preset", ["lossless", "balanced", "compact"])
@pytest.mark.parametrize("kind", ["topk", "sampled"])
def test_round_trip_through_reader(tmp_path, preset, kind):
    url = str(tmp_path / "c.zarr")
    results = write_synthetic_store(url, codecs=preset, logit_targets=kind)
    table = pq.read_table(Path(url) / "manifest.parquet")
    assert table.schema.equals(MANIFEST_SCHEMA)
    assert table.column("index").to_pylist() == list(range(len(results)))
    reader = CacheReader(url)
    assert validate(reader.attrs, attrs_schema()) == []
    written = [r for r in results if r.sample is not None]
    assert reader.ids == [r.id for r in written]
    assert set(reader.skipped) == {r.id for r in results if r.sample is None}
    tokenized = [tokenized_from_row(row, reader.attrs["image_token_id"]) for row in reader.rows]
    assert [s.input_ids for s in tokenized] == [r.sample.input_ids for r in written]
    assert [s.labels for s in tokenized] == [r.sample.labels for r in written]
    owners = {
        image: v.numpy()
        for r in written
        for image, v in zip(r.images, r.signal.visual, strict=True)
        if v is not None
    }
    tol = {"lossless": (0, 0, 0), "balanced": (5e-3, 2e-3, 2e-2), "compact": (5e-3, 0.1, 0.2)}[preset]
    for r in written:
        got, want_logits = reader.read(r.id), r.signal.logits
        if r.signal.attention is None:
            assert got.attention is None and got.visual == []
        else:
            assert got.attention.shape == r.signal.attention.shape
            assert np.abs(got.attention.numpy() - r.signal.attention.numpy()).max() <= tol[0]
            assert len(got.visual) == len(r.images)
            for image, visual in zip(r.images, got.visual, strict=True):
                want = owners[image]
                assert np.abs(visual.numpy() - want).max() <= tol[1] * np.abs(want).max()
        assert torch.equal(got.logits.ids, want_logits.ids.long())
        assert got.logits.positions.tolist() == want_logits.positions.tolist()
        if kind == "topk":
            assert (
                np.abs(got.logits.values.numpy() - want_logits.values.numpy()).max()
                <= tol[2] * np.abs(want_logits.values.numpy()).max()
            )
            assert np.array_equal(got.logits.tail.numpy(), want_logits.tail.numpy())
        else:
            assert (
                np.array_equal(got.logits.values.numpy(), want_logits.values.numpy())
                and got.logits.tail is None
            )
    with pytest.raises(KeyError, match="skipped"):
        reader.read(next(r.id for r in results if r.sample is None))


@pytest.mark.parametrize("preset", ["balanced", "compact"])
def test_arrays_kept_whole_read_the_same_as_slices_within_the_budget(tmp_path, preset):
    url = str(tmp_path / "c.zarr")
    write_synthetic_store(url, codecs=preset)
    sliced = CacheReader(url, cache_bytes=0)
    budget = 6_000  # room for a few small arrays, so the oldest get evicted
    kept = CacheReader(url, cache_bytes=budget)
    for _ in range(2):
        for sid in kept.ids:
            a, b = kept.read(sid), sliced.read(sid)
            assert (a.attention is None and b.attention is None) or torch.equal(a.attention, b.attention)
            assert len(a.visual) == len(b.visual)
            assert all(torch.equal(x, y) for x, y in zip(a.visual, b.visual, strict=True))
            for name in ("ids", "values", "positions", "tail"):
                assert torch.equal(getattr(a.logits, name), getattr(b.logits, name))
            assert 0 < kept._whole_bytes <= budget
    assert sliced._whole_bytes == 0 and not sliced._whole


def test_shared_images_are_stored_once(tmp_path):
    url = str(tmp_path / "c.zarr")
    results = write_synthetic_store(url)
    reader = CacheReader(url)
    images = {image for r in results if r.sample is not None for image in r.images}
    assert any(len(r.images) == 2 for r in results if r.sample is not None)
    assert reader.attrs["counts"]["images"] == len(images)
    stored = sum(reader.array(b, "visual").shape[0] for b in range(reader.attrs["num_blocks"]))
    assert stored == len(images) * NV


def test_reader_in_dataloader_with_forked_workers(tmp_path):
    url = str(tmp_path / "c.zarr")
    write_synthetic_store(url)
    reader = CacheReader(url)
    reader.read(reader.ids[0])  # handles opened in the parent before the fork
    loader = torch.utils.data.DataLoader(
        CacheDataset(reader), batch_size=3, num_workers=2, collate_fn=list, multiprocessing_context="fork"
    )
    # Every sample's logit targets differ (random ids at distinct positions), so they name the sample.
    name = lambda s: (s.logits.positions.tolist(), s.logits.ids.tolist())  # noqa: E731
    want = [name(reader.read(i)) for i in reader.ids]
    assert len({str(w) for w in want}) == len(want)
    assert [name(s) for batch in loader for s in batch] == want
    batches = list(reader.prefetch(reader.ids, batch_size=4))
    assert [name(s) for b in batches for s in b] == want
    assert torch.equal(batches[0][0].logits.ids, reader.read(reader.ids[0]).logits.ids)


def test_verify_passes_a_clean_store(tmp_path):
    url = str(tmp_path / "c.zarr")
    write_synthetic_store(url, codecs="compact")
    report = verify(url)
    assert report.ok, report.lines()
    assert report.samples_checked == len(CacheReader(url).ids)


def chunk_files(root: Path) -> list[Path]:
    return sorted(p for p in root.rglob("c/*") if p.is_file()) + sorted(
        p for p in root.rglob("c/*/*") if p.is_file()
    )


def test_verify_catches_every_flip_in_chunks_and_manifest(tmp_path):
    url = tmp_path / "c.zarr"
    write_synthetic_store(str(url))
    files = sorted({*chunk_files(url)}) + [url / "manifest.parquet"]
    flip_rng = np.random.default_rng(1)
    for path in files:
        data = path.read_bytes()
        for _ in range(3):
            pos = int(flip_rng.integers(len(data)))
            damaged = bytearray(data)
            damaged[pos] ^= 1 << int(flip_rng.integers(8))
            path.write_bytes(bytes(damaged))
            report = verify(str(url))
            assert not report.ok, f"flip at byte {pos} of {path.relative_to(url)} not caught"
            path.write_bytes(data)
    assert verify(str(url)).ok


def test_verify_names_the_samples_in_a_damaged_chunk(tmp_path):
    url = tmp_path / "c.zarr"
    write_synthetic_store(str(url))
    reader = CacheReader(str(url))
    path = url / "blocks/b000001/attention/c/0/0"
    data = bytearray(path.read_bytes())
    data[3] ^= 0x10  # inside the first inner chunk
    path.write_bytes(bytes(data))
    report = verify(str(url))
    in_block = [r["id"] for r in reader.rows if r["block"] == 1 and r["attention_rows"]]
    assert in_block and set(in_block) <= set(report.bad_samples)
    assert not {r["id"] for r in reader.rows if r["block"] != 1} & set(report.bad_samples)


def test_missing_chunk_is_an_error_not_zeros(tmp_path):
    url = tmp_path / "c.zarr"
    write_synthetic_store(str(url))
    (url / "blocks/b000000/visual/c/0/0").unlink()
    report = verify(str(url))
    assert any("missing" in p for p in report.problems)
    reader = CacheReader(str(url))  # blocks are checked as they are first read
    with pytest.raises(UntrustedCache, match="blocks/b000000/visual: its chunk file is missing"):
        reader.read(next(r["id"] for r in reader.rows if r["block"] == 0))
    with pytest.raises(UntrustedCache, match="blocks/b000000/visual: its chunk file is missing"):
        cache_info(str(url))


def test_info_stats_on_threads_give_the_same_bytes_and_refusals(tmp_path, monkeypatch):
    """Slow stats (a cold disk, a network file system) go to threads after a probe: the same sums,
    and a missing chunk is refused there too."""
    from alignkd_cache.store import info

    url = tmp_path / "c.zarr"
    write_synthetic_store(str(url))
    on_this_thread = cache_info(str(url))
    monkeypatch.setattr(info, "PROBE_STATS", 1)
    monkeypatch.setattr(info, "CACHED_STAT_S", 0.0)  # every probe counts as slow
    assert cache_info(str(url)) == on_this_thread
    (url / "blocks/b000001/visual/c/0/0").unlink()
    with pytest.raises(UntrustedCache, match="blocks/b000001/visual: its chunk file is missing"):
        cache_info(str(url))


def test_verify_checks_attributes_against_the_schema(tmp_path):
    url = tmp_path / "c.zarr"
    write_synthetic_store(str(url))
    meta = json.loads((url / "zarr.json").read_text())
    meta["attributes"]["codecs"] = "tiny"
    (url / "zarr.json").write_text(json.dumps(meta))
    report = verify(str(url))
    assert any("codecs" in p for p in report.problems)


def test_reader_decodes_head_count_from_rows(tmp_path):
    url = str(tmp_path / "c.zarr")
    write_synthetic_store(url)
    reader = CacheReader(url)
    signal = reader.read(reader.ids[0])
    assert signal.attention.shape[0] == H
    assert signal.attention.shape[1] == len(
        tokenized_from_row(reader.row(reader.ids[0]), reader.attrs["image_token_id"]).query_positions
    )


@pytest.mark.parametrize("chosen", [None, "mimalloc"])
def test_arrow_buffers_avoid_mimalloc_unless_the_user_chose_a_pool(chosen):
    """A large manifest decodes about 3x slower from Arrow's mimalloc pool (docs/benchmarks.md)."""
    env = {k: v for k, v in os.environ.items() if k != "ARROW_DEFAULT_MEMORY_POOL"}
    if chosen:
        env["ARROW_DEFAULT_MEMORY_POOL"] = chosen
    code = "import pyarrow as pa, alignkd_cache.store; print(pa.default_memory_pool().backend_name)"
    backend = subprocess.run(
        [sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True
    ).stdout.strip()
    assert backend == chosen if chosen else backend in ("jemalloc", "system")
