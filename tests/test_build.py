"""Builds with a real tiny teacher: signals equal the teacher's, refusals, resume after kill -9,
torchrun, S3, merge, and reading with nothing but zarr + pyarrow."""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
from click.testing import CliRunner
from conftest import SUBPROCESS_ENV
from run_logs import free_port, interrupt_when, resume_command

from alignkd_cache.backends import load_backend
from alignkd_cache.build import BuildOptions, build_cache
from alignkd_cache.cli.cache import main as cache_cli
from alignkd_cache.cli.train import main as train_cli
from alignkd_cache.data import SampleDataset, Tokenization, read_records, tokenize_all
from alignkd_cache.store.merge import merge_caches
from alignkd_cache.store.provenance import IncompatibleCache
from alignkd_cache.store.reader import CacheReader
from alignkd_cache.store.verify import verify

OPTS = dict(template="v1", topk=8, batch_size=3, block_size=4)


@pytest.fixture(scope="module")
def big_dataset(digits_dataset, tmp_path_factory) -> Path:
    """The digit records four times over (fresh ids), so a build has many blocks to interrupt."""
    path, root = digits_dataset
    records = json.loads(path.read_text())
    out = root / "digits_x4.json"
    out.write_text(json.dumps([r | {"id": f"{r['id']}-{k}"} for k in range(4) for r in records]))
    return out


@pytest.fixture(scope="module")
def lossless_cache(llava_teacher_dir, digits_dataset, tmp_path_factory) -> str:
    path, root = digits_dataset
    out = str(tmp_path_factory.mktemp("caches") / "lossless.zarr")
    build_cache(
        str(llava_teacher_dir), path, root, out, BuildOptions(codecs="lossless", **OPTS, progress=False)
    )
    return out


def test_lossless_cache_holds_the_teachers_signals(lossless_cache, llava_teacher_dir, digits_dataset):
    path, root = digits_dataset
    backend = load_backend(llava_teacher_dir)
    tok = Tokenization(backend.tokenizer, "v1", backend.image_token_id, backend.num_visual_tokens)
    samples, _ = tokenize_all(read_records(path), tok)
    reader = CacheReader(lossless_cache)
    assert reader.ids == [s.id for s in samples]
    assert [row["input_ids"] for row in reader.rows] == [s.input_ids for s in samples]
    # Each image is the tower's fixed patch grid (schema 4.1 records it; the default feature
    # strategy drops CLS), from the checkpoint's own config.
    vision = json.loads((llava_teacher_dir / "config.json").read_text())["vision_config"]
    side = vision["image_size"] // vision["patch_size"]
    assert reader.attrs["schema_version"] == "4.1"
    for row in reader.rows:
        assert row["image_layouts"] == [[{"role": "grid", "rows": side, "cols": side}]] * len(row["images"])
    assert (
        reader.attrs["num_heads"] == backend.num_heads
        and reader.attrs["tokenizer_sha256"] == backend.fingerprint()["tokenizer_sha256"]
    )
    dataset = SampleDataset(
        samples, root, backend.preprocess, backend.tokenizer.pad_token_id, backend.pad_color
    )
    for i in (0, 2, 4):  # an image sample, the text-only one, the multi-turn one
        batch = dataset.collate([dataset[i]])
        with torch.inference_mode():
            sig = backend.forward(batch, capture=True)
        got = reader.read(samples[i].id)
        if sig.attention[0] is None:
            assert got.attention is None and got.visual == []
        else:
            # Batching differs from the build's (batch of 3, padded), so allow float noise only.
            torch.testing.assert_close(got.attention, sig.attention[0].float(), atol=1e-5, rtol=1e-4)
            torch.testing.assert_close(got.visual[0], sig.visual[0].float(), atol=1e-5, rtol=1e-4)
        logp = torch.log_softmax(sig.logits[0].float(), -1)[got.logits.positions]
        torch.testing.assert_close(got.logits.values, logp.gather(1, got.logits.ids), atol=1e-4, rtol=1e-4)
        assert got.logits.positions.tolist() == samples[i].supervised_positions
    assert verify(lossless_cache).ok


