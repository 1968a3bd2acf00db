"""The demo: its digit question set, and the whole `alignkd-demo --quick` run."""

from __future__ import annotations

import json

import numpy as np
import pytest
from click.testing import CliRunner

from alignkd_cache.cli.train import main as train_main
from alignkd_cache.data import Tokenization, read_records, tokenize_all
from alignkd_cache.demo import digits
from alignkd_cache.images import load_image
from alignkd_cache.tiny import build_tokenizer

SIZES = {"train": 30, "val": 8, "test": 12}


@pytest.fixture(scope="module")
def digit_set(tmp_path_factory):
    out = tmp_path_factory.mktemp("digits")
    return out, digits.build_digits_vqa(out, SIZES, seed=3)


def test_scan_pools_are_disjoint_and_cover_every_digit():
    _, labels = digits.load_scans()
    pools = digits.split_scans(labels, seed=3)
    sets = {name: set(pool.tolist()) for name, pool in pools.items()}
    assert (
        not sets["train"] & sets["val"]
        and not sets["train"] & sets["test"]
        and not sets["val"] & sets["test"]
    )
    assert sum(len(s) for s in sets.values()) == len(labels)
    for pool in pools.values():
        assert set(labels[pool].tolist()) == set(range(10))


def test_held_out_images_share_no_scan_with_train(digit_set):
    _, paths = digit_set
    used = {name: {s for r in json.loads(p.read_text()) for s in r["scans"]} for name, p in paths.items()}
    assert used["train"] and not used["train"] & (used["val"] | used["test"])
    assert not used["val"] & used["test"]


def test_answers_match_the_composed_labels(digit_set):
    _, paths = digit_set
    _, labels = digits.load_scans()
    for path in paths.values():
        for r in json.loads(path.read_text()):
            grid = r["labels"]
            assert [int(labels[s]) for s in r["scans"]] == grid
            question = r["conversations"][0]["value"].removeprefix("<image>\n")
            answer = r["conversations"][1]["value"]
            if r["kind"] == "position":
                position = question.removeprefix("Which digit is ").removesuffix("?")
                assert answer == str(grid[digits.POSITIONS.index(position)])
            elif r["kind"] == "presence":
                digit = int(question.removeprefix("Is there a ")[0])
                assert answer == ("yes" if digit in grid else "no")
            else:
                digit = int(question.removeprefix("How many ")[0])
                assert answer == str(grid.count(digit))


