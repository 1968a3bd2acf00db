"""`--signals layer0` caches: logit targets plus the teacher's layer-0 stub, whose recomputed
signals equal a lossless stored cache's (both families, GQA, padding, text-only samples, pooling,
both head modes), with the student's tower shared when it is the teacher's."""

from __future__ import annotations

import dataclasses
import json
import shutil
import sys
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from conftest import build_digits_cache, loss_and_grads, run_ok
from run_logs import free_port

from alignkd_cache.backends import load_backend
from alignkd_cache.build import BuildOptions, build_cache
from alignkd_cache.cli.cache import main as cache_cli
from alignkd_cache.layer0 import vision_tower
from alignkd_cache.losses import LossConfig, parse_weights
from alignkd_cache.sources import CacheSource, Layer0Source, OnlineSource, SignalOptions
from alignkd_cache.store.copy import copy_cache
from alignkd_cache.store.info import cache_info
from alignkd_cache.store.merge import merge_caches
from alignkd_cache.store.provenance import IncompatibleCache
from alignkd_cache.store.reader import CacheReader
from alignkd_cache.store.trust import UntrustedCache
from alignkd_cache.store.verify import verify
from alignkd_cache.tiny import build_tiny_llava, build_tiny_mobilevlm
from alignkd_cache.train import trainable_model_parameters


@pytest.fixture(scope="module")
def caches(tmp_path_factory, llava_teacher_dir, mobilevlm_teacher_dir, digits_dataset, llava_cache) -> dict:
    """(family, kind, attn_heads) -> a cache of the digits built by that family's tiny teacher."""
    out = tmp_path_factory.mktemp("layer0_caches")
    teachers = {"llava": llava_teacher_dir, "mobilevlm": mobilevlm_teacher_dir}
    built = {
        (family, kind, heads): build_digits_cache(
            teachers[family], digits_dataset, out / f"{family}-{kind}-{heads}", signals=kind, attn_heads=heads
        )
        for family in teachers
        for kind in ("stored", "layer0")
        for heads in ("all", "mean")
        if (family, kind, heads) != ("llava", "stored", "all")
    }
    return built | {("llava", "stored", "all"): llava_cache}


@pytest.fixture(scope="module")
def students(tmp_path_factory, tokenizer_dir, mobilevlm_teacher_dir) -> dict:
    """llava: 16 visual tokens (the teacher's 8x8 grid pools 2x2 onto it) and its own tower;
    mobilevlm: the teacher's own CLIP tower directory, as MobileVLM V2 1.7B shares the 7B's."""
    root = tmp_path_factory.mktemp("layer0_students")
    llava = build_tiny_llava(
        root / "llava", tokenizer_dir, layers=2, hidden=32, heads=2, patch_size=8, seed=7
    )
    mobilevlm = build_tiny_mobilevlm(
        root / "mobilevlm", tokenizer_dir, layers=2, hidden=32, heads=2, tower="separate", seed=8
    )
    config = json.loads((mobilevlm / "config.json").read_text())
    config["mm_vision_tower"] = json.loads((mobilevlm_teacher_dir / "config.json").read_text())[
        "mm_vision_tower"
    ]
    (mobilevlm / "config.json").write_text(json.dumps(config))
    backends = {"llava": load_backend(llava), "mobilevlm": load_backend(mobilevlm)}
    for backend in backends.values():
        trainable_model_parameters(backend.model)  # the tower frozen, as the trainer freezes it
    return backends


def embeddings(tower):
    return next(m for name, m in tower.named_modules() if name.endswith("embeddings"))


def all_signals(source):
    micro = source.collate([source[i] for i in range(len(source))])
    return micro, source.signals(micro, "cpu")


