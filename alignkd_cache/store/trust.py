"""What makes a cache valid: the one definition every command that reads a cache relies on.

A cache from someone else is untrusted input. `open_cache` runs the cheap checks (metadata and
manifest only, no chunk is read) before any command reads a signal, and refuses with the first
problem, naming the sample and the field:
- the store is a tree of regular files under its root, in zarr format 3, holding only the keys a
  cache has (no symlink, device, fifo, zarr v2 document or stray file is ever read or copied);
- the root attributes against schemas/attrs.schema.json, their cross-field agreement, and hard
  bounds on every size they declare (LIMITS);
- the manifest's sha256 against the attributes, its declared size before it is decoded, its Arrow
  schema, and every row: status, unique ids in dataset order, token ids inside the vocabulary
  (image-token ids exactly at the visual positions), positions inside the tokens, row counts
  equal to what the positions imply, offsets tiling each block's arrays, visual references;
- every array's zarr.json: format, dtype, shape, chunking, codecs and encoding against what the
  attributes and manifest imply, so nothing is allocated beyond what the manifest accounts for.
`verify` runs the same checks (collecting every problem) and then streams every chunk.
"""

from __future__ import annotations

import functools
import io
import json
import os
import re
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import zarr
from zarr.core.buffer import default_buffer_prototype
from zarr.core.sync import sync
from zarr.storage import MemoryStore

from alignkd_cache.signals import STORED_ARRAYS, array_encoding, cache_kind, stored_arrays
from alignkd_cache.store import codecs
from alignkd_cache.store.jsonschema_lite import attrs_schema, validate
from alignkd_cache.store.location import Location
from alignkd_cache.store.lock import LOCK_NAME
from alignkd_cache.store.manifest import MANIFEST_KEY, MANIFEST_SCHEMA, block_path, sha256
from alignkd_cache.store.provenance import (
    LAYER0_SCHEMA_VERSION,
    UNFINISHED,
    IncompatibleCache,
    _first_difference,
    check_readable,
)
from alignkd_cache.store.stub import FORMAT as STUB_FORMAT
from alignkd_cache.store.stub import MANIFEST as STUB_MANIFEST
from alignkd_cache.store.stub import STUB_DIR, stub_sha256
from alignkd_cache.store.writer import create_array


class UntrustedCache(IncompatibleCache):
    """A cache that fails the checks: damaged, edited, or not a cache."""


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
MAX_JSON_BYTES = 1 << 20  # a zarr.json document; real ones are under 2 KB

ARRAYS = (*STORED_ARRAYS, *(f"{name}_scale" for name in STORED_ARRAYS))  # every name a block array may have
_KEY = re.compile(
    r"(zarr\.json|manifest\.parquet|blocks/zarr\.json|blocks/b\d{6}/zarr\.json"
    rf"|blocks/b\d{{6}}/({'|'.join(ARRAYS)})/(zarr\.json|c(/0)+))"
)
_STORED_DTYPE = {"f32": "float32", "f16": "float16", "bf16": "uint16", "fixed_u16": "uint16"}
_STORED_DTYPE |= {"sqrt_u8": "uint8", "fp8_row": "uint8"}
FIX = "the cache is damaged or was edited: get a good copy from its producer, or rebuild it"


@dataclass
class ArraySpec:
    """What one block array must be: its dtype, shape (for logits, the widest allowed) and encoding."""

    dtype: str
    shape: tuple
    encoding: str | None = None


@dataclass
class Inspection:
    url: str
    loc: Location
    root: bytes | None = None  # the root zarr.json to check instead of the stored one (copy)
    problems: list[tuple[str | None, str]] = field(default_factory=list)  # (sample id or None, what)
    keys: dict[str, None] = field(default_factory=dict)  # the store's files (ordered set), all checked
    attrs: dict = field(default_factory=dict)
    table: pa.Table | None = None
    specs: dict[tuple[int, str], ArraySpec] = field(default_factory=dict)
    # block -> (sample id, "attention" | "logit", first row, end row): whose rows are where
    spans: dict[int, list[tuple[str, str, int, int]]] = field(default_factory=dict)
    visual_users: dict[tuple[int, int], list[str]] = field(default_factory=lambda: defaultdict(list))

    def add(self, what: str, sample: str | None = None) -> None:
        self.problems.append((sample, what))