def test_refuses_non_empty_store_and_changed_options(lossless_cache, llava_teacher_dir, digits_dataset):
    path, root = digits_dataset
    with pytest.raises(IncompatibleCache, match="not empty"):
        build_cache(
            str(llava_teacher_dir),
            path,
            root,
            lossless_cache,
            BuildOptions(codecs="lossless", **OPTS, progress=False),
        )
    with pytest.raises(IncompatibleCache, match="options.topk"):
        opts = BuildOptions(**(OPTS | {"codecs": "lossless", "topk": 4}))
        build_cache(
            str(llava_teacher_dir),
            path,
            root,
            lossless_cache,
            dataclasses.replace(opts, resume=True, progress=False),
        )


def test_mobilevlm_build_with_head_mean_and_sampled_targets(mobilevlm_teacher_dir, digits_dataset, tmp_path):
    path, root = digits_dataset
    opts = BuildOptions(
        template="plain",
        attn_heads="mean",
        logit_targets="sampled",
        codecs="compact",
        block_size=5,
        batch_size=4,
    )
    attrs = build_cache(
        str(mobilevlm_teacher_dir),
        path,
        root,
        str(tmp_path / "m.zarr"),
        dataclasses.replace(opts, progress=False),
    )
    # `plain` takes one question and one answer (preprocess_plain): the multi-turn digit-3 is skipped.
    assert attrs["family"] == "mobilevlm" and (attrs["counts"]["written"], attrs["counts"]["skipped"]) == (
        9,
        1,
    )
    reader = CacheReader(str(tmp_path / "m.zarr"))
    got = reader.read("digit-0")
    assert got.attention.shape[0] == 1 and got.visual[0].shape == (
        attrs["num_visual_tokens"],
        attrs["visual_dim"],
    )
    assert got.logits.kind == "sampled" and got.logits.tail is None and got.logits.values.sum() > 0
    grid = json.loads((mobilevlm_teacher_dir / "config.json").read_text()).get("mm_ldp_grid", 12)
    assert reader.row("digit-0")["image_layouts"] == [[{"role": "grid", "rows": grid, "cols": grid}]]
    assert verify(str(tmp_path / "m.zarr")).ok


def test_vision_tower_option_replaces_mm_vision_tower(mobilevlm_teacher_dir, digits_dataset, tmp_path):
    """A MobileVLM checkpoint whose mm_vision_tower is unreachable builds with --vision-tower."""
    path, root = digits_dataset
    moved = tmp_path / "teacher"
    shutil.copytree(mobilevlm_teacher_dir, moved)
    config = json.loads((moved / "config.json").read_text())
    tower = config["mm_vision_tower"]
    config["mm_vision_tower"] = str(tmp_path / "no-such-tower")
    (moved / "config.json").write_text(json.dumps(config))
    opts = dict(limit=2, codecs="lossless", block_size=2)
    with pytest.raises(Exception, match="no-such-tower"):
        build_cache(str(moved), path, root, str(tmp_path / "a.zarr"), BuildOptions(**opts, progress=False))
    attrs = build_cache(
        str(moved),
        path,
        root,
        str(tmp_path / "b.zarr"),
        BuildOptions(vision_tower=tower, **opts, progress=False),
    )
    assert attrs["options"]["vision_tower"] == tower and attrs["counts"]["written"] == 2
    assert verify(str(tmp_path / "b.zarr")).ok
    with pytest.raises(ValueError, match="do not apply to an HF LLaVA"):
        load_backend(str(tmp_path / "b.zarr"), family="llava", vision_tower=tower)


def block_bytes(url: Path) -> dict[str, bytes]:
    return {
        str(p.relative_to(url)): p.read_bytes() for p in sorted((url / "blocks").rglob("*")) if p.is_file()
    }


def assert_same_cache(a: Path, b: Path):
    assert block_bytes(a) == block_bytes(b)
    assert pq.read_table(a / "manifest.parquet").equals(pq.read_table(b / "manifest.parquet"))


