"""InternVL (transformers' InternVLForConditionalGeneration): only the image layout is
family-specific; batching is the generic one.

Facts the generic code relies on (checked by tests/test_families.py):
- the chat template writes <IMG_CONTEXT> once per image; the processor replaces it with
  <img> + <IMG_CONTEXT> * (image_seq_length * tiles) + </img>, so only <IMG_CONTEXT> positions are
  visual (the <img> / </img> markers are text);
- with crop_to_patches the GotOcr2 image processor tiles an image into up to max_patches crops of
  its size on the best aspect-ratio grid, plus a thumbnail when there is more than one crop;
  pixel_values are (tiles, 3, H, W): a batch concatenates them along dim 0 (the generic collate);
- each tile gives image_seq_length = (size / patch)^2 * downsample_ratio^2 tokens (pixel shuffle).
"""

from __future__ import annotations

import math

from alignkd_cache.data import segment


def image_layouts(vlm, processed, images: list) -> list[list[dict]]:
    """Per image: its crops in the image processor's order (row-major over its crop grid), each a
    "tile_<row>_<col>" of side x side tokens (side^2 = image_seq_length, after the pixel shuffle),
    then a "thumbnail" of the same size when there is more than one crop; one crop alone is
    "tile_0_0". The crop count is the image processor's num_patches (the processor drops it from
    its output); the grid is the one its get_optimal_tiled_canvas chose for the image's size,
    checked against that count."""
    from transformers.models.got_ocr2.image_processing_pil_got_ocr2 import get_optimal_tiled_canvas

    side = math.isqrt(int(vlm.processor.image_seq_length))
    ip = vlm.image_processor
    tile = lambda r, c: segment(f"tile_{r}_{c}", side, side)  # noqa: E731
    layouts = []
    for image, n in zip(images, processed["num_patches"], strict=True):
        n = int(n)
        if n == 1:
            layouts.append([tile(0, 0)])
            continue
        cols, rows = get_optimal_tiled_canvas(
            (image.height, image.width), (ip.size.height, ip.size.width), ip.min_patches, ip.max_patches
        )
        if cols * rows + 1 != n:
            raise RuntimeError(
                f"internvl: the image processor made {n} patches, its {rows} x {cols} crop grid plus a thumbnail"
            )
        layouts.append(
            [tile(r, c) for r in range(rows) for c in range(cols)] + [segment("thumbnail", side, side)]
        )
    return layouts