def chunk_damage(error: Exception) -> str:
    """What a chunk that failed to read (zarr's CRC32C or decode error) has, for reader and verify."""
    if "checksum" in str(error):
        return "fails its checksum"
    return f"is in a damaged chunk ({type(error).__name__}: {error})"


def open_cache(url: str, storage_options: dict | None = None) -> Inspection:
    """The checked cache (attributes, manifest table, file list), or UntrustedCache naming the problem."""
    found = inspect(url, storage_options)
    if found.problems == [(None, "zarr.json is missing")]:
        raise UntrustedCache(
            f"{url} is not an alignkd cache (no zarr.json at its root); give the --out of an `alignkd-cache build`"
        )
    if found.problems == [(None, UNFINISHED)]:
        raise UntrustedCache(f"{url}: {UNFINISHED}")
    if found.problems:
        sample, what = found.problems[0]
        where = f"sample {sample!r}: " if sample is not None else ""
        more = f" (and {len(found.problems) - 1} more problem(s))" if len(found.problems) > 1 else ""
        raise UntrustedCache(f"{url}: {where}{what}{more}; {FIX}")
    return found


def inspect(
    url: str, storage_options: dict | None = None, root: bytes | None = None, max_problems: int = 50
) -> Inspection:
    """Every cheap check, collecting problems (up to max_problems) instead of raising. `root`: the
    root zarr.json to check in place of the stored one (a copy writes it only once verified)."""
    loc = Location(url, storage_options, read_only=True)
    found = Inspection(str(url), loc, root)
    steps = (_check_tree, _check_attrs, _check_keys, _check_manifest, _check_rows, _check_arrays)
    for step in steps:
        step(loc, found)
        if found.problems:  # later steps trust what earlier ones checked
            break
    del found.problems[max_problems:]
    return found


# ---------------------------------------------------------------------------------------------
# The tree


def _check_tree(loc: Location, found: Inspection) -> None:
    root = loc.local_root
    keys = _local_files(root, root, found) if root is not None else loc.list_keys()
    found.keys = dict.fromkeys(k for k in keys if k != LOCK_NAME)  # a writer's lock: never read


def _check_keys(loc: Location, found: Inspection) -> None:
    stub = _stub_keys(found.attrs)
    for key in found.keys:
        if not _KEY.fullmatch(key) and key not in stub:
            found.add(
                f"unexpected file {key!r} (a cache holds only zarr v3 metadata, chunks, the manifest "
                "and, in a layer0 cache, the files its attributes list under layer0/)"
            )
    for key in sorted(set(stub) - set(found.keys)):
        found.add(f"{key} is missing (the layer-0 stub lists it)")
    if stub and not found.problems:
        size = sum(loc.size(k) for k in stub if k != f"{STUB_DIR}/{STUB_MANIFEST}")
        if size != found.attrs["layer0"]["bytes"]:
            found.add(
                f"the layer-0 stub's files hold {size} bytes, its attributes say {found.attrs['layer0']['bytes']}"
            )
        _check_stub_manifest(loc, found)


def _check_stub_manifest(loc: Location, found: Inspection) -> None:
    """The stub's own layer0.json must list the files and hash the cache's attributes record."""
    key = f"{STUB_DIR}/{STUB_MANIFEST}"
    if loc.size(key) > MAX_JSON_BYTES:
        found.add(f"{key} is larger than {MAX_JSON_BYTES} bytes")
        return
    try:
        manifest = json.loads(loc.read_bytes(key))
    except (ValueError, UnicodeDecodeError) as e:
        found.add(f"{key}: not JSON ({e})")
        return
    record = found.attrs["layer0"]
    for name in ("format", "files", "sha256"):
        if not isinstance(manifest, dict) or manifest.get(name) != record[name]:
            found.add(f"{key}: its {name} differs from the cache attribute layer0.{name}")
            return