def cli(*args) -> list[str]:
    return [sys.executable, "-m", "alignkd_cache.cli.cache", *args]


def build_args(teacher, data, root, out) -> list[str]:
    return ["build", "--teacher", str(teacher), "--data", str(data), "--image-root", str(root), "--out", str(out),
            "--topk", "8", "--batch-size", "2", "--block-size", "2"]  # fmt: skip


@pytest.fixture(scope="module")
def uninterrupted(llava_teacher_dir, big_dataset, digits_dataset, tmp_path_factory) -> Path:
    """The build the interrupted ones must end up equal to, start to end in one command."""
    reference = tmp_path_factory.mktemp("uninterrupted") / "ref.zarr"
    args = cli(*build_args(llava_teacher_dir, big_dataset, digits_dataset[1], reference))
    subprocess.run(args, check=True, env=SUBPROCESS_ENV, capture_output=True)
    return reference


@pytest.mark.slow
def test_resume_after_kill_9_is_byte_identical(
    llava_teacher_dir, big_dataset, digits_dataset, tmp_path, uninterrupted
):
    root = digits_dataset[1]
    reference, killed = uninterrupted, tmp_path / "killed.zarr"
    proc = subprocess.Popen(
        cli(*build_args(llava_teacher_dir, big_dataset, root, killed)),
        env=SUBPROCESS_ENV,
        stderr=subprocess.DEVNULL,
    )
    deadline = time.time() + 120
    while not list((killed / "parts").glob("*.parquet")) and time.time() < deadline and proc.poll() is None:
        time.sleep(0.02)
    time.sleep(0.3)  # land somewhere inside a later block
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    committed = len(list((killed / "parts").glob("*.parquet")))
    assert not (killed / "manifest.parquet").exists() and 0 < committed < 20, "the kill must land mid-build"
    with pytest.raises(ValueError, match="unfinished: resume it"):
        CacheReader(str(killed))
    # zarr writes NAME.<uuid>.partial then renames it; a kill can land between the two.
    (killed / "zarr.6e22086d58ac42c49164894caac98a09.partial").write_bytes(b"{")
    done = subprocess.run(
        cli(*build_args(llava_teacher_dir, big_dataset, root, killed), "--resume"),
        env=SUBPROCESS_ENV,
        capture_output=True,
        text=True,
    )
    assert done.returncode == 0, done.stderr
    assert_same_cache(reference, killed)
    ids = CacheReader(str(killed)).ids
    assert len(ids) == len(set(ids)) == 40


