"""Today's families through the user's path: build a cache by command line, check it against an
independent eager transformers forward, train a narrower student of the same family from it and
with the teacher resident (the same terms), verify, info, show, eval. A `--signals layer0` cache of
the same data recomputes the lossless cache's attention slices and visual tokens from its stub (the
family's checkpoint cut to one decoder layer) and gives the online loss.

Each family's pair comes from tiny_families (a wider, deeper teacher with a padded vocabulary and
a narrower student, one processor). The data: a multi-turn sample with non-ASCII text, a sample
with two images of different non-square sizes, a text-only sample.
"""

from __future__ import annotations

import json

import pytest
import torch
import transformers
from click.testing import CliRunner
from conftest import loss_and_grads
from safetensors import safe_open
from test_families import FAMILIES, _flat, _hf_messages, _reference_processor

from alignkd_cache import layer0
from alignkd_cache.backends import load_backend
from alignkd_cache.cli import cache as cache_cli
from alignkd_cache.cli import train as train_cli
from alignkd_cache.demo.digits import compose, load_scans
from alignkd_cache.losses import LossConfig, parse_weights
from alignkd_cache.sources import CacheSource, Layer0Source, OnlineSource, SignalOptions
from alignkd_cache.store.reader import CacheReader
from alignkd_cache.tiny_families import tiny_checkpoint

TOL = 1e-5
RECORDS = [
    {
        "id": "multi-turn",
        "image": "wide.png",
        "conversations": [
            {"from": "human", "value": "<image>\nЧто это? 数字"},
            {"from": "gpt", "value": "Это 7."},
            {"from": "human", "value": "А тут?"},
            {"from": "gpt", "value": "数字 3"},
        ],
    },
    {
        "id": "two-images",
        "image": ["wide.png", "tall.png"],
        "conversations": [
            {"from": "human", "value": "<image> and <image> differ?"},
            {"from": "gpt", "value": "yes"},
        ],
    },
    {
        "id": "text-only",
        "conversations": [{"from": "human", "value": "Hello"}, {"from": "gpt", "value": "hi there"}],
    },
]


def invoke(main, *args):
    result = CliRunner().invoke(main, [str(a) for a in args])
    assert result.exit_code == 0, result.output
    return result.output


@pytest.fixture(scope="module", params=FAMILIES)
def built(request, tmp_path_factory):
    """(model_type, teacher dir, student dir, data, image root, lossless cache) built by command line."""
    root = tmp_path_factory.mktemp(f"e2e-{request.param}")
    scans, _ = load_scans()
    compose(scans[:4], cell=16).resize((40, 28)).save(root / "wide.png")
    compose(scans[4:8], cell=16).resize((28, 56)).save(root / "tall.png")
    data = root / "data.json"
    data.write_text(json.dumps(RECORDS, ensure_ascii=False))
    teacher = tiny_checkpoint(request.param, root / "teacher", role="teacher", seed=1)
    student = tiny_checkpoint(request.param, root / "student", role="student", seed=2)
    cache = root / "cache.zarr"
    invoke(cache_cli.main, "build", "--teacher", teacher, "--data", data, "--image-root", root, "--out", cache,
           "--template", "chat", "--codecs", "lossless", "--batch-size", "2", "--topk", "8")  # fmt: skip
    return request.param, teacher, student, data, root, cache


@pytest.fixture(scope="module")
def layer0_cache(built):
    """The same build with `--signals layer0`: logit targets and the teacher's layer-0 stub."""
    _, teacher, _, data, root, _ = built
    cache = root / "layer0.zarr"
    invoke(cache_cli.main, "build", "--teacher", teacher, "--data", data, "--image-root", root, "--out", cache,
           "--template", "chat", "--codecs", "lossless", "--batch-size", "2", "--topk", "8",
           "--signals", "layer0")  # fmt: skip
    return cache


