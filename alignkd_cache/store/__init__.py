"""The zarr + Parquet teacher-signal cache: codecs, writer, reader, checks."""
