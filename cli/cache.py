"""`alignkd-cache`: build, inspect, check, merge, copy and draw teacher-signal caches."""

from __future__ import annotations

import json
import sys

import click

import alignkd_cache
from alignkd_cache.cli.errors import EXIT_VERIFY_FAILED, Commands, Device, ExistingPath
from alignkd_cache.cli.options import field_option, parse_storage_options, storage_option
from alignkd_cache.images import PIL_MAX_PIXELS
from alignkd_cache.options import BuildOptions
from alignkd_cache.progress import quiet_libraries
from alignkd_cache.signal_spec import ATTN_HEADS, CACHE_KINDS, KINDS, LOGIT_POSITIONS, TEMPLATES
from alignkd_cache.store.codecs import PRESETS


@click.group(cls=Commands)
@click.version_option(alignkd_cache.__version__, prog_name="alignkd-cache")
def main():
    """Offline Align-KD teacher-signal caches (zarr + Parquet)."""
    quiet_libraries()  # our commands show one progress display each


@main.command()
@click.option(
    "--teacher",
    required=True,
    help="Teacher: a checkpoint directory or a hub id org/name[@revision] (HF LLaVA or MobileVLM V2).",
)
@click.option("--data", required=True, type=ExistingPath(dir_okay=False), help="LLaVA-format JSON/JSONL.")
@click.option(
    "--image-root",
    type=ExistingPath(file_okay=False),
    help="Directory the 'image' paths are relative to.",
)
@click.option(
    "--out", required=True, help="Cache location: a directory or an fsspec URL (s3://bucket/cache)."
)
@field_option(BuildOptions, "template", type=click.Choice(TEMPLATES))
@field_option(BuildOptions, "topk", type=click.IntRange(1), help="Top-k ids per logit position.")
@field_option(
    BuildOptions,
    "signals",
    type=click.Choice(CACHE_KINDS),
    help="stored: every signal on disk (share outputs only). layer0: logit targets plus the teacher's "
    "layer-0 stub, which recomputes the attention and visual tokens exactly at training time "
    "(smaller, exact; the receiving team holds the teacher's first layer and vision path).",
)
@field_option(BuildOptions, "logit_targets", type=click.Choice(KINDS))
@field_option(BuildOptions, "draws", type=click.IntRange(1), help="Draws per position for sampled targets.")
@field_option(BuildOptions, "seed", type=click.IntRange(0), help="Seed of sampled targets.")
@field_option(BuildOptions, "logit_positions", type=click.Choice(LOGIT_POSITIONS))
@field_option(BuildOptions, "attn_heads", type=click.Choice(ATTN_HEADS))
@field_option(BuildOptions, "codecs", type=click.Choice(list(PRESETS)))
@field_option(BuildOptions, "batch_size", type=click.IntRange(1))
@field_option(BuildOptions, "block_size", type=click.IntRange(1), help="Samples per committed block.")
@field_option(BuildOptions, "dtype", type=click.Choice(["float32", "float16", "bfloat16"]))
@field_option(BuildOptions, "device", type=Device())
@field_option(
    BuildOptions,
    "vision_tower",
    help="MobileVLM teachers: CLIP tower directory or hub id[@revision], instead of mm_vision_tower.",
)
@field_option(BuildOptions, "limit", type=click.IntRange(0), help="Only the first N records.")
@field_option(BuildOptions, "max_length", type=click.IntRange(1))
@field_option(BuildOptions, "on_too_long", type=click.Choice(["skip", "error"]))
@field_option(
    BuildOptions,
    "on_bad_sample",
    type=click.Choice(["error", "skip"]),
    help="A bad record or image (see the pre-flight report): stop before the teacher loads, or skip it "
    "(recorded in the manifest with its reason).",
)
@field_option(
    BuildOptions,
    "max_image_pixels",
    type=click.IntRange(1, PIL_MAX_PIXELS),
    help="Refuse images with more pixels (decompression bombs), each with its own error.",
)
@field_option(
    BuildOptions,
    "report",
    type=click.Path(dir_okay=False),
    help="Where the pre-flight report's full problem list goes (default: OUT.preflight.json beside OUT).",
)
@field_option(BuildOptions, "resume", help="Continue an interrupted build with the same settings.")
@storage_option
def build(teacher, data, image_root, out, storage, **options):
    """Run the teacher once over a dataset and write its signals."""
    from alignkd_cache.build import build_cache

    options = BuildOptions(**options, storage_options=parse_storage_options(storage))
    attrs = build_cache(teacher, data, image_root, out, options)
    if attrs is not None:
        c = attrs["counts"]
        click.echo(f"{out}: {c['written']} written, {c['skipped']} skipped, {c['images']} images")


