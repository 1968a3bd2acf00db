"""SmolVLM (Idefics3-style): what transformers does not expose generically.

The processor splits an image into tiles of max_image_size (plus one global tile) and returns
pixel_values (1, n_tiles, 3, H, W) and pixel_attention_mask (1, n_tiles, H, W) per sample, batch
first. The model flattens (batch, tile) and drops tiles that are entirely 0, so a batch pads the
tile dimension with zeros and gives text-only samples all-zero tiles.
"""

from __future__ import annotations

import torch

from alignkd_cache.backends.transformers_vlm import pad_dim


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
