"""InternVL (transformers' InternVLForConditionalGeneration): nothing family-specific is needed.

Facts the generic code relies on (checked by tests/test_families.py):
- the chat template writes <IMG_CONTEXT> once per image; the processor replaces it with
  <img> + <IMG_CONTEXT> * (image_seq_length * tiles) + </img>, so only <IMG_CONTEXT> positions are
  visual (the <img> / </img> markers are text);
- with crop_to_patches the GotOcr2 image processor tiles an image into up to max_patches crops of
  its size on the best aspect-ratio grid, plus a thumbnail when there is more than one crop;
  pixel_values are (tiles, 3, H, W): a batch concatenates them along dim 0 (the generic collate);
- each tile gives image_seq_length = (size / patch)^2 * downsample_ratio^2 tokens (pixel shuffle).
"""
