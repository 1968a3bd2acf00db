"""Qwen2.5-VL and Qwen3-VL: only the image layout is family-specific; batching is the generic one.

Facts the generic code relies on (checked by tests/test_families.py):
- image token <|image_pad|>, written once per image between <|vision_start|> and <|vision_end|>
  by the chat template; the processor repeats it grid_t * grid_h * grid_w / merge_size**2 times
  (image_grid_thw per image, patches of 14 (2.5) or 16 (3) pixels, merged 2x2);
- pixel_values are flattened patches (sum of patches, C * T * P * P) and image_grid_thw (n, 3):
  a batch concatenates both along dim 0 (the generic collate);
- M-RoPE positions need mm_token_type_ids (the processor's create_mm_token_type_ids, which the
  generic collate builds because the processor class sets return_mm_token_type_ids); without it
  the model silently falls back to 1-D positions;
- Qwen3-VL's deepstack features are added inside the model's forward: the visual tokens kept are
  get_image_features' pooler_output (the merger's output), the ones spliced at the image positions.
"""

from __future__ import annotations

from alignkd_cache.data import segment


def image_layouts(vlm, processed, images: list) -> list[list[dict]]:
    """Per image, its merged patch grid: image_grid_thw (t, h, w) in patches // merge_size, one
    "grid" segment of (h / m) x (w / m) tokens per temporal patch (t is 1 for an image). The merger
    emits each m x m window as one token, windows in row-major order over the resized image."""
    m = int(vlm.image_processor.merge_size)
    layouts = []
    for t, h, w in processed["image_grid_thw"].tolist():
        layouts.append([segment("grid", h // m, w // m) for _ in range(t)])
    return layouts
