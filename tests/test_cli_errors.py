"""User mistakes through the real commands: each is one line `Error: ...` with its documented exit
code and no traceback; --debug brings the traceback back; help texts say what the commands do."""

from __future__ import annotations

import json
import multiprocessing
import shutil
import subprocess
import sys

import pytest
from click.testing import CliRunner

from alignkd_cache.cli import cache, train
from alignkd_cache.cli.errors import (
    EXIT_BAD_INPUT,
    EXIT_CACHE_REFUSED,
    EXIT_DAMAGED,
    EXIT_NOT_FOUND,
    EXIT_SYSTEM,
    EXIT_USAGE,
)


@pytest.fixture(scope="module")
def tiny_cache(cli_built_cache):
    return cli_built_cache[0]


@pytest.fixture
def w(tmp_path, tiny_cache, llava_teacher_dir, llava_student_dir, digits_dataset, monkeypatch):
    """The pieces the mistakes are made of."""
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    data, root = digits_dataset
    records = json.loads(data.read_text())
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps([{**records[0], "image": "images/nope.png"}, *records[1:]]))
    utf16 = tmp_path / "utf16.json"
    utf16.write_text(data.read_text(), encoding="utf-16")
    damaged = tmp_path / "damaged.zarr"
    shutil.copytree(tiny_cache, damaged)
    for chunk in damaged.glob("blocks/*/logit_values/c/0/0"):  # one bit in every block: any step meets one
        chunk.write_bytes(chunk.read_bytes()[:-1] + bytes([chunk.read_bytes()[-1] ^ 1]))
    edited = tmp_path / "edited.zarr"  # every block's metadata, checked as each block is first read
    shutil.copytree(tiny_cache, edited)
    for meta in edited.glob("blocks/*/logit_ids/zarr.json"):
        meta.write_text(json.dumps(json.loads(meta.read_text()) | {"data_type": "int64"}))
    no_config = tmp_path / "no_config"
    no_config.mkdir()
    (tmp_path / "empty").mkdir()
    return {
        "data": str(data), "root": str(root), "bad": str(bad), "utf16": str(utf16), "cache": str(tiny_cache),
        "damaged": str(damaged), "edited": str(edited), "teacher": str(llava_teacher_dir), "student": str(llava_student_dir),
        "no_config": str(no_config), "empty": str(tmp_path / "empty"), "new": str(tmp_path / "new.zarr"),
        "out": str(tmp_path / "run"),
    }  # fmt: skip


# fmt: off
def from_cache(student="{student}", cache_="{cache}", *extra):
    return ["from-cache", "--student", student, "--cache", cache_, "--image-root", "{root}", "--out", "{out}",
            "--max-steps", "1", *extra]


def build(data="{data}", out="{new}", teacher="{teacher}", *extra):
    return ["build", "--teacher", teacher, "--data", data, "--image-root", "{root}", "--out", out, *extra]


