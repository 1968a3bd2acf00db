"""The fuzzer of benchmarks/fuzz.py, bounded for CI: a few hundred mutations of a real tiny cache
through every command that reads one, with 0 outcomes other than a clean refusal or an identical
result. ALIGNKD_FUZZ_MUTATIONS / _SEED / _REPORT let benchmarks/fuzz.py run it longer."""

import dataclasses
import importlib.util
import json
import os
import shutil
from pathlib import Path

import pyarrow.parquet as pq
import pytest
from click.testing import CliRunner

from alignkd_cache.build import BuildOptions, build_cache
from alignkd_cache.store.lock import lock_dir
from alignkd_cache.store.manifest import sha256, to_table
from cli.train import main as train_cli

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "fuzz.py"


def load_fuzz():
    spec = importlib.util.spec_from_file_location("fuzz", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def renamed(good: Path, out: Path) -> None:
    """A second valid cache with other ids (the merge partner): same signals, ids prefixed."""
    shutil.copytree(good, out)
    table = pq.read_table(out / "manifest.parquet")
    rows = [r | {"id": "b-" + r["id"]} for r in table.to_pylist()]
    pq.write_table(to_table(rows), out / "manifest.parquet")
    meta = json.loads((out / "zarr.json").read_text())
    meta["attributes"]["manifest_sha256"] = sha256((out / "manifest.parquet").read_bytes())
    (out / "zarr.json").write_text(json.dumps(meta))


@pytest.fixture(scope="module")
def good(tmp_path_factory, llava_teacher_dir, digits_dataset, two_image_dataset) -> Path:
    """The digits plus a sample with two images (per-image lists and offsets are input too)."""
    (data, root), (pairs, _) = digits_dataset, two_image_dataset
    work = tmp_path_factory.mktemp("fuzz")
    both = work / "data.json"
    both.write_text(json.dumps(json.loads(data.read_text()) + json.loads(pairs.read_text())))
    good = work / "good.zarr"
    opts = BuildOptions(template="v1", topk=8, batch_size=4, block_size=4)
    build_cache(str(llava_teacher_dir), both, root, str(good), dataclasses.replace(opts, progress=False))
    return good


@pytest.mark.slow
def test_fuzz_every_reading_command(tmp_path, good, llava_student_dir, digits_dataset):
    root = digits_dataset[1]
    renamed(good, tmp_path / "good2.zarr")
    mutations = int(os.environ.get("ALIGNKD_FUZZ_MUTATIONS", "200"))
    report = load_fuzz().fuzz(
        good, tmp_path / "good2.zarr", llava_student_dir, root, "digit-0", tmp_path / "work",
        mutations, seed=int(os.environ.get("ALIGNKD_FUZZ_SEED", "1")),
    )  # fmt: skip
    if "ALIGNKD_FUZZ_REPORT" in os.environ:
        Path(os.environ["ALIGNKD_FUZZ_REPORT"]).write_text(json.dumps(report, indent=1))
    assert report["mutations"] == mutations
    assert not report["others"], "\n".join(report["others"][:40])
    assert report["runs"]["refused"] > mutations  # most mutations are refused by several commands


@pytest.mark.slow
def test_fuzz_a_layer0_cache(tmp_path, llava_teacher_dir, llava_student_dir, digits_dataset):
    """The same mutations on a `layer0` cache: its stub and its record in the attributes are input too."""
    data, root = digits_dataset
    good = tmp_path / "good.zarr"
    opts = BuildOptions(template="v1", topk=8, batch_size=4, block_size=4, signals="layer0")
    build_cache(str(llava_teacher_dir), data, root, str(good), dataclasses.replace(opts, progress=False))
    renamed(good, tmp_path / "good2.zarr")
    mutations = int(os.environ.get("ALIGNKD_FUZZ_LAYER0_MUTATIONS", "60"))
    report = load_fuzz().fuzz(
        good,
        tmp_path / "good2.zarr",
        llava_student_dir,
        root,
        "digit-0",
        tmp_path / "work",
        mutations,
        seed=2,
    )
    assert report["mutations"] == mutations
    assert not report["others"], "\n".join(report["others"][:40])


def test_a_second_training_run_on_one_out_is_refused_naming_the_holder(
    tmp_path, good, llava_student_dir, digits_dataset
):
    args = ["from-cache", "--student", str(llava_student_dir), "--cache", str(good), "--image-root",
            str(digits_dataset[1]), "--out", str(tmp_path / "run"), "--max-steps", "1", "--device", "cpu"]  # fmt: skip
    with lock_dir(tmp_path / "run", "a training run"):  # the first run, still going
        result = CliRunner().invoke(train_cli, args)
        assert result.exit_code == 4 and f"pid {os.getpid()}" in result.output  # EXIT_CACHE_REFUSED
    assert not (tmp_path / "run" / "metrics.jsonl").exists()
    assert CliRunner().invoke(train_cli, args).exit_code == 0  # released: the next run goes ahead
