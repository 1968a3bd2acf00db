"""Root attributes of a cache: provenance, options, layout, and the checks that compare them.

schema_version is "MAJOR.MINOR". A reader accepts any cache with its own MAJOR and any MINOR
(minor versions only add optional attributes or manifest columns); a different MAJOR is refused.

2.0 changed what the ids and pixels are (issue 10): one tokenization of the whole prompt with
SentencePiece semantics, `<image>` moved to the front of its turn, and square padding with the
image processor's mean. `preprocessing` records those choices so readers can check them.
2.1 added `signals` ("stored"). 3.0 is the `layer0` kind (issue 12): no stored attention or visual
arrays, a layer-0 stub instead; each kind keeps its own MAJOR so older readers refuse only 3.0.
"""

from __future__ import annotations

import hashlib
import json
from datetime import UTC, datetime
from pathlib import Path

import alignkd_cache
from alignkd_cache.backends.tokenizer import tokenizer_settings
from alignkd_cache.signals import cache_kind
from alignkd_cache.store.codecs import int_dtype

SCHEMA_VERSION = "2.1"  # a `stored` cache (2.1 added the optional `signals` attribute)
# A `layer0` cache (its attention and visual signals are recomputed from a stub, docs/cache-format.md):
# a new MAJOR, so that a 2.x reader refuses it rather than reading it as a stored cache.
LAYER0_SCHEMA_VERSION = "3.0"
READABLE_MAJORS = ("2", "3")
# What each older MAJOR did differently, for the refusal message.
OLDER_MAJORS = {
    "1": "1.x caches tokenized the system prompt and each turn separately, duplicated a later-turn "
    "<image>, and padded images with their own mean colour; their ids and visual signals differ"
}

# Options that may differ between a build and its --resume: they cannot change what is stored.
RESUME_FREE_OPTIONS = ("device",)
# What must agree for caches to be merged: the same teacher producing the same kind of signals.
MERGE_FIELDS = (
    "layer0",  # the stub: identical, or no merge
    "teacher",
    "tokenizer_sha256",
    "template",
    "preprocessing",
    "num_visual_tokens",
    "num_heads",
    "visual_dim",
)
MERGE_OPTIONS = (
    "topk",
    "logit_targets",
    "logit_positions",
    "attn_heads",
    "codecs",
    "dtype",
    "max_length",
    "draws",
    "seed",
)


class IncompatibleCache(ValueError):
    pass