def test_images_are_the_real_scans_in_reading_order(digit_set):
    out, paths = digit_set
    scans, _ = digits.load_scans()
    record = json.loads(paths["test"].read_text())[0]
    image, _ = load_image(out / record["image"], record["id"], (0, 0, 0))  # square: no padding
    pixels = np.asarray(image.convert("L"), dtype=np.float32)
    cell = pixels.shape[0] // 2
    for i, s in enumerate(record["scans"]):
        tile = pixels[(i // 2) * cell : (i // 2 + 1) * cell, (i % 2) * cell : (i % 2 + 1) * cell]
        # Downsampling the tile back to 8x8 recovers the scan's ink up to resampling blur.
        ink = (255 - tile).reshape(8, cell // 8, 8, cell // 8).mean((1, 3)) * 16 / 255
        assert np.corrcoef(ink.ravel(), scans[s].ravel())[0, 1] > 0.9


def test_same_seed_same_set_other_seed_other_set(tmp_path, digit_set):
    out, paths = digit_set
    again = digits.build_digits_vqa(tmp_path / "a", SIZES, seed=3)
    other = digits.build_digits_vqa(tmp_path / "b", SIZES, seed=4)
    assert again["train"].read_text() == paths["train"].read_text()
    assert (tmp_path / "a/images/train/00000.png").read_bytes() == (
        out / "images/train/00000.png"
    ).read_bytes()
    assert other["train"].read_text() != paths["train"].read_text()


def test_questions_are_balanced_enough_to_need_looking(tmp_path):
    paths = digits.build_digits_vqa(tmp_path, {"train": 300}, seed=0)
    records = json.loads(paths["train"].read_text())
    answers = {k: [r["conversations"][1]["value"] for r in records if r["kind"] == k] for k in digits.KINDS}
    assert 0.4 < answers["presence"].count("yes") / len(answers["presence"]) < 0.6
    assert {"0", "1", "2", "3"} <= set(answers["count"])
    assert set(answers["position"]) == {str(d) for d in range(10)}


def test_set_loads_through_the_data_layer(digit_set):
    out, paths = digit_set
    tokenizer = build_tokenizer(corpus=digits.corpus())
    records = read_records(paths["train"])
    samples, skips = tokenize_all(
        records, Tokenization(tokenizer, "v1", image_token_id=3, num_visual_tokens=16)
    )
    assert not skips and len(samples) == 3 * SIZES["train"]
    for s in samples:
        answer = tokenizer.decode([t for t in s.labels if t >= 0])
        assert answer.strip().removesuffix("</s>").strip() in {"yes", "no", *map(str, range(10))}


def test_unknown_split_is_refused(tmp_path):
    with pytest.raises(ValueError, match="unknown splits"):
        digits.build_digits_vqa(tmp_path, {"holdout": 3})


# ---------------------------------------------------------------------------------------------
# `alignkd-train finetune`: the teacher-less cross-entropy run the demo trains its teacher with


def test_finetune_trains_on_cross_entropy_alone(tmp_path, llava_student_dir, digits_dataset):
    data, root = digits_dataset
    out = tmp_path / "ft"
    args = ["finetune", "--model", str(llava_student_dir), "--data", str(data), "--image-root", str(root)]
    args += ["--out", str(out), "--lr", "3e-3", "--batch-size", "10", "--epochs", "12", "--seed", "1"]
    result = CliRunner().invoke(train_main, args)
    assert result.exit_code == 0, result.output
    metrics = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert len(metrics) == 12
    assert all(m["logit"] is None and m["vis"] is None and m["attn"] is None for m in metrics)
    assert metrics[-1]["ce"] < 0.7 * metrics[0]["ce"]  # it learns
    record = json.loads((out / "alignkd_train.json").read_text())
    assert record["signals"]["source"].startswith("data only")
    assert (out / "model.safetensors").exists() and (out / "config.json").exists()


def test_finetune_refuses_distillation_terms(tmp_path, llava_student_dir, digits_dataset):
    data, root = digits_dataset
    args = ["finetune", "--model", str(llava_student_dir), "--data", str(data), "--image-root", str(root)]
    result = CliRunner().invoke(
        train_main, [*args, "--out", str(tmp_path / "x"), "--weights", "ce=1,logit=1,vis=0,attn=0"]
    )
    assert result.exit_code != 0
    assert "no teacher" in result.output and "logit" in result.output


# ---------------------------------------------------------------------------------------------
# The whole demo, through its console script


@pytest.mark.slow
def test_quick_demo_runs_every_stage_and_reports(tmp_path, monkeypatch):
    import subprocess

    from PIL import Image

    from alignkd_cache.demo import run as demo_run

    out = tmp_path / "demo"
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    proc = subprocess.run(
        ["alignkd-demo", "--out", str(out), "--quick"], capture_output=True, text=True, timeout=600
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "alignkd-demo" in proc.stderr  # the stage progress bar

    report = (out / "results.md").read_text()
    assert "alignkd-demo --out" in report and "--quick" in report
    for name in demo_run.VARIANTS:
        assert f"| student: {name} | 1 |" in report
    assert "| teacher | 1 |" in report and "CE-only" in report
    commands = [line for line in report.splitlines() if line.startswith(("alignkd-train ", "alignkd-cache "))]
    verbs = [c.split()[1] for c in commands]
    assert verbs.count("from-cache") == len(demo_run.VARIANTS)
    assert verbs.count("eval") == len(demo_run.VARIANTS) + 1
    assert {"finetune", "build", "show"} <= set(verbs)

    # Every evaluation covered the whole held-out split.
    n_test = len(json.loads((out / "data" / "test.json").read_text()))
    for predictions in out.rglob("predictions.jsonl"):
        assert len(predictions.read_text().splitlines()) == n_test
    for figure in ("demo-accuracy.png", "demo-attention.png"):
        with Image.open(out / "figures" / figure) as image:
            assert image.width > 300 and image.height > 200

    # The teacher is cached under the user cache directory: a second request trains nothing.
    teachers = list((tmp_path / "xdg" / "alignkd-cache").glob("demo-teacher-*"))
    assert len(teachers) == 1 and (teachers[0] / "model.safetensors").exists()
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    runner = demo_run.Runner(tmp_path / "again.log")
    data = {"train": out / "data" / "train.json"}
    assert demo_run.get_teacher(demo_run.QUICK, data, out / "data", runner) == teachers[0]
    assert runner.commands == []