@pytest.mark.slow
def test_a_signal_stops_the_build_resumably(
    llava_teacher_dir, big_dataset, digits_dataset, tmp_path, uninterrupted
):
    """Ctrl-C, then SIGTERM on the resumed build: each time the blocks computed so far are committed,
    one line gives the resume command and the code is 128 + the signal; the cache resumed to its end
    is byte-identical to an uninterrupted one."""
    root = digits_dataset[1]
    stopped = tmp_path / "stopped.zarr"
    parts = lambda: len(list((stopped / "parts").glob("*.parquet")))  # noqa: E731
    command, done = cli(*build_args(llava_teacher_dir, big_dataset, root, stopped)), 0
    for signum in (signal.SIGINT, signal.SIGTERM):
        proc = subprocess.Popen(
            command, env=SUBPROCESS_ENV, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True
        )
        stderr = interrupt_when(proc, lambda d=done: parts() >= d // 2 + 2, signum)
        assert proc.returncode == 128 + signum, stderr
        if done:
            assert f"resuming from sample {done} of 40" in stderr
        done, before = 2 * parts(), done  # --block-size 2
        assert before + 4 <= done < 40 and not (stopped / "manifest.parquet").exists()
        assert f"Error: stopped by {signal.Signals(signum).name} at sample {done} of 40" in stderr
        info = CliRunner().invoke(cache_cli, ["info", str(stopped)])
        assert info.exit_code == 4 and info.stderr.startswith(f"Error: {stopped}: unfinished: resume it")
        assert "damaged" not in info.stderr
        command = resume_command(stderr, sys.executable)
    resumed = subprocess.run(command, env=SUBPROCESS_ENV, capture_output=True, text=True)
    assert resumed.returncode == 0, resumed.stderr
    assert f"resuming from sample {done} of 40" in resumed.stderr
    assert_same_cache(uninterrupted, stopped)


@pytest.mark.slow
def test_torchrun_two_ranks_equals_one_process(
    llava_teacher_dir, big_dataset, digits_dataset, tmp_path, uninterrupted
):
    root = digits_dataset[1]
    single, multi = uninterrupted, tmp_path / "two.zarr"  # the same build by one process
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(free_port()),
                "-m", "alignkd_cache.cli.cache", *build_args(llava_teacher_dir, big_dataset, root, multi)]  # fmt: skip
    run = subprocess.run(torchrun, env=SUBPROCESS_ENV, capture_output=True, text=True)
    assert run.returncode == 0, run.stderr[-3000:]
    assert_same_cache(single, multi)
    assert verify(str(multi)).ok

    # Resuming a complete cache: every rank learns from the store that it is complete (rank 1 used to
    # go on to a barrier that rank 0, already returned, never joined).
    torchrun[torchrun.index("--master_port") + 1] = str(free_port())
    again = subprocess.run([*torchrun, "--resume"], env=SUBPROCESS_ENV, capture_output=True, text=True)
    assert again.returncode == 0, again.stderr[-3000:]
    assert_same_cache(single, multi)
    # Rank 0 alone opens --out; its refusal stops rank 1 too, each in one line, rank 0's first.
    torchrun[torchrun.index("--master_port") + 1] = str(free_port())
    refused = subprocess.run(torchrun, env=SUBPROCESS_ENV, capture_output=True, text=True)
    errors = [line for line in refused.stderr.splitlines() if line.startswith("Error:")]
    assert refused.returncode != 0 and errors[0] == (
        f"Error: {multi} is not empty; pass --resume to continue that build, or choose a new --out"
    ), refused.stderr[-3000:]
    assert errors[1:] in (
        [],
        [f"Error: rank 1: another rank failed to open {multi}; that rank's error says why"],
    )
    assert "[rank" not in refused.stderr and refused.stderr.count("Traceback") == 1, refused.stderr[-3000:]


@pytest.fixture(scope="module")
def s3_server():
    from moto.server import ThreadedMotoServer

    port = free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port)
    server.start()
    options = {"endpoint_url": f"http://127.0.0.1:{port}", "key": "testing", "secret": "testing"}
    import s3fs

    s3fs.S3FileSystem(**options).mkdir("caches")
    yield options
    server.stop()


@pytest.mark.slow
def test_build_to_s3_read_and_copy_back(
    s3_server, llava_teacher_dir, llava_student_dir, digits_dataset, lossless_cache, tmp_path
):
    path, root = digits_dataset
    url = "s3://caches/direct"
    build_cache(
        str(llava_teacher_dir),
        path,
        root,
        url,
        BuildOptions(codecs="lossless", **OPTS, storage_options=s3_server, progress=False),
    )
    remote = CacheReader(url, s3_server)
    local = CacheReader(lossless_cache)
    assert remote.ids == local.ids
    assert torch.equal(remote.read("digit-1").attention, local.read("digit-1").attention)
    assert verify(url, s3_server).ok
    # The train CLI reaches the store with --storage-option, as the cache commands do.
    storage = [f"--storage-option={key}={value}" for key, value in s3_server.items()]
    trained = CliRunner().invoke(train_cli, ["from-cache", "--student", str(llava_student_dir), "--cache", url,
                                             "--image-root", str(root), "--out", str(tmp_path / "run"),
                                             "--max-steps", "1", *storage])  # fmt: skip
    assert trained.exit_code == 0, trained.output
    from alignkd_cache.store.copy import copy_cache

    copy_cache(lossless_cache, "s3://caches/copied", dst_options=s3_server)
    copy_cache("s3://caches/copied", str(tmp_path / "back.zarr"), src_options=s3_server)
    assert_same_cache(Path(lossless_cache), tmp_path / "back.zarr")


