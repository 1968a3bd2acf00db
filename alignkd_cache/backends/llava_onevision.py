"""LLaVA-OneVision (anyres): what transformers does not expose generically.

The processor returns pixel_values (n_images, n_patches, 3, H, W) per sample, the patch count
depending on the image's best grid pinpoint; the model unpads each image to the patch count its
image_sizes imply. A batch pads the patch dimension with zeros and concatenates images, image_sizes
and batch_num_images (how many images each sample has: a multi-image sample gets the base crop only,
num_image_tokens + 1 tokens per image, where a single image gets anyres tiles and newline tokens).
"""

from __future__ import annotations

import torch

from alignkd_cache.backends.transformers_vlm import pad_dim


def collate_pixels(per_sample: list[dict]) -> dict:
    present = [p for p in per_sample if p]
    if not present:
        return {}
    return {
        "pixel_values": torch.cat(pad_dim([p["pixel_values"] for p in present], dim=1)),
        "image_sizes": torch.cat([p["image_sizes"] for p in present]),
        "batch_num_images": torch.cat([p["batch_num_images"] for p in present]),
    }