def _stub_keys(attrs: dict) -> dict[str, str | None]:
    """A layer0 cache's stub files as store keys -> their sha256 (its layer0.json: None)."""
    if cache_kind(attrs) != "layer0":
        return {}
    files = {f"{STUB_DIR}/{name}": sha for name, sha in attrs["layer0"]["files"].items()}
    return files | {f"{STUB_DIR}/{STUB_MANIFEST}": None}


def _local_files(root: Path, folder: Path, found: Inspection) -> list[str]:
    """Regular files under root, as store keys; a symlink or special file is a problem, never followed."""
    keys = []
    with os.scandir(folder) as entries:
        for entry in sorted(entries, key=lambda e: e.name):
            key = Path(entry.path).relative_to(root).as_posix()
            if entry.is_symlink():
                found.add(
                    f"{key!r} is a symlink (to {os.readlink(entry.path)!r}); a cache holds regular files only"
                )
            elif entry.is_dir(follow_symlinks=False):
                keys += _local_files(root, Path(entry.path), found)
            elif entry.is_file(follow_symlinks=False):
                keys.append(key)
            else:
                found.add(f"{key!r} is not a regular file (a device, fifo or socket)")
    return keys


def _read_json(loc: Location, key: str, found: Inspection) -> dict | None:
    """A zarr v3 metadata document, bounded in size; None (with the problem recorded) if it is not one."""
    if key == "zarr.json" and found.root is not None:
        data = found.root
    elif key not in found.keys:
        found.add(f"{key} is missing")
        return None
    elif loc.size(key) > MAX_JSON_BYTES:
        found.add(f"{key} is larger than {MAX_JSON_BYTES} bytes")
        return None
    else:
        data = loc.read_bytes(key)
    try:
        doc = json.loads(data)
    except (ValueError, UnicodeDecodeError) as e:
        found.add(f"{key}: not JSON ({e})")
        return None
    if not isinstance(doc, dict) or doc.get("zarr_format") != 3:
        found.add(
            f"{key}: zarr_format is {doc.get('zarr_format') if isinstance(doc, dict) else doc!r}, only 3 is read"
        )
        return None
    return doc


# ---------------------------------------------------------------------------------------------
# Attributes


def _check_attrs(loc: Location, found: Inspection) -> None:
    root = _read_json(loc, "zarr.json", found)
    if root is None:
        return
    attrs = root.get("attributes")
    if {**root, "attributes": {}} != _group_layout() or not isinstance(attrs, dict):
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
        if value > limit:
            found.add(f"attribute {name} is {value}, above the limit {limit}")
    for name in ("template", "topk", "logit_targets", "logit_positions", "attn_heads", "codecs"):
        if attrs[name] != attrs["options"][name]:
            found.add(f"attribute {name} is {attrs[name]!r} but options.{name} is {attrs['options'][name]!r}")
    if cache_kind(attrs) != attrs["options"].get("signals", "stored"):
        found.add(
            f"attribute signals is {cache_kind(attrs)!r} but options.signals is {attrs['options'].get('signals')!r}"
        )
    _check_kind(attrs, found)
    if attrs["encodings"] != codecs.resolve_preset(attrs["codecs"]):
        found.add(f"attribute encodings {attrs['encodings']} are not those of codecs {attrs['codecs']!r}")
    if attrs["logit_id_dtype"] != codecs.int_dtype(attrs["vocab_size"] - 1).name:
        found.add(
            f"attribute logit_id_dtype {attrs['logit_id_dtype']!r} does not fit vocab_size {attrs['vocab_size']}"
        )
    found.attrs = attrs


_STUB_FILE = re.compile(r"[A-Za-z0-9_.-]+(/[A-Za-z0-9_.-]+)*")


