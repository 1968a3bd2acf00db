"""The zarr + Parquet teacher-signal cache: codecs, writer, reader, checks."""

from alignkd_cache.store import bounded_zstd

# Before any cache is read in this process (DataLoader workers import this package too).
bounded_zstd.register()
