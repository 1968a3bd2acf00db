"""Random access to a finished cache by sample id; safe in DataLoader worker processes.

Array handles are opened lazily and cached per process (after a fork a worker opens its own, so
no remote-filesystem session crosses a fork). Nothing is unpickled: signals come from zarr, the
index from Parquet. `read_many` and `prefetch` overlap reads on threads, because each zarr read
has a fixed per-call cost that batching hides.
"""

from __future__ import annotations

import functools
import os
import threading
from collections import OrderedDict
from collections.abc import Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import torch

from alignkd_cache.signal_spec import stored_heads
from alignkd_cache.signals import LogitTargets, TeacherSignal
from alignkd_cache.store import codecs
from alignkd_cache.store.location import Location
from alignkd_cache.store.manifest import block_path
from alignkd_cache.store.trust import (
    CacheError,
    UntrustedCache,
    adopt,
    check_before_reading,
    chunk_damage,
    open_cache,
)
from alignkd_cache.store.trust_rows import ROWS_PER_BATCH

# An array at most this big is read whole: a zarr call costs milliseconds whatever its size, so
# reading a few MiB whole costs a random reader little more than its slice, and every other sample
# of the block is then served from memory. Bigger arrays (7B-sized attention and visual blocks) are
# always read by slice, so random access never pays for a whole block.
WHOLE_ARRAY_BYTES = 4 * 2**20


