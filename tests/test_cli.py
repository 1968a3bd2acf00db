"""Every console script answers --version, and every command --help."""

import click
import pytest
from click.testing import CliRunner

import alignkd_cache
from alignkd_cache.cli import cache, demo, train

SCRIPTS = {"alignkd-cache": cache.main, "alignkd-train": train.main, "alignkd-demo": demo.main}


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
