"""Image loading as LLaVA and MobileVLM do it: RGB, padded to a centred square with the mean colour.

The content key of an image is a hash of its decoded, padded pixels, so the same picture saved
twice shares one key, and a different file under the same name does not.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
from PIL import Image, UnidentifiedImageError


class ImageError(ValueError):
    pass


def pad_to_square(image: Image.Image) -> Image.Image:
    w, h = image.size
    if w == h:
        return image
    mean = tuple(int(c) for c in np.asarray(image, dtype=np.float64).reshape(-1, 3).mean(0))
    side = max(w, h)
    canvas = Image.new("RGB", (side, side), mean)
    canvas.paste(image, ((side - w) // 2, (side - h) // 2))
    return canvas


def image_key(image: Image.Image) -> str:
    pixels = np.asarray(image, dtype=np.uint8)
    digest = hashlib.sha256(f"{pixels.shape}".encode())
    digest.update(pixels.tobytes())
    return digest.hexdigest()[:32]


def load_image(path: str | Path, sample_id: str) -> tuple[Image.Image, str]:
    """Return the padded RGB image and its content key; a clear error for unreadable files."""
    try:
        with Image.open(path) as raw:
            image = raw.convert("RGB")
    except (UnidentifiedImageError, OSError, ValueError) as e:
        raise ImageError(
            f"sample {sample_id!r}: image {path} is unreadable or corrupt ({e}); replace the file"
        ) from e
    image = pad_to_square(image)
    return image, image_key(image)