def test_a_layer0_cache_stores_logits_and_the_stub_only(caches):
    path = caches[("llava", "layer0", "all")]
    reader = CacheReader(str(path))
    attrs = reader.attrs
    assert attrs["signals"] == "layer0" and attrs["schema_version"].startswith("4.")
    arrays = {p.name for p in (path / "blocks").glob("b*/*") if p.is_dir()}
    assert arrays == {"logit_ids", "logit_values", "logit_tail"}
    stub_files = {
        p.relative_to(path / "layer0").as_posix() for p in (path / "layer0").rglob("*") if p.is_file()
    }
    assert stub_files == set(attrs["layer0"]["files"]) | {"layer0.json"}
    signal = reader.read(reader.ids[0])
    assert signal.attention is None and signal.visual == [None] and len(signal.image_keys) == 1
    stored = CacheReader(str(caches[("llava", "stored", "all")]))
    for sid in reader.ids:  # the logit targets are the stored cache's (a forward without capture)
        a, b = reader.read(sid).logits, stored.read(sid).logits
        assert torch.equal(a.ids, b.ids) and torch.equal(a.positions, b.positions)
        torch.testing.assert_close(a.values, b.values, atol=1e-5, rtol=0)
        torch.testing.assert_close(a.tail, b.tail, atol=1e-6, rtol=1e-4)
    assert verify(str(path)).ok
    info, stored_info = cache_info(str(path)), cache_info(str(caches[("llava", "stored", "all")]))
    assert info["kind"] == "layer0" and info["stub"]["bytes"] == attrs["layer0"]["bytes"] > 0
    assert stored_info["kind"] == "stored" and stored_info["stub"] is None
    assert (
        info["signals"]["attention"]["bytes_per_sample"] == info["signals"]["visual"]["bytes_per_sample"] == 0
    )
    assert info["total"]["bytes_per_sample"] * 5 < stored_info["total"]["bytes_per_sample"]


@pytest.mark.parametrize("family", ["llava", "mobilevlm"])
@pytest.mark.parametrize("heads", ["all", "mean"])
def test_layer0_signals_equal_the_lossless_stored_signals(caches, students, digits_dataset, family, heads):
    _, root = digits_dataset
    student = students[family]
    stored = CacheSource(CacheReader(str(caches[(family, "stored", heads)])), student, root)
    layer0 = Layer0Source(CacheReader(str(caches[(family, "layer0", heads)])), student, root)
    assert layer0.route == (
        "layer0, student's tower shared" if family == "mobilevlm" else "layer0, the stub's own tower"
    )
    assert (layer0.teacher_heads, layer0.teacher_dim) == (stored.teacher_heads, stored.teacher_dim)
    _, want = all_signals(stored)
    _, got = all_signals(layer0)
    assert sum(s.attention is None for s in got) == 2  # the two text-only samples
    for a, b in zip(want, got, strict=True):
        pairs = [(a.attention, b.attention, -1)] + [
            (x, y, -2) for x, y in zip(a.visual, b.visual, strict=True)
        ]
        assert len(a.visual) == len(b.visual)
        for x, y, axis in pairs:
            assert (x is None) == (y is None)
            if x is not None:
                assert x.shape == y.shape and x.shape[axis] == student.num_visual_tokens
                torch.testing.assert_close(y, x, atol=1e-5, rtol=0)
        assert torch.equal(a.logits.positions, b.logits.positions)


def test_the_shared_tower_runs_once_per_micro_batch_and_matches_the_stubs_own(
    caches, students, digits_dataset
):
    _, root = digits_dataset
    student = students["mobilevlm"]
    path = caches[("mobilevlm", "layer0", "all")]
    shared = Layer0Source(CacheReader(str(path)), student, root)
    runs = []  # a tower's embeddings run exactly when the tower really runs (not when its output is reused)
    hooks = [
        embeddings(vision_tower(backend)).register_forward_hook(lambda *a, who=who: runs.append(who))
        for who, backend in (("stub", shared.stub), ("student", student))
    ]
    micro, got = all_signals(shared)
    student.forward(micro.student, capture=False)
    for hook in hooks:
        hook.remove()
    assert runs == ["student"]  # the stub's tower never ran; the student's forward reused the output
    own = Layer0Source(CacheReader(str(path)), student, root)
    own.tower = None  # the stub's own tower, as for a student whose tower differs
    _, want = all_signals(own)
    for a, b in zip(want, got, strict=True):
        if a.visual is not None:
            torch.testing.assert_close(b.visual, a.visual, atol=1e-6, rtol=0)
            torch.testing.assert_close(b.attention, a.attention, atol=1e-6, rtol=0)


def test_a_student_tower_that_trains_is_not_shared(caches, students, digits_dataset):
    _, root = digits_dataset
    student = students["mobilevlm"]
    source = Layer0Source(CacheReader(str(caches[("mobilevlm", "layer0", "all")])), student, root)
    student.model.vision_tower.requires_grad_(True)
    try:
        all_signals(source)
        assert source.route == "layer0, the stub's own tower (the student's tower trains)"
    finally:
        student.model.vision_tower.requires_grad_(False)


