"""End to end through the commands: build a cache, train from it (one process and two DDP ranks), eval."""

import json
import signal
import subprocess
import sys

import pytest
from click.testing import CliRunner
from conftest import SUBPROCESS_ENV, run_ok
from run_logs import free_port, interrupt_when, metrics, resume_command, untimed

from alignkd_cache.cli.cache import main as cache_cli
from alignkd_cache.cli.train import main as train_cli

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def cli_cache(tmp_path_factory, llava_teacher_dir, digits_dataset):
    data, root = digits_dataset
    out = tmp_path_factory.mktemp("cli") / "cache"
    args = ["build", "--teacher", str(llava_teacher_dir), "--data", str(data), "--image-root", str(root),
            "--out", str(out), "--codecs", "lossless"]  # fmt: skip
    result = CliRunner().invoke(cache_cli, args)  # in this process: the training runs are the subprocesses
    assert result.exit_code == 0, result.output
    return out


def train_args(student, cache, root, out, *extra):
    return [
        "from-cache",
        "--student",
        str(student),
        "--cache",
        str(cache),
        "--image-root",
        str(root),
        "--out",
        str(out),
        "--lr",
        "1e-3",
        "--epochs",
        "1",
        "--batch-size",
        "2",
        "--seed",
        "7",
        *extra,
    ]


def test_ddp_two_gloo_ranks_match_one_process_accumulating(
    tmp_path, llava_student_dir, cli_cache, digits_dataset
):
    _, root = digits_dataset
    one, two = tmp_path / "one", tmp_path / "two"
    cli = [sys.executable, "-m", "alignkd_cache.cli.train"]
    run_ok(*cli, *train_args(llava_student_dir, cli_cache, root, one, "--grad-accum", "2"))
    run_ok(
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nproc-per-node",
        "2",
        "--master-port",
        str(free_port()),
        "-m",
        "alignkd_cache.cli.train",
        *train_args(llava_student_dir, cli_cache, root, two),
    )
    a, b = metrics(one), metrics(two)
    assert len(a) == len(b) == 3
    for x, y in zip(a, b, strict=True):
        assert untimed(x) == pytest.approx(untimed(y), rel=1e-4)


def test_cli_trains_refuses_and_evaluates(
    tmp_path, llava_student_dir, mobilevlm_student_dir, cli_cache, digits_dataset
):
    """In this process (the console scripts' own starts are tested in test_cli_errors and by the
    README's commands): train, a student with another tokenizer refused, eval."""
    data, root = digits_dataset
    out = tmp_path / "run"

    def train_command(*args):
        return CliRunner().invoke(train_cli, [str(a) for a in args])

    extra = (
        "--max-steps",
        "2",
        "--weights",
        "vis=0.5",
        "--attn-loss",
        "kl-headmean",
        "--vis-preset",
        "2024-12",
    )
    result = train_command(*train_args(llava_student_dir, cli_cache, root, out, *extra))
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout.splitlines()[-1])["finished"]
    assert len(metrics(out)) == 2
    refused = train_command(*train_args(mobilevlm_student_dir, cli_cache, root, tmp_path / "no"))
    assert refused.exit_code != 0 and "tokenizer" in refused.stderr
    result = train_command("eval", "--model", out, "--data", data, "--image-root", root, "--max-new-tokens", "3",
                           "--predictions", tmp_path / "p.jsonl")  # fmt: skip
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout.splitlines()[-1])
    assert report["n"] == 10 and 0 <= report["accuracy"] <= 1
    assert len((tmp_path / "p.jsonl").read_text().splitlines()) == 10


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory, llava_student_dir, cli_cache, digits_dataset):
    """A run long enough to interrupt (40 steps of one sample), start to end."""
    out = tmp_path_factory.mktemp("uninterrupted") / "run"
    run_ok(
        sys.executable,
        "-m",
        "alignkd_cache.cli.train",
        *long_run(llava_student_dir, cli_cache, digits_dataset, out),
    )
    return out


def long_run(student, cache, digits_dataset, out) -> list[str]:
    return train_args(student, cache, digits_dataset[1], out, "--epochs", "4", "--batch-size", "1")


def test_a_signal_saves_a_checkpoint_and_resume_ends_bit_identical(
    tmp_path, llava_student_dir, cli_cache, digits_dataset, uninterrupted
):
    """Ctrl-C, then SIGTERM on the resumed run: each saves a checkpoint and gives the resume command
    in one line, with code 128 + the signal; the run resumed to its end is bit-identical to an
    uninterrupted one."""
    out = tmp_path / "run"
    args = [
        sys.executable,
        "-m",
        "alignkd_cache.cli.train",
        *long_run(llava_student_dir, cli_cache, digits_dataset, out),
    ]
    step = 0
    for signum in (signal.SIGINT, signal.SIGTERM):
        proc = subprocess.Popen(
            args, env=SUBPROCESS_ENV, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True
        )
        logged = lambda s=step: (out / "metrics.jsonl").is_file() and len(metrics(out)) >= s + 2  # noqa: E731
        stderr = interrupt_when(proc, logged, signum)
        assert proc.returncode == 128 + signum, stderr
        if step:
            assert f"resuming from step {step} of 40" in stderr
        step, before = json.loads((out / "checkpoint" / "state.json").read_text())["step"], step
        name = signal.Signals(signum).name
        assert (
            f"Error: stopped by {name} at step {step} of 40; checkpoint saved in {out / 'checkpoint'}"
            in stderr
        )
        assert before + 2 <= step < 40 and len(metrics(out)) == step
        args = resume_command(stderr, sys.executable)
    resumed = subprocess.run(args, capture_output=True, text=True, env=SUBPROCESS_ENV)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert f"resuming from step {step} of 40" in resumed.stderr
    assert (out / "model.safetensors").read_bytes() == (uninterrupted / "model.safetensors").read_bytes()
    assert [untimed(r) for r in metrics(out)] == [untimed(r) for r in metrics(uninterrupted)]


def test_a_finished_run_is_never_replaced(
    tmp_path, llava_student_dir, cli_cache, digits_dataset, uninterrupted
):
    before = {p.name: p.read_bytes() for p in uninterrupted.iterdir() if p.is_file()}
    args = long_run(llava_student_dir, cli_cache, digits_dataset, uninterrupted)
    refused = CliRunner().invoke(train_cli, [str(a) for a in args])
    assert refused.exit_code == 4, refused.output
    assert f"Error: {uninterrupted} is not empty (it holds alignkd_adapters.safetensors" in refused.stderr
    assert {p.name: p.read_bytes() for p in uninterrupted.iterdir() if p.is_file()} == before
