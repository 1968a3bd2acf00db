"""Trust, the file walk: a cache is a tree of regular files holding only the keys a cache has.

The walk up front lists every file outside the block directories and the block directories by
name; a block's own files are listed when that block is checked (trust_arrays.check_block), so
opening a cache costs one directory per block, not the ~18 each one holds."""

from __future__ import annotations

import json
import os
import re

from alignkd_cache.signal_spec import STORED_ARRAYS, cache_kind
from alignkd_cache.store.inspection import MAX_JSON_BYTES, Inspection
from alignkd_cache.store.location import Location
from alignkd_cache.store.lock import LOCK_NAME
from alignkd_cache.store.stub import MANIFEST as STUB_MANIFEST
from alignkd_cache.store.stub import STUB_DIR

ARRAYS = (*STORED_ARRAYS, *(f"{name}_scale" for name in STORED_ARRAYS))  # every name a block array may have
KEY = re.compile(
    r"(zarr\.json|manifest\.parquet|blocks/zarr\.json|blocks/b\d{6}/zarr\.json"
    rf"|blocks/b\d{{6}}/({'|'.join(ARRAYS)})/(zarr\.json|c(/0)+))"
)
BLOCK_DIR = re.compile(r"blocks/(b\d{6})/(.*)")


def check_tree(loc: Location, found: Inspection) -> None:
    root = loc.local_root
    if root is not None:
        keys = local_files(str(root), found, blocks=found.block_dirs)
    else:  # a remote store is listed whole (paginated); a block's files are listed again at its check
        keys = []
        for key in loc.list_keys():
            inside = BLOCK_DIR.fullmatch(key)
            if inside:
                found.block_dirs.add(inside[1])
            else:
                keys.append(key)
    found.keys = dict.fromkeys(k for k in keys if k != LOCK_NAME)  # a writer's lock: never read


def local_files(root: str, found: Inspection, prefix: str = "", blocks: set[str] | None = None) -> list[str]:
    """Regular files under root, as store keys (depth first, by name); a symlink or special file
    is a problem, never followed. With `blocks`, block directories (blocks/bNNNNNN) are added to
    it by name instead of walked. Plain strings, no Path objects: a 3.6M-sample cache has about a
    million directories."""
    keys = []
    with os.scandir(os.path.join(root, prefix) if prefix else root) as entries:
        for entry in sorted(entries, key=lambda e: e.name):
            key = prefix + entry.name
            if entry.is_symlink():
                found.add(irregular(key, entry.path, symlink=True))
            elif entry.is_dir(follow_symlinks=False):
                if blocks is not None and prefix == "blocks/" and BLOCK_DIR.fullmatch(key + "/"):
                    blocks.add(entry.name)
                else:
                    keys += local_files(root, found, key + "/", blocks)
            elif entry.is_file(follow_symlinks=False):
                keys.append(key)
            else:
                found.add(irregular(key, entry.path, symlink=False))
    return keys


def irregular(key: str, path: str, symlink: bool) -> str:
    """Why a file that is not a regular one is refused (it is never followed or opened)."""
    if symlink:
        return f"{key!r} is a symlink (to {os.readlink(path)!r}); a cache holds regular files only"
    return f"{key!r} is not a regular file (a device, fifo or socket)"


def block_files(found: Inspection, block_dir: str) -> list[str]:
    """A block directory's files (blocks/bNNNNNN/...), walked as check_tree walks the rest."""
    if found.local_root is None:
        return found.loc.list_keys(f"blocks/{block_dir}/")
    return local_files(found.local_root, found, f"blocks/{block_dir}/")


def check_keys(loc: Location, found: Inspection) -> None:
    stub = stub_keys(found.attrs)
    for key in found.keys:
        if key not in stub:
            check_key(found, key)
    for key in sorted(set(stub) - set(found.keys)):
        found.add(f"{key} is missing (the layer-0 stub lists it)")
    if stub and not found.problems:
        size = sum(loc.size(k) for k in stub if k != f"{STUB_DIR}/{STUB_MANIFEST}")
        if size != found.attrs["layer0"]["bytes"]:
            found.add(
                f"the layer-0 stub's files hold {size} bytes, its attributes say {found.attrs['layer0']['bytes']}"
            )
        _check_stub_manifest(loc, found)


def check_key(found: Inspection, key: str) -> None:
    if not KEY.fullmatch(key):
        found.add(
            f"unexpected file {key!r} (a cache holds only zarr v3 metadata, chunks, the manifest "
            "and, in a layer0 cache, the files its attributes list under layer0/)"
        )


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


def stub_keys(attrs: dict) -> dict[str, str | None]:
    """A layer0 cache's stub files as store keys -> their sha256 (its layer0.json: None)."""
    if cache_kind(attrs) != "layer0":
        return {}
    files = {f"{STUB_DIR}/{name}": sha for name, sha in attrs["layer0"]["files"].items()}
    return files | {f"{STUB_DIR}/{STUB_MANIFEST}": None}
