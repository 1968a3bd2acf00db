"""`alignkd-cache build`: dataset -> teacher forward -> signals -> blocks on disk -> manifest.

The dataset (after --limit) is cut into blocks of `block_size` consecutive samples. Block b holds
the same samples whatever the number of ranks or restarts, and its batches are always the same
slices of it, so its bytes are the same however the build was run. Under torchrun, rank r builds
blocks r, r + N, r + 2N, ...; rank 0 then writes the manifest. --resume skips blocks that have
their manifest part (the commit mark) and rebuilds any other block directory from scratch.

Visual tokens depend on the image only, so each distinct image path is stored once, by the first
sample (in dataset order) that uses it; other samples reference that row. Finalizing checks that
every sample sharing a row has the same image content key.
"""

from __future__ import annotations

import json
import math
import os
import sys
import tempfile
from concurrent.futures import ThreadPoolExecutor
from dataclasses import replace
from functools import partial
from pathlib import Path

import torch

import alignkd_cache
from alignkd_cache import distributed, layer0
from alignkd_cache.backends import load_backend
from alignkd_cache.backends.tokenizer import tokenizer_settings
from alignkd_cache.data import (
    DataError,
    Problem,
    Record,
    SampleDataset,
    Skip,
    pad_id,
    tokenization_for,
    tokenize,
)
from alignkd_cache.interrupt import interrupted, stop_requests
from alignkd_cache.options import BuildOptions
from alignkd_cache.preflight import Preflight, default_report_path, preflight
from alignkd_cache.progress import progress_bar
from alignkd_cache.signals import sample_signal
from alignkd_cache.store.codecs import int_dtype, resolve_preset
from alignkd_cache.store.finalize import finalize
from alignkd_cache.store.location import Location
from alignkd_cache.store.lock import LOCK_NAME, WriterLock, lock_store
from alignkd_cache.store.manifest import block_path, part_key
from alignkd_cache.store.provenance import (
    SCHEMA_VERSION,
    IncompatibleCache,
    check_resume,
    file_sha256,
    now,
)
from alignkd_cache.store.writer import BackgroundWriter, SampleResult


def build_attrs(backend, options: dict, data_path: str | Path, encodings: dict, vocab_size: int) -> dict:
    """The root attributes of a new build; a `layer0` build adds its stub's record (see build.py)."""
    fp = backend.fingerprint()
    return {
        "schema_version": SCHEMA_VERSION,
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
        # What sets each image's visual-token count in the dynamic families (absent from CLIP's).
        "min_pixels",
        "max_pixels",
        "patch_size",
        "temporal_patch_size",
        "merge_size",
        "do_image_splitting",
        "max_image_size",
        "image_grid_pinpoints",
        "crop_to_patches",
        "min_patches",
        "max_patches",
    )
    return {
        "template": template,
        "tokenizer": tokenizer_settings(backend.tokenizer),
        "image": {
            "pad_color": None if backend.pad_color is None else list(backend.pad_color),
            "processor": type(processor).__name__,
            **{k: v for k, v in json.loads(processor.to_json_string()).items() if k in settings},
        },
        "image_key": "sha256-of-padded-rgb",
    }


def _prepare_store(loc: Location, attrs: dict, resume: bool) -> tuple[dict, WriterLock]:
    """Lock --out for this build, then create the root group or check that --resume continues the
    same build. Returns its attrs and the lock (held until dropped). Deletes nothing it did not create:
    any entry in a new --out, even an empty directory, a symlink or a fifo, refuses the build."""
    lock = lock_store(loc, "a cache build")
    entries = [e for e in _entries(loc) if e != LOCK_NAME]
    if not entries:
        loc.group("a").attrs.update(attrs)
        return attrs, lock
    if not resume:
        raise IncompatibleCache(
            f"{loc.url} is not empty; pass --resume to continue that build, or choose a new --out"
        )
    if not loc.exists("zarr.json"):
        raise IncompatibleCache(f"{loc.url} is not empty and is not an alignkd cache; choose a new --out")
    stored = dict(loc.group("r").attrs)
    check_resume(stored, attrs, loc.url)
    _drop_partial_writes(loc)
    return stored, lock


