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
- every block's files and every array's zarr.json: format, dtype, shape, chunking, codecs and
  encoding against what the attributes and manifest imply, so nothing is allocated beyond what the
  manifest accounts for.
Opening checks everything but the blocks' insides, whose cost grows with the number of blocks (18
directories and 7 documents each): a reader checks a block before it reads the block's first chunk
(`check_before_reading`), so no chunk is read from an unchecked block, and opening a 3.6M-sample
cache does not walk its million files. `verify`, `copy` and `merge` check every block up front;
`verify` collects every problem and then streams every chunk.
"""

from __future__ import annotations

import json

from alignkd_cache.store.inspection import MAX_PROBLEMS, Inspection
from alignkd_cache.store.location import Location
from alignkd_cache.store.manifest import MANIFEST_KEY, ManifestFile, sha256
from alignkd_cache.store.manifest_index import ManifestIndex
from alignkd_cache.store.provenance import UNFINISHED, IncompatibleCache
from alignkd_cache.store.trust_arrays import check_block, check_block_dirs, check_every_block
from alignkd_cache.store.trust_attrs import check_attrs
from alignkd_cache.store.trust_manifest import check_manifest
from alignkd_cache.store.trust_plan import check_plan
from alignkd_cache.store.trust_rows import ROWS_PER_BATCH, check_rows
from alignkd_cache.store.trust_tree import check_keys, check_tree

# In order; each step trusts what the earlier ones checked.
STEPS = (check_tree, check_attrs, check_keys, check_manifest, check_rows, check_plan, check_block_dirs)
FIX = "the cache is damaged or was edited: get a good copy from its producer, or rebuild it"


class UntrustedCache(IncompatibleCache):
    """A cache that fails the checks: damaged, edited, or not a cache."""


class CacheError(UntrustedCache):
    """A damaged chunk met while reading (open_cache checks metadata only; `verify` reads chunks)."""


def chunk_damage(error: Exception) -> str:
    """What a chunk that failed to read (zarr's CRC32C or decode error) has, for reader and verify."""
    if "checksum" in str(error):
        return "fails its checksum"
    return f"is in a damaged chunk ({type(error).__name__}: {error})"


def open_cache(
    url: str, storage_options: dict | None = None, every_block: bool = False, once_attributes=None
) -> Inspection:
    """The checked cache (attributes, manifest file and index, file list), or UntrustedCache naming the
    problem. Without `every_block`, each block is checked by `check_before_reading`.
    `once_attributes(found)`: called when the files and attributes have passed, before the manifest
    is read (`info` starts its chunk stats there, on a thread)."""
    found = inspect(url, storage_options, every_block=every_block, once_attributes=once_attributes)
    if found.problems == [(None, "zarr.json is missing")]:
        raise UntrustedCache(
            f"{url} is not an alignkd cache (no zarr.json at its root); give the --out of an `alignkd-cache build`"
        )
    if found.problems == [(None, UNFINISHED)]:
        raise UntrustedCache(f"{url}: {UNFINISHED}")
    _refuse(found.url, found.problems)
    return found


def check_before_reading(found: Inspection, block: int) -> None:
    """Check a block of an opened cache once, before its first chunk is read (callers on threads
    hold a lock)."""
    if block in found.block_keys:
        return
    check_block(found, block)
    if found.problems:  # a refused block stays unchecked: the next read is refused again
        del found.block_keys[block]
        problems, found.problems = found.problems, []
        _refuse(found.url, problems)


def _refuse(url: str, problems: list[tuple[str | None, str]]) -> None:
    if problems:
        sample, what = problems[0]
        where = f"sample {sample!r}: " if sample is not None else ""
        more = f" (and {len(problems) - 1} more problem(s))" if len(problems) > 1 else ""
        raise UntrustedCache(f"{url}: {where}{what}{more}; {FIX}")


def inspect(
    url: str,
    storage_options: dict | None = None,
    root: bytes | None = None,
    max_problems: int = MAX_PROBLEMS,
    every_block: bool = True,
    once_attributes=None,
) -> Inspection:
    """Every cheap check, collecting problems (up to max_problems) instead of raising. `root`: the
    root zarr.json to check in place of the stored one (a copy writes it only once verified)."""
    loc = Location(url, storage_options, read_only=True)
    found = Inspection(str(url), loc, root, max_problems)
    for step in STEPS + ((check_every_block,) if every_block else ()):
        step(loc, found)
        if found.problems:  # later steps trust what earlier ones checked
            break
        if step is check_keys and once_attributes is not None:
            once_attributes(found)
    del found.problems[max_problems:]
    return found


def adopt(url: str, storage_options: dict | None = None) -> Inspection:
    """A cache another process of this job has just opened with `open_cache` (torchrun: rank 0),
    without repeating its checks: the attributes and the manifest are read again, and the manifest
    must still have the sha256 the attributes record."""
    loc = Location(url, storage_options, read_only=True)
    found = Inspection(str(url), loc)
    found.attrs = json.loads(loc.read_bytes("zarr.json"))["attributes"]
    data = loc.read_bytes(MANIFEST_KEY)
    if data is None or sha256(data) != found.attrs["manifest_sha256"]:
        raise UntrustedCache(f"{url}: {MANIFEST_KEY} changed after another rank checked it; {FIX}")
    found.manifest = ManifestFile(data)
    found.index = ManifestIndex.read(found.manifest, ROWS_PER_BATCH, found.attrs["num_blocks"])
    check_plan(loc, found)  # the blocks' shapes, for check_before_reading
    return found
