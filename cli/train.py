"""`alignkd-train`: distil a student from a cache (`from-cache`) or a resident teacher (`online`); `eval`."""

from __future__ import annotations

import functools
import json

import click

import alignkd_cache
from alignkd_cache.cli.errors import Commands, Device, ExistingPath
from alignkd_cache.data import TEMPLATES
from alignkd_cache.losses import (
    ATTN_LOSSES,
    DEFAULT_LOGIT_LOSS,
    LOGIT_LOSSES,
    VIS_PRESETS,
    LossConfig,
    parse_weights,
    vis_settings,
)
from alignkd_cache.progress import quiet_libraries
from alignkd_cache.signals import ATTN_HEADS, ONLINE_KINDS

DISTILL_WEIGHTS = "ce=1,logit=1,vis=1,attn=1"


def training_options(command, weights: str = DISTILL_WEIGHTS):
    """The options the training commands share; `weights` is the --weights default."""
    options = [
        click.option(
            "--out",
            required=True,
            type=click.Path(file_okay=False),
            help="Output directory (student, adapters, metrics.jsonl, checkpoint/).",
        ),
        click.option(
            "--weights",
            default=weights,
            show_default=True,
            help="Loss weights; 0 switches a term off.",
        ),
        click.option("--lr", default=2e-5, show_default=True, type=click.FloatRange(0, min_open=True)),
        click.option(
            "--batch-size",
            default=4,
            show_default=True,
            type=click.IntRange(1),
            help="Samples per micro-batch per process.",
        ),
        click.option("--grad-accum", default=1, show_default=True, type=click.IntRange(1)),
        click.option("--epochs", default=1, show_default=True, type=click.IntRange(1)),
        click.option(
            "--max-steps",
            default=None,
            type=click.IntRange(1),
            help="Stop after this many optimizer steps (the schedule spans them).",
        ),
        click.option(
            "--seed",
            default=0,
            show_default=True,
            type=click.IntRange(0),
            help="Batch order and adapter init.",
        ),
        click.option("--bf16", is_flag=True, help="bf16 autocast for the forward passes (losses stay fp32)."),
        click.option("--resume", is_flag=True, help="Continue from OUT/checkpoint."),
        click.option("--warmup-ratio", default=0.03, show_default=True, type=click.FloatRange(0, 1)),
        click.option("--weight-decay", default=0.0, show_default=True, type=click.FloatRange(0)),
        click.option(
            "--max-grad-norm",
            default=1.0,
            show_default=True,
            type=click.FloatRange(0),
            help="0 disables clipping.",
        ),
        click.option("--grad-checkpointing", is_flag=True),
        click.option(
            "--freeze-adapters",
            is_flag=True,
            help="Keep the adapters at their random init (the public code's effective behaviour).",
        ),
        click.option(
            "--attn-loss",
            type=click.Choice(ATTN_LOSSES),
            default="mse-adapter",
            show_default=True,
            help="mse-adapter and kl-headmean: ours (docs/training.md); the -2025-01 and -2024-12 "
            "variants: the public revisions' formulas as published.",
        ),
        click.option(
            "--vis-preset",
            type=click.Choice(sorted(VIS_PRESETS)),
            default="2025-01",
            show_default=True,
            help="k / top-k weight: 2025-01 = 16 / 1, 2024-12 = 32 / 0.1.",
        ),
        click.option("--vis-topk", type=click.IntRange(1), default=None, help="Override the preset's k."),
        click.option(
            "--vis-topk-weight",
            type=click.FloatRange(0),
            default=None,
            help="Override the preset's top-k weight.",
        ),
        click.option(
            "--logit-loss",
            type=click.Choice(LOGIT_LOSSES),
            default=None,
            help="Default: topk-tail for top-k targets, sampled for sampled, full for full.",
        ),
        click.option(
            "--save-every",
            type=click.IntRange(1),
            default=None,
            help="Checkpoint every N optimizer steps (one is always written at the end).",
        ),
        click.option(
            "--stop-after",
            type=click.IntRange(1),
            default=None,
            help="Stop this run after N steps with a checkpoint; --resume continues it.",
        ),
        click.option(
            "--num-workers",
            default=0,
            show_default=True,
            type=click.IntRange(0),
            help="DataLoader worker processes.",
        ),
        click.option(
            "--device",
            type=Device(),
            default=None,
            help="cpu, cuda, cuda:1 ... (default: cuda when available).",
        ),
        click.option(
            "--log-grad-norms",
            is_flag=True,
            help="Log each term's gradient norm per step in metrics.jsonl (one extra backward per term).",
        ),
    ]
    return functools.reduce(lambda f, option: option(f), reversed(options), command)


def make_options(kw: dict, target_kind: str):
    from alignkd_cache.train import TrainOptions

    k, weight = vis_settings(kw.pop("vis_preset"), kw.pop("vis_topk"), kw.pop("vis_topk_weight"))
    loss = LossConfig(
        weights=parse_weights(kw.pop("weights")),
        attn_loss=kw.pop("attn_loss"),
        vis_topk=k,
        vis_topk_weight=weight,
        logit_loss=kw.pop("logit_loss") or DEFAULT_LOGIT_LOSS[target_kind],
    )
    return TrainOptions(loss=loss, max_grad_norm=kw.pop("max_grad_norm") or None, **kw)


@click.group(cls=Commands)
@click.version_option(alignkd_cache.__version__, prog_name="alignkd-train")
def main():
    """Distil a mobile VLM student with Align-KD."""
    quiet_libraries()  # our commands show one progress display each


