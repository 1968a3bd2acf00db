"""What a cache's signals are, as names and numbers: the values each signal option may take, the
kinds of cache, and how each signal is stored in a block. No torch: the cache commands that read
no chunk (`info`, `copy`, ...) and the CLI's option parsing import this, not signals.py.
"""

from __future__ import annotations

from dataclasses import dataclass

TEMPLATES = ("plain", "v1", "chat")  # how a record becomes text (data.render)
KINDS = ("topk", "sampled")
# "full": the teacher's whole log-softmax at each position; online only (never stored).
ONLINE_KINDS = (*KINDS, "full")
ATTN_HEADS = ("all", "mean")
# What a cache holds: every signal ("stored"), or the logit targets and the teacher's layer-0 stub
# that recomputes the rest ("layer0", alignkd_cache/layer0.py).
CACHE_KINDS = ("stored", "layer0")
LOGIT_POSITIONS = ("answer", "text")


# How a TeacherSignal is stored in a block: array name -> (the field it holds, its encoding).
# An encoding "encodings.X" is the cache's choice (attrs["encodings"]["X"], from --codecs); "f32"
# is fixed; None is raw. A scaled encoding (codecs.SCALED) adds the array "<name>_scale".
STORED_ARRAYS = {
    "attention": ("attention", "encodings.attention"),
    "visual": ("visual", "encodings.visual"),
    "logit_ids": ("logits", None),
    "logit_values": ("logits", "encodings.logprobs"),  # top-k log-probs; sampled: raw uint16 counts
    "logit_tail": ("logits", "f32"),  # top-k only
}


def array_encoding(name: str, attrs: dict) -> str | None:
    """The encoding of block array `name` in a cache with these root attrs (None: stored raw)."""
    encoding = STORED_ARRAYS[name][1]
    if name == "logit_values" and attrs["logit_targets"] != "topk":
        return None
    if encoding and encoding.startswith("encodings."):
        return attrs["encodings"][encoding.removeprefix("encodings.")]
    return encoding


def cache_kind(attrs: dict) -> str:
    """A cache's kind (CACHE_KINDS) from its root attrs; caches before schema 2.1 are all stored."""
    return attrs.get("signals", "stored")


def stored_arrays(attrs: dict) -> list[str]:
    """The block arrays of a cache with these root attrs (without the scale arrays codecs add):
    a `layer0` cache stores no attention or visual tokens (its stub recomputes them)."""
    names = ["logit_ids", "logit_values"] + (["logit_tail"] if attrs["logit_targets"] == "topk" else [])
    if cache_kind(attrs) == "layer0":
        return names
    return ["attention", "visual", *names]


@dataclass
class SignalOptions:
    """How a teacher's forward becomes signals, the same for a cache build (BuildOptions extends it)
    and a resident teacher (`alignkd-train online`): the one place for their defaults, which the CLI
    reads (cli/options.py)."""

    template: str = "v1"
    topk: int = 64
    logit_targets: str = "topk"  # or "sampled", or "full" (online only)
    logit_positions: str = "answer"  # or "text"
    attn_heads: str = "all"  # or "mean"
    max_length: int = 2048
    draws: int = 50  # sampled targets: draws per position
    seed: int = 0  # sampled targets' per-sample seed base

    def __post_init__(self):
        check_options(self, ONLINE_KINDS)


def check_options(options, kinds: tuple[str, ...] = KINDS) -> None:
    """Refuse an unknown logit_targets (of `kinds`), attn_heads or logit_positions in `options`."""
    for name, value, allowed in (
        ("--logit-targets", options.logit_targets, kinds),
        ("--attn-heads", options.attn_heads, ATTN_HEADS),
        ("--logit-positions", options.logit_positions, LOGIT_POSITIONS),
    ):
        if value not in allowed:
            raise ValueError(f"unknown {name} {value!r}; choose one of {allowed}")


def logit_positions(sample, which: str) -> list[int]:
    """Where a sample's logit targets are: "answer", the supervised positions (logits[p] predicts
    the supervised token p + 1); "text", every position whose next token is text."""
    if which == "answer":
        return sample.supervised_positions
    if which == "text":
        return followed_by_text(sample.input_ids, sample.image_token_id)
    raise ValueError(f"unknown --logit-positions {which!r}; choose one of {LOGIT_POSITIONS}")


def followed_by_text(input_ids: list[int], image_token_id: int) -> list[int]:
    """The positions of a sequence whose next token is text (not visual): the "text" logit positions."""
    return [p for p in range(len(input_ids) - 1) if input_ids[p + 1] != image_token_id]


def stored_heads(attn_heads: str, num_heads: int) -> int:
    """The attention heads a signal holds: 1 with --attn-heads mean (their mean), else every head."""
    return 1 if attn_heads == "mean" else int(num_heads)
