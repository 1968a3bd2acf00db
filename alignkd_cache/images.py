"""Image loading as LLaVA and MobileVLM do it: RGB, padded to a centred square.

The padding colour is the image processor's mean, `tuple(int(x * 255) for x in image_mean)`, as
MobileVLM's and LLaVA's `expand2square` use it and transformers' LlavaImageProcessor(do_pad=True)
does. The content key of an image is a hash of its padded pixels (see image_key), so the same
picture saved twice shares one key, and a different file under the same name does not.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
from PIL import Image, UnidentifiedImageError


class ImageError(ValueError):
    pass


def pad_color(image_mean) -> tuple[int, int, int]:
    """The processor's mean as an RGB fill, truncated as the official code truncates it."""
    return tuple(int(x * 255) for x in image_mean)


def pad_to_square(image: Image.Image, color: tuple[int, int, int]) -> Image.Image:
    """`expand2square`: a centred square of the longer side, the rest filled with `color`."""
    w, h = image.size
    if w == h:
        return image
    side = max(w, h)
    canvas = Image.new(image.mode, (side, side), tuple(color))
    canvas.paste(image, ((side - w) // 2, (side - h) // 2))
    return canvas


def image_key(image: Image.Image) -> str:
    """sha256 of the padded RGB pixels: the text of the array shape, e.g. "(32, 32, 3)", then the
    uint8 bytes in (height, width, RGB) order; the first 32 hex digits."""
    pixels = np.asarray(image, dtype=np.uint8)
    digest = hashlib.sha256(f"{pixels.shape}".encode())
    digest.update(pixels.tobytes())
    return digest.hexdigest()[:32]


def load_image(path: str | Path, sample_id: str, pad: tuple[int, int, int]) -> tuple[Image.Image, str]:
    """Return the RGB image padded with `pad` and its content key; a clear error for unreadable files."""
    try:
        with Image.open(path) as raw:
            image = raw.convert("RGB")
    except (UnidentifiedImageError, OSError, ValueError) as e:
        raise ImageError(
            f"sample {sample_id!r}: image {path} is unreadable or corrupt ({e}); replace the file"
        ) from e
    image = pad_to_square(image, pad)
    return image, image_key(image)