@main.command()
@click.argument("store")
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
@storage_option
def info(store, as_json, storage):
    """Counts, provenance and bytes per signal per sample."""
    from alignkd_cache.store.info import cache_info

    i = cache_info(store, parse_storage_options(storage))
    if as_json:
        click.echo(json.dumps(i, indent=2))
        return
    click.echo(f"cache {i['url']}")
    click.echo("counts: " + ", ".join(f"{k} {v}" for k, v in i["counts"].items()))
    if i["skipped"]:
        click.echo("skipped: " + ", ".join(f"{reason} {n}" for reason, n in i["skipped"].items()))
    for key, value in i["provenance"].items():
        click.echo(f"{key}: {json.dumps(value) if isinstance(value, dict | list) else value}")
    click.echo("options: " + json.dumps(i["options"]))
    click.echo("encodings: " + json.dumps(i["encodings"]))
    stub = i["stub"]
    if stub is None:
        click.echo("kind: stored (every signal on disk)")
    else:
        click.echo(
            f"kind: layer0 (attention and visual tokens recomputed from the stub: {stub['bytes'] / 2**20:.2f} MiB, "
            f"sha256 {stub['sha256'][:16]}...)"
        )
    click.echo(f"{'signal':<10} {'bytes/sample':>14} {'raw fp16':>14} {'ratio':>8}")
    for name, s in [*i["signals"].items(), ("total", i["total"])]:
        click.echo(
            f"{name:<10} {s['bytes_per_sample']:>14.1f} {s['raw_fp16_per_sample']:>14.1f} {s['ratio']:>7.2f}x"
        )


@main.command()
@click.argument("store")
@click.option(
    "--jobs", default=1, show_default=True, type=click.IntRange(1), help="Processes that read chunks."
)
@storage_option
def verify(store, jobs, storage):
    """Read every chunk and check checksums, schema, shapes, NaN/inf and the manifest."""
    from alignkd_cache.store.verify import verify as run

    report = run(store, parse_storage_options(storage), jobs=jobs)
    for line in report.lines():
        click.echo(line, err=True)
    if not report.ok:
        click.echo(
            f"FAILED: {len(report.problems)} problem(s), {len(report.bad_samples)} bad sample(s)", err=True
        )
        sys.exit(EXIT_VERIFY_FAILED)
    click.echo(f"ok: {report.samples_checked} samples verified")


@main.command()
@click.argument("stores", nargs=-1, required=True)
@click.option("--out", required=True)
@storage_option
def merge(stores, out, storage):
    """Merge caches of the same teacher, tokenizer, template and options."""
    from alignkd_cache.store.merge import merge_caches

    attrs = merge_caches(list(stores), out, parse_storage_options(storage))
    click.echo(f"{out}: {attrs['counts']['written']} samples from {len(stores)} caches")


@main.command()
@click.argument("src")
@click.argument("dst")
@storage_option
def copy(src, dst, storage):
    """Copy a cache between local and remote stores, then verify the copy."""
    from alignkd_cache.store.copy import copy_cache

    options = parse_storage_options(storage)
    report = copy_cache(src, dst, options, options)
    click.echo(f"{dst}: copied and verified ({report.samples_checked} samples)")


@main.command()
@click.argument("store")
@click.option("--sample", "sample_id", required=True)
@click.option("--image-root", required=True, type=ExistingPath(file_okay=False))
@click.option("--head", type=click.IntRange(0), default=None, help="One head (default: mean over heads).")
@click.option("--tokens", default=None, help="Text queries: an index or a span like 0:5 (default: all).")
@click.option("--out", required=True, type=click.Path(dir_okay=False))
@storage_option
def show(store, sample_id, image_root, head, tokens, out, storage):
    """Draw a sample's text->vision attention over its image (PNG)."""
    from alignkd_cache.show import show_attention

    click.echo(
        show_attention(
            store,
            sample_id,
            image_root,
            out,
            head=head,
            tokens=tokens,
            storage_options=parse_storage_options(storage),
        )
    )


if __name__ == "__main__":
    main()
