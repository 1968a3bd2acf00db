"""What of a manifest stays in memory once it is checked: per written sample, the numbers the block
plan, the reader, `info` and `verify` need, as numpy arrays (about 40 bytes a sample with its
images). Ids, offsets, token lists, paths, layouts and skip reasons stay in the file
(`ManifestFile`), read a row group at a time when a sample is read."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from alignkd_cache.store.manifest import ManifestFile

PER_ROW = {"block": np.int32, "attention_rows": np.int32, "logit_rows": np.int32}  # nulls become 0
SPANS = ("attention", "logit")  # the (offset, rows) pairs into a block's flat arrays
PER_IMAGE = {"num_visual": np.int32, "visual_blocks": np.int32, "visual_offsets": np.int64}
COLUMNS = [
    "status",
    *PER_ROW,
    *(f"{k}_offset" for k in SPANS),
    *PER_IMAGE,
    "image_keys",
]
SAMPLES_AT_ONCE = 1 << 20  # samples per slice where a whole-index pass would need large temporaries
KEY_DIGITS = 32  # an image key: 32 hex digits, kept as 16 bytes
HEX = np.zeros(256, np.uint8)  # a non-digit reads as 0: its row is refused by the row rules anyway
HEX[np.frombuffer(b"0123456789abcdef", np.uint8)] = np.arange(16)


@dataclass
class ManifestIndex:
    """Per written sample (in dataset order) unless said otherwise."""

    written: np.ndarray  # per manifest row: bool
    rows: np.ndarray  # each written sample's manifest row (its id and lists stay in the file)
    columns: dict[str, np.ndarray]  # PER_ROW
    block_rows: dict[str, np.ndarray]  # per SPANS kind, per block: its rows (the block's array length)
    misplaced: dict[str, list[tuple[int, int, int]]]  # per kind, the first (sample, offset, expected)
    image_start: np.ndarray  # samples + 1: sample i's images are image_start[i]:image_start[i + 1]
    images: dict[str, np.ndarray]  # per image, in sample order: PER_IMAGE
    image_key: np.ndarray  # per image: its content key's 16 bytes (numpy void, comparable)

    def __len__(self) -> int:
        return len(self.rows)

    def image_count(self) -> np.ndarray:
        """Per sample, its images."""
        return np.diff(self.image_start)

    def image_sample(self) -> np.ndarray:
        """Each image's sample."""
        return np.repeat(np.arange(len(self), dtype=np.int32), self.image_count())

    def sample_of(self, images: np.ndarray) -> np.ndarray:
        """The sample of each of these images."""
        return np.searchsorted(self.image_start, images, "right") - 1

    def visual_tokens(self) -> np.ndarray:
        """Per sample, its images' visual tokens (a checked sample's fit in int32: they are at
        most its max_length tokens). Summed a slice of samples at a time, to bound the temporaries."""
        n, sums = self.images["num_visual"], np.zeros(len(self), np.int32)
        for lo in range(0, len(self), SAMPLES_AT_ONCE):
            start = self.image_start[lo : lo + SAMPLES_AT_ONCE + 1]
            with_images = np.flatnonzero(np.diff(start))  # their images tile n[start[0]:start[-1]]
            if len(with_images):
                sums[lo + with_images] = np.add.reduceat(
                    n[start[0] : start[-1]], start[with_images] - start[0]
                )
        return sums

    @classmethod
    def read(cls, manifest: ManifestFile, batch_size: int, num_blocks: int) -> ManifestIndex:
        """The index of a manifest another process has checked (trust.adopt)."""
        builder = IndexBuilder(manifest.num_rows, num_blocks, keep=0)
        for start, batch in manifest.batches(batch_size, COLUMNS):
            builder.add(start, batch)
        return builder.finish()