def _drop_partial_writes(loc: Location) -> None:
    """zarr's local store writes `NAME.<uuid>.partial` and renames it: a killed build leaves these."""
    if loc.local_root is not None:
        for leftover in Path(loc.local_root).rglob("*.partial"):
            if leftover.is_file() and not leftover.is_symlink():
                leftover.unlink()


def _entries(loc: Location) -> list[str]:
    root = loc.local_root
    return os.listdir(root) if root is not None else loc.list_keys()


def _plan_visual(outcomes, block_size: int) -> dict[tuple[int, int], tuple[int, int, int]]:
    """(sample index, image k) -> (owner index, block, first token row) of that image's stored
    visual tokens: the first user of an image path stores them, in its block, after the tokens of
    the images stored before it there (the order the writer appends them in)."""
    owner: dict[str, tuple[int, int, int]] = {}
    tokens_in_block: dict[int, int] = {}
    refs: dict[tuple[int, int], tuple[int, int, int]] = {}
    for i, out in enumerate(outcomes):
        if isinstance(out, Skip):
            continue
        for k, (image, n) in enumerate(zip(out.images, out.num_visual, strict=True)):
            if image not in owner:
                b = i // block_size
                owner[image] = (i, b, tokens_in_block.get(b, 0))
                tokens_in_block[b] = owner[image][2] + n
            refs[i, k] = owner[image]
    return refs


def _compute_block(backend, block, outcomes, records, dataset, opts, refs) -> list[SampleResult]:
    lo, hi = block * opts.block_size, min(len(outcomes), (block + 1) * opts.block_size)
    results = {}
    todo = []
    for i in range(lo, hi):
        out = outcomes[i]
        if isinstance(out, Skip):
            results[i] = SampleResult(i, out.id, images=records[i].images, skip_reason=out.reason)
        else:
            todo.append(i)
    batches = [todo[start : start + opts.batch_size] for start in range(0, len(todo), opts.batch_size)]
    load = lambda idx: dataset.collate([dataset[i] for i in idx])  # noqa: E731
    # Decode and preprocess the next batch's images while the teacher runs on this one.
    with ThreadPoolExecutor(1) as loader:
        pending = loader.submit(load, batches[0]) if batches else None
        for n, idx in enumerate(batches):
            batch = pending.result().to(opts.device)
            if n + 1 < len(batches):
                pending = loader.submit(load, batches[n + 1])
            # A layer0 cache stores no attention: no capture, the fastest attention the backend has.
            with torch.inference_mode():
                forward = backend.forward(batch, capture=opts.signals == "stored")
            for j, i in enumerate(idx):
                sample = outcomes[i]
                owner = [refs.get((i, k)) for k in range(len(sample.images))]
                owns = [ref is not None and ref[0] == i for ref in owner]
                # Top-k runs on the device; only the targets come to host memory.
                signal = sample_signal(
                    forward, batch, j, sample, opts, with_visual=owns, vocab=backend.vocab_size
                ).to("cpu")
                visual_refs = [
                    None if ref is None or own else ref[1:] for ref, own in zip(owner, owns, strict=True)
                ]
                results[i] = SampleResult(
                    i, sample.id, sample.images, sample, signal=signal, visual_refs=visual_refs
                )
    return [results[i] for i in range(lo, hi)]


