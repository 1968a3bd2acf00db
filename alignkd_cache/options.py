"""The options tree: each default written once, on its field; the CLI's options are made from these
fields (cli/options.py), so its help text, the Python API and the docs' defaults are the same values.

SignalOptions (signal_spec.py): how a teacher forward becomes signals, for a build and a resident teacher.
BuildOptions: SignalOptions, plus how a build runs and stores them.
LossConfig: the loss terms' weights and variants (the losses themselves: losses.py).
TrainOptions: a training run, with its LossConfig.

This module imports no torch, so the CLI can build its options without loading it.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from alignkd_cache.images import DEFAULT_MAX_PIXELS
from alignkd_cache.signal_spec import CACHE_KINDS, SignalOptions, check_options

TERMS = ("ce", "logit", "vis", "attn")
# Ours first (the default, scaled so that it moves the student), then the public revisions as published.
ATTN_LOSSES = ("mse-adapter", "kl-headmean", "mse-adapter-2025-01", "kl-headmean-2024-12")
LOGIT_LOSSES = ("topk-tail", "topk-renorm", "sampled", "full")


@dataclass
class LossConfig:
    weights: dict[str, float]
    attn_loss: str = "mse-adapter"
    vis_topk: int = 16
    vis_topk_weight: float = 1.0
    logit_loss: str = "topk-tail"

    def __post_init__(self):
        if self.attn_loss not in ATTN_LOSSES:
            raise ValueError(f"unknown attention loss {self.attn_loss!r}; choose one of {ATTN_LOSSES}")
        if self.logit_loss not in LOGIT_LOSSES:
            raise ValueError(f"unknown logit loss {self.logit_loss!r}; choose one of {LOGIT_LOSSES}")
        if self.vis_topk < 1 or self.vis_topk_weight < 0:
            raise ValueError(
                f"--vis-topk must be >= 1 and --vis-topk-weight >= 0 (got {self.vis_topk}, {self.vis_topk_weight})"
            )
        if set(self.weights) != set(TERMS) or not any(self.weights.values()):
            raise ValueError(
                f"--weights must give each of {TERMS} a weight, at least one non-zero (got {self.weights})"
            )

    def on(self, term: str) -> bool:
        return self.weights[term] != 0


@dataclass
class BuildOptions(SignalOptions):
    """A build's options: the signal options, and how the build runs and stores them."""

    codecs: str = "balanced"
    batch_size: int = 8
    dtype: str = "float32"
    device: str = "cpu"
    limit: int | None = None
    on_too_long: str = "skip"  # or "error"
    block_size: int = 64
    vision_tower: str | None = None  # MobileVLM: load the CLIP tower from here, not mm_vision_tower
    on_bad_sample: str = "error"  # or "skip": bad records and images become skipped manifest rows
    max_image_pixels: int = DEFAULT_MAX_PIXELS
    signals: str = "stored"  # or "layer0": logit targets only, plus the teacher's layer-0 stub
    # How this invocation runs; not recorded in the cache (RECORDED_OPTIONS).
    resume: bool = False
    storage_options: dict | None = None  # fsspec options for a remote --out
    progress: bool = True
    report: str | None = None  # the pre-flight report (default: next to --out)

    def __post_init__(self):
        if self.logit_targets == "full":
            raise ValueError("--logit-targets 'full' is online only (a cache stores topk or sampled targets)")
        check_options(self)
        if self.signals not in CACHE_KINDS:
            raise ValueError(f"unknown --signals {self.signals!r}; choose one of {CACHE_KINDS}")

    def recorded(self) -> dict:
        """The options a cache records (its `options` attribute), in RECORDED_OPTIONS' order."""
        return {name: getattr(self, name) for name in RECORDED_OPTIONS}


# The options a cache records, in the order its zarr.json has always held them (its bytes).
RECORDED_OPTIONS = (
    "template",
    "topk",
    "logit_targets",
    "logit_positions",
    "attn_heads",
    "codecs",
    "batch_size",
    "dtype",
    "device",
    "limit",
    "max_length",
    "on_too_long",
    "block_size",
    "draws",
    "seed",
    "vision_tower",
    "on_bad_sample",
    "max_image_pixels",
    "signals",
)


@dataclass
class TrainOptions:
    out: str
    loss: LossConfig
    lr: float = 2e-5
    batch_size: int = 4
    grad_accum: int = 1
    epochs: int = 1
    max_steps: int | None = None
    seed: int = 0
    bf16: bool = False
    warmup_ratio: float = 0.03
    weight_decay: float = 0.0
    max_grad_norm: float | None = 1.0
    grad_checkpointing: bool = False
    freeze_adapters: bool = False
    resume: bool = False
    save_every: int | None = None  # optimizer steps between checkpoints (always one at the end)
    stop_after: int | None = None  # stop this invocation after N steps, checkpointed (schedule unchanged)
    num_workers: int = 0
    device: str | None = None
    progress: bool = True
    log_grad_norms: bool = False  # each term's gradient norm in metrics.jsonl (one extra backward per term)
    report_to: str = "none"  # also send each step's metrics to a tracker (tracking.REPORT_TO)
    lora: dict | None = None  # lora.LoraOptions as a dict: train LoRA + projector instead of the LLM
    merge: bool = False  # with lora: also write the merged, plain student checkpoint
    extra: dict = field(default_factory=dict)  # provenance recorded in the output