def file_sha256(path: str | Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def now() -> str:
    return datetime.now(UTC).isoformat(timespec="seconds")


def preprocessing(backend, template: str) -> dict:
    """Everything besides the weights that decides the ids and pixels a cache was built from."""
    processor = backend.image_processor
    settings = (
        "image_mean",
        "image_std",
        "size",
        "crop_size",
        "resample",
        "do_center_crop",
        "rescale_factor",
    )
    return {
        "template": template,
        "tokenizer": tokenizer_settings(backend.tokenizer),
        "image": {
            "pad_color": list(backend.pad_color),
            "processor": type(processor).__name__,
            **{k: v for k, v in json.loads(processor.to_json_string()).items() if k in settings},
        },
        "image_key": "sha256-of-padded-rgb",
    }


def attrs_pad_color(attrs: dict) -> tuple[int, int, int]:
    """The padding colour a cache's image keys are defined with."""
    return tuple(attrs["preprocessing"]["image"]["pad_color"])


def build_attrs(backend, options: dict, data_path: str | Path, encodings: dict, vocab_size: int) -> dict:
    """The root attributes of a new build; a `layer0` build adds its stub's record (see build.py)."""
    fp = backend.fingerprint()
    layer0 = options["signals"] == "layer0"
    return {
        "schema_version": LAYER0_SCHEMA_VERSION if layer0 else SCHEMA_VERSION,
        "signals": options["signals"],
        "tool_version": alignkd_cache.__version__,
        "created": now(),
        "complete": False,
        "teacher": {k: fp[k] for k in ("model_id", "revision", "config_sha256", "weights_sha256")},
        "tokenizer_sha256": fp["tokenizer_sha256"],
        "template": options["template"],
        "preprocessing": preprocessing(backend, options["template"]),
        "dataset": {"file": Path(data_path).name, "sha256": file_sha256(data_path)},
        "options": dict(options),
        "family": backend.family,
        "num_visual_tokens": backend.num_visual_tokens,
        "image_token_id": backend.image_token_id,
        "num_heads": backend.num_heads,
        "visual_dim": backend.visual_dim,
        "vocab_size": vocab_size,
        "attn_heads": options["attn_heads"],
        "logit_targets": options["logit_targets"],
        "topk": options["topk"],
        "logit_positions": options["logit_positions"],
        "codecs": options["codecs"],
        "encodings": encodings,  # a layer0 cache uses only "logprobs"
        "logit_id_dtype": int_dtype(vocab_size - 1).name,
        "block_size": options["block_size"],
    }


def _first_difference(stored, new, where: str) -> str | None:
    if isinstance(stored, dict) and isinstance(new, dict):
        for key in sorted(set(stored) | set(new)):
            diff = _first_difference(stored.get(key), new.get(key), f"{where}.{key}" if where else key)
            if diff:
                return diff
        return None
    return None if stored == new else f"{where}: stored {stored!r}, now {new!r}"


def check_resume(stored: dict, new: dict, url: str) -> None:
    """Refuse to resume a build whose teacher, data or options differ, naming the field."""
    diff = _first_difference(cache_kind(stored), cache_kind(new), "signals")
    if diff:
        raise IncompatibleCache(f"cannot --resume {url}: {diff}; use a new --out or the original --signals")
    old_stub, new_stub = (a.get("layer0", {}).get("sha256") for a in (stored, new))
    if old_stub != new_stub:
        raise IncompatibleCache(
            f"cannot --resume {url}: its layer-0 stub has sha256 {old_stub}, this teacher's {new_stub} "
            "(another teacher, or its weights changed); use a new --out or the original teacher"
        )
    keys = (
        "schema_version",
        "teacher",
        "tokenizer_sha256",
        "template",
        "preprocessing",
        "dataset",
        "encodings",
    )
    for key in keys:
        diff = _first_difference(stored.get(key), new.get(key), key)
        if diff:
            raise IncompatibleCache(
                f"cannot --resume {url}: {diff}; use a new --out or the original settings"
            )
    options = {k: v for k, v in new["options"].items() if k not in RESUME_FREE_OPTIONS}
    before = {k: v for k, v in stored.get("options", {}).items() if k not in RESUME_FREE_OPTIONS}
    diff = _first_difference(before, options, "options")
    if diff:
        raise IncompatibleCache(f"cannot --resume {url}: {diff}; use a new --out or the original settings")


def check_mergeable(first: dict, other: dict, url: str) -> None:
    if cache_kind(first) != cache_kind(other):
        raise IncompatibleCache(
            f"cannot merge {url}: a {cache_kind(other)} cache into {cache_kind(first)} ones"
        )
    for key in MERGE_FIELDS:
        diff = _first_difference(first.get(key), other.get(key), key)
        if diff:
            raise IncompatibleCache(
                f"cannot merge {url}: {diff} (caches must share teacher, tokenizer and template)"
            )
    for key in MERGE_OPTIONS:
        diff = _first_difference(first["options"].get(key), other["options"].get(key), f"options.{key}")
        if diff:
            raise IncompatibleCache(
                f"cannot merge {url}: {diff} (caches must be built with the same options)"
            )


def check_readable(attrs: dict, url: str) -> None:
    version = str(attrs.get("schema_version", ""))
    major = version.split(".")[0]
    if major not in READABLE_MAJORS:
        why = f" ({OLDER_MAJORS[major]})" if major in OLDER_MAJORS else ""
        reads = " and ".join(f"{m}.x" for m in READABLE_MAJORS)
        raise IncompatibleCache(
            f"{url}: schema_version {version!r} is not readable by this tool (reads {reads})"
            f"{why}; rebuild the cache with this version or use a matching alignkd-cache version"
        )
    if not attrs.get("complete"):
        raise IncompatibleCache(f"{url}: the build is not finished; run the same build command with --resume")