def test_merge_and_its_refusals(llava_teacher_dir, digits_dataset, lossless_cache, tmp_path):
    path, root = digits_dataset
    records = json.loads(path.read_text())
    (tmp_path / "a.json").write_text(json.dumps(records[:6]))
    (tmp_path / "b.json").write_text(json.dumps(records[6:]))
    opts = BuildOptions(codecs="lossless", **OPTS)
    for name in "ab":
        build_cache(
            str(llava_teacher_dir),
            tmp_path / f"{name}.json",
            root,
            str(tmp_path / f"{name}.zarr"),
            dataclasses.replace(opts, progress=False),
        )
    attrs = merge_caches([str(tmp_path / "a.zarr"), str(tmp_path / "b.zarr")], str(tmp_path / "ab.zarr"))
    assert attrs["counts"]["written"] == 10 and len(attrs["merged_from"]) == 2
    merged, whole = CacheReader(str(tmp_path / "ab.zarr")), CacheReader(lossless_cache)
    assert merged.ids == whole.ids
    for sid in ("digit-0", "digit-7", "text-1"):
        assert merged.row(sid)["image_layouts"] == whole.row(sid)["image_layouts"]  # carried
        a, b = merged.read(sid), whole.read(sid)
        assert torch.equal(a.logits.ids, b.logits.ids)
        if a.attention is not None:
            torch.testing.assert_close(a.attention, b.attention, atol=1e-5, rtol=1e-4)
            torch.testing.assert_close(a.visual, b.visual, atol=1e-5, rtol=1e-4)
    assert verify(str(tmp_path / "ab.zarr")).ok
    with pytest.raises(IncompatibleCache, match="digit-0"):
        merge_caches([str(tmp_path / "a.zarr"), lossless_cache], str(tmp_path / "x.zarr"))
    build_cache(
        str(llava_teacher_dir),
        tmp_path / "b.json",
        root,
        str(tmp_path / "b4.zarr"),
        BuildOptions(**(OPTS | {"codecs": "lossless", "topk": 4}), progress=False),
    )
    with pytest.raises(IncompatibleCache, match="options.topk"):
        merge_caches([str(tmp_path / "a.zarr"), str(tmp_path / "b4.zarr")], str(tmp_path / "y.zarr"))
    build_cache(
        str(llava_teacher_dir),
        tmp_path / "b.json",
        root,
        str(tmp_path / "bp.zarr"),
        BuildOptions(**(OPTS | {"codecs": "lossless", "template": "plain"}), progress=False),
    )
    with pytest.raises(IncompatibleCache, match="template"):
        merge_caches([str(tmp_path / "a.zarr"), str(tmp_path / "bp.zarr")], str(tmp_path / "z.zarr"))


READ_WITHOUT_ALIGNKD = r"""
import sys, json, io
import numpy as np, pyarrow.parquet as pq, zarr
url = sys.argv[1]
root = zarr.open_group(url, mode="r")
attrs = dict(root.attrs)
manifest = pq.read_table(f"{url}/manifest.parquet").to_pylist()
row = next(r for r in manifest if r["status"] == "written" and r["images"] and r["visual_blocks"][0] >= 0)
block = root[f"blocks/b{row['block']:06d}"]
a = block["attention"][row["attention_offset"] : row["attention_offset"] + row["attention_rows"]]
assert block["attention"].attrs["encoding"] == "f32"
n_v = sum(row["num_visual"])
first = row["input_ids"].index(attrs["image_token_id"])
n_text = len(row["input_ids"]) - first - n_v
a = a[:, :n_v].reshape(-1, n_text, n_v)
vb, vo = row["visual_blocks"][0], row["visual_offsets"][0]
v = root[f"blocks/b{vb:06d}"]["visual"][vo : vo + row["num_visual"][0]]
lo, hi = row["logit_offset"], row["logit_offset"] + row["logit_rows"]
logp = block["logit_values"][lo:hi]
tail = block["logit_tail"][lo:hi]
# L_vis top-k index (heads mean, summed over text queries) and a forward-KL term vs a uniform student
focus = np.argsort(-a.mean(0).sum(0))[:4]
p = np.exp(logp)
kl = float((p * (logp - np.log(1.0 / attrs["vocab_size"]))).sum(1).mean())
assert "alignkd_cache" not in sys.modules
print(json.dumps({"id": row["id"], "focus": focus.tolist(), "kl": kl, "v0": float(v[0, 0]), "tail0": float(tail[0])}))
"""


