"""Where a cache lives: a local directory or an fsspec URL (s3://...), seen as one zarr store.

Every byte the cache writes goes through the zarr store API, the Parquet files included, so local
and remote stores behave the same and need no second I/O layer.
"""

from __future__ import annotations

import io
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import zarr
from zarr.core.buffer import default_buffer_prototype
from zarr.core.sync import sync
from zarr.storage import FsspecStore, LocalStore

from alignkd_cache.store.provenance import IncompatibleCache


class Location:
    def __init__(self, url: str | Path, storage_options: dict | None = None, read_only: bool = False):
        self.url = str(url)
        self.storage_options = storage_options
        if "://" in self.url and not self.url.startswith("file://"):
            self.store = FsspecStore.from_url(self.url, storage_options=storage_options, read_only=read_only)
        else:
            # The user's own path may be a symlink; everything under it is checked (see trust.py).
            path = Path(self.url.removeprefix("file://")).resolve()
            if read_only and path.is_file():
                raise IncompatibleCache(
                    f"{path} is a file, not a cache; give the directory an `alignkd-cache build` wrote (its --out)"
                )
            if read_only and not path.is_dir():
                raise FileNotFoundError(f"no cache at {path}: the directory does not exist")
            self.store = LocalStore(path, read_only=read_only)

    @property
    def local_root(self) -> Path | None:
        """The directory of a local store (None for remote ones)."""
        return Path(self.store.root) if isinstance(self.store, LocalStore) else None

    def group(self, mode: str = "r") -> zarr.Group:
        return zarr.open_group(self.store, mode=mode)

    def read_bytes(self, key: str) -> bytes | None:
        root = self.local_root
        if root is not None:  # one copy, not zarr's buffer and then bytes (a large manifest twice)
            try:
                with open(root / key, "rb") as f:
                    return f.read()
            except (FileNotFoundError, NotADirectoryError):
                return None
        buf = sync(self.store.get(key, prototype=default_buffer_prototype()))
        return None if buf is None else buf.to_bytes()

    def write_bytes(self, key: str, data: bytes) -> None:
        sync(self.store.set(key, default_buffer_prototype().buffer.from_bytes(data)))

    def size(self, key: str) -> int:
        return sync(self.store.getsize(key))

    def exists(self, key: str) -> bool:
        return sync(self.store.exists(key))

    def list_keys(self, prefix: str = "") -> list[str]:
        async def collect():
            return [k async for k in self.store.list_prefix(prefix)]

        return sorted(sync(collect()))

    def chunk_bytes(self, array_path: str) -> int:
        """Bytes of an array's chunk files (its metadata document excluded)."""
        return sum(sync(self.store.getsize(k)) for k in self.list_keys(f"{array_path}/c/"))

    def delete(self, key: str) -> None:
        sync(self.store.delete(key))

    def delete_dir(self, prefix: str) -> None:
        sync(self.store.delete_dir(prefix))

    def is_empty(self) -> bool:
        return sync(self.store.is_empty(""))

    def read_parquet(self, key: str) -> pa.Table:
        data = self.read_bytes(key)
        if data is None:
            raise FileNotFoundError(f"{self.url}: {key} is missing")
        return pq.read_table(pa.BufferReader(data))

    def write_parquet(self, key: str, table: pa.Table) -> None:
        sink = io.BytesIO()
        pq.write_table(table, sink, compression="zstd")
        self.write_bytes(key, sink.getvalue())
