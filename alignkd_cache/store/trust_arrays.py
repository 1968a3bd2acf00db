"""Trust, the blocks: the block directories up front, then each block's files and every array's
zarr.json against the document the writer makes for the plan's shapes, so nothing is allocated
beyond what the manifest accounts for. A reader checks a block before its first chunk is read;
verify, copy and merge check every block before reading any.

A document equal to the writer's passes at the cost of a read and a dict comparison; any other is
examined field by field, which words the first difference."""

from __future__ import annotations

from alignkd_cache.store.inspection import Inspection
from alignkd_cache.store.layout import ArraySpec, array_document, group_document
from alignkd_cache.store.location import Location
from alignkd_cache.store.manifest import block_path
from alignkd_cache.store.provenance import first_difference
from alignkd_cache.store.trust_tree import block_files, check_key


def check_block_dirs(loc: Location, found: Inspection) -> None:
    """Up front: blocks/ is a plain group holding exactly the cache's block directories."""
    expected = {block_dir(b) for b in range(found.attrs["num_blocks"])}
    extra = found.block_dirs - expected
    if extra:
        found.add(
            f"block directories {sorted(extra)} are not among the cache's {found.attrs['num_blocks']} blocks"
        )
    for name in sorted(expected - found.block_dirs)[: found.max_problems]:
        found.add(f"blocks/{name}/zarr.json is missing")
    doc = found.read_json("blocks/zarr.json")
    if doc is not None and doc != group_document():
        found.add("blocks/zarr.json is not a zarr group without attributes")


def check_every_block(loc: Location, found: Inspection) -> None:
    for b in range(found.attrs["num_blocks"]):
        check_block(found, b)
        if found.full:
            return


def check_block(found: Inspection, block: int) -> None:
    """One block's files (regular, and only its group and the arrays the plan gives it) and every
    array's zarr.json; the block's keys join `found.keys`. Readers run it before the block's first
    chunk is read; verify, copy and merge run it for every block up front."""
    path = block_path(block)
    keys = block_files(found, block_dir(block))
    found.keys.update(dict.fromkeys(keys))
    found.block_keys[block] = keys
    specs = found.block_specs(block)
    arrays = {f"{path}/{name}" for name in specs}
    for key in keys:
        check_key(found, key)
    stray = sorted(
        {k.rsplit("/", 1)[0] for k in keys if k.count("/") == 3 and k.endswith("zarr.json")} - arrays
    )
    if stray:
        found.add(
            f"arrays {stray[:5]} are not part of a {found.attrs['logit_targets']} cache with these encodings"
        )
    doc = found.read_json(f"{path}/zarr.json")
    if doc is not None and doc != group_document():
        found.add(f"{path}/zarr.json is not a zarr group without attributes")
    for name in specs:
        _check_array(found, block, name, specs)
        if found.full:
            return


def block_dir(block: int) -> str:
    return block_path(block).split("/")[1]


def _check_array(found: Inspection, block: int, name: str, specs: dict[str, ArraySpec]) -> None:
    spec, path = specs[name], f"{block_path(block)}/{name}"
    doc = found.read_json(f"{path}/zarr.json")
    if doc is None:
        return
    shape = doc.get("shape")
    if name == "logit_ids" and _width_fits(shape, spec):  # the block's widest row; values share it
        found.blocks.logit_width[block] = shape[1]
        spec.shape = specs["logit_values"].shape = (spec.shape[0], shape[1])
    if doc != array_document(spec, spec.shape) and not _examine(found, path, doc, spec):
        return
    chunk_key = f"{path}/c/" + "/".join("0" * len(spec.shape))
    if 0 not in spec.shape and chunk_key not in found.keys:
        found.add(f"{path}: its chunk file is missing")


def _width_fits(shape, spec: ArraySpec) -> bool:
    return (
        isinstance(shape, list)
        and len(shape) == 2
        and isinstance(shape[1], int)
        and 1 <= shape[1] <= spec.shape[1]
    )


def _examine(found: Inspection, path: str, doc: dict, spec: ArraySpec) -> bool:
    """A document other than the writer's: True if it is still the cache's layout, else the first
    problem is recorded."""
    shape = doc.get("shape")
    if doc.get("node_type") != "array" or doc.get("data_type") != spec.dtype:
        found.add(f"{path}: dtype {doc.get('data_type')!r}, expected {spec.dtype}")
        return False
    if not isinstance(shape, list) or len(shape) != len(spec.shape):
        found.add(f"{path}: shape {shape}, expected {list(spec.shape)}")
        return False
    if shape != list(spec.shape):
        found.add(f"{path}: shape {shape}, expected {list(spec.shape)} from the manifest and attributes")
        return False
    problem = _chunking_problem(doc, shape) or _layout_difference(doc, spec)
    if problem:
        found.add(f"{path}: {problem}")
        return False
    return True


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
    want = array_document(spec, doc["shape"])
    grid = {
        **want["chunk_grid"]["configuration"],
        "chunk_shape": doc["chunk_grid"]["configuration"]["chunk_shape"],
    }
    want["chunk_grid"] = {**want["chunk_grid"], "configuration": grid}
    sharding = want["codecs"][0]
    inner = {**sharding["configuration"], "chunk_shape": doc["codecs"][0]["configuration"]["chunk_shape"]}
    want["codecs"] = [{**sharding, "configuration": inner}, *want["codecs"][1:]]
    difference = first_difference(doc, want, "")
    return None if difference is None else f"metadata is not the cache's layout ({difference[:200]})"
