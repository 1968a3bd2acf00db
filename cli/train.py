"""`alignkd-train`: distil a student from a cache (`from-cache`) or a resident teacher (`online`); `eval`."""

from __future__ import annotations

import functools
import json

import click

import alignkd_cache
from alignkd_cache.cli.errors import Commands, Device, ExistingPath
from alignkd_cache.cli.options import field_option, parse_storage_options, storage_option
from alignkd_cache.lora import lora_record
from alignkd_cache.losses import (
    ATTN_LOSSES,
    DEFAULT_LOGIT_LOSS,
    LOGIT_LOSSES,
    VIS_PRESETS,
    LossConfig,
    parse_weights,
    vis_settings,
)
from alignkd_cache.options import TrainOptions
from alignkd_cache.progress import quiet_libraries
from alignkd_cache.signal_spec import ATTN_HEADS, ONLINE_KINDS, TEMPLATES, SignalOptions
from alignkd_cache.tracking import REPORT_TO

DISTILL_WEIGHTS = "ce=1,logit=1,vis=1,attn=1"
train_option = functools.partial(field_option, TrainOptions)
signal_option = functools.partial(field_option, SignalOptions)


# The training commands' options, in the order the help lists them: the optimizer and schedule, the losses, the run.
OPTIMIZER_OPTIONS = [
    train_option("lr", type=click.FloatRange(0, min_open=True)),
    train_option("batch_size", type=click.IntRange(1), help="Samples per micro-batch per process."),
    train_option("grad_accum", type=click.IntRange(1)),
    train_option("epochs", type=click.IntRange(1)),
    train_option(
        "max_steps",
        type=click.IntRange(1),
        help="Stop after this many optimizer steps (the schedule spans them).",
    ),
    train_option("seed", type=click.IntRange(0), help="Batch order and adapter init."),
    train_option("bf16", help="bf16 autocast for the forward passes (losses stay fp32)."),
    train_option("resume", help="Continue from OUT/checkpoint."),
    train_option("warmup_ratio", type=click.FloatRange(0, 1)),
    train_option("weight_decay", type=click.FloatRange(0)),
    train_option("max_grad_norm", type=click.FloatRange(0), help="0 disables clipping."),
    train_option("grad_checkpointing"),
    train_option(
        "freeze_adapters",
        help="Keep the adapters at their random init (the public code's effective behaviour).",
    ),
]
LOSS_OPTIONS = [
    field_option(
        LossConfig,
        "attn_loss",
        type=click.Choice(ATTN_LOSSES),
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
]
RUN_OPTIONS = [
    train_option(
        "save_every",
        type=click.IntRange(1),
        help="Checkpoint every N optimizer steps (one is always written at the end).",
    ),
    train_option(
        "stop_after",
        type=click.IntRange(1),
        help="Stop this run after N steps with a checkpoint; --resume continues it.",
    ),
    train_option("num_workers", type=click.IntRange(0), help="DataLoader worker processes."),
    train_option("device", type=Device(), help="cpu, cuda, cuda:1 ... (default: cuda when available)."),
    train_option(
        "log_grad_norms",
        help="Log each term's gradient norm per step in metrics.jsonl (one extra backward per term).",
    ),
    click.option(
        "--lora",
        default=None,
        help="Train a LoRA student (the `lora` extra): r=8,alpha=16,dropout=0,targets=q_proj+k_proj+v_proj+o_proj "
        "(items left out keep these defaults); the projector and the loss adapters train fully. "
        "The adapter goes to OUT/lora in PEFT's format.",
    ),
    train_option("merge", help="With --lora: also write the merged student to OUT."),
    train_option(
        "report_to",
        type=click.Choice(REPORT_TO),
        help="Also log every step's metrics to this tracker (OUT/tensorboard); metrics.jsonl is always written.",
    ),
]


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
        *OPTIMIZER_OPTIONS,
        *LOSS_OPTIONS,
        *RUN_OPTIONS,
    ]
    return functools.reduce(lambda f, option: option(f), reversed(options), command)


