"""A cache's root attributes as the store knows them: the schema versions, and the checks that
compare them (readable, resumable, mergeable). build.py makes them from the teacher (build_attrs).

schema_version is "MAJOR.MINOR". A reader accepts its MAJORs (READABLE_MAJORS) with any MINOR
(minor versions only add optional attributes or manifest columns); another MAJOR is refused.

2.0 changed what the ids and pixels are (issue 10): one tokenization of the whole prompt with
SentencePiece semantics, `<image>` moved to the front of its turn, and square padding with the
image processor's mean. `preprocessing` records those choices so readers can check them.
2.1 added `signals` ("stored"). 3.0 was the `layer0` kind (issue 12): no stored attention or visual
arrays, a layer-0 stub instead. 4.0 (issue 21) holds several images per sample, each with its own
visual-token count (dynamic resolution, tiles): per-image manifest lists, visual tokens stored as
token rows, attention rows as wide as the sample's visual tokens. Both kinds are 4.x; `signals`
says which. 4.1 adds the manifest column image_layouts (how the processor laid each image's
visual tokens out); a 4.0 cache, without it, is read as before.
"""

from __future__ import annotations

import hashlib
from datetime import UTC, datetime
from pathlib import Path

from alignkd_cache.signal_spec import cache_kind

SCHEMA_VERSION = "4.1"  # either kind (`signals`: stored or layer0); 4.1: image_layouts
READABLE_MAJORS = ("4",)
# What each older MAJOR did differently, for the refusal message.
_ONE_IMAGE = (
    "caches hold one image per sample with one visual-token count for all; 4.x manifests list each "
    "image's count and offsets, so their rows and arrays differ"
)
OLDER_MAJORS = {
    "1": "1.x caches tokenized the system prompt and each turn separately, duplicated a later-turn "
    "<image>, and padded images with their own mean colour; their ids and visual signals differ",
    "2": f"2.x {_ONE_IMAGE}",
    "3": f"3.x (layer0) {_ONE_IMAGE}",
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


def attrs_pad_color(attrs: dict) -> tuple[int, int, int] | None:
    """The padding colour a cache's image keys are defined with (None: images are not padded)."""
    color = attrs["preprocessing"]["image"]["pad_color"]
    return None if color is None else tuple(color)


def first_difference(stored, new, where: str) -> str | None:
    if isinstance(stored, dict) and isinstance(new, dict):
        for key in sorted(set(stored) | set(new)):
            diff = first_difference(stored.get(key), new.get(key), f"{where}.{key}" if where else key)
            if diff:
                return diff
        return None
    return None if stored == new else f"{where}: stored {stored!r}, now {new!r}"


def check_resume(stored: dict, new: dict, url: str) -> None:
    """Refuse to resume a build whose teacher, data or options differ, naming the field."""
    diff = first_difference(cache_kind(stored), cache_kind(new), "signals")
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
        diff = first_difference(stored.get(key), new.get(key), key)
        if diff:
            raise IncompatibleCache(
                f"cannot --resume {url}: {diff}; use a new --out or the original settings"
            )
    options = {k: v for k, v in new["options"].items() if k not in RESUME_FREE_OPTIONS}
    before = {k: v for k, v in stored.get("options", {}).items() if k not in RESUME_FREE_OPTIONS}
    diff = first_difference(before, options, "options")
    if diff:
        raise IncompatibleCache(f"cannot --resume {url}: {diff}; use a new --out or the original settings")


def check_mergeable(first: dict, other: dict, url: str) -> None:
    if cache_kind(first) != cache_kind(other):
        raise IncompatibleCache(
            f"cannot merge {url}: a {cache_kind(other)} cache into {cache_kind(first)} ones"
        )
    if first.get("schema_version") != other.get("schema_version"):
        raise IncompatibleCache(
            f"cannot merge {url}: its schema_version is {other.get('schema_version')!r}, the first cache's "
            f"{first.get('schema_version')!r} (4.1 records image layouts, 4.0 does not); rebuild the older one"
        )
    for key in MERGE_FIELDS:
        diff = first_difference(first.get(key), other.get(key), key)
        if diff:
            raise IncompatibleCache(
                f"cannot merge {url}: {diff} (caches must share teacher, tokenizer and template)"
            )
    for key in MERGE_OPTIONS:
        diff = first_difference(first["options"].get(key), other["options"].get(key), f"options.{key}")
        if diff:
            raise IncompatibleCache(
                f"cannot merge {url}: {diff} (caches must be built with the same options)"
            )


# All a reader says of a cache whose build has not finished: nothing in it is damaged.
UNFINISHED = "unfinished: resume it (the same `alignkd-cache build` command with --resume)"


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
        raise IncompatibleCache(f"{url}: {UNFINISHED}")
