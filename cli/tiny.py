"""`alignkd-tiny`: a tiny random teacher and student of one family, to try every command offline."""

from __future__ import annotations

import click

import alignkd_cache
from alignkd_cache.tiny_families import SUPPORTED


@click.command()
@click.version_option(alignkd_cache.__version__, prog_name="alignkd-tiny")
@click.argument("model_type", type=click.Choice(SUPPORTED))
@click.option(
    "--out",
    required=True,
    type=click.Path(file_okay=False),
    help="Folder for teacher/ and student/ (same processor; the teacher wider, deeper, with a padded vocabulary).",
)
def main(model_type, out):
    """Write OUT/teacher and OUT/student: random checkpoints of MODEL_TYPE built from transformers'
    own config and processor classes, saved as a hub checkpoint is."""
    from pathlib import Path

    from alignkd_cache.tiny_families import tiny_checkpoint

    for role, seed in (("teacher", 1), ("student", 2)):
        path = tiny_checkpoint(model_type, Path(out) / role, role=role, seed=seed)
        click.echo(f"{role}: {path}")