def test_lossless_cache_equals_an_independent_eager_forward(built):
    model_type, teacher, _, _, root, cache = built
    reader = CacheReader(str(cache))
    processor = _reference_processor(teacher, model_type)
    model = transformers.AutoModelForImageTextToText.from_pretrained(
        teacher, attn_implementation="eager", use_safetensors=True
    ).eval()
    assert reader.attrs["vocab_size"] == len(processor.tokenizer) < model.config.get_text_config().vocab_size
    image_id = processor.image_token_id
    for record in RECORDS:
        paths = [record["image"]] if isinstance(record.get("image"), str) else record.get("image", [])
        images = [transformers.image_utils.load_image(str(root / p)) for p in paths]
        turns = [
            ("user" if t["from"] == "human" else "assistant", t["value"]) for t in record["conversations"]
        ]
        text = processor.apply_chat_template(_hf_messages(turns), tokenize=False)
        inputs = processor(text=[text], images=images or None, return_tensors="pt")
        row, got = reader.row(record["id"]), reader.read(record["id"])
        ids = inputs["input_ids"][0]
        assert row["input_ids"] == ids.tolist()
        with torch.no_grad():
            out = model(**inputs, output_attentions=True, use_cache=False)
        log_probs = out.logits[0].float().log_softmax(-1)[got.logits.positions]
        torch.testing.assert_close(got.logits.values, log_probs.gather(1, got.logits.ids), atol=TOL, rtol=0)
        if not images:
            assert got.attention is None and got.visual == []
            continue
        v = (ids == image_id).nonzero().flatten()
        t = torch.tensor([p for p in range(int(v[0]) + 1, len(ids)) if ids[p] != image_id])
        torch.testing.assert_close(got.attention, out.attentions[0][0][:, t][:, :, v], atol=TOL, rtol=0)
        assert row["num_visual"] == [int(x.shape[0]) for x in got.visual]
        pixel = {k: val for k, val in inputs.items() if k not in ("input_ids", "attention_mask")}
        with torch.no_grad():
            features = model.model.get_image_features(**_image_kwargs(model_type, pixel))
        want = _flat(features.pooler_output, got.visual[0].shape[-1])
        torch.testing.assert_close(torch.cat(got.visual), want, atol=TOL, rtol=0)


def _image_kwargs(model_type: str, pixel: dict) -> dict:
    """The inputs get_image_features takes for this family (the rest of the processor's output is for
    the text side)."""
    names = {
        "qwen2_5_vl": ("pixel_values", "image_grid_thw"),
        "qwen3_vl": ("pixel_values", "image_grid_thw"),
        "internvl": ("pixel_values",),
        "smolvlm": ("pixel_values", "pixel_attention_mask"),
        "llava_onevision": ("pixel_values", "image_sizes"),
    }[model_type]
    return {k: pixel[k] for k in names if k in pixel}


def test_offline_equals_online_for_a_narrower_student(built, layer0_cache):
    """Both kinds of cache (stored, and layer0 with the slices and visual tokens recomputed by its
    stub) give the resident teacher's loss terms and gradients."""
    _, teacher_dir, student_dir, data, root, cache = built
    student = load_backend(student_dir)
    teacher = load_backend(teacher_dir)
    teacher.model.requires_grad_(False)
    assert teacher.num_heads > student.num_heads and teacher.visual_dim > student.visual_dim
    cfg = LossConfig(parse_weights(""))
    online = OnlineSource(teacher, student, data, root, SignalOptions(template="chat", topk=8))
    on, g_on = loss_and_grads(student, online, cfg)
    for offline in (
        CacheSource(CacheReader(str(cache)), student, root),
        Layer0Source(CacheReader(str(layer0_cache)), student, root),
    ):
        assert [s.input_ids for s in offline.samples] == [s.input_ids for s in online.samples]
        off, g_off = loss_and_grads(student, offline, cfg)
        for term in ("loss", "ce", "logit", "vis", "attn"):
            assert off[term] > 0, (offline.route, term)
            assert abs(off[term] - on[term]) <= 1e-4, (offline.route, term, off[term], on[term])
        torch.testing.assert_close(g_off, g_on, rtol=1e-3, atol=1e-5)


