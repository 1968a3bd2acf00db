"""Trust, the root attributes: the schema, schema_version's MAJOR, cross-field agreement, and hard
bounds on every size they declare."""

from __future__ import annotations

import re

from alignkd_cache.signal_spec import cache_kind
from alignkd_cache.store import codecs
from alignkd_cache.store.inspection import Inspection
from alignkd_cache.store.jsonschema_lite import attrs_schema, validate
from alignkd_cache.store.layout import group_document
from alignkd_cache.store.location import Location
from alignkd_cache.store.provenance import IncompatibleCache, check_readable
from alignkd_cache.store.stub import FORMAT as STUB_FORMAT
from alignkd_cache.store.stub import MANIFEST as STUB_MANIFEST
from alignkd_cache.store.stub import stub_sha256

# Hard bounds on what the attributes may declare: far above any real teacher (a 7B LLaVA has 576
# visual tokens of 4096 dims and 32 heads), far below what would exhaust a machine's memory.
LIMITS = {
    "num_visual_tokens": 4096,
    "visual_dim": 16384,
    "num_heads": 256,
    "topk": 4096,
    "vocab_size": 2**31 - 1,
    "block_size": 2**20,
    "num_blocks": 2**20,
    "options.max_length": 65536,
    "options.draws": 4096,
}


def check_attrs(loc: Location, found: Inspection) -> None:
    root = found.read_json("zarr.json")
    if root is None:
        return
    attrs = root.get("attributes")
    if {**root, "attributes": {}} != group_document() or not isinstance(attrs, dict):
        found.add("zarr.json: the root is not a zarr group with attributes")
        return
    try:
        check_readable(attrs, loc.url)
    except IncompatibleCache as e:
        found.add(str(e).removeprefix(f"{loc.url}: "))
        return
    for problem in validate(attrs, attrs_schema()):
        found.add(f"attribute {problem.removeprefix('$.')}")
    if found.problems:
        return
    for name, limit in LIMITS.items():
        value = attrs["options"][name[8:]] if name.startswith("options.") else attrs[name]
        if value is not None and value > limit:
            found.add(f"attribute {name} is {value}, above the limit {limit}")
    for name in ("template", "topk", "logit_targets", "logit_positions", "attn_heads", "codecs"):
        if attrs[name] != attrs["options"][name]:
            found.add(f"attribute {name} is {attrs[name]!r} but options.{name} is {attrs['options'][name]!r}")
    if cache_kind(attrs) != attrs["options"].get("signals", "stored"):
        found.add(
            f"attribute signals is {cache_kind(attrs)!r} but options.signals is {attrs['options'].get('signals')!r}"
        )
    check_kind(attrs, found)
    if attrs["encodings"] != codecs.resolve_preset(attrs["codecs"]):
        found.add(f"attribute encodings {attrs['encodings']} are not those of codecs {attrs['codecs']!r}")
    if attrs["logit_id_dtype"] != codecs.int_dtype(attrs["vocab_size"] - 1).name:
        found.add(
            f"attribute logit_id_dtype {attrs['logit_id_dtype']!r} does not fit vocab_size {attrs['vocab_size']}"
        )
    found.attrs = attrs


_STUB_FILE = re.compile(r"[A-Za-z0-9_.-]+(/[A-Za-z0-9_.-]+)*")


def check_kind(attrs: dict, found: Inspection) -> None:
    """A layer0 cache's stub record is well formed (its files' contents are checked by `verify` and
    by load_layer0 before a training run uses them)."""
    if cache_kind(attrs) != "layer0":
        return
    stub = attrs.get("layer0")
    if not isinstance(stub, dict) or stub.get("format") != STUB_FORMAT:
        found.add(f"attribute layer0 is not a {STUB_FORMAT} stub record")
        return
    for name in stub["files"]:
        if not _STUB_FILE.fullmatch(name) or ".." in name.split("/") or name == STUB_MANIFEST:
            found.add(f"attribute layer0 lists the file name {name!r}, which is not a plain relative path")
    if stub_sha256(stub["files"]) != stub["sha256"]:
        found.add("attribute layer0.sha256 is not the hash of its file list")