def test_a_layer0_cache_gives_the_online_loss_and_gradients(
    caches, llava_teacher_dir, llava_student_dir, digits_dataset
):
    data, root = digits_dataset
    student = load_backend(llava_student_dir)
    teacher = load_backend(llava_teacher_dir)
    cfg = LossConfig(parse_weights(""))
    offline = Layer0Source(CacheReader(str(caches[("llava", "layer0", "all")])), student, root)
    online = OnlineSource(teacher, student, data, root, SignalOptions())
    (off, g_off), (on, g_on) = loss_and_grads(student, offline, cfg), loss_and_grads(student, online, cfg)
    for term in ("ce", "logit", "vis", "attn"):
        assert off[term] > 0 and abs(off[term] - on[term]) <= 1e-5, (term, off[term], on[term])
    torch.testing.assert_close(g_off, g_on, rtol=1e-4, atol=1e-6)


def test_a_tampered_stub_is_refused(caches, tmp_path, llava_student_dir, digits_dataset):
    _, root = digits_dataset
    path = tmp_path / "c"
    shutil.copytree(caches[("llava", "layer0", "all")], path)
    weights = path / "layer0" / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-3] ^= 1
    weights.write_bytes(bytes(data))
    lines = verify(str(path)).lines()
    assert any("layer0/model.safetensors" in line and "sha256" in line for line in lines), lines
    with pytest.raises(ValueError, match=r"model.safetensors does not match its sha256"):
        Layer0Source(CacheReader(str(path)), load_backend(llava_student_dir), root)
    manifest = path / "layer0" / "layer0.json"
    edited = json.loads(manifest.read_text()) | {"sha256": "0" * 64}
    manifest.write_text(json.dumps(edited))
    with pytest.raises(UntrustedCache, match="layer0.json: its sha256 differs"):
        CacheReader(str(path))
    (path / "layer0" / "extra.bin").write_bytes(b"x")
    with pytest.raises(UntrustedCache, match="unexpected file 'layer0/extra.bin'"):
        CacheReader(str(path))


def test_merge_needs_identical_stubs_and_copy_carries_the_stub(caches, tmp_path, digits_dataset):
    first, other = caches[("llava", "layer0", "all")], caches[("mobilevlm", "layer0", "all")]
    half = tmp_path / "half"
    shutil.copytree(first, half)  # the same stub; ids must differ, so rename them in a rebuilt copy
    data, root = digits_dataset
    records = json.loads(Path(data).read_text())
    renamed = tmp_path / "renamed.json"
    renamed.write_text(json.dumps([dict(r, id=f"again-{r['id']}") for r in records]))
    teacher = CacheReader(str(first)).attrs["teacher"]["model_id"]
    second = build_digits_cache(teacher, (renamed, root), tmp_path / "second", signals="layer0")
    merged = merge_caches([str(first), str(second)], str(tmp_path / "merged"))
    assert merged["layer0"] == CacheReader(str(first)).attrs["layer0"] and verify(str(tmp_path / "merged")).ok
    assert merged["counts"]["written"] == 2 * CacheReader(str(first)).attrs["counts"]["written"]
    with pytest.raises(IncompatibleCache, match="layer0"):
        merge_caches([str(first), str(other)], str(tmp_path / "refused"))
    report = copy_cache(str(first), str(tmp_path / "copy"))
    assert report.ok and (tmp_path / "copy" / "layer0" / "layer0.json").is_file()
    assert CacheReader(str(tmp_path / "copy")).attrs["layer0"] == CacheReader(str(first)).attrs["layer0"]


@pytest.mark.slow
def test_the_commands_build_train_and_report_a_layer0_cache(tmp_path, llava_teacher_dir, digits_dataset):
    """`build --signals layer0`, `info`, `verify`, then `from-cache` on two DDP ranks: the log and
    metrics.jsonl say the signals were recomputed, and what share of each step that took."""
    data, root = digits_dataset
    cache, run_dir = tmp_path / "cache", tmp_path / "run"

    # The cache commands in this process (a process start costs more than they do); torchrun's ranks apart.
    def cache_command(*args) -> str:
        result = CliRunner().invoke(cache_cli, [str(a) for a in args])
        assert result.exit_code == 0, result.output
        return result.output

    cache_command("build", "--teacher", llava_teacher_dir, "--data", data, "--image-root", root, "--out", cache,
                  "--signals", "layer0")  # fmt: skip
    info = cache_command("info", cache)
    assert "kind: layer0 (attention and visual tokens recomputed from the stub" in info
    cache_command("verify", cache)
    module = [sys.executable, "-m"]
    trained = run_ok(*module, "torch.distributed.run", "--nproc-per-node", "2", "--master-port", str(free_port()),
                  "-m", "alignkd_cache.cli.train", "from-cache", "--student", str(llava_teacher_dir),
                  "--cache", str(cache), "--image-root", str(root), "--out", str(run_dir), "--max-steps", "2")  # fmt: skip
    assert "teacher signals: layer0, student's tower shared" in trained.stderr  # the student is the teacher
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert len(rows) == 2 and all(r["signals_route"] == "layer0, student's tower shared" for r in rows)
    assert all(0 < r["signals_share"] < 1 and r["attn"] > 0 and r["vis"] > 0 for r in rows)


