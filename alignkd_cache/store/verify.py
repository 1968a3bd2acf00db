"""`alignkd-cache verify`: read every chunk and check the cache end to end, naming bad samples.

Checks: root attributes against schemas/attrs.schema.json; the manifest's sha256 (recorded in the
attributes at finalize), Arrow schema and order; every chunk of every block array (each carries a
CRC32C, so a flipped bit fails its read); that no chunk file is missing (zarr would read zeros);
shapes and dtypes; NaN/inf in decoded values; and that every manifest row points inside the arrays
with the row counts its token positions imply.
"""

from __future__ import annotations

import io
from collections import defaultdict
from dataclasses import dataclass, field

import numpy as np
import pyarrow.parquet as pq

from alignkd_cache.store import codecs
from alignkd_cache.store.jsonschema_lite import attrs_schema, validate
from alignkd_cache.store.location import Location
from alignkd_cache.store.manifest import MANIFEST_KEY, MANIFEST_SCHEMA, block_path, sha256


@dataclass
class VerifyReport:
    url: str
    problems: list[str] = field(default_factory=list)  # store-level problems
    bad_samples: dict[str, list[str]] = field(default_factory=lambda: defaultdict(list))
    samples_checked: int = 0

    @property
    def ok(self) -> bool:
        return not self.problems and not self.bad_samples

    def lines(self) -> list[str]:
        out = [f"problem: {p}" for p in self.problems]
        out += [f"bad sample {sid!r}: {'; '.join(why)}" for sid, why in self.bad_samples.items()]
        return out


def _array_names(attrs: dict) -> list[str]:
    names = ["attention", "visual", "logit_ids", "logit_values"]
    names += [
        f"{n}_scale"
        for n, kind in (("attention", "attention"), ("visual", "visual"))
        if attrs["encodings"][kind] in codecs.SCALED
    ]
    if attrs["logit_targets"] == "topk":
        names.append("logit_tail")
    return names


def _read_checked(
    loc: Location, group, path: str, name: str, report: VerifyReport
) -> tuple[np.ndarray | None, list[tuple[int, int]]]:
    """Read an array chunk by chunk. Returns (values with bad chunks zeroed, bad row ranges)."""
    full = f"{path}/{name}"
    try:
        array = group[name]
    except Exception as e:  # noqa: BLE001 - any failure here is a damaged store
        report.problems.append(f"{full}: cannot open ({e})")
        return None, []
    if array.size and not loc.exists(f"{full}/c/" + "/".join("0" * array.ndim)):
        report.problems.append(f"{full}: chunk file missing")
        return None, [(0, array.shape[0])]
    out = np.zeros(array.shape, array.dtype)
    bad = []
    step = array.chunks[0]
    for lo in range(0, array.shape[0], step):
        hi = min(array.shape[0], lo + step)
        try:
            out[lo:hi] = array[lo:hi]
        except Exception as e:  # noqa: BLE001 - checksum or decode failure: damaged chunk
            bad.append((lo, hi))
            report.problems.append(f"{full}: rows {lo}..{hi - 1} unreadable ({type(e).__name__}: {e})")
    return (out, array.attrs.get("encoding")), bad


def verify(url: str, storage_options: dict | None = None) -> VerifyReport:
    report = VerifyReport(str(url))
    loc = Location(url, storage_options, read_only=True)
    try:
        attrs = dict(loc.group("r").attrs)
    except Exception as e:  # noqa: BLE001
        report.problems.append(f"root group unreadable: {e}")
        return report
    report.problems += [f"attributes: {e}" for e in validate(attrs, attrs_schema())]
    if report.problems:
        return report
    data = loc.read_bytes(MANIFEST_KEY)
    if data is None:
        report.problems.append(f"{MANIFEST_KEY} is missing")
        return report
    if sha256(data) != attrs["manifest_sha256"]:
        report.problems.append(
            f"{MANIFEST_KEY}: sha256 {sha256(data)} differs from the recorded {attrs['manifest_sha256']}"
        )
    try:
        table = pq.read_table(io.BytesIO(data))
    except Exception as e:  # noqa: BLE001
        report.problems.append(f"{MANIFEST_KEY}: unreadable Parquet ({e})")
        return report
    if not table.schema.equals(MANIFEST_SCHEMA):
        report.problems.append(f"{MANIFEST_KEY}: schema differs from schemas/manifest.arrow.json")
        return report
    rows = table.to_pylist()
    if [r["index"] for r in rows] != list(range(len(rows))):
        report.problems.append(f"{MANIFEST_KEY}: rows are not in dataset order 0..{len(rows) - 1}")
    if len({r["id"] for r in rows}) != len(rows):
        report.problems.append(f"{MANIFEST_KEY}: duplicate ids")
    counts = attrs["counts"]
    written = [r for r in rows if r["status"] == "written"]
    if counts["records"] != len(rows) or counts["written"] != len(written):
        report.problems.append(
            f"counts in attributes {counts} disagree with the manifest ({len(rows)} rows, {len(written)} written)"
        )
    _check_blocks(loc, attrs, written, report)
    report.samples_checked = len(written)
    return report


