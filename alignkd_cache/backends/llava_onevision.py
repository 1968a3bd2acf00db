"""LLaVA-OneVision (anyres): what transformers does not expose generically.

The processor returns pixel_values (n_images, n_patches, 3, H, W) per sample, the patch count
depending on the image's best grid pinpoint; the model unpads each image to the patch count its
image_sizes imply. A batch pads the patch dimension with zeros and concatenates images, image_sizes
and batch_num_images (how many images each sample has: a multi-image sample gets the base crop only,
num_image_tokens + 1 tokens per image, where a single image gets anyres tiles and newline tokens).
Which images get anyres follows batch_num_images as the model reads it (an image of a sample of
one), so the layout does too.
"""

from __future__ import annotations

import math

import torch

from alignkd_cache.backends.transformers_vlm import pad_dim
from alignkd_cache.data import segment


def image_layouts(vlm, processed, images: list) -> list[list[dict]]:
    """Per image, as the model's get_image_features / pack_image_features store its tokens: the
    "base" crop (side x side patches of the tower), then
    - for an image of a sample of one (anyres): "anyres_newline", the crops' patch grid unpadded to
      the image's aspect (the model's own get_anyres_image_grid_shape and unpad_image on
      image_sizes), shrunk as the model shrinks it beyond vision_aspect_ratio's anyres_max_N, with
      one image_newline token ending each row, so rows x (cols + 1) tokens, the last column the
      newlines;
    - otherwise (a multi-image sample: base crop only) a single "newline" token."""
    from transformers.models.llava_onevision.modeling_llava_onevision import (
        get_anyres_image_grid_shape,
        unpad_image,
    )

    config = vlm.model.config
    side = config.vision_config.image_size // config.vision_config.patch_size
    max_patches = int(config.vision_aspect_ratio.removeprefix("anyres_max_"))
    anyres = [n == 1 for n in processed["batch_num_images"] for _ in range(int(n))]
    layouts = []
    for size, patched in zip(processed["image_sizes"], anyres, strict=True):
        base = segment("base", side, side)
        if not patched:
            layouts.append([base, segment("newline", 1, 1)])
            continue
        grid_h, grid_w = get_anyres_image_grid_shape(
            size, config.image_grid_pinpoints, config.vision_config.image_size
        )
        # Only the shape matters: the model unpads its feature map, a meta tensor of that shape here.
        unpadded = unpad_image(torch.empty(1, grid_h * side, grid_w * side, device="meta"), size)
        rows, cols = unpadded.shape[1:]
        ratio = math.sqrt(rows * cols / (max_patches * side**2))
        if ratio > 1.1:  # the model's bilinear shrink
            rows, cols = int(rows // ratio), int(cols // ratio)
        layouts.append([base, segment("anyres_newline", rows, cols + 1)])
    return layouts


def collate_pixels(per_sample: list[dict]) -> dict:
    present = [p for p in per_sample if p]
    if not present:
        return {}
    return {
        "pixel_values": torch.cat(pad_dim([p["pixel_values"] for p in present], dim=1)),
        "image_sizes": torch.cat([p["image_sizes"] for p in present]),
        "batch_num_images": torch.cat([p["batch_num_images"] for p in present]),
    }
