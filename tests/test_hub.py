"""Model arguments as hub ids, resolved offline from a Hugging Face cache laid out as huggingface_hub
writes it (`hub/models--org--name/snapshots/<commit>/`, `refs/main`)."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess

import pytest
from click.testing import CliRunner

from alignkd_cache.backends import detect_family, load_backend
from alignkd_cache.backends.checkpoint import hub_revision, resolve_checkpoint
from alignkd_cache.cli import cache as cache_cli
from alignkd_cache.cli import train as train_cli
from alignkd_cache.store.reader import CacheReader


def commit(name: str) -> str:
    return hashlib.sha1(name.encode()).hexdigest()


def add_to_hub_cache(hub, repo_id: str, checkpoint) -> str:
    """Copy a checkpoint directory into the hub cache as revision `main`; returns its commit hash."""
    repo = hub / f"models--{repo_id.replace('/', '--')}"
    rev = commit(repo_id)
    shutil.copytree(checkpoint, repo / "snapshots" / rev)
    (repo / "refs").mkdir(parents=True, exist_ok=True)
    (repo / "refs" / "main").write_text(rev)
    return rev


@pytest.fixture(scope="module")
def hf_home(tmp_path_factory, llava_teacher_dir, llava_student_dir, mobilevlm_teacher_dir):
    home = tmp_path_factory.mktemp("hf_home")
    add_to_hub_cache(home / "hub", "org/teacher", llava_teacher_dir)
    add_to_hub_cache(home / "hub", "org/student", llava_student_dir)
    add_to_hub_cache(home / "hub", "org/clip", f"{mobilevlm_teacher_dir}-clip")
    return home


@pytest.fixture
def offline(hf_home, monkeypatch):
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(hf_home / "hub"))
    return hf_home / "hub"


def test_hub_ids_resolve_offline_with_an_optional_revision(offline):
    snapshot = offline / "models--org--teacher" / "snapshots" / commit("org/teacher")
    for name in ("org/teacher", "org/teacher@main", f"org/teacher@{commit('org/teacher')}"):
        assert resolve_checkpoint(name) == snapshot, name
    assert hub_revision(snapshot) == commit("org/teacher")
    assert detect_family("org/teacher") == "llava"
    with pytest.raises(
        FileNotFoundError,
        match="org/absent: no such directory, and as a hub id not in the Hugging Face cache",
    ):
        resolve_checkpoint("org/absent")
    with pytest.raises(FileNotFoundError, match="org/teacher@v2: no such directory, and as a hub id not in"):
        resolve_checkpoint("org/teacher@v2")
    with pytest.raises(FileNotFoundError, match="no such directory and not a hub id"):
        resolve_checkpoint("./missing-model")


def test_vision_tower_by_hub_id_and_revision_in_the_fingerprint(offline, mobilevlm_teacher_dir):
    teacher = load_backend(mobilevlm_teacher_dir, vision_tower="org/clip")
    assert teacher.tower_ref == "org/clip"
    assert teacher.fingerprint()["revision"] is None  # a local directory has no hub revision
    student = load_backend("org/student")
    assert student.model_id == "org/student" and student.fingerprint()["revision"] == commit("org/student")


@pytest.mark.slow
def test_build_train_and_eval_by_hub_id_offline(offline, hf_home, digits_dataset, tmp_path):
    """build and from-cache in-process with huggingface_hub offline; eval as a user runs it, with
    HF_HOME and HF_HUB_OFFLINE=1 in the environment."""
    data, root = digits_dataset
    cache = tmp_path / "c.zarr"
    built = CliRunner().invoke(cache_cli.main, ["build", "--teacher", "org/teacher", "--data", str(data),
                                                "--image-root", str(root), "--out", str(cache), "--topk", "4"])  # fmt: skip
    assert built.exit_code == 0, built.output
    teacher = CacheReader(cache).attrs["teacher"]
    assert teacher["model_id"] == "org/teacher" and teacher["revision"] == commit("org/teacher")
    out = tmp_path / "run"
    trained = CliRunner().invoke(train_cli.main, ["from-cache", "--student", f"org/student@{commit('org/student')}",
                                                  "--cache", str(cache), "--image-root", str(root), "--out", str(out),
                                                  "--max-steps", "1"])  # fmt: skip
    assert trained.exit_code == 0, trained.output
    env = {**os.environ, "HF_HOME": str(hf_home), "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    env.pop("HF_HUB_CACHE", None)
    done = subprocess.run(["alignkd-train", "eval", "--model", "org/student", "--data", str(data), "--image-root",
                           str(root), "--max-new-tokens", "1"], capture_output=True, text=True, env=env,
                          timeout=600)  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    report = json.loads(done.stdout.splitlines()[-1])
    assert report["model"] == "org/student" and report["n"] == 10


def counting(monkeypatch, module_names, name):
    """Wrap the real function `name` wherever these modules imported it; returns its calls' arguments."""
    import importlib

    calls = []
    for module_name in module_names:
        module = importlib.import_module(module_name)
        real = getattr(module, name)

        def wrapped(*args, _real=real, **kwargs):
            calls.append(args[0] if args else kwargs)
            return _real(*args, **kwargs)

        monkeypatch.setattr(module, name, wrapped)
    return calls


BACKEND_MODULES = [
    "alignkd_cache.backends.checkpoint",
    "alignkd_cache.backends.mobilevlm",
]


def test_each_model_reference_is_resolved_once(offline, mobilevlm_teacher_dir, monkeypatch):
    """A hub id without a revision is one snapshot_download: the family, weights, tokenizer, tower and
    processor must all come from one resolution, so every reference is resolved once per load."""
    calls = counting(monkeypatch, BACKEND_MODULES, "resolve_checkpoint")
    load_backend("org/student")
    assert calls == ["org/student"]
    calls.clear()
    load_backend(mobilevlm_teacher_dir, vision_tower="org/clip")
    assert sorted(map(str, calls)) == sorted([str(mobilevlm_teacher_dir), "org/clip"])


def test_train_cli_opens_the_cache_once(
    llava_cache, llava_student_dir, digits_dataset, tmp_path, monkeypatch
):
    """`from-cache` reads the cache's target kind and trains on the same open reader: one trust check."""
    from alignkd_cache.store import reader as reader_module

    opened = []
    real_init = reader_module.CacheReader.__init__

    def counting_init(self, *args, **kwargs):
        opened.append(args[0] if args else kwargs)
        real_init(self, *args, **kwargs)

    monkeypatch.setattr(reader_module.CacheReader, "__init__", counting_init)
    resolved = counting(monkeypatch, BACKEND_MODULES, "resolve_checkpoint")
    result = CliRunner().invoke(train_cli.main, ["from-cache", "--student", str(llava_student_dir),
                                                 "--cache", str(llava_cache), "--image-root", str(digits_dataset[1]),
                                                 "--out", str(tmp_path / "run"), "--max-steps", "1"])  # fmt: skip
    assert result.exit_code == 0, result.output
    assert opened == [str(llava_cache)]
    assert resolved == [str(llava_student_dir)]
