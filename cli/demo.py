"""`alignkd-demo`: Align-KD in miniature on real scanned digits, end to end, with a table and figures."""

from __future__ import annotations

import click

import alignkd_cache


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
    help="Student seeds per variant [default: 3; 1 with --quick].",
)
@click.option("--quick", is_flag=True, help="Tiny models, a few steps, one seed: a smoke run of every stage.")
def main(out, seeds, quick):
    """Train a small LLaVA teacher (cached after the first run), cache its signals, distil five student
    variants from the cache, evaluate them on held-out digits and write OUT/results.md."""
    from alignkd_cache.demo.report import table, verdict
    from alignkd_cache.demo.run import run_demo

    seeds = seeds or (1 if quick else 3)
    command = f"alignkd-demo --out {out} --seeds {seeds}" + (" --quick" if quick else "")
    results = run_demo(out, seeds, quick, command)
    click.echo(table(results))
    click.echo(verdict(results))
    click.echo(f"{results.seconds['total'] / 60:.1f} min; wrote {out}/results.md and {out}/figures/")
