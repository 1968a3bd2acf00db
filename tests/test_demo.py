"""The demo: its digit question set, and the whole `alignkd-demo --quick` run."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

from alignkd_cache.cli.train import main as train_main
from alignkd_cache.data import Tokenization, read_records, tokenize_all
from alignkd_cache.demo import digits
from alignkd_cache.images import load_image
from alignkd_cache.sources import tokenized_from_row
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
# Report arithmetic, progress, the teacher's cache key


def _results(ce: list[float], full: list[float]):
    from types import SimpleNamespace

    scores = lambda values: [dict.fromkeys(("all", "position", "presence", "count"), v) for v in values]  # noqa: E731
    return SimpleNamespace(
        students={"CE only": scores(ce), "Align-KD (all)": scores(full)}, seeds=list(range(len(ce)))
    )


def test_paired_interval_matches_student_t_by_hand():
    from alignkd_cache.demo.report import mean_ci, paired

    results = _results([30.0, 31.0, 32.0], [31.0, 33.0, 35.0])
    assert paired(results, "Align-KD (all)") == [1.0, 2.0, 3.0]
    mean, lo, hi = mean_ci([1.0, 2.0, 3.0])
    # mean 2, sd 1, n 3: t(0.975, 2) = 4.302653 (tables), half-width 4.302653 / sqrt(3)
    assert (
        mean == 2.0
        and lo == pytest.approx(2 - 2.484138, abs=1e-5)
        and hi == pytest.approx(2 + 2.484138, abs=1e-5)
    )


@pytest.mark.parametrize(
    ("ce", "full", "verdict"),
    [
        ([30, 31, 32, 33], [32, 33.5, 33, 35], "beats"),  # differences 2, 2.5, 1, 2: interval above 0
        ([30, 31, 32, 33], [31, 33, 31, 32], "No difference"),  # +1, +2, -1, -1: interval spans 0
        ([30, 31, 32, 33], [28, 29.5, 30, 31], "WORSE"),
    ],
)
def test_headline_follows_the_paired_interval_not_the_mean(ce, full, verdict):
    from alignkd_cache.demo.report import headline

    text = headline(_results(ce, full))
    assert verdict in text and "95% CI" in text and f"paired over {len(ce)} seeds" in text


def test_stage_progress_weighs_the_eta_by_cost_and_prints_plain_lines(monkeypatch):
    import io

    from alignkd_cache import progress

    now = [100.0]
    monkeypatch.setattr(progress.time, "perf_counter", lambda: now[0])
    stream = io.StringIO()  # not a terminal
    bar = progress.StageProgress([1.0, 9.0, 2.0], "demo", stream)
    now[0] += 10  # the cheap first stage took 10 s, so the 11 cost units left take ~110 s
    bar.stage_done("small")
    now[0] += 90
    bar.stage_done("big")
    bar.close()
    lines = stream.getvalue().splitlines()
    assert lines == [
        "demo [1/3] small done; 0:10 elapsed, ~1:50 left",
        "demo [2/3] big done; 1:40 elapsed, ~0:20 left",
    ]
    assert "\r" not in stream.getvalue() and "\x1b" not in stream.getvalue()


def test_stage_progress_on_a_terminal_is_one_bar_advanced_by_cost():
    import io

    from alignkd_cache.progress import StageProgress

    class Terminal(io.StringIO):
        def isatty(self):
            return True

    stream = Terminal()
    bar = StageProgress([1.0, 9.0], "demo", stream)
    bar.stage_done("small")
    shown = stream.getvalue().split("\r")[-1]
    assert shown.startswith("demo  10%|") and shown.endswith("small done")
    bar.stage_done("big")
    bar.close()
    assert stream.getvalue().split("\r")[-1].startswith("demo 100%|") and "\n" not in stream.getvalue()[:-1]


def test_teacher_key_changes_with_code_and_environment(monkeypatch):
    from alignkd_cache.demo import run as demo_run

    key = demo_run.QUICK.teacher_key()
    assert key == demo_run.QUICK.teacher_key()
    monkeypatch.setattr(demo_run, "code_sha256", lambda: "older code")
    assert demo_run.QUICK.teacher_key() != key
    monkeypatch.undo()
    env = demo_run.environment()
    monkeypatch.setattr(demo_run, "environment", lambda: {**env, "torch threads": "16"})
    assert demo_run.QUICK.teacher_key() != key
    root = Path(demo_run.__file__).parents[2]
    assert all((root / name).exists() for name in demo_run.PRESENTATION_ONLY)  # the list is not stale


# ---------------------------------------------------------------------------------------------
# The whole demo, through its console script


def _quick_demo(out, xdg, env: dict[str, str], *args: str):
    import os
    import subprocess

    proc = subprocess.run(
        ["alignkd-demo", "--out", str(out), "--quick", *args],
        capture_output=True,
        text=True,
        timeout=600,
        env={**os.environ, "XDG_CACHE_HOME": str(xdg), **env},
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


@pytest.mark.slow
def test_quick_demo_runs_every_stage_and_reports(tmp_path, monkeypatch):
    import os
    import platform
    import shlex

    from PIL import Image

    from alignkd_cache.demo import run as demo_run
    from alignkd_cache.show import query_text
    from alignkd_cache.store.reader import CacheReader

    out = tmp_path / "demo"
    # A machine that would compute differently: more threads, torch's AVX-512 kernels, no MKL pin.
    env = {"OMP_NUM_THREADS": "4", "ATEN_CPU_CAPABILITY": "avx512"}
    proc = _quick_demo(out, tmp_path / "xdg", env, "--seeds", "2", "--ablation")

    # One display, plain lines when redirected: an opening line, one line per stage, no library bars.
    output = proc.stdout + proc.stderr
    assert output.startswith("alignkd-demo: train a teacher") and "about " in output.splitlines()[0]
    stage_lines = [line for line in proc.stderr.splitlines() if line.startswith("alignkd-demo [")]
    assert len(stage_lines) == 4 + 2 * (1 + 2 * len(demo_run.VARIANTS)) + 1
    assert "\r" not in output and "\x1b" not in output and len(output) < 8000
    log = (out / "commands.log").read_text()
    for noise in ("Loading weights", "Writing model shards"):
        assert noise not in output and noise not in log
    # The inner build/train/eval commands write plain progress lines into the log, not tqdm's \r frames.
    assert "\r" not in log and "train: " in log and "build: " in log

    report = (out / "results.md").read_text()
    assert "alignkd-demo --out" in report and "--quick" in report
    for name in demo_run.VARIANTS:
        assert f"| student: {name} | 2 |" in report
    assert "| teacher | 1 |" in report and "paired over 2 seeds" in report
    # The environment is recorded, with the numerics the script pinned over the caller's settings.
    assert "| torch threads | 1 |" in report and "| MKL_CBWR | AVX2 |" in report
    if platform.machine() in ("x86_64", "AMD64"):
        assert "| torch cpu kernels | AVX2 |" in report
    commands = [line for line in report.splitlines() if line.startswith(("alignkd-train ", "alignkd-cache "))]
    verbs = [c.split()[1] for c in commands]
    assert verbs.count("from-cache") == 2 * len(demo_run.VARIANTS)
    assert verbs.count("eval") == 2 * len(demo_run.VARIANTS) + 1
    assert {"finetune", "build", "show"} <= set(verbs)
    # The teacher's command can be replayed: every path it names still exists.
    finetune = shlex.split(next(c for c in commands if c.split()[1] == "finetune"))
    for flag in ("--model", "--data", "--image-root"):
        assert Path(os.path.expanduser(finetune[finetune.index(flag) + 1])).exists()

    # Every evaluation covered the whole held-out split.
    n_test = len(json.loads((out / "data" / "test.json").read_text()))
    for predictions in out.rglob("predictions.jsonl"):
        assert len(predictions.read_text().splitlines()) == n_test
    for figure in ("demo-accuracy.png", "demo-attention.png"):
        with Image.open(out / "figures" / figure) as image:
            assert image.width > 300 and image.height > 200
    # The heatmap's title shows the sample's text, decoded with the teacher's tokenizer.
    reader = CacheReader(str(out / "cache"))
    sample = tokenized_from_row(reader.row("train-00000-position"), reader.attrs["image_token_id"])
    assert "Which digit is" in query_text(reader, [sample.input_ids[p] for p in sample.query_positions])

    # The teacher is cached under the user cache directory: a second request trains nothing.
    teachers = list((tmp_path / "xdg" / "alignkd-cache").glob("demo-teacher-*"))
    assert len(teachers) == 1 and (teachers[0] / "model" / "model.safetensors").exists()
    assert (teachers[0] / "init" / "model.safetensors").exists()
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    monkeypatch.setattr(
        demo_run, "environment", lambda: json.loads((teachers[0] / "environment.json").read_text())
    )
    runner = demo_run.Runner(tmp_path / "again.log")
    data = {"train": out / "data" / "train.json"}
    assert demo_run.get_teacher(demo_run.QUICK, data, out / "data", runner) == teachers[0] / "model"
    assert runner.commands == []

    # Another caller environment, same numbers: the script pins threads and kernels itself.
    again = tmp_path / "again"
    _quick_demo(
        again,
        tmp_path / "xdg2",
        {"OMP_NUM_THREADS": "1", "ATEN_CPU_CAPABILITY": "default", "MKL_CBWR": "AUTO"},
    )
    second = next((tmp_path / "xdg2" / "alignkd-cache").glob("demo-teacher-*"))
    for a, b in [
        (teachers[0] / "model" / "model.safetensors", second / "model" / "model.safetensors"),
        (out / "teacher-eval" / "predictions.jsonl", again / "teacher-eval" / "predictions.jsonl"),
        *[
            (out / "students" / d / "predictions.jsonl", again / "students" / d / "predictions.jsonl")
            for d in ("ce-only-s0", "align-kd-all-s0")
        ],
    ]:
        assert a.read_bytes() == b.read_bytes(), a