def all_signals(source):
    micro = source.collate([source[i] for i in range(len(source))])
    return micro, source.signals(micro, "cpu")


def test_a_layer0_cache_recomputes_the_lossless_signals(built, layer0_cache):
    """Through the trainer's path (Layer0Source): every slice and every image's visual tokens equal
    the lossless stored cache's; the stub is the teacher cut to one decoder layer, without lm_head."""
    _, _, student_dir, _, root, cache = built
    student = load_backend(student_dir)
    stored = CacheSource(CacheReader(str(cache)), student, root)
    source = Layer0Source(CacheReader(str(layer0_cache)), student, root)
    assert source.route == "layer0, the stub's own tower"
    text = source.stub.model.config.get_text_config()
    assert text.num_hidden_layers == 1 == len(source.stub.model.model.get_decoder().layers)
    with safe_open(str(layer0_cache / "layer0" / "model.safetensors"), "pt") as f:
        names = list(f.keys())
    assert not any(n.startswith("lm_head.") for n in names)
    assert any(".layers.0." in n for n in names) and not any(
        ".layers.1." in n and "language" in n for n in names
    )
    assert (source.teacher_heads, source.teacher_dim) == (stored.teacher_heads, stored.teacher_dim)
    _, want = all_signals(stored)
    micro, got = all_signals(source)
    assert [s.attention is None for s in got] == [False, False, True]
    for a, b in zip(want, got, strict=True):
        assert (a.attention is None) == (b.attention is None) and len(a.visual) == len(b.visual)
        if a.attention is not None:
            assert a.attention.shape == b.attention.shape
            torch.testing.assert_close(b.attention, a.attention, atol=TOL, rtol=0)
        for x, y in zip(a.visual, b.visual, strict=True):
            assert x.shape == y.shape
            torch.testing.assert_close(y, x, atol=TOL, rtol=0)
        assert torch.equal(a.logits.ids, b.logits.ids) and torch.equal(a.logits.positions, b.logits.positions)
    mean = layer0.recompute(source.stub, micro.teacher, "mean")
    full = layer0.recompute(source.stub, micro.teacher, "all")
    for m, f in zip(mean.attention, full.attention, strict=True):
        assert (m is None) == (f is None)
        if m is not None:
            torch.testing.assert_close(m, f.mean(0, keepdim=True), atol=0, rtol=0)


def test_verify_info_and_show_a_layer0_cache(built, layer0_cache, tmp_path):
    _, _, _, _, root, _ = built
    assert "ok" in invoke(cache_cli.main, "verify", layer0_cache).lower()
    info = json.loads(invoke(cache_cli.main, "info", layer0_cache, "--json"))
    assert info["kind"] == "layer0" and info["stub"]["bytes"] > 0 and info["counts"]["written"] == 3
    figure = tmp_path / "two.png"
    invoke(
        cache_cli.main, "show", layer0_cache, "--sample", "two-images", "--image-root", root, "--out", figure
    )
    assert figure.stat().st_size > 0


def test_verify_info_show_train_and_eval_by_command_line(built, tmp_path):
    model_type, _, student, data, root, cache = built
    assert "ok" in invoke(cache_cli.main, "verify", cache).lower()
    info = json.loads(invoke(cache_cli.main, "info", cache, "--json"))
    assert info["counts"]["written"] == 3 and info["provenance"]["family"] == model_type
    figure = tmp_path / "two.png"
    invoke(cache_cli.main, "show", cache, "--sample", "two-images", "--image-root", root, "--out", figure)
    assert figure.stat().st_size > 0
    run = tmp_path / "run"
    out = invoke(train_cli.main, "from-cache", "--student", student, "--cache", cache, "--image-root", root,
                 "--out", run, "--max-steps", "2", "--batch-size", "2", "--lr", "1e-3")  # fmt: skip
    assert json.loads(out.strip().splitlines()[-1])["finished"]
    # The student is written as its source was: every file but the weights byte for byte.
    kept = [f for f in sorted(student.iterdir()) if f.is_file() and f.suffix != ".safetensors"]
    assert kept and all((run / f.name).read_bytes() == f.read_bytes() for f in kept)
    predictions = tmp_path / "p.jsonl"
    invoke(train_cli.main, "eval", "--model", run, "--data", data, "--image-root", root,
           "--max-new-tokens", "3", "--predictions", predictions)  # fmt: skip
    assert len(predictions.read_text().splitlines()) == len(RECORDS)


