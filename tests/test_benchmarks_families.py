"""The Qwen2.5-VL benchmarks' --tiny runs (capture overhead, cache sizes), so the scripts never rot."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import SUBPROCESS_ENV

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_family_benchmarks_tiny_runs_print_their_fields():
    env = {**SUBPROCESS_ENV, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    commands = {
        "capture": [sys.executable, str(ROOT / "benchmarks/capture.py"), "--family", "qwen2_5_vl", "--tiny"],
        "sizes": [sys.executable, str(ROOT / "benchmarks/family_sizes.py"), "--tiny"],
    }
    # Side by side: both spend most of their time importing transformers' Qwen2.5-VL model.
    procs = {
        name: subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
        for name, cmd in commands.items()
    }
    out = {}
    for name, proc in procs.items():
        stdout, stderr = proc.communicate(timeout=300)
        assert proc.returncode == 0, stderr[-3000:]
        out[name] = json.loads(stdout)

    capture = out["capture"]
    assert capture["family"] == "qwen2_5_vl"
    for key in (
        "plain_sdpa_ms",
        "capture_ms",
        "time_ratio",
        "paired_ratio_median",
        "slice_ms",
        "load_average",
    ):
        assert capture[key] is not None, key
    assert capture["visual_tokens"] == 16 and capture["text_query_rows"] > 0
    assert len(capture["paired_ratios"]) == capture["repeats"]

    sizes = out["sizes"]
    assert sizes["shapes"]["logit_id_dtype"] == "int32"
    assert set(sizes["caches"]) == {
        f"{stage}/{kind}/{preset}"
        for stage in ("pre-training", "fine-tuning")
        for kind in ("stored", "layer0")
        for preset in ("lossless", "balanced", "compact")
    }
    for name, cache in sizes["caches"].items():
        found = cache["on_disk_bytes_per_sample"]
        assert ("attention" in found and "visual" in found) == name.split("/")[1].startswith("stored"), name
        assert {"logit_ids", "logit_values", "logit_tail", "manifest"} <= set(found), name
    stub = sizes["layer0_stub"]
    assert stub["stub_bf16_bytes"] == 2 * stub["stub_params_7b"]["total"]
    assert stub["stub_params_7b"]["embed_tokens"] == 152064 * 3584
    assert set(sizes["paper_job_3.6M_samples"]) >= {"stored/balanced", "layer0/balanced"}