def _check_kind(attrs: dict, found: Inspection) -> None:
    """The kind matches the schema MAJOR, and a layer0 cache's stub record is well formed (its
    files' contents are checked by `verify` and by load_layer0 before a training run uses them)."""
    layer0 = cache_kind(attrs) == "layer0"
    if layer0 != (attrs["schema_version"].split(".")[0] == LAYER0_SCHEMA_VERSION.split(".")[0]):
        found.add(
            f"attribute signals {cache_kind(attrs)!r} does not go with schema_version {attrs['schema_version']!r}"
        )
        return
    if not layer0:
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


# ---------------------------------------------------------------------------------------------
# Manifest


def _check_manifest(loc: Location, found: Inspection) -> None:
    attrs = found.attrs
    if MANIFEST_KEY not in found.keys:
        found.add(f"{MANIFEST_KEY} is missing")
        return
    records, max_length = attrs["counts"]["records"], attrs["options"]["max_length"]
    # Per row: three int32 lists of at most max_length, plus the fixed columns and strings.
    bound = records * (12 * max_length + 4096) + (1 << 20)
    if loc.size(MANIFEST_KEY) > bound:
        found.add(f"{MANIFEST_KEY} is larger than {records} records of at most {max_length} tokens can be")
        return
    data = loc.read_bytes(MANIFEST_KEY)
    if sha256(data) != attrs["manifest_sha256"]:
        found.add(
            f"{MANIFEST_KEY}: sha256 {sha256(data)} differs from the recorded {attrs['manifest_sha256']}"
        )
        return
    try:
        meta = pq.ParquetFile(io.BytesIO(data)).metadata
        declared = sum(meta.row_group(i).total_byte_size for i in range(meta.num_row_groups))
        if meta.num_rows != records or declared > bound:
            found.add(
                f"{MANIFEST_KEY}: declares {meta.num_rows} rows of {declared} bytes; "
                f"the attributes allow {records} rows of at most {bound} bytes"
            )
            return
        table = pq.read_table(io.BytesIO(data))
    except (pa.ArrowException, OSError) as e:
        found.add(f"{MANIFEST_KEY}: unreadable Parquet ({e})")
        return
    if not table.schema.equals(MANIFEST_SCHEMA):
        found.add(f"{MANIFEST_KEY}: schema differs from schemas/manifest.arrow.json")
        return
    found.table = table


def _check_rows(loc: Location, found: Inspection) -> None:
    attrs, rows = found.attrs, found.table.to_pylist()
    counts, seen = defaultdict(int), set()
    for i, r in enumerate(rows):
        sid = r["id"]
        if sid in seen or not sid:
            found.add(f"manifest row {i}: id is {'a duplicate' if sid else 'empty'}", sid)
        seen.add(sid)
        if r["index"] != i:
            found.add(f"manifest row {i}: index is {r['index']}, rows must be in dataset order", sid)
        if not 0 <= r["block"] < attrs["num_blocks"]:
            found.add(f"block {r['block']} is not one of the cache's {attrs['num_blocks']} blocks", sid)
        counts[r["status"]] += 1
        if r["status"] == "written":
            _check_written(r, attrs, found)
        elif r["status"] == "skipped":
            if r["skip_reason"] is None or any(r[k] is not None for k in WRITTEN_FIELDS):
                found.add("a skipped row must have skip_reason and no signal fields", sid)
        else:
            found.add(f"status {r['status']!r} is not 'written' or 'skipped'", sid)
        if len(found.problems) >= 50:
            return
    want = attrs["counts"]
    got = {"records": len(rows), "written": counts["written"], "skipped": counts["skipped"]}
    if any(want[k] != v for k, v in got.items()):
        found.add(f"attribute counts {want} disagree with the manifest {got}")
    if found.problems:
        return
    _plan_arrays(rows, attrs, found)


WRITTEN_FIELDS = (
    "input_ids",
    "visual_start",
    "num_visual",
    "supervised_positions",
    "logit_positions",
    "attention_offset",
    "attention_rows",
    "logit_offset",
    "logit_rows",
    "visual_block",
    "visual_row",
)