def make_options(kw: dict, target_kind: str) -> TrainOptions:
    k, weight = vis_settings(kw.pop("vis_preset"), kw.pop("vis_topk"), kw.pop("vis_topk_weight"))
    loss = LossConfig(
        weights=parse_weights(kw.pop("weights")),
        attn_loss=kw.pop("attn_loss"),
        vis_topk=k,
        vis_topk_weight=weight,
        logit_loss=kw.pop("logit_loss") or DEFAULT_LOGIT_LOSS[target_kind],
    )
    lora = lora_record(kw.pop("lora"))
    if kw["merge"] and not lora:
        raise click.UsageError("--merge merges a LoRA adapter: add --lora, or drop --merge")
    return TrainOptions(loss=loss, max_grad_norm=kw.pop("max_grad_norm") or None, lora=lora, **kw)


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
    "expect_template",
    type=click.Choice(TEMPLATES),
    default=None,
    help="Refuse unless the cache used this template (default: the cache's).",
)
@storage_option
@training_options
def from_cache_command(student, cache, image_root, expect_template, storage, **kw):
    """Train the student on cached teacher signals; the teacher never loads."""
    from alignkd_cache import distributed
    from alignkd_cache.train import from_cache, open_for_job

    world = distributed.init(kw["device"])
    reader = open_for_job(cache, parse_storage_options(storage), world)  # the command's one open
    opts = make_options(kw, reader.attrs["logit_targets"])
    summary = from_cache(student, reader, image_root, opts, expect_template)
    click.echo(json.dumps(summary))


@main.command("online")
@click.option("--teacher", required=True, help="Teacher checkpoint directory or hub id org/name[@revision].")
@click.option("--student", required=True, help="Student checkpoint directory or hub id org/name[@revision].")
@click.option("--data", required=True, type=ExistingPath(dir_okay=False), help="LLaVA-format JSON or JSONL.")
@click.option("--image-root", type=ExistingPath(file_okay=False), default=None)
@signal_option("template", type=click.Choice(TEMPLATES))
@signal_option("topk", type=click.IntRange(1), help="Top-k logit targets (as `alignkd-cache build`).")
@signal_option("logit_targets", type=click.Choice(ONLINE_KINDS))
@signal_option("draws", type=click.IntRange(1), help="Sampled targets: draws per position.")
@signal_option(
    "seed",
    "--sample-seed",
    "sample_seed",
    type=click.IntRange(0),
    help="Sampled targets: the seed (as the build's --seed).",
)
@click.option(
    "--teacher-dtype",
    type=click.Choice(["float32", "bfloat16", "float16"]),
    default="float32",
    show_default=True,
)
@signal_option("max_length", type=click.IntRange(1))
@signal_option(
    "attn_heads",
    type=click.Choice(ATTN_HEADS),
    help="Attention signals per head, or their mean (as `alignkd-cache build`).",
)
@training_options
def online_command(teacher, student, data, image_root, teacher_dtype, **kw):
    """Train the student with the teacher resident: the reference the cache is compared against."""
    from alignkd_cache.train import online

    fields = ("template", "topk", "logit_targets", "draws", "max_length", "attn_heads")
    signal_options = SignalOptions(**{f: kw.pop(f) for f in fields}, seed=kw.pop("sample_seed"))
    opts = make_options(kw, signal_options.logit_targets)
    summary = online(teacher, student, data, image_root, opts, signal_options, teacher_dtype)
    click.echo(json.dumps(summary))


@main.command("finetune")
@click.option(
    "--model", required=True, help="Model to fine-tune: a checkpoint directory or hub id org/name[@revision]."
)
@click.option("--data", required=True, type=ExistingPath(dir_okay=False), help="LLaVA-format JSON or JSONL.")
@click.option("--image-root", type=ExistingPath(file_okay=False), default=None)
@signal_option("template", type=click.Choice(TEMPLATES))
@signal_option("max_length", type=click.IntRange(1))
@functools.partial(training_options, weights="ce=1,logit=0,vis=0,attn=0")
def finetune_command(model, data, image_root, template, max_length, **kw):
    """Plain cross-entropy fine-tuning, no teacher (how the demo trains its teacher).

    Only the ce weight may be non-zero here: there is no teacher to distil from."""
    from alignkd_cache.train import finetune

    signal_options = SignalOptions(template=template, max_length=max_length)
    summary = finetune(model, data, image_root, make_options(kw, "topk"), signal_options)
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
