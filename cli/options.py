"""Click options made from the options dataclasses: a default is written once, on the field.

`field_option(BuildOptions, "topk", ...)` is `--topk` with the field's default (shown in the help);
tests/test_cli.py checks every command's defaults against its dataclasses, so a literal default
written here by hand cannot drift either."""

from __future__ import annotations

import dataclasses
import json

import click


def field_default(cls, name: str):
    """The default of dataclass `cls`'s field `name` (a default_factory's value)."""
    field = next(f for f in dataclasses.fields(cls) if f.name == name)
    if field.default is not dataclasses.MISSING:
        return field.default
    if field.default_factory is not dataclasses.MISSING:
        return field.default_factory()
    raise TypeError(f"{cls.__name__}.{name} has no default")


def field_option(cls, name: str, *decls: str, **kwargs):
    """The option named after the field (underscores as dashes), or `decls`, defaulting to the
    field's default; the default is shown unless it is None."""
    default = field_default(cls, name)
    kwargs.setdefault("show_default", default is not None)
    is_flag = isinstance(default, bool)
    return click.option(
        *(decls or [f"--{name.replace('_', '-')}"]), default=default, is_flag=is_flag, **kwargs
    )


def parse_storage_options(pairs: tuple[str, ...]) -> dict | None:
    """--storage-option key=value (repeatable) -> fsspec storage_options (values parsed as JSON if they can be)."""
    if not pairs:
        return None
    out = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep:
            raise click.BadParameter(f"{pair!r}: expected key=value")
        try:
            out[key] = json.loads(value)
        except json.JSONDecodeError:
            out[key] = value
    return out


storage_option = click.option(
    "--storage-option",
    "storage",
    multiple=True,
    help="fsspec option for remote stores, key=value (repeatable).",
)
