"""Every console script answers --version, and every command --help; the docs' commands exist."""

import importlib
import re
import subprocess
import sys
from pathlib import Path

import click
import pytest
from click.testing import CliRunner
from conftest import SUBPROCESS_ENV

import alignkd_cache
from alignkd_cache.cli import cache, demo, tiny, train

SCRIPTS = {
    "alignkd-cache": cache.main,
    "alignkd-train": train.main,
    "alignkd-demo": demo.main,
    "alignkd-tiny": tiny.main,
}


@pytest.mark.parametrize("name", SCRIPTS)
def test_version(name):
    result = CliRunner().invoke(SCRIPTS[name], ["--version"])
    assert result.exit_code == 0 and result.output.strip() == f"{name}, version {alignkd_cache.__version__}"


def commands():
    for name, main in SCRIPTS.items():
        subcommands = main.commands if isinstance(main, click.Group) else {"": main}
        for sub in subcommands:
            yield name, sub


@pytest.mark.parametrize(("name", "sub"), list(commands()))
def test_help(name, sub):
    args = ([sub] if sub else []) + ["--help"]
    result = CliRunner().invoke(SCRIPTS[name], args)
    assert result.exit_code == 0 and "Usage:" in result.output


def test_every_documented_command_exists():
    assert {"build", "info", "verify", "merge", "copy", "show"} <= set(cache.main.commands)
    assert {"from-cache", "online", "eval", "finetune"} <= set(train.main.commands)


ROOT = Path(__file__).resolve().parent.parent


def test_every_torchrun_line_in_the_docs_names_a_module_that_runs():
    lines = [
        line
        for doc in ("README.md", "docs/cache-format.md", "docs/scaling.md", "docs/training.md")
        for line in (ROOT / doc).read_text().splitlines()
        if "torchrun " in line and "alignkd" in line
    ]
    assert lines
    for line in lines:
        module = re.search(r"-m (alignkd_cache\.cli\.\w+)", line)
        assert module, f"{line!r} runs a console script under torchrun; use -m alignkd_cache.cli.<name>"
        assert importlib.import_module(module.group(1)).main


def test_docs_quote_the_measured_reader_figure():
    measured = re.search(r"~(\d+) MB/s of decoded signal", (ROOT / "docs/benchmarks.md").read_text()).group(1)
    scaling = (ROOT / "docs/scaling.md").read_text()
    quoted = set(re.findall(r"about (\d+) MB/s (?:of decoded\s+signal|per two cores)", scaling))
    assert quoted == {measured}


def test_readme_says_where_the_demo_teacher_is_cached():
    from alignkd_cache.demo.run import user_cache_dir

    readme = " ".join((ROOT / "README.md").read_text().split())
    assert f"~/.cache/{user_cache_dir().name}/" in readme and "demo-teacher-" in readme
    assert "install the CUDA build of torch for your driver" in readme


def test_cli_installs_inside_the_package_and_nowhere_else():
    """cli/ is the source of alignkd_cache.cli; the installed tree has no top-level `cli` package."""
    import tomllib
    from pathlib import Path

    import alignkd_cache.cli

    repo = Path(__file__).resolve().parents[1]
    setup = tomllib.loads((repo / "pyproject.toml").read_text())["tool"]["setuptools"]
    assert setup["package-dir"]["alignkd_cache.cli"] == "cli"
    assert all(p == "alignkd_cache" or p.startswith("alignkd_cache.") for p in setup["packages"])
    assert Path(alignkd_cache.cli.__file__).resolve().parent == repo / "cli"
    scripts = tomllib.loads((repo / "pyproject.toml").read_text())["project"]["scripts"]
    assert all(target.startswith("alignkd_cache.cli.") for target in scripts.values())


# Each command's options and the dataclasses they fill; --sample-seed fills SignalOptions.seed.
OPTION_CLASSES = {
    ("alignkd-cache", "build"): ["BuildOptions"],
    ("alignkd-train", "from-cache"): ["TrainOptions", "LossConfig"],
    ("alignkd-train", "online"): ["SignalOptions", "TrainOptions", "LossConfig"],
    ("alignkd-train", "finetune"): ["SignalOptions", "TrainOptions", "LossConfig"],
}
RENAMED = {"sample_seed": "seed"}
# Fields a command computes from its options (a preset, the cache's target kind), not defaults.
FILLED_BY_THE_COMMAND = {"weights", "logit_loss", "vis_topk", "vis_topk_weight"}


def test_every_click_default_is_its_dataclass_default():
    """A default lives on its dataclass field; the CLI shows that value (changing topk is one line)."""
    import dataclasses

    from alignkd_cache import losses, options, signal_spec
    from alignkd_cache.cli.options import field_default

    classes = {c.__name__: c for c in (options.BuildOptions, options.TrainOptions, losses.LossConfig)}
    classes["SignalOptions"] = signal_spec.SignalOptions
    checked = 0
    for (script, sub), names in OPTION_CLASSES.items():
        for param in SCRIPTS[script].commands[sub].params:
            field = RENAMED.get(param.name, param.name)
            owner = next(
                (classes[n] for n in names if field in {f.name for f in dataclasses.fields(classes[n])}), None
            )
            if owner is None or param.required or field in FILLED_BY_THE_COMMAND:
                continue
            assert param.default == field_default(owner, field), (script, sub, param.name)
            checked += 1
    assert checked >= 45
    assert options.BuildOptions().topk == signal_spec.SignalOptions().topk == 64  # inherited, not repeated


QUIET_PROBE = """
import sys
from click.testing import CliRunner
from alignkd_cache.cli.cache import main
result = CliRunner().invoke(main, ["info", sys.argv[1]])
assert result.exit_code == 0, result.output
imported = "torch" in sys.modules, "transformers" in sys.modules
from transformers.utils import logging
print(*imported, logging.get_verbosity(), logging.is_progress_bar_enabled())
"""


def test_cache_commands_import_neither_torch_nor_transformers(cli_built_cache):
    """`alignkd-cache info` (as verify, copy, merge) imports neither torch (1 s and 0.25 GB of every
    such command) nor transformers, even to quiet it; imported afterwards, transformers still logs
    errors only and shows no bars."""
    env = {k: v for k, v in SUBPROCESS_ENV.items() if k != "TRANSFORMERS_VERBOSITY"}
    probe = [sys.executable, "-c", QUIET_PROBE, str(cli_built_cache[0])]
    done = subprocess.run(probe, capture_output=True, text=True, env=env)
    assert done.returncode == 0, done.stderr
    assert done.stdout.split() == ["False", "False", "40", "False"]  # 40: logging.ERROR