def _tokens_fit(r: dict, attrs: dict, found: Inspection) -> bool:
    """The row's ids, visual run and image key are those of a valid sample of this cache."""
    sid = r["id"]
    ids, vs, nv = r["input_ids"], r["visual_start"], r["num_visual"]
    n = len(ids)
    if not 2 <= n <= attrs["options"]["max_length"]:
        found.add(
            f"input_ids has {n} tokens; the cache's max_length is {attrs['options']['max_length']}", sid
        )
        return False
    image = vs >= 0
    if image and (nv != attrs["num_visual_tokens"] or vs + nv >= n):
        found.add(
            f"visual_start {vs} / num_visual {nv} do not fit {n} tokens of which {attrs['num_visual_tokens']} visual",
            sid,
        )
        return False
    if not image and (vs != -1 or nv != 0):
        found.add(f"visual_start {vs} / num_visual {nv}: a text-only sample has -1 / 0", sid)
        return False
    keyed = isinstance(r["image"], str) and re.fullmatch("[0-9a-f]{32}", r["image_key"] or "")
    unkeyed = r["image"] is None and r["image_key"] is None
    if not (keyed if image else unkeyed):
        found.add(
            "image / image_key do not match the sample's visual tokens (a 32-hex-digit key per image)", sid
        )
        return False
    image_id, vocab = attrs["image_token_id"], attrs["vocab_size"]
    tokens, is_visual = np.asarray(ids, dtype=np.int64), np.zeros(n, bool)
    is_visual[vs : vs + nv] = image
    bad = ((tokens == image_id) != is_visual) | (~is_visual & ((tokens < 0) | (tokens >= vocab)))
    if bad.any():
        p = int(np.flatnonzero(bad)[0])
        found.add(
            f"input_ids[{p}] is {ids[p]}: text ids must be in 0..{vocab - 1} and the image id {image_id} "
            "must fill exactly the visual positions",
            sid,
        )
        return False
    return True


def _check_written(r: dict, attrs: dict, found: Inspection) -> None:
    sid = r["id"]
    missing = [k for k in WRITTEN_FIELDS if r[k] is None]
    if missing:
        found.add(f"{missing[0]} is null in a written row", sid)
        return
    if not _tokens_fit(r, attrs, found):
        return
    ids, vs, nv = r["input_ids"], r["visual_start"], r["num_visual"]
    n, image = len(ids), vs >= 0
    visual = range(vs, vs + nv) if image else range(0)
    text_next = [p for p in range(n - 1) if p + 1 not in visual]  # positions whose next token is text
    sup, pos = r["supervised_positions"], r["logit_positions"]
    if not set(sup) <= set(text_next) or sup != sorted(set(sup)):
        found.add("supervised_positions are not increasing positions followed by a text token", sid)
    expected = sup if attrs["logit_positions"] == "answer" else text_next
    if pos != expected:
        found.add(
            f"logit_positions differ from the {attrs['logit_positions']!r} positions of its tokens", sid
        )
    heads = 1 if attrs["attn_heads"] == "mean" else attrs["num_heads"]
    stored = cache_kind(attrs) == "stored"  # a layer0 cache stores no attention and no visual rows
    image_rows = image and stored
    need = {"attention_rows": heads * (n - vs - nv) if image_rows else 0, "logit_rows": len(expected)}
    for name, rows in need.items():
        if r[name] != rows:
            found.add(f"{name} is {r[name]}, its positions need {rows}", sid)
    if image_rows != (r["visual_block"] >= 0) or (
        image_rows and not 0 <= r["visual_block"] < attrs["num_blocks"]
    ):
        found.add(
            f"visual_block {r['visual_block']} does not match the sample's image (or is not a block)", sid
        )
    elif image_rows and r["visual_row"] < 0 or not image_rows and r["visual_row"] != -1:
        found.add(f"visual_row {r['visual_row']} is not a row", sid)


