"""What of a manifest stays in memory once it is checked: per written sample, the numbers the block
plan, the reader, `info`, `verify` and the trainer's normalisers need, as numpy arrays (about 60
bytes a sample with its images). Ids, token lists, paths, layouts and skip reasons stay in the
file (`ManifestFile`), read a row group at a time when a sample is read."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from alignkd_cache.store.manifest import ManifestFile

PER_ROW = {  # column -> numpy dtype (nulls, as on skipped rows, become 0)
    "block": np.int32,
    "attention_offset": np.int64,
    "attention_rows": np.int32,
    "logit_offset": np.int64,
    "logit_rows": np.int32,
}
PER_IMAGE = {"num_visual": np.int32, "visual_blocks": np.int32, "visual_offsets": np.int64}
COLUMNS = ["status", *PER_ROW, "supervised_positions", *PER_IMAGE, "image_keys"]
KEY_DIGITS = 32  # an image key: 32 hex digits, kept as 16 bytes
HEX = np.zeros(256, np.uint8)  # a non-digit reads as 0: its row is refused by the row rules anyway
HEX[np.frombuffer(b"0123456789abcdef", np.uint8)] = np.arange(16)


@dataclass
class ManifestIndex:
    """Per written sample (in dataset order) unless said otherwise."""

    written: np.ndarray  # per manifest row: bool
    rows: np.ndarray  # each written sample's manifest row (its id and lists stay in the file)
    columns: dict[str, np.ndarray]  # PER_ROW, and "supervised" (supervised positions)
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
        """Per sample, its images' visual tokens."""
        sums = np.zeros(len(self), np.int64)
        with_images = np.flatnonzero(self.image_count())  # their images tile the per-image arrays
        if len(with_images):
            sums[with_images] = np.add.reduceat(
                self.images["num_visual"], self.image_start[with_images], dtype=np.int64
            )
        return sums

    @classmethod
    def read(cls, manifest: ManifestFile, batch_size: int) -> ManifestIndex:
        """The index of a manifest another process has checked (trust.adopt)."""
        builder = IndexBuilder(manifest.num_rows)
        for start, batch in manifest.batches(batch_size, COLUMNS):
            builder.add(start, batch)
        return builder.finish()


class IndexBuilder:
    """Collects the index batch by batch while the row rules stream the manifest: the written
    rows' values, appended in place (nothing of a skipped row is kept but its status)."""

    def __init__(self, num_rows: int):
        self.written = np.zeros(num_rows, bool)
        self.skipped = 0
        dtypes = PER_ROW | {"supervised": np.int32, "images": np.int32} | PER_IMAGE | {"image_keys": "V16"}
        self.arrays = {name: Growing(dtype, num_rows) for name, dtype in dtypes.items()}

    def add(self, start: int, batch: pa.RecordBatch) -> None:
        """Index a batch. Only a checked manifest's index is kept: there, only written rows have
        per-image lists, so flattening the whole batch gives the written rows' images."""
        status = batch.column("status")
        written = pc.fill_null(pc.equal(status, "written"), False)
        mask = written.to_numpy(zero_copy_only=False)
        self.written[start : start + batch.num_rows] = mask
        self.skipped += pc.sum(pc.equal(status, "skipped")).as_py() or 0
        add = lambda name, values: self.arrays[name].append(values)  # noqa: E731
        for name in PER_ROW:
            add(name, pc.fill_null(batch.column(name), 0).to_numpy()[mask])
        add("supervised", _lengths(batch.column("supervised_positions"))[mask])
        add("images", _lengths(batch.column("num_visual"))[mask])
        for name in PER_IMAGE:
            add(name, pc.list_flatten(batch.column(name)).to_numpy(zero_copy_only=False))
        add("image_keys", key_bytes(pc.list_flatten(batch.column("image_keys"))))

    def finish(self) -> ManifestIndex:
        arrays = {name: growing.done() for name, growing in self.arrays.items()}
        return ManifestIndex(
            written=self.written,
            rows=np.arange(len(self.written), dtype=_positions(len(self.written)))[self.written],
            columns={name: arrays[name] for name in [*PER_ROW, "supervised"]},
            image_start=np.concatenate(
                [[0], np.cumsum(arrays["images"], dtype=_positions(arrays["images"].sum()))]
            ),
            images={name: arrays[name] for name in PER_IMAGE},
            image_key=arrays["image_keys"],
        )


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
