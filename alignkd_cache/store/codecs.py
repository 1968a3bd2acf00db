"""Encodings of the teacher signals: explicit numpy transforms, then zstd and a CRC32C per chunk.

An encoding turns float32 values into a stored array (and, for scaled encodings, a float32 scale
array), and back. zarr has no bfloat16 or float8 dtype, so those are stored as uint16 / uint8 bit
patterns; the encoding name in the array's attributes says how to read them. Every transform clamps
before it quantises, because fixed-point codecs silently wrap out-of-range values.

Encodings (x = float32 input; "row" = the last axis):
- f32:        x as is (lossless).
- f16:        float16, clamped to +-65504.
- bf16:       bfloat16 (round to nearest even) as uint16 bits.
- fixed_u16:  round(clip(x, 0, 1) * 65535) as uint16: for probabilities; abs error <= 7.7e-6.
- sqrt_u8:    per row m = max(sqrt(x)); round(sqrt(clip(x,0,1)) / m * 255) as uint8, m stored as
              scale: companding keeps small probabilities, the row scale keeps the peaks.
- fp8_row:    per row s = max|x| / 448; float8 e4m3 of x / s as uint8 bits, s stored as scale
              (a plain cast overflows to NaN above 448).
Integer signals (token ids, sample counts) are always lossless: uint16 when every value fits, else
int32.
"""

from __future__ import annotations

import numpy as np
from zarr.codecs import Crc32cCodec, ZstdCodec

FLOAT_ENCODINGS = ("f32", "f16", "bf16", "fixed_u16", "sqrt_u8", "fp8_row")
SCALED = ("sqrt_u8", "fp8_row")

# Which encoding each preset uses per lossy signal. The numbers behind these choices are in
# docs/benchmarks.md ("Codecs"); benchmarks/codecs.py regenerates them.
PRESETS: dict[str, dict[str, str]] = {
    "lossless": {"attention": "f32", "visual": "f32", "logprobs": "f32"},
    "balanced": {"attention": "sqrt_u8", "visual": "f16", "logprobs": "f16"},
    # fp8_row visual tokens miss the fidelity budget on real signals (loss error 7%), so the
    # smallest preset within it stops at bf16.
    "compact": {"attention": "sqrt_u8", "visual": "bf16", "logprobs": "bf16"},
}

FP8_MAX = 448.0


def _torch():
    """torch, for its bfloat16 and float8 conversions: imported when a chunk in those encodings is
    encoded or decoded, so the cache commands that read no chunk (`info`, `copy`) never load it."""
    import torch

    return torch


# The numpy dtype each encoding stores (zarr has no bfloat16 or float8: their bits as unsigned ints).
STORED_DTYPE = {"f32": "float32", "f16": "float16", "bf16": "uint16", "fixed_u16": "uint16"}
STORED_DTYPE |= {"sqrt_u8": "uint8", "fp8_row": "uint8"}
RAW_DTYPE = "uint16"  # an array stored without an encoding: sampled targets' draw counts


def encode(encoding: str, x: np.ndarray) -> tuple[np.ndarray, np.ndarray | None]:
    """float32 array -> (stored array, per-row float32 scale or None)."""
    x = np.ascontiguousarray(x, dtype=np.float32)
    if encoding == "f32":
        return x, None
    if encoding == "f16":
        return np.clip(x, -65504, 65504).astype(np.float16), None
    if encoding == "bf16":
        torch = _torch()
        return torch.from_numpy(x).to(torch.bfloat16).view(torch.int16).numpy().view(np.uint16), None
    if encoding == "fixed_u16":
        return np.rint(np.clip(x, 0.0, 1.0) * 65535.0).astype(np.uint16), None
    if encoding == "sqrt_u8":
        root = np.sqrt(np.clip(x, 0.0, 1.0))
        scale = root.max(axis=-1) if root.shape[-1] else np.zeros(root.shape[:-1], np.float32)
        safe = np.where(scale > 0, scale, 1.0)[..., None]
        return np.rint(root / safe * 255.0).astype(np.uint8), scale.astype(np.float32)
    if encoding == "fp8_row":
        peak = np.abs(x).max(axis=-1) if x.shape[-1] else np.zeros(x.shape[:-1], np.float32)
        scale = (peak / FP8_MAX).astype(np.float32)
        safe = np.where(scale > 0, scale, 1.0)[..., None]
        scaled = np.clip(x / safe, -FP8_MAX, FP8_MAX)
        torch = _torch()
        bits = torch.from_numpy(scaled).to(torch.float8_e4m3fn).view(torch.uint8).numpy()
        return bits, scale
    raise ValueError(f"unknown encoding {encoding!r}; choose one of {FLOAT_ENCODINGS}")


def decode(encoding: str, stored: np.ndarray, scale: np.ndarray | None = None) -> np.ndarray:
    """Inverse of `encode`, to float32."""
    if encoding == "f32":
        return np.asarray(stored, dtype=np.float32)
    if encoding == "f16":
        return stored.astype(np.float32)
    if encoding == "bf16":
        torch = _torch()
        bits = torch.from_numpy(np.ascontiguousarray(stored).view(np.int16))
        return bits.view(torch.bfloat16).float().numpy()
    if encoding == "fixed_u16":
        return stored.astype(np.float32) / np.float32(65535.0)
    if encoding == "sqrt_u8":
        root = stored.astype(np.float32) / np.float32(255.0) * scale[..., None]
        return root * root
    if encoding == "fp8_row":
        torch = _torch()
        values = torch.from_numpy(np.ascontiguousarray(stored)).view(torch.float8_e4m3fn).float().numpy()
        return values * scale[..., None]
    raise ValueError(f"unknown encoding {encoding!r}; choose one of {FLOAT_ENCODINGS}")


def int_dtype(max_value: int) -> np.dtype:
    """The stored dtype of ids up to max_value: uint16 when they fit (vocabularies up to 65,536, so
    every LLaMA-family one), else int32. Logit ids use it (`logit_id_dtype`); sampled targets' draw
    counts are always uint16 (--draws is at most 4096)."""
    return np.dtype(np.uint16) if max_value <= np.iinfo(np.uint16).max else np.dtype(np.int32)


def compressors() -> list:
    """zstd level 1 (level barely matters for these data, speed does), then a CRC32C so that any
    flipped bit in a chunk is an error instead of a silently wrong number."""
    return [ZstdCodec(level=1), Crc32cCodec()]


def resolve_preset(name: str) -> dict[str, str]:
    if name not in PRESETS:
        raise ValueError(f"unknown codec preset {name!r}; choose one of {sorted(PRESETS)}")
    return dict(PRESETS[name])