class CacheReader:
    """`cache_bytes` bounds the per-process memory of arrays kept whole (see `_rows`); 0 keeps none.
    `checked`: another process of this job has just opened the cache with the full check (see
    `trust.adopt`)."""

    def __init__(
        self,
        url: str,
        storage_options: dict | None = None,
        cache_bytes: int = 256 * 2**20,
        checked: bool = False,
    ):
        self.url, self.storage_options, self.cache_bytes = str(url), storage_options, cache_bytes
        # open_cache refuses a damaged or edited cache up front
        self._found = (adopt if checked else open_cache)(url, storage_options)
        self.loc, self.attrs = self._found.loc, self._found.attrs
        # The index is numbers per row; a row's token lists are decoded from its row group when read.
        self.manifest, self.index = self._found.manifest, self._found.index
        self._reset_process_state()

    @functools.cached_property
    def ids(self) -> list[str]:
        """The written samples' ids in dataset order (built on first use)."""
        return self.manifest.read(["id"]).column("id").filter(pa.array(self.index.written)).to_pylist()

    @property
    def rows(self) -> Iterator[dict]:
        """Every written row as a dict, in dataset order (decoded a row group at a time)."""
        return (self.row_at(i) for i in range(len(self)))

    def supervised_counts(self) -> np.ndarray:
        """Per written sample, its supervised positions (read from the file a batch at a time)."""
        counts = [np.zeros(0, np.int32)]
        for start, batch in self.manifest.batches(ROWS_PER_BATCH, ["supervised_positions"]):
            written = self.index.written[start : start + batch.num_rows]
            counts.append(pc.fill_null(pc.list_value_length(batch.column(0)), 0).to_numpy()[written])
        return np.concatenate(counts)

    def image_counts(self) -> np.ndarray:
        """Per written sample, its images."""
        return self.index.image_count()

    @functools.cached_property
    def _row_of(self) -> dict[str, int]:
        return {sid: i for i, sid in enumerate(self.ids)}

    @functools.cached_property
    def skipped(self) -> dict[str, str]:
        skipped = self.manifest.read(["id", "skip_reason"]).filter(pa.array(~self.index.written))
        return dict(zip(*skipped.to_pydict().values(), strict=True))

    def _reset_process_state(self) -> None:
        self._pid = os.getpid()
        self._handles: dict[tuple[int, str], object] = {}
        self._whole: OrderedDict[tuple[int, str], np.ndarray] = OrderedDict()
        self._whole_bytes = 0
        self._lock = threading.Lock()

    def __len__(self) -> int:
        return len(self.index)

    def row_at(self, i: int) -> dict:
        """The manifest row of the i-th written sample."""
        if not 0 <= i < len(self):
            raise IndexError(f"written sample {i} of {len(self)}")
        return self.manifest.row(int(self.index.rows[i]))

    def row(self, sample_id: str) -> dict:
        if sample_id not in self._row_of:
            why = f"it was skipped: {self.skipped[sample_id]}" if sample_id in self.skipped else "no such id"
            raise KeyError(f"sample {sample_id!r} is not in the cache {self.url} ({why})")
        return self.row_at(self._row_of[sample_id])

    def array(self, block: int, name: str):
        if os.getpid() != self._pid:  # forked worker: open its own handles and store session
            self.loc = self._found.loc = Location(self.url, self.storage_options, read_only=True)
            self._reset_process_state()
        key = (block, name)
        if key not in self._handles:
            with self._lock:
                check_before_reading(self._found, block)  # its files and metadata, once
            self._handles[key] = self.loc.group("r")[f"{block_path(block)}/{name}"]
        return self._handles[key]

    def _rows(self, block: int, name: str, start: int, stop: int) -> np.ndarray:
        """Stored rows start:stop of one block's array: small arrays come whole from a byte-bounded
        LRU (see WHOLE_ARRAY_BYTES), large ones by slice."""
        key = (block, name)
        with self._lock:
            whole = self._whole.get(key)
            if whole is not None:
                self._whole.move_to_end(key)
                return whole[start:stop]
        array = self.array(block, name)
        if array.nbytes > min(WHOLE_ARRAY_BYTES, self.cache_bytes):
            return array[start:stop]
        whole = array[...]
        with self._lock:
            if key not in self._whole:
                self._whole[key] = whole
                self._whole_bytes += whole.nbytes
                while self._whole_bytes > self.cache_bytes:
                    self._whole_bytes -= self._whole.popitem(last=False)[1].nbytes
        return whole[start:stop]

    def _decoded(self, block: int, name: str, start: int, stop: int) -> np.ndarray:
        stored = self._rows(block, name, start, stop)
        encoding = self.array(block, name).attrs.get("encoding")
        if encoding is None:
            return stored
        scale = self._rows(block, f"{name}_scale", start, stop) if encoding in codecs.SCALED else None
        return codecs.decode(encoding, stored, scale)

    def read(self, sample_id: str) -> TeacherSignal:
        """The sample's signals on the teacher's sequence (its manifest row: `row`), float32."""
        return self.read_row(self.row(sample_id))

    def read_row(self, row: dict) -> TeacherSignal:
        """The signals of a manifest row (from `row` or `row_at`)."""
        sample_id = row["id"]
        try:
            return self._read(row)
        except (MemoryError, UntrustedCache):  # UntrustedCache: its block failed its check
            raise
        except Exception as e:  # noqa: BLE001 - zarr's checksum or decode failure: a damaged chunk
            raise CacheError(
                f"{self.url}: sample {sample_id!r} (block {row['block']}) {chunk_damage(e)}, so the cache is damaged; "
                f"run `alignkd-cache verify {self.url}` to list every damaged sample"
            ) from e

    def _read(self, row: dict) -> TeacherSignal:
        b, nv = row["block"], row["num_visual"]
        attention = None
        if row["attention_rows"]:
            a = self._decoded(
                b, "attention", row["attention_offset"], row["attention_offset"] + row["attention_rows"]
            )
            # Rows are as wide as the block's widest sample: this one's visual tokens come first.
            heads = stored_heads(self.attrs["attn_heads"], self.attrs["num_heads"])
            attention = torch.from_numpy(np.ascontiguousarray(a[:, : sum(nv)])).reshape(heads, -1, sum(nv))
        visual = [
            None if vb < 0 else torch.from_numpy(self._decoded(vb, "visual", offset, offset + n))
            for vb, offset, n in zip(row["visual_blocks"], row["visual_offsets"], nv, strict=True)
        ]
        lo, hi = row["logit_offset"], row["logit_offset"] + row["logit_rows"]
        ids = torch.from_numpy(self._rows(b, "logit_ids", lo, hi).astype(np.int64))
        values = torch.from_numpy(self._decoded(b, "logit_values", lo, hi).astype(np.float32))
        tail = None
        if self.attrs["logit_targets"] == "topk":
            tail = torch.from_numpy(self._decoded(b, "logit_tail", lo, hi))
        logits = LogitTargets(
            kind=self.attrs["logit_targets"],
            positions=torch.tensor(row["logit_positions"], dtype=torch.long),
            ids=ids,
            values=values,
            tail=tail,
        )
        return TeacherSignal(attention, visual, logits, row["image_keys"])

    def read_many(self, ids: Iterable[str], threads: int = 8) -> list[TeacherSignal]:
        ids = list(ids)
        if len(ids) <= 1 or threads <= 1:
            return [self.read(i) for i in ids]
        for i in ids:  # open handles once, before threads race to open the same ones
            self.row(i)
        with ThreadPoolExecutor(threads) as pool:
            return list(pool.map(self.read, ids))

    def prefetch(
        self, ids: Iterable[str], batch_size: int = 16, depth: int = 2, threads: int = 8
    ) -> Iterator[list[TeacherSignal]]:
        """Yield batches in order while the next `depth` batches are read in the background."""
        ids = list(ids)
        batches = [ids[i : i + batch_size] for i in range(0, len(ids), batch_size)]
        with ThreadPoolExecutor(max(1, depth)) as pool:
            pending = [pool.submit(self.read_many, b, threads) for b in batches[:depth]]
            for i in range(len(batches)):
                result = pending.pop(0).result()
                if i + depth < len(batches):
                    pending.append(pool.submit(self.read_many, batches[i + depth], threads))
                yield result


class CacheDataset(torch.utils.data.Dataset):
    """A torch Dataset over cached signals (by position in `reader.ids`), for DataLoader workers."""

    def __init__(self, reader: CacheReader, ids: list[str] | None = None):
        self.reader, self.ids = reader, list(reader.ids if ids is None else ids)

    def __len__(self):
        return len(self.ids)

    def __getitem__(self, i) -> TeacherSignal:
        return self.reader.read(self.ids[i])