def test_read_with_only_zarr_and_pyarrow(lossless_cache, tmp_path):
    script = tmp_path / "read.py"
    script.write_text(READ_WITHOUT_ALIGNKD)
    out = subprocess.run(
        [sys.executable, "-I", str(script), lossless_cache], capture_output=True, text=True, cwd=tmp_path
    )
    assert out.returncode == 0, out.stderr
    got = json.loads(out.stdout)
    sample = CacheReader(lossless_cache).read(got["id"])
    focus = sample.attention.mean(0).sum(0).argsort(descending=True)[:4].tolist()
    assert got["focus"] == focus
    p = sample.logits.values.exp()
    vocab = CacheReader(lossless_cache).attrs["vocab_size"]
    expected = (p * (sample.logits.values - float(np.log(1.0 / vocab)))).sum(1).mean().item()
    assert got["kl"] == pytest.approx(expected, rel=1e-5)
    assert got["v0"] == pytest.approx(sample.visual[0][0, 0].item())
    assert got["tail0"] == pytest.approx(sample.logits.tail[0].item())


def test_s3_lock_object_one_writer_and_stale_takeover(s3_server):
    """The object-store lock: a conditional create refuses a second writer naming the holder, and a lock
    left by a dead process on this host is taken over."""
    import s3fs

    from alignkd_cache.store.location import Location
    from alignkd_cache.store.lock import LOCK_NAME, WriterLocked, lock_store

    loc = Location("s3://caches/locked", s3_server)
    first = lock_store(loc, "a cache build")
    with pytest.raises(WriterLocked, match=f"locked by host {socket.gethostname()} pid {os.getpid()}"):
        lock_store(loc, "a cache build")
    first.release()
    lock_store(loc, "a cache build").release()  # released: free again
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    fs = s3fs.S3FileSystem(**s3_server)
    fs.pipe(f"caches/locked/{LOCK_NAME}", f"host {socket.gethostname()} pid {dead.pid} since then".encode())
    taken = lock_store(loc, "a cache build")
    assert f"pid {os.getpid()}" in fs.cat(f"caches/locked/{LOCK_NAME}").decode()
    taken.release()


@pytest.mark.slow
def test_a_layer0_cache_on_s3_carries_its_stub(
    s3_server, llava_teacher_dir, llava_student_dir, digits_dataset, tmp_path
):
    """Build a layer0 cache straight to an object store, verify it there, train-read it from there
    (the stub is fetched and hash-checked), and copy it back: the signals are the local build's."""
    from alignkd_cache.sources import Layer0Source
    from alignkd_cache.store.copy import copy_cache

    path, root = digits_dataset
    url, options = "s3://caches/layer0", BuildOptions(codecs="lossless", signals="layer0", **OPTS)
    build_cache(
        str(llava_teacher_dir),
        path,
        root,
        url,
        dataclasses.replace(options, storage_options=s3_server, progress=False),
    )
    assert verify(url, s3_server).ok
    copy_cache(url, str(tmp_path / "back.zarr"), src_options=s3_server)
    student = load_backend(llava_student_dir)
    sources = [
        Layer0Source(CacheReader(u, o), student, root)
        for u, o in ((url, s3_server), (str(tmp_path / "back.zarr"), None))
    ]
    signals = []
    for source in sources:
        micro = source.collate([source[i] for i in range(4)])
        signals.append(source.signals(micro, "cpu"))
    for a, b in zip(*signals, strict=True):
        assert (a.attention is None and b.attention is None) or torch.equal(a.attention, b.attention)
        assert torch.equal(a.logits.ids, b.logits.ids)
