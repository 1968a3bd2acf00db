"""benchmarks/gpu_scale.py: its --tiny run on CPU (so the GPU script never rots), and its guards."""

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "gpu_scale.py"


def load_script():
    spec = importlib.util.spec_from_file_location("gpu_scale", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclasses resolve their annotations through it
    spec.loader.exec_module(module)
    return module


@pytest.mark.slow
def test_tiny_run_measures_everything(tmp_path):
    gpu_scale = load_script()
    out = tmp_path / "results.json"
    proc = subprocess.run(
        [sys.executable, str(SCRIPT), "--tiny", "--out", str(out), "--device", "cpu"],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    summary = json.loads(proc.stdout)  # stdout is the one JSON summary, nothing else
    assert json.loads(out.read_text()) == summary
    assert summary["errors"] == {} and summary["skipped"] == {}
    assert summary["mode"] == "tiny"

    tiny = gpu_scale.TINY
    data = summary["setup"]["data"]
    assert data["samples"] == tiny.samples and data["images"] == tiny.samples // gpu_scale.SAMPLES_PER_IMAGE
    assert data["visual_tokens"] == tiny.grid**2
    assert data["supervised_positions"]["min"] > 0 and data["text_rows_T"]["min"] > 0

    forward = summary["forward"]
    for key in ("capture_sdpa", "plain_sdpa", "topk_on_host", "topk_on_device"):
        assert forward[key]["median_s"] > 0 and len(forward[key]["times_s"]) == tiny.repeats
    assert "not_run" in forward["plain_flash"]

    builds = summary["build"]
    assert set(builds) == {*gpu_scale.PRESETS, "layer0"}
    layer0 = builds.pop("layer0")  # logit targets only, plus the stub
    assert layer0["samples"] == tiny.samples and layer0["stub_bytes"] > 0
    assert layer0["bytes_per_sample"]["attention"] == layer0["bytes_per_sample"]["visual"] == 0
    assert layer0["total_bytes_per_sample"] < builds["balanced"]["total_bytes_per_sample"]
    for preset, build in builds.items():
        assert build["samples"] == tiny.samples, preset
        assert build["samples_per_s_excluding_load"] > 0
        assert build["images"] == data["images"]
        # Each stored image row serves SAMPLES_PER_IMAGE samples: dedup halves visual bytes per sample.
        per_sample = build["bytes_per_sample"]["visual"] * gpu_scale.SAMPLES_PER_IMAGE
        assert build["visual_bytes_per_image"] == pytest.approx(per_sample)
    # float32 attention is 4 bytes a value; every lossy preset stores at most 2.
    lossless = builds["lossless"]
    for preset in set(builds) - {"lossless"}:
        assert (
            lossless["bytes_per_sample"]["attention"] > 1.5 * builds[preset]["bytes_per_sample"]["attention"]
        )
        assert lossless["total_bytes_per_sample"] > builds[preset]["total_bytes_per_sample"]

    assert summary["train"]["layer0"]["route"].startswith("layer0")
    for source in ("from_cache", "online", "layer0"):
        step = summary["train"][source]
        assert step["median_s"] > 0 and all(map(torch.isfinite, torch.tensor(step["loss_first_last"])))

    # No GPU here: memory is null, and the summary says why.
    assert (
        forward["capture_sdpa"]["peak_gpu_bytes"] is None
        and summary["train"]["online"]["peak_gpu_bytes"] is None
    )
    assert "no CUDA device" in summary["notes"]["peak_gpu_bytes"]
    ratios = summary["ratios"]
    assert ratios["capture_over_plain_sdpa"] > 0 and ratios["online_step_over_cache_step"] > 0
    assert ratios["layer0_step_over_cache_step"] > 0 and ratios["balanced_over_layer0_bytes_per_sample"] > 1
    assert ratios["online_peak_over_cache_peak"] is None


def test_guarded_records_a_failure_and_goes_on(tmp_path):
    gpu_scale = load_script()
    run = gpu_scale.Run(tmp_path / "s.json", budget_s=600, device=torch.device("cpu"))
    assert run.guarded("build.lossless", lambda: 1 / 0) is None
    assert run.guarded("build.balanced", lambda: {"samples": 3}) == {"samples": 3}
    saved = json.loads((tmp_path / "s.json").read_text())
    assert saved["errors"] == {"build.lossless": "ZeroDivisionError: division by zero"}
    assert saved["build"]["balanced"] == {"samples": 3}
    assert "ZeroDivisionError" in saved["build"]["lossless"]["traceback"]


def test_nothing_starts_past_the_time_budget(tmp_path):
    gpu_scale = load_script()
    run = gpu_scale.Run(tmp_path / "s.json", budget_s=-1, device=torch.device("cpu"))
    called = []
    assert run.guarded("train.online", lambda: called.append(1)) is None
    assert called == []
    assert "time budget" in run.summary["skipped"]["train.online"]
    assert "time budget" in run.summary["train"]["online"]["skipped"]
