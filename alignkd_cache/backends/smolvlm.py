"""SmolVLM (Idefics3-style): what transformers does not expose generically.

The processor splits an image into tiles of max_image_size (plus one global tile) and returns
pixel_values (1, n_tiles, 3, H, W) and pixel_attention_mask (1, n_tiles, H, W) per sample, batch
first. The model flattens (batch, tile) and drops tiles that are entirely 0, so a batch pads the
tile dimension with zeros and gives text-only samples all-zero tiles.

The image processor returns each image's tile grid (rows, cols; 0, 0 for an image not split),
which the processor drops from its output; `image_layouts` reads it from the image processor's.
"""

from __future__ import annotations

import math

import torch

from alignkd_cache.backends.transformers_vlm import pad_dim
from alignkd_cache.data import segment


def image_layouts(vlm, processed, images: list) -> list[list[dict]]:
    """Per image: its rows x cols tiles in the processor's order (row by row, each after its
    <row_r_col_c> token: "tile_<r-1>_<c-1>"), then the "global" tile (the whole image), each
    side x side tokens (side^2 = image_seq_len, after the pixel shuffle); an image not split is
    the global tile alone."""
    side = math.isqrt(int(vlm.processor.image_seq_len))
    rows = [r for sample in processed["rows"] for r in sample]
    cols = [c for sample in processed["cols"] for c in sample]
    return [
        [segment(f"tile_{r}_{c}", side, side) for r in range(n_rows) for c in range(n_cols)]
        + [segment("global", side, side)]
        for n_rows, n_cols in zip(rows, cols, strict=True)
    ]


def collate_pixels(per_sample: list[dict]) -> dict:
    present = [p for p in per_sample if p]
    if not present:
        return {}
    batch = {}
    for key in present[0]:
        template = present[0][key]
        rows = [p[key] if p else template.new_zeros((1, 1, *template.shape[2:])) for p in per_sample]
        batch[key] = torch.cat(pad_dim(rows, dim=1))
    return batch
