"""`alignkd-demo`: Align-KD in miniature on real scanned digits, end to end, with a table and figures."""

from __future__ import annotations

import os

import click

import alignkd_cache

DEFAULT_SEEDS = 10


@click.command()
@click.version_option(alignkd_cache.__version__, prog_name="alignkd-demo")
@click.option(
    "--out",
    default="demo-out",
    show_default=True,
    type=click.Path(file_okay=False),
    help="Working directory: data, cache, students, results.md and figures/.",
)
@click.option(
    "--seeds",
    default=None,
    type=click.IntRange(1),
    help=f"Student seeds per variant [default: {DEFAULT_SEEDS}; 1 with --quick].",
)
@click.option(
    "--ablation",
    is_flag=True,
    help="Also train each Align-KD term on its own (5 variants instead of CE only and Align-KD).",
)
@click.option("--quick", is_flag=True, help="Tiny models, a few steps, one seed: a smoke run of every stage.")
def main(out, seeds, ablation, quick):
    """Train a small LLaVA teacher (cached after the first run), cache its signals, distil CE-only and
    Align-KD students from the cache, evaluate them on held-out digits and write OUT/results.md."""
    from alignkd_cache.demo import PINNED_NUMERICS

    os.environ.update(PINNED_NUMERICS)  # before torch loads: the numbers must not depend on the machine
    from alignkd_cache.demo.report import headline, table
    from alignkd_cache.demo.run import run_demo

    seeds = seeds or (1 if quick else DEFAULT_SEEDS)
    command = f"alignkd-demo --out {out}"
    command += (f" --seeds {seeds}" if seeds != DEFAULT_SEEDS else "") + (" --ablation" if ablation else "")
    command += " --quick" if quick else ""
    results = run_demo(out, seeds, quick, ablation, command)
    click.echo(table(results))
    click.echo(headline(results))
    click.echo(f"{results.seconds['total'] / 60:.1f} min; wrote {out}/results.md and {out}/figures/")