def build_cache(
    teacher: str,
    data: str | Path,
    image_root: str | Path | None,
    out: str,
    options: BuildOptions | None = None,
) -> dict:
    """Build (or resume, `options.resume`) a cache; returns its root attributes on rank 0 (None on
    other ranks).

    Before the teacher loads, a pre-flight check reads every record and image header; its problems
    go to stderr (counts and first cases) and to `options.report` (JSON, default next to `out`)."""
    opts = options or BuildOptions()
    world = distributed.init(opts.device, distributed.BUILD_TIMEOUT)
    checked = preflight(data, image_root, opts.limit, opts.max_image_pixels)
    if checked.problems:
        _report(checked, opts.report or default_report_path(str(out)), opts.on_bad_sample, show=world.main)
    if opts.device.startswith("cuda"):
        opts = replace(opts, device=str(world.device))  # one GPU per rank, by LOCAL_RANK
    tower = {"vision_tower": opts.vision_tower} if opts.vision_tower else {}
    backend = load_backend(teacher, dtype=getattr(torch, opts.dtype), device=opts.device, **tower)
    backend.model.eval()
    # Problems stay in dataset order as skipped rows, under their id (or file position when it has none).
    records = [
        Record(e.id or e.where, (e.image,) if e.image else (), [], e.where) if isinstance(e, Problem) else e
        for e in checked.entries
    ]
    outcomes = _tokenized(records, checked.entries, backend, opts, image_root)
    vocab = backend.vocab_size  # the logits' width: what the targets' ids index
    attrs = build_attrs(backend, opts.recorded(), data, resolve_preset(opts.codecs), vocab)
    loc = Location(out, opts.storage_options)
    with tempfile.TemporaryDirectory(prefix="alignkd-layer0-") as scratch:
        stub = _saved_stub(backend, Path(scratch), attrs) if opts.signals == "layer0" and world.main else None
        attrs, lock = _open_store(loc, attrs, opts.resume, world, stub)  # noqa: F841 - held until return
    if attrs.get("complete"):
        return attrs if world.main else None
    num_blocks = math.ceil(len(outcomes) / opts.block_size)
    blocks = partial(_build_blocks, backend, loc, attrs, records, outcomes, image_root, opts, world)
    world.agreed("to write its blocks", blocks)
    finalized = partial(finalize, loc, attrs, len(outcomes), num_blocks)
    return world.agreed(f"to finalize {loc.url}", finalized if world.main else None)


def _tokenized(records, entries, backend, opts: BuildOptions, image_root) -> list:
    """Each record tokenized with the teacher's tokenizer (or processor), or a Skip saying why not."""
    tok = tokenization_for(backend, opts.template, opts.max_length, image_root)
    outcomes = []
    for record, entry in zip(records, entries, strict=True):
        if isinstance(entry, Problem):
            outcomes.append(Skip(record.id, f"{entry.reason}: {entry.message}"))
            continue
        outcome = tokenize(record, tok)
        if isinstance(outcome, Skip) and opts.on_too_long == "error":
            raise DataError(
                f"{record.where}: sample {record.id!r}: {outcome.reason}; raise --max-length or shorten it"
            )
        outcomes.append(outcome)
    return outcomes


def _saved_stub(backend, scratch: Path, attrs: dict) -> Path:
    """Save the teacher's layer-0 stub under scratch and record it (hash, files, bytes) in attrs."""
    stub = scratch / layer0.STUB_DIR
    sha = layer0.save_layer0(backend, stub)
    manifest = layer0.verify_layer0(stub)
    size = sum((stub / name).stat().st_size for name in manifest["files"])
    attrs["layer0"] = {"format": layer0.FORMAT, "sha256": sha, "files": manifest["files"], "bytes": size}
    return stub


def _open_store(loc: Location, attrs: dict, resume: bool, world: distributed.World, stub: Path | None):
    """On rank 0: lock --out, create it (or check that --resume continues the same build), and upload
    a layer0 build's stub. Every rank returns the store's attrs (a resumed build's are the stored
    ones, complete or not); rank 0 also the lock."""

    def prepare():
        prepared, lock = _prepare_store(loc, attrs, resume)
        if stub is not None:
            for path in sorted(p for p in stub.rglob("*") if p.is_file()):
                loc.write_bytes(f"{layer0.STUB_DIR}/{path.relative_to(stub).as_posix()}", path.read_bytes())
        return prepared, lock

    opened = world.agreed(f"to open {loc.url}", prepare if world.main else None)
    return opened if world.main else (dict(loc.group("r").attrs), None)


