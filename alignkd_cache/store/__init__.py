"""The zarr + Parquet teacher-signal cache: codecs, writer, reader, checks."""

import os

import pyarrow as pa

from alignkd_cache.store import bounded_zstd

# Before any cache is read in this process (DataLoader workers import this package too).
bounded_zstd.register()


def _arrow_allocator() -> None:
    """Decoding a large manifest allocates hundreds of MB of fresh buffers: with Arrow's mimalloc
    pool that took about 3x the time of jemalloc's or the system allocator's here (1M rows: 3.3 s
    against 0.8-1.0 s; docs/benchmarks.md). A pool the user chose (ARROW_DEFAULT_MEMORY_POOL) is kept."""
    if "ARROW_DEFAULT_MEMORY_POOL" in os.environ or pa.default_memory_pool().backend_name != "mimalloc":
        return
    try:
        pa.set_memory_pool(pa.jemalloc_memory_pool())
    except NotImplementedError:  # a pyarrow built without jemalloc
        pa.set_memory_pool(pa.system_memory_pool())


_arrow_allocator()
