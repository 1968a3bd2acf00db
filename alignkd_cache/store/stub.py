"""The layer-0 stub's files (a `layer0` cache's `layer0/` folder): their manifest and hashes.

layer0.json lists the sha256 of every other file in the folder; the stub's hash is the sha256 of
the text "<file sha256>  <relative path>\\n" over those files, sorted by path. The model side (saving,
loading, recomputing) is alignkd_cache/layer0.py.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

from alignkd_cache.store.provenance import file_sha256

MANIFEST = "layer0.json"
FORMAT = "alignkd-layer0/1"
STUB_DIR = "layer0"  # the stub's folder at the root of a `layer0` cache


def stub_sha256(files: dict[str, str]) -> str:
    """The stub's hash from {relative path: file sha256} (see the module docstring)."""
    text = "".join(f"{files[name]}  {name}\n" for name in sorted(files))
    return hashlib.sha256(text.encode()).hexdigest()


def verify_layer0(stub_dir: str | Path) -> dict:
    """Check every file against layer0.json; returns the manifest or raises a one-line ValueError."""
    stub = Path(stub_dir)
    where = f"layer-0 teacher {stub}"
    try:
        manifest = json.loads((stub / MANIFEST).read_text())
    except (OSError, ValueError) as e:
        raise ValueError(f"{where}: {MANIFEST} is missing or unreadable ({e}); rebuild the stub") from None
    if manifest.get("format") != FORMAT:
        raise ValueError(f"{where}: format {manifest.get('format')!r} is not {FORMAT}; rebuild the stub")
    files = manifest["files"]
    present = {p.relative_to(stub).as_posix() for p in stub.rglob("*") if p.is_file()} - {MANIFEST}
    if present != set(files):
        raise ValueError(
            f"{where}: files {sorted(present ^ set(files))} are extra or missing against {MANIFEST}; "
            "restore the stub from its source or rebuild it"
        )
    for name in sorted(files):
        if file_sha256(stub / name) != files[name]:
            raise ValueError(
                f"{where}: {name} does not match its sha256 in {MANIFEST} (changed or damaged); "
                "restore the stub from its source or rebuild it"
            )
    if stub_sha256(files) != manifest.get("sha256"):
        raise ValueError(f"{where}: the sha256 in {MANIFEST} does not match its file list; rebuild the stub")
    return manifest


def stub_problems(loc, record: dict) -> list[str]:
    """Each stub file in a cache whose content differs from its sha256 in the cache's `layer0`
    record (trust.py has checked the names, sizes and layer0.json against that record)."""
    problems = []
    for name, expected in sorted(record["files"].items()):
        key = f"{STUB_DIR}/{name}"
        if loc.local_root is not None:
            actual = file_sha256(Path(loc.local_root) / key)
        else:
            actual = hashlib.sha256(loc.read_bytes(key) or b"").hexdigest()
        if actual != expected:
            problems.append(
                f"{key}: its sha256 is not the stub's recorded {expected[:16]}... (changed or damaged)"
            )
    return problems