def _build_blocks(backend, loc, attrs, records, outcomes, image_root, opts, world) -> None:
    """This rank's blocks (r, r + N, ...) that are not committed yet, written in the background."""
    rank, ranks = world.rank, world.size
    refs = _plan_visual(outcomes, opts.block_size) if opts.signals == "stored" else {}
    dataset = _IndexedDataset(
        outcomes,
        image_root,
        backend.preprocess,
        pad_id(backend.tokenizer),
        backend.pad_color,
        backend.collate_pixels,
    )
    num_blocks = math.ceil(len(outcomes) / opts.block_size)
    mine = [b for b in range(rank, num_blocks, ranks)]
    todo = [b for b in mine if not loc.exists(part_key(b))]
    size = lambda b: min(len(outcomes), (b + 1) * opts.block_size) - b * opts.block_size  # noqa: E731
    written = {"bytes": 0}
    bar = progress_bar(
        sum(size(b) for b in mine),
        f"rank {rank}" if ranks > 1 else "build",
        initial=sum(size(b) for b in mine if b not in todo),
        unit="sample",
        disable=not opts.progress,
    )

    def on_written(block, n, nbytes):
        written["bytes"] += nbytes

    if world.main and len(todo) < len(mine):
        print(f"resuming from sample {_committed(loc, num_blocks, size)} of {len(outcomes)}", file=sys.stderr)
    writer = BackgroundWriter(loc, attrs, on_written=on_written)
    try:
        with stop_requests() as stop:
            for b in todo:
                if stop.signum:
                    break
                loc.delete_dir(block_path(b))  # an interrupted write of this block, if any
                writer.submit(b, _compute_block(backend, b, outcomes, records, dataset, opts, refs))
                bar.update(size(b))
                bar.set_postfix_str(f"{written['bytes'] / 2**20:.1f} MiB written")
    finally:
        writer.close()  # commits every block computed so far: a resume starts after them
        bar.close()
    if stop.signum:
        where = f"at sample {_committed(loc, num_blocks, size)} of {len(outcomes)}"
        raise interrupted(stop.signum, where, f"the samples before it are kept in {loc.url}")


def _committed(loc: Location, num_blocks: int, size) -> int:
    """How many samples the store's committed blocks hold (every rank's)."""
    return sum(size(b) for b in range(num_blocks) if loc.exists(part_key(b)))


def _report(checked: Preflight, path: str | Path, on_bad_sample: str, show: bool) -> None:
    """Print the pre-flight problems and write their full list (if `show`); with on_bad_sample="error", stop."""
    if show:
        checked.write_json(path)
        print("\n".join(checked.lines()), file=sys.stderr)
    if on_bad_sample == "error":
        counts = ", ".join(f"{n} {reason}" for reason, n in checked.counts().items())
        raise DataError(
            f"pre-flight found {len(checked.problems)} bad sample(s) ({counts}); every one is listed in {path}; "
            "fix them, or pass --on-bad-sample skip to build without them",
            "pre-flight",
        )
    if show:
        print(f"pre-flight: skipping them (listed in {path})", file=sys.stderr)


class _IndexedDataset(SampleDataset):
    """SampleDataset addressed by dataset index (skipped entries are never asked for)."""

    def __init__(self, outcomes, image_root, preprocess, pad_id, pad, collate_pixels):
        self.samples, self.image_root, self.preprocess, self.pad_id = outcomes, image_root, preprocess, pad_id
        self.pad = None if pad is None else tuple(pad)
        self.collate_pixels = collate_pixels