def test_the_readme_family_commands_run_as_written(tmp_path):
    """README's block for today's families, as a user runs it from the repository root (one family,
    by subprocess: the console scripts as installed)."""
    import re
    import shutil
    import subprocess
    from pathlib import Path

    from conftest import SUBPROCESS_ENV

    repo = Path(__file__).resolve().parents[1]
    readme = (repo / "README.md").read_text()
    block = next(b for b in re.findall(r"```bash\n(.*?)```", readme, re.S) if "alignkd-tiny" in b)
    loop = block.split("\n", 1)[1]  # the install line is the environment's job here
    assert re.search(r"for family in qwen2_5_vl qwen3_vl internvl smolvlm llava_onevision; do", loop)
    script = re.sub(r"for family in [^;]*;", "for family in smolvlm;", loop)
    shutil.copytree(repo / "examples", tmp_path / "examples")
    done = subprocess.run(
        ["bash", "-euo", "pipefail", "-c", script],
        cwd=tmp_path,
        env=SUBPROCESS_ENV,
        capture_output=True,
        text=True,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert (tmp_path / "runs/smolvlm/alignkd_train.json").is_file()


def test_a_student_that_processes_images_differently_is_refused_naming_the_setting(built, tmp_path):
    import shutil

    from alignkd_cache.sources import CompatibilityError

    _, _, student_dir, _, root, cache = built
    other = tmp_path / "student"
    shutil.copytree(student_dir, other)
    # transformers 5 keeps the image processor's settings inside processor_config.json
    path = other / "processor_config.json"
    config = json.loads(path.read_text())
    config["image_processor"]["image_mean"] = [0.0, 0.0, 0.0]
    path.write_text(json.dumps(config))
    with pytest.raises(CompatibilityError, match="image processing: .*image_mean") as refused:
        CacheSource(CacheReader(str(cache)), load_backend(other), root)
    assert "layout" not in str(refused.value)  # other pixels, the same layout: nothing more to name


# Per family, an image-processor setting that lays the cache's first image (wide.png) out otherwise.
OTHER_LAYOUT = {
    "qwen2_5_vl": lambda ip, config: ip["size"].update(shortest_edge=4 * ip["size"]["shortest_edge"]),
    "qwen3_vl": lambda ip, config: ip["size"].update(shortest_edge=4 * ip["size"]["shortest_edge"]),
    "internvl": lambda ip, config: ip.update(min_patches=2),
    "smolvlm": lambda ip, config: ip["size"].update(longest_edge=ip["max_image_size"]["longest_edge"]),
    "llava_onevision": lambda ip, config: [x.update(image_grid_pinpoints=[[16, 16]]) for x in (ip, config)],
}


def test_a_student_that_lays_images_out_otherwise_is_refused_naming_both_layouts(built, tmp_path):
    """The refusal names the teacher's recorded layout of the cache's first image and the one the
    student's processor gives it, in the problem's one line."""
    import shutil

    from alignkd_cache.data import describe_layout
    from alignkd_cache.sources import CompatibilityError

    model_type, _, student_dir, _, root, cache = built
    other = tmp_path / "student"
    shutil.copytree(student_dir, other)
    processor, config = (
        json.loads((other / name).read_text()) for name in ("processor_config.json", "config.json")
    )
    OTHER_LAYOUT[model_type](processor["image_processor"], config)
    (other / "processor_config.json").write_text(json.dumps(processor))
    (other / "config.json").write_text(json.dumps(config))
    student = load_backend(other)
    reader = CacheReader(str(cache))
    teacher = reader.row("multi-turn")["image_layouts"][0]
    ours = student.layouts_of([transformers.image_utils.load_image(str(root / "wide.png"))])[0]
    assert ours != teacher
    with pytest.raises(CompatibilityError) as refused:
        CacheSource(reader, student, root)
    line = next(x for x in str(refused.value).splitlines() if "image processing:" in x)
    assert line.endswith(
        f"; sample 'multi-turn' image 0: the teacher's recorded layout {describe_layout(teacher)}, "
        f"the student's {describe_layout(ours)}"
    )


def test_show_draws_a_panel_per_segment_and_a_4_0_cache_as_before(built, tmp_path, monkeypatch):
    """`show` on a cache that records layouts: one heatmap per segment of each image, titled by role
    and shape (a layout that is one grid: that grid over the image); on the same cache as schema 4.0
    wrote it (no layouts), today's drawing."""
    import shutil

    import matplotlib.figure
    import pyarrow.parquet as pq

    from alignkd_cache.data import describe_layout
    from alignkd_cache.store.manifest import MANIFEST_KEY, sha256

    _, _, _, _, root, cache = built
    titles = []
    save = matplotlib.figure.Figure.savefig
    monkeypatch.setattr(
        matplotlib.figure.Figure,
        "savefig",
        lambda fig, *a, **k: titles.append([ax.get_title() for ax in fig.axes]) or save(fig, *a, **k),
    )
    layouts = CacheReader(str(cache)).row("two-images")["image_layouts"]
    invoke(
        cache_cli.main,
        "show",
        cache,
        "--sample",
        "two-images",
        "--image-root",
        root,
        "--out",
        tmp_path / "a.png",
    )
    segments = [
        s for layout in layouts if layout != [layout[0]] or layout[0]["role"] != "grid" for s in layout
    ]
    got = [t for t in titles[0] if t and "image" not in t and "text->vision" not in t]
    assert got == [
        describe_layout([s]) + (" (last column: newlines)" if s["role"] == "anyres_newline" else "")
        for s in segments
    ]
    if not segments:  # Qwen: one grid per image, drawn over the image
        assert [layout[0]["role"] for layout in layouts] == ["grid", "grid"]
    old = tmp_path / "old.zarr"
    shutil.copytree(cache, old)
    table = pq.read_table(old / MANIFEST_KEY).drop_columns(["image_layouts"])
    pq.write_table(table, old / MANIFEST_KEY)
    meta = json.loads((old / "zarr.json").read_text())
    meta["attributes"] |= {
        "schema_version": "4.0",
        "manifest_sha256": sha256((old / MANIFEST_KEY).read_bytes()),
    }
    (old / "zarr.json").write_text(json.dumps(meta))
    invoke(
        cache_cli.main,
        "show",
        old,
        "--sample",
        "two-images",
        "--image-root",
        root,
        "--out",
        tmp_path / "b.png",
    )
    assert (tmp_path / "b.png").stat().st_size > 0 and len(titles) == 2
    assert not any(t for t in titles[1] if " 2x2" in t or "tile_" in t or "base " in t)


def test_a_fixed_grid_student_on_a_dynamic_cache_is_refused_naming_both_layouts(built, llava_student_dir):
    from alignkd_cache.data import describe_layout
    from alignkd_cache.sources import CompatibilityError

    _, _, _, _, root, cache = built
    reader = CacheReader(str(cache))
    student = load_backend(llava_student_dir)
    with pytest.raises(CompatibilityError) as refused:
        CacheSource(reader, student, root)
    line = next(x for x in str(refused.value).splitlines() if "visual-token layout:" in x)
    teacher = describe_layout(reader.row("multi-turn")["image_layouts"][0])
    ours = describe_layout(student.image_layouts(1)[0])
    assert f"the student {student.num_visual_tokens} per image" in line
    assert line.endswith(
        f"; sample 'multi-turn' image 0: the teacher's recorded layout {teacher}, the student's {ours}"
    )