MISTAKES = [
    # (command group, arguments, exit code, words its one Error line must hold)
    (cache, ["info", "/nonexistent/c.zarr"], EXIT_NOT_FOUND, "no cache at /nonexistent/c.zarr"),
    (cache, ["info", "{empty}"], EXIT_CACHE_REFUSED, "is not an alignkd cache"),
    (cache, ["show", "{cache}", "--sample", "nope", "--image-root", "{root}", "--out", "{empty}/a.png"],
     EXIT_BAD_INPUT, "sample 'nope' is not in the cache"),
    (cache, build(teacher="/nonexistent/teacher"), EXIT_NOT_FOUND, "not a hub id"),
    (cache, build(out="{cache}"), EXIT_CACHE_REFUSED, "is not empty; pass --resume"),
    (cache, build(data="{bad}"), EXIT_BAD_INPUT, "pre-flight found 1 bad sample(s) (1 missing image)"),
    (cache, build(data="{utf16}"), EXIT_BAD_INPUT, "the file is UTF-16"),
    (cache, build("{bad}", "{new}", "{teacher}", "--report", "/dev/full"), EXIT_SYSTEM,
     "no space left on the device"),
    (cache, build("{data}", "{new}", "{teacher}", "--batch-size", "0"), EXIT_USAGE, "0 is not in the range x>=1"),
    (cache, build("{data}", "{new}", "{teacher}", "--template", "llama"), EXIT_USAGE, "'plain', 'v1', 'chat'"),
    (cache, build("{data}", "{new}", "{teacher}", "--device", "gpu0"), EXIT_USAGE, "'gpu0' is not a torch device"),
    (cache, ["build", "--teacher", "{teacher}", "--data", "{data}", "--image-root", "/nonexistent", "--out",
             "{new}"], EXIT_NOT_FOUND, "--image-root /nonexistent does not exist; check the path"),
    (cache, build(data="/nonexistent/d.json"), EXIT_NOT_FOUND, "--data /nonexistent/d.json does not exist"),
    (cache, ["info", "{data}"], EXIT_CACHE_REFUSED, "is a file, not a cache"),
    (train, from_cache(cache_="{data}"), EXIT_CACHE_REFUSED, "is a file, not a cache"),
    (train, from_cache("{student}", "{cache}", "--out", "{student}"), EXIT_CACHE_REFUSED,
     "is not empty (it holds chat_template.jinja, config.json, generation_config.json, model.safetensors and"),
    (train, ["eval", "--model", "{student}", "--data", "/nonexistent/d.json"], EXIT_NOT_FOUND,
     "--data /nonexistent/d.json does not exist; check the path"),
    (train, from_cache(cache_="{empty}"), EXIT_CACHE_REFUSED, "is not an alignkd cache"),
    (train, from_cache(student="{no_config}"), EXIT_NOT_FOUND, "config.json is missing"),
    (train, from_cache("{student}", "{cache}", "--batch-size", "0"), EXIT_USAGE, "0 is not in the range x>=1"),
    (train, from_cache(cache_="{damaged}"), EXIT_DAMAGED,
     "fails its checksum, so the cache is damaged; run `alignkd-cache verify"),
    # Met in a DataLoader worker: torch re-raises it with the worker's traceback in its message.
    (train, from_cache("{student}", "{damaged}", "--num-workers", "1"), EXIT_DAMAGED,
     "fails its checksum, so the cache is damaged; run `alignkd-cache verify"),
    (train, from_cache("{student}", "{edited}", "--num-workers", "1"), EXIT_CACHE_REFUSED,
     "logit_ids: dtype 'int64', expected"),
    (train, ["eval", "--model", "org/missing", "--data", "{data}"], EXIT_NOT_FOUND,
     "as a hub id not in the Hugging Face cache"),
    (train, ["eval", "--model", "{student}", "--data", "{data}", "--image-root", "{root}", "--predictions",
             "/dev/full"], EXIT_SYSTEM, "no space left on the device"),
    (train, ["finetune", "--model", "{student}", "--data", "{data}", "--image-root", "{root}", "--out", "{out}",
             "--weights", "ce=1,logit=1"], EXIT_BAD_INPUT, "logit"),
]
# fmt: on


@pytest.mark.parametrize(
    ("group", "args", "code", "words"), MISTAKES, ids=[" ".join(m[1][:2]) for m in MISTAKES]
)
def test_a_mistake_is_one_clean_line(w, group, args, code, words):
    before = set(multiprocessing.active_children())
    result = CliRunner().invoke(group.main, [a.format(**w) for a in args])
    # A DataLoader worker is stopped with the run, not left to a later garbage collection (which
    # makes torch wait 5 s for it).
    assert set(multiprocessing.active_children()) <= before
    # (progress bars of the run before the failure may share the line)
    errors = [line[line.index("Error: ") :] for line in result.output.splitlines() if "Error: " in line]
    assert result.exit_code == code, result.output
    assert len(errors) == 1 and words in errors[0], result.output
    assert "Traceback" not in result.output


def test_debug_shows_the_traceback(w):
    result = CliRunner().invoke(cache.main, ["--debug", "info", w["empty"]])
    assert result.exit_code == 1 and type(result.exception).__name__ == "UntrustedCache"