class IndexBuilder:
    """Collects the index batch by batch while the row rules stream the manifest: the written
    rows' values, appended in place (nothing of a skipped row is kept but its status). The offsets
    are checked on the way, not kept: each must be the rows before it in its block, and the first
    `keep` that are not are recorded for the plan to word."""

    def __init__(self, num_rows: int, num_blocks: int, keep: int):
        self.written = np.zeros(num_rows, bool)
        self.skipped = 0
        self.block_rows = {kind: np.zeros(num_blocks, np.int64) for kind in SPANS}
        self.misplaced: dict[str, list] = {kind: [] for kind in SPANS}
        self.keep = keep
        dtypes = PER_ROW | {"rows": _positions(num_rows), "image_start": np.int32}
        dtypes |= PER_IMAGE | {"image_keys": "V16"}
        self.arrays = {name: Growing(dtype, num_rows + 1) for name, dtype in dtypes.items()}
        self.arrays["image_start"].append(np.zeros(1, np.int32))  # image counts until finish sums them

    def add(self, start: int, batch: pa.RecordBatch) -> None:
        """Index a batch. Only a checked manifest's index is kept: there, only written rows have
        per-image lists, so flattening the whole batch gives the written rows' images."""
        status = batch.column("status")
        written = pc.fill_null(pc.equal(status, "written"), False)
        mask = written.to_numpy(zero_copy_only=False)
        self.written[start : start + batch.num_rows] = mask
        self.skipped += pc.sum(pc.equal(status, "skipped")).as_py() or 0
        first = self.arrays["block"].size  # this batch's first written sample
        add = lambda name, values: self.arrays[name].append(values)  # noqa: E731
        for name in PER_ROW:
            add(name, pc.fill_null(batch.column(name), 0).to_numpy()[mask])
        self._tile(first, batch, mask)
        add("rows", start + np.flatnonzero(mask))
        add("image_start", _lengths(batch.column("num_visual"))[mask])
        for name in PER_IMAGE:
            add(name, pc.list_flatten(batch.column(name)).to_numpy(zero_copy_only=False))
        add("image_keys", key_bytes(pc.list_flatten(batch.column("image_keys"))))

    def _tile(self, first: int, batch: pa.RecordBatch, mask: np.ndarray) -> None:
        num_blocks = len(self.block_rows["attention"])
        if not num_blocks:  # every written row names a block that is not there: the row rules refuse it
            return
        ints = lambda name: pc.fill_null(batch.column(name), 0).to_numpy()[mask]  # noqa: E731
        block = np.clip(ints("block"), 0, num_blocks - 1)  # a block out of range is refused by the row rules
        for kind in SPANS:
            offset = ints(f"{kind}_offset")
            expected = tile_offsets(block, ints(f"{kind}_rows"), self.block_rows[kind])
            for i in np.flatnonzero(offset != expected)[: self.keep - len(self.misplaced[kind])]:
                self.misplaced[kind].append((first + int(i), int(offset[i]), int(expected[i])))

    def finish(self) -> ManifestIndex:
        arrays = {name: growing.done() for name, growing in self.arrays.items()}
        return ManifestIndex(
            written=self.written,
            rows=arrays["rows"],
            columns={name: arrays[name] for name in PER_ROW},
            block_rows=self.block_rows,
            misplaced=self.misplaced,
            image_start=_running_total(arrays["image_start"]),
            images={name: arrays[name] for name in PER_IMAGE},
            image_key=arrays["image_keys"],
        )


def tile_offsets(block: np.ndarray, rows: np.ndarray, running: np.ndarray) -> np.ndarray:
    """Each row's offset when rows follow each other in their block, in row order: the rows before
    it in its block, `running[block]` of them before these. Adds these rows to `running` (per
    block, updated in place), so a manifest can be tiled a batch at a time."""
    if not len(block):
        return np.zeros(0, np.int64)
    order = None if np.all(block[1:] >= block[:-1]) else np.argsort(block, kind="stable")
    b, r = (block, rows) if order is None else (block[order], rows[order])
    starts = np.flatnonzero(np.concatenate([[True], b[1:] != b[:-1]]))  # each block's run
    expected = np.cumsum(r, dtype=np.int64)  # in place: rows through each row, then before it
    running_before = running[b[starts]].copy()
    running[b[starts]] += np.diff(np.concatenate([[0], expected[starts[1:] - 1], expected[-1:]]))
    expected -= r
    expected += np.repeat(running_before - expected[starts], np.diff(np.append(starts, len(b))))
    if order is None:
        return expected
    unsorted = np.empty_like(expected)
    unsorted[order] = expected
    return unsorted


def _running_total(counts: np.ndarray) -> np.ndarray:
    """0 and the image counts, summed in place where the total fits their int32."""
    if counts.sum(dtype=np.int64) < 2**31:
        return np.cumsum(counts, out=counts)
    return np.cumsum(counts, dtype=np.int64)


def _positions(count: int) -> type:
    """The narrowest index type for positions 0..count (int32 up to 2**31 - 1: 4 bytes a sample)."""
    return np.int32 if count < 2**31 else np.int64


class Growing:
    """A numpy array appended to in place: its pages are touched only as they are written, and
    growing or trimming it reallocates without a second copy held (no per-batch pieces to join)."""

    def __init__(self, dtype, capacity: int):
        self.array, self.size = np.empty(max(1, capacity), dtype), 0

    def append(self, values: np.ndarray) -> None:
        end = self.size + len(values)
        if end > len(self.array):
            self.array.resize(max(end, 2 * len(self.array)), refcheck=False)
        self.array[self.size : end] = values
        self.size = end

    def done(self) -> np.ndarray:
        self.array.resize(self.size, refcheck=False)
        return self.array


def _lengths(lists: pa.Array) -> np.ndarray:
    return pc.fill_null(pc.list_value_length(lists), 0).to_numpy()


def key_bytes(keys: pa.Array) -> np.ndarray:
    """32-hex-digit keys as 16-byte numpy voids: equal exactly when the keys are. A null or a key
    of another length reads as zeros (its row is refused by the row rules)."""
    zeros = "0" * KEY_DIGITS
    keys = pc.fill_null(keys, zeros)
    keys = pc.if_else(pc.equal(pc.binary_length(keys), KEY_DIGITS), keys, zeros)
    if not len(keys):
        return np.zeros(0, "V16")
    offsets = np.frombuffer(keys.buffers()[1], np.int32)[keys.offset : keys.offset + 1]
    digits = np.frombuffer(keys.buffers()[2], np.uint8)[offsets[0] : offsets[0] + KEY_DIGITS * len(keys)]
    nibbles = HEX[digits].reshape(len(keys), KEY_DIGITS // 2, 2)
    return np.ascontiguousarray(nibbles[:, :, 0] << 4 | nibbles[:, :, 1]).view("V16").ravel()
