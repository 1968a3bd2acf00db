"""zarr's zstd codec with a bounded decode: every chunk decodes into a buffer of exactly the size its
array's metadata gives it (which trust.py bounds), so a forged chunk cannot make a reader allocate more.

A zstd frame states its own decoded size, and zarr's codec (numcodecs) allocates whatever it states.
A chunk forged with a valid CRC32C whose frame states terabytes, or whose zeros really decode to
gigabytes from a few kilobytes, would fill the reader's memory before any check could name it.
Frames whose stated size differs from the chunk's, or that state none (a streaming writer; zarr's
own writer always states it), are refused as damage. `register()` makes this the decoder for the
"zstd" codec name in this process: the stored metadata stays plain zarr, readable by any zarr.
"""

from __future__ import annotations

import math
from functools import partial

import numpy as np
import zarr
from zarr.codecs import ZstdCodec
from zarr.core.buffer.cpu import as_numpy_array_wrapper
from zarr.registry import register_codec

MAGIC = b"\x28\xb5\x2f\xfd"
FCS_FIELD_SIZE = {0: 0, 1: 2, 2: 4, 3: 8}  # by Frame_Content_Size_flag (RFC 8878 3.1.1.1.1)
DICT_ID_FIELD_SIZE = {0: 0, 1: 1, 2: 2, 3: 4}


def stated_size(frame: bytes) -> int | None:
    """The decoded size a zstd frame's header states (RFC 8878 3.1.1.1), or None when it states none."""
    if frame[:4] != MAGIC or len(frame) < 6:
        raise ValueError("not a zstd frame")
    descriptor = frame[4]
    single_segment = bool(descriptor & 0x20)
    fcs_size = FCS_FIELD_SIZE[descriptor >> 6] or (1 if single_segment else 0)
    if fcs_size == 0:
        return None
    start = 5 + (0 if single_segment else 1) + DICT_ID_FIELD_SIZE[descriptor & 0x03]
    field = frame[start : start + fcs_size]
    if len(field) < fcs_size:
        raise ValueError("truncated zstd frame header")
    return int.from_bytes(field, "little") + (256 if fcs_size == 2 else 0)


class BoundedZstdCodec(ZstdCodec):
    def _decode_sync(self, chunk_bytes, chunk_spec):
        expected = math.prod(chunk_spec.shape) * chunk_spec.dtype.to_native_dtype().itemsize
        stated = stated_size(chunk_bytes.as_numpy_array()[:18].tobytes())  # headers are <= 18 bytes
        if stated != expected:
            raise ValueError(
                f"zstd frame states {'no' if stated is None else stated} decoded bytes where the chunk "
                f"holds {expected}"
            )
        decode = partial(self._zstd_codec.decode, out=np.empty(expected, np.uint8))
        return as_numpy_array_wrapper(decode, chunk_bytes, chunk_spec.prototype)


def register() -> None:
    register_codec("zstd", BoundedZstdCodec)
    zarr.config.set({"codecs.zstd": f"{BoundedZstdCodec.__module__}.{BoundedZstdCodec.__qualname__}"})