def _plan_arrays(rows: list[dict], attrs: dict, found: Inspection) -> None:
    """Each block's array specs from the manifest; offsets must tile the arrays in manifest order."""
    nv, dim = attrs["num_visual_tokens"], attrs["visual_dim"]
    width = attrs["topk"] if attrs["logit_targets"] == "topk" else attrs["options"]["draws"]
    ends = defaultdict(lambda: {"attention": 0, "logit": 0})
    visual_rows, image_keys = defaultdict(set), {}
    for r in rows:
        if r["status"] != "written":
            continue
        b, sid, end = r["block"], r["id"], ends[r["block"]]
        for kind in ("attention", "logit"):
            if r[f"{kind}_offset"] != end[kind]:
                found.add(
                    f"{kind}_offset is {r[f'{kind}_offset']}, expected {end[kind]} (rows follow each other)",
                    sid,
                )
            found.spans.setdefault(b, []).append((sid, kind, end[kind], end[kind] + r[f"{kind}_rows"]))
            end[kind] += r[f"{kind}_rows"]
        if r["visual_block"] >= 0:
            ref = (r["visual_block"], r["visual_row"])
            if image_keys.setdefault(ref, r["image_key"]) != r["image_key"]:
                found.add(f"shares visual row {ref} with a sample of another image_key", sid)
            visual_rows[r["visual_block"]].add(r["visual_row"])
            found.visual_users[(r["visual_block"], r["visual_row"])].append(sid)
    per_block = defaultdict(int)
    for r in rows:
        per_block[r["block"]] += 1
    for b in range(attrs["num_blocks"]):
        refs = visual_rows[b]
        if refs != set(range(len(refs))) or len(refs) > per_block[b]:
            found.add(f"visual rows {sorted(refs)[:5]} of block {b} are not 0..n-1 stored by its samples")
        a, lg = ends[b]["attention"], ends[b]["logit"]
        shapes = {"attention": (a, nv), "visual": (len(refs), nv, dim), "logit_ids": (lg, width)}
        shapes |= {"logit_values": (lg, width), "logit_tail": (lg,)}
        specs = {}
        for name in stored_arrays(attrs):
            encoding = array_encoding(name, attrs)
            dtype = _STORED_DTYPE[encoding] if encoding else "uint16"  # raw: sampled targets' counts
            specs[name] = ArraySpec(
                attrs["logit_id_dtype"] if name == "logit_ids" else dtype, shapes[name], encoding
            )
            if encoding in codecs.SCALED:
                specs[f"{name}_scale"] = ArraySpec("float32", shapes[name][:1])
        found.specs.update({(b, name): spec for name, spec in specs.items()})
    if cache_kind(attrs) == "layer0":  # counted by content: no visual rows are stored
        image_keys = {r["image_key"] for r in rows if r["status"] == "written" and r["image_key"]}
    if attrs["counts"]["images"] != len(image_keys):
        found.add(
            f"attribute counts.images is {attrs['counts']['images']}, the manifest has {len(image_keys)}"
        )


# ---------------------------------------------------------------------------------------------
# Array metadata


def _check_arrays(loc: Location, found: Inspection) -> None:
    blocks = {k.split("/")[1] for k in found.keys if k.startswith("blocks/b")}
    extra = blocks - {block_path(b).split("/")[1] for b in range(found.attrs["num_blocks"])}
    if extra:
        found.add(
            f"block directories {sorted(extra)} are not among the cache's {found.attrs['num_blocks']} blocks"
        )
    wanted = {block_path(b) + "/" + name for b, name in found.specs}
    stray = {
        k.rsplit("/", 1)[0] for k in found.keys if k.count("/") == 3 and k.endswith("zarr.json")
    } - wanted
    if stray:
        found.add(
            f"arrays {sorted(stray)[:5]} are not part of a {found.attrs['logit_targets']} cache with these encodings"
        )
    for path in ["blocks"] + [block_path(b) for b in range(found.attrs["num_blocks"])]:
        doc = _read_json(loc, f"{path}/zarr.json", found)
        if doc is not None and doc != _group_layout():
            found.add(f"{path}/zarr.json is not a zarr group without attributes")
    for key in found.specs:
        _check_array(loc, key, found)
        if len(found.problems) >= 50:
            return