def test_show_recomputes_a_layer0_caches_attention(caches, digits_dataset, tmp_path):
    from PIL import Image

    from alignkd_cache.images import load_image
    from alignkd_cache.show import show_attention, teacher_attention
    from alignkd_cache.sources import tokenized_from_row

    _, root = digits_dataset
    stored = CacheReader(str(caches[("mobilevlm", "stored", "all")]))
    layer0 = CacheReader(str(caches[("mobilevlm", "layer0", "all")]))
    sample = tokenized_from_row(layer0.row("digit-1"), layer0.attrs["image_token_id"])
    pictures = [
        load_image(
            root / sample.images[0], sample.id, tuple(layer0.attrs["preprocessing"]["image"]["pad_color"])
        )
    ]
    torch.testing.assert_close(
        teacher_attention(layer0, sample, pictures),
        teacher_attention(stored, sample, pictures),
        atol=1e-5,
        rtol=0,
    )
    out = show_attention(str(layer0.url), "digit-1", root, tmp_path / "heat.png")
    with Image.open(out) as png:
        assert png.width > 300


def test_resume_refuses_another_stub_or_kind(tmp_path, llava_teacher_dir, tokenizer_dir, digits_dataset):
    partial = build_digits_cache(llava_teacher_dir, digits_dataset, tmp_path / "c", signals="layer0", limit=4)
    data, root = digits_dataset
    other = build_tiny_llava(
        tmp_path / "other", tokenizer_dir, layers=3, hidden=64, heads=4, kv_heads=2, seed=11
    )
    options = BuildOptions(codecs="lossless", batch_size=4, signals="layer0", limit=4)
    with pytest.raises(
        IncompatibleCache, match="its layer-0 stub has sha256 .*use a new --out or the original teacher"
    ):
        build_cache(
            str(other), data, root, str(partial), dataclasses.replace(options, resume=True, progress=False)
        )
    stored = BuildOptions(codecs="lossless", batch_size=4, limit=4)
    with pytest.raises(IncompatibleCache, match="signals: stored 'layer0', now 'stored'"):
        build_cache(
            str(llava_teacher_dir),
            data,
            root,
            str(partial),
            dataclasses.replace(stored, resume=True, progress=False),
        )
    again = build_cache(
        str(llava_teacher_dir),
        data,
        root,
        str(partial),
        dataclasses.replace(options, resume=True, progress=False),
    )
    assert again["layer0"] == CacheReader(str(partial)).attrs["layer0"]  # the same teacher: the same stub


def test_a_stub_that_points_outside_itself_is_refused(caches, tmp_path, mobilevlm_teacher_dir):
    """Even with every hash made consistent (a forged cache), a stub may not load a tower from elsewhere."""
    from alignkd_cache.layer0 import load_layer0
    from alignkd_cache.store.provenance import file_sha256
    from alignkd_cache.store.stub import stub_sha256

    stub = tmp_path / "layer0"
    shutil.copytree(caches[("mobilevlm", "layer0", "all")] / "layer0", stub)
    config = json.loads((stub / "config.json").read_text())
    config["mm_vision_tower"] = str(mobilevlm_teacher_dir) + "-clip"
    (stub / "config.json").write_text(json.dumps(config))
    manifest = json.loads((stub / "layer0.json").read_text())
    manifest["files"]["config.json"] = file_sha256(stub / "config.json")
    manifest["sha256"] = stub_sha256(manifest["files"])
    (stub / "layer0.json").write_text(json.dumps(manifest))
    with pytest.raises(ValueError, match="names a vision tower outside the stub"):
        load_layer0(stub)