@main.command("from-cache")
@click.option("--student", required=True, help="Student checkpoint directory or hub id org/name[@revision].")
@click.option("--cache", required=True, help="Cache store (path or fsspec URL) from `alignkd-cache build`.")
@click.option("--image-root", type=ExistingPath(file_okay=False), default=None)
@click.option(
    "--template",
    type=click.Choice(TEMPLATES),
    default=None,
    help="Refuse unless the cache used this template (default: the cache's).",
)
@training_options
def from_cache_command(student, cache, image_root, template, **kw):
    """Train the student on cached teacher signals; the teacher never loads."""
    from alignkd_cache.store.reader import CacheReader
    from alignkd_cache.train import from_cache

    kind = CacheReader(cache).attrs["logit_targets"]
    summary = from_cache(student, cache, image_root, make_options(kw, kind), template)
    click.echo(json.dumps(summary))


@main.command("online")
@click.option("--teacher", required=True, help="Teacher checkpoint directory or hub id org/name[@revision].")
@click.option("--student", required=True, help="Student checkpoint directory or hub id org/name[@revision].")
@click.option("--data", required=True, type=ExistingPath(dir_okay=False), help="LLaVA-format JSON or JSONL.")
@click.option("--image-root", type=ExistingPath(file_okay=False), default=None)
@click.option("--template", type=click.Choice(TEMPLATES), default="v1", show_default=True)
@click.option(
    "--topk",
    default=64,
    show_default=True,
    type=click.IntRange(1),
    help="Top-k logit targets (as `alignkd-cache build`).",
)
@click.option("--logit-targets", type=click.Choice(ONLINE_KINDS), default="topk", show_default=True)
@click.option(
    "--draws",
    default=50,
    show_default=True,
    type=click.IntRange(1),
    help="Sampled targets: draws per position.",
)
@click.option(
    "--sample-seed",
    default=0,
    show_default=True,
    type=click.IntRange(0),
    help="Sampled targets: the seed (as the build's --seed).",
)
@click.option(
    "--teacher-dtype",
    type=click.Choice(["float32", "bfloat16", "float16"]),
    default="float32",
    show_default=True,
)
@click.option("--max-length", default=2048, show_default=True, type=click.IntRange(1))
@click.option(
    "--attn-heads",
    type=click.Choice(ATTN_HEADS),
    default="all",
    show_default=True,
    help="Attention signals per head, or their mean (as `alignkd-cache build`).",
)
@training_options
def online_command(teacher, student, data, image_root, teacher_dtype, **kw):
    """Train the student with the teacher resident: the reference the cache is compared against."""
    from alignkd_cache.teacher_signals import OnlineOptions
    from alignkd_cache.train import online

    fields = ("template", "topk", "logit_targets", "draws", "max_length", "attn_heads")
    signal_options = OnlineOptions(**{f: kw.pop(f) for f in fields}, seed=kw.pop("sample_seed"))
    opts = make_options(kw, signal_options.logit_targets)
    summary = online(teacher, student, data, image_root, opts, signal_options, teacher_dtype)
    click.echo(json.dumps(summary))


@main.command("finetune")
@click.option(
    "--model", required=True, help="Model to fine-tune: a checkpoint directory or hub id org/name[@revision]."
)
@click.option("--data", required=True, type=ExistingPath(dir_okay=False), help="LLaVA-format JSON or JSONL.")
@click.option("--image-root", type=ExistingPath(file_okay=False), default=None)
@click.option("--template", type=click.Choice(TEMPLATES), default="v1", show_default=True)
@click.option("--max-length", default=2048, show_default=True, type=click.IntRange(1))
@functools.partial(training_options, weights="ce=1,logit=0,vis=0,attn=0")
def finetune_command(model, data, image_root, template, max_length, **kw):
    """Plain cross-entropy fine-tuning, no teacher (how the demo trains its teacher).

    Only the ce weight may be non-zero here: there is no teacher to distil from."""
    from alignkd_cache.train import finetune

    summary = finetune(model, data, image_root, make_options(kw, "topk"), template, max_length)
    click.echo(json.dumps(summary))


@main.command("eval")
@click.option("--model", required=True, help="Model directory (e.g. an alignkd-train --out) or hub id.")
@click.option("--data", required=True, type=ExistingPath(dir_okay=False))
@click.option("--image-root", type=ExistingPath(file_okay=False), default=None)
@click.option(
    "--template",
    type=click.Choice(TEMPLATES),
    default=None,
    help="Default: the template the model was trained with (its alignkd_train.json), else v1.",
)
@click.option("--max-new-tokens", default=16, show_default=True, type=click.IntRange(1))
@click.option("--batch-size", default=8, show_default=True, type=click.IntRange(1))
@click.option(
    "--predictions",
    type=click.Path(dir_okay=False),
    default=None,
    help="Write one JSON line per sample here.",
)
@click.option("--device", type=Device(), default=None, help="Default: cuda when available.")
def eval_command(model, data, image_root, template, max_new_tokens, batch_size, predictions, device):
    """Greedy short answers and exact-match accuracy (lower-cased, whitespace collapsed)."""
    import torch

    from alignkd_cache.backends import load_backend
    from alignkd_cache.evaluate import evaluate, trained_template

    backend = load_backend(model, device=device or ("cuda" if torch.cuda.is_available() else "cpu"))
    template = template or trained_template(backend.source) or "v1"
    result = evaluate(backend, data, image_root, template, max_new_tokens, batch_size, predictions)
    click.echo(json.dumps({"model": model, "template": template, **result}))


if __name__ == "__main__":
    main()