def _check_array(loc: Location, key: tuple[int, str], found: Inspection) -> None:
    spec, path = found.specs[key], f"{block_path(key[0])}/{key[1]}"
    doc = _read_json(loc, f"{path}/zarr.json", found)
    if doc is None:
        return
    shape = doc.get("shape")
    if doc.get("node_type") != "array" or doc.get("data_type") != spec.dtype:
        found.add(f"{path}: dtype {doc.get('data_type')!r}, expected {spec.dtype}")
        return
    if not isinstance(shape, list) or len(shape) != len(spec.shape):
        found.add(f"{path}: shape {shape}, expected {list(spec.shape)}")
        return
    expected = list(spec.shape)
    if key[1] == "logit_ids":  # width: the block's widest row, at most k (or draws); values share it
        if isinstance(shape[1], int) and 1 <= shape[1] <= spec.shape[1]:
            expected[1] = shape[1]
        found.specs[(key[0], "logit_values")].shape = tuple(expected)
    if shape != expected:
        found.add(f"{path}: shape {shape}, expected {expected} from the manifest and attributes")
        return
    problem = _chunking_problem(doc, shape) or _layout_difference(doc, spec)
    if problem:
        found.add(f"{path}: {problem}")
        return
    chunk_key = f"{path}/c/" + "/".join("0" * len(shape))
    if 0 not in shape and chunk_key not in found.keys:
        found.add(f"{path}: its chunk file is missing")


def _chunking_problem(doc: dict, shape: list) -> str | None:
    """One shard per array, no chunk larger than the array (so a read allocates what the manifest
    accounts for)."""
    try:
        outer = doc["chunk_grid"]["configuration"]["chunk_shape"]
        inner = doc["codecs"][0]["configuration"]["chunk_shape"]
    except (KeyError, TypeError, IndexError):
        return "codecs or chunk grid are not the cache's layout"
    dims = [max(1, d) for d in shape]
    ok = (
        isinstance(outer, list)
        and isinstance(inner, list)
        and all(type(c) is int and c >= 1 for c in [*outer, *inner])
        and len(outer) == len(inner) == len(shape)
        and outer[1:] == inner[1:] == dims[1:]
        and inner[0] <= dims[0]
        and outer[0] % inner[0] == 0
        and dims[0] <= outer[0] < dims[0] + inner[0]
    )
    return (
        None if ok else f"chunk shapes {outer} / {inner} do not fit the shape {shape} (one shard per array)"
    )


def _layout_difference(doc: dict, spec: ArraySpec) -> str | None:
    """Everything else in the document (codecs and their settings, fill value, attributes...) must be
    exactly what the writer makes: nothing else is ever handed to a zarr codec."""
    want = json.loads(json.dumps(_layout(spec.dtype, len(spec.shape), spec.encoding)))
    want["shape"] = doc["shape"]
    want["chunk_grid"]["configuration"]["chunk_shape"] = doc["chunk_grid"]["configuration"]["chunk_shape"]
    want["codecs"][0]["configuration"]["chunk_shape"] = doc["codecs"][0]["configuration"]["chunk_shape"]
    difference = _first_difference(doc, want, "")
    return None if difference is None else f"metadata is not the cache's layout ({difference[:200]})"


@functools.cache
def _group_layout() -> dict:
    store = MemoryStore()
    zarr.open_group(store, mode="w")
    return _document(store, "zarr.json")


def _document(store: MemoryStore, key: str) -> dict:
    return json.loads(sync(store.get(key, prototype=default_buffer_prototype())).to_bytes())


@functools.cache
def _layout(dtype: str, ndim: int, encoding: str | None) -> dict:
    """The zarr.json the writer makes for such an array."""
    store = MemoryStore()
    create_array(zarr.open_group(store, mode="w"), "a", (1,) * ndim, dtype, encoding)
    return _document(store, "a/zarr.json")