def _check_blocks(loc: Location, attrs: dict, written: list[dict], report: VerifyReport) -> None:
    heads = 1 if attrs["attn_heads"] == "mean" else attrs["num_heads"]
    n_v, dim = attrs["num_visual_tokens"], attrs["visual_dim"]
    by_block = defaultdict(list)
    visual_users = defaultdict(list)
    for r in written:
        by_block[r["block"]].append(r)
        if r["visual_block"] >= 0:
            visual_users[(r["visual_block"], r["visual_row"])].append(r["id"])
    extra = {k.split("/")[1] for k in loc.list_keys("blocks/") if k.count("/") >= 2} - {
        f"b{b:06d}" for b in range(attrs["num_blocks"])
    }
    if extra:
        report.problems.append(f"block directories not in the cache: {sorted(extra)}")
    visual_lengths = {}
    for b in range(attrs["num_blocks"]):
        path = block_path(b)
        try:
            group = loc.group("r")[path]
        except Exception as e:  # noqa: BLE001
            report.problems.append(f"{path}: cannot open ({e})")
            for r in by_block[b]:
                report.bad_samples[r["id"]].append(f"its block {path} is unreadable")
            continue
        arrays, bad = {}, {}
        for name in _array_names(attrs):
            arrays[name], bad[name] = _read_checked(loc, group, path, name, report)
        decoded = {}
        for name in ("attention", "visual", "logit_values", "logit_tail"):
            if arrays.get(name) is None:
                continue
            values, encoding = arrays[name]
            scale = arrays.get(f"{name}_scale")
            decoded[name] = (
                codecs.decode(encoding, values, scale[0] if scale else None)
                if encoding
                else values.astype(np.float32)
            )
        nonfinite = {
            n: ~np.isfinite(v.reshape(v.shape[0], -1)).all(axis=1) for n, v in decoded.items() if v.size
        }
        for n in ("attention", "visual", "logit_values", "logit_ids"):
            if arrays.get(n) is None:
                continue
            shape = arrays[n][0].shape
            want = {"attention": (n_v,), "visual": (n_v, dim)}.get(n)
            if want is not None and shape[1:] != want:
                report.problems.append(
                    f"{path}/{n}: shape {shape}, expected (*, {', '.join(map(str, want))})"
                )
        if arrays.get("logit_ids") is not None and arrays["logit_ids"][0].dtype != np.dtype(
            attrs["logit_id_dtype"]
        ):
            report.problems.append(
                f"{path}/logit_ids: dtype {arrays['logit_ids'][0].dtype}, expected {attrs['logit_id_dtype']}"
            )
        if "visual" in decoded:
            visual_lengths[b] = decoded["visual"].shape[0]
            for row in np.flatnonzero(nonfinite.get("visual", [])):
                for sid in visual_users[(b, int(row))]:
                    report.bad_samples[sid].append(f"visual tokens ({path} row {row}) hold NaN/inf")
            for lo, hi in bad["visual"] + bad.get("visual_scale", []):
                for row in range(lo, hi):
                    for sid in visual_users[(b, row)]:
                        report.bad_samples[sid].append(
                            f"visual tokens ({path} row {row}) are in a damaged chunk"
                        )
        for r in by_block[b]:
            _check_sample(r, arrays, bad, nonfinite, heads, attrs, report)
    for (b, row), ids in visual_users.items():
        if b not in visual_lengths and b < attrs["num_blocks"]:
            continue
        if b >= attrs["num_blocks"] or row >= visual_lengths[b]:
            for sid in ids:
                report.bad_samples[sid].append(
                    f"visual reference (block {b}, row {row}) points outside the arrays"
                )


def _check_sample(
    r: dict, arrays: dict, bad: dict, nonfinite: dict, heads: int, attrs: dict, report: VerifyReport
) -> None:
    sid, why = r["id"], []
    n_ids = len(r["input_ids"])
    n_text = n_ids - (r["visual_start"] + r["num_visual"]) if r["visual_start"] >= 0 else 0
    if r["visual_start"] >= 0 and r["visual_start"] + r["num_visual"] > n_ids:
        why.append("visual positions run past the token ids")
    if any(p < 0 or p >= n_ids - 1 for p in r["logit_positions"] + r["supervised_positions"]):
        why.append("a logit or supervised position is outside the token ids")
    spans = {
        "attention": (
            r["attention_offset"],
            r["attention_rows"],
            heads * n_text if r["visual_start"] >= 0 else 0,
        ),
        "logit_ids": (r["logit_offset"], r["logit_rows"], len(r["logit_positions"])),
    }
    for name, (lo, n, expected) in spans.items():
        if n != expected:
            why.append(f"{name} has {n} rows, its positions need {expected}")
        related = [name] + {"attention": ["attention_scale"], "logit_ids": ["logit_values", "logit_tail"]}[
            name
        ]
        for part in related:
            if part not in arrays or arrays[part] is None:
                continue
            length = arrays[part][0].shape[0]
            if lo < 0 or lo + n > length:
                why.append(f"{part} rows {lo}..{lo + n - 1} are outside the array ({length} rows)")
            if any(a < lo + n and lo < b for a, b in bad.get(part, [])):
                why.append(f"{part} rows are in a damaged chunk")
            if part in nonfinite and nonfinite[part][lo : lo + n].any():
                why.append(f"{part} holds NaN/inf")
        if name == "logit_ids" and arrays.get("logit_ids") is not None:
            ids = arrays["logit_ids"][0][lo : lo + n]
            if ids.size and int(ids.max()) >= attrs["vocab_size"]:
                why.append("a logit id is outside the vocabulary")
    if why:
        report.bad_samples[sid] += why