def test_the_console_scripts_print_one_line(tmp_path):
    """The installed entry points, as a user runs them: one stderr line, the exit code, no traceback."""
    env = {"PATH": f"{sys.prefix}/bin", "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    # fmt: off
    mistakes = [
        (["alignkd-cache", "info", str(tmp_path)], EXIT_CACHE_REFUSED),
        (["alignkd-train", "from-cache", "--student", "x", "--cache", str(tmp_path), "--out", "o",
          "--batch-size", "0"], EXIT_USAGE),
    ]
    # fmt: on
    for args, code in mistakes:
        done = subprocess.run(args, capture_output=True, text=True, env=env, timeout=120)
        assert done.returncode == code, done.stderr
        assert [line for line in done.stderr.splitlines() if line.startswith("Error: ")], done.stderr
        assert "Traceback" not in done.stderr and len(done.stderr.splitlines()) <= 4  # click's usage lines
    debug = subprocess.run(["alignkd-cache", "--debug", "info", str(tmp_path)], capture_output=True, text=True,
                           env=env, timeout=120)  # fmt: skip
    assert debug.returncode == 1 and "Traceback" in debug.stderr


def test_help_says_what_the_commands_do():
    finetune = CliRunner().invoke(train.main, ["finetune", "--help"]).output
    assert "default: ce=1,logit=0,vis=0,attn=0" in " ".join(finetune.split())
    evaluate = " ".join(CliRunner().invoke(train.main, ["eval", "--help"]).output.split())
    assert "Default: the template the model was trained with" in evaluate
    for group in (cache, train):
        for name in group.main.commands:
            text = CliRunner().invoke(group.main, [name, "--help"]).output
            assert "--family" not in text, name


def test_no_message_suggests_an_option_that_does_not_exist(tmp_path):
    """Every `--option` the package's code and messages name is an option of one of its commands (the
    benchmarks' own `--tiny` aside)."""
    import re
    from pathlib import Path

    import alignkd_cache
    from alignkd_cache.backends import detect_family
    from alignkd_cache.cli import demo

    commands = [
        cache.main,
        train.main,
        demo.main,
        *cache.main.commands.values(),
        *train.main.commands.values(),
    ]
    known = {name for command in commands for param in command.params for name in param.opts} | {"--tiny"}
    package = Path(alignkd_cache.__file__).parent
    for source in [*package.rglob("*.py"), *Path(cache.__file__).parent.glob("*.py")]:
        named = set(re.findall(r"(?<![\w-])--[a-z][a-z0-9-]+", source.read_text()))
        assert named <= known, (source, named - known)
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "bert"}))
    with pytest.raises(
        ValueError, match="model_type 'bert' is not supported; supported: internvl, llava, "
    ) as e:
        detect_family(tmp_path)
    assert "--" not in str(e.value)


def test_eval_defaults_to_the_template_the_model_was_trained_with(w, tmp_path):
    model = tmp_path / "model"
    shutil.copytree(w["student"], model)
    (model / "alignkd_train.json").write_text(json.dumps({"signals": {"template": "chat"}}))
    args = [
        "eval",
        "--model",
        str(model),
        "--data",
        w["data"],
        "--image-root",
        w["root"],
        "--max-new-tokens",
        "1",
    ]
    result = CliRunner().invoke(train.main, args)
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout.splitlines()[-1])["template"] == "chat"
    plain = CliRunner().invoke(train.main, ["eval", "--model", w["student"], *args[3:]])
    assert json.loads(plain.stdout.splitlines()[-1])["template"] == "v1"


def test_a_full_disk_under_the_background_writer_is_one_line_too(tmp_path):
    """BackgroundWriter re-raises a failed write as RuntimeError from the OSError; the cause decides."""
    from alignkd_cache.cli.errors import explain

    try:
        with open("/dev/full", "w") as f:
            f.write("x")
    except OSError as full:
        wrapped = RuntimeError(f"writing to {tmp_path} failed: {full}")
        wrapped.__cause__ = full
    assert explain(wrapped) == (
        "no space left on the device; free space there or write somewhere else",
        EXIT_SYSTEM,
    )


def test_options_are_typed_and_templates_come_from_the_data_layer():
    """--batch-size 0 and friends fail in click's parser, naming the option, not deep in a loop."""
    import click

    from alignkd_cache.signal_spec import TEMPLATES

    for group in (cache, train):
        for name, command in group.main.commands.items():
            for param in command.params:
                where = f"{group.__name__} {name} {param.name}"
                if param.name == "template":
                    assert list(param.type.choices) == list(TEMPLATES), where
                if isinstance(param.type, click.types.IntParamType | click.types.FloatParamType):
                    assert isinstance(param.type, click.IntRange | click.FloatRange), where


@pytest.mark.skipif(__import__("torch").cuda.is_available(), reason="this machine has a CUDA device")
def test_cuda_on_a_machine_without_it_is_a_usage_error(w):
    result = CliRunner().invoke(
        train.main, ["eval", "--model", w["student"], "--data", w["data"], "--device", "cuda"]
    )
    assert result.exit_code == EXIT_USAGE and "has no cuda device; use --device cpu" in result.output


def test_every_exit_code_is_documented_and_a_stopped_rank_has_its_own():
    """README's table lists exactly the codes cli/errors.py gives; a rank stopped by another rank's
    failure (torchrun) is one line with code 8, not a traceback."""
    import re
    from pathlib import Path

    from alignkd_cache.cli import errors
    from alignkd_cache.errors import PeerFailed

    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    documented = {int(code) for code in re.findall(r"^\| (\d+) \|", readme, re.MULTILINE)}
    assert documented == {0} | {v for k, v in vars(errors).items() if k.startswith("EXIT_")}
    message = "rank 1: another rank failed to lock /runs/x; that rank's error says why"
    assert errors.explain(PeerFailed(message)) == (message, errors.EXIT_PEER_FAILED) == (message, 8)
