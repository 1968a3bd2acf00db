"""Image loading as LLaVA and MobileVLM do it: RGB, padded to a centred square.

The padding colour is the image processor's mean, `tuple(int(x * 255) for x in image_mean)`, as
MobileVLM's and LLaVA's `expand2square` use it and transformers' LlavaImageProcessor(do_pad=True)
does. The content key of an image is a hash of its padded pixels (see image_key), so the same
picture saved twice shares one key, and a different file under the same name does not.
"""

from __future__ import annotations

import contextlib
import hashlib
import warnings
from pathlib import Path

import numpy as np
from PIL import Image, UnidentifiedImageError


class ImageError(ValueError):
    """An image that cannot be used; `reason` is the kind the pre-flight report counts."""

    def __init__(self, message: str, reason: str = "unreadable image"):
        super().__init__(message)
        self.reason = reason


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


DEFAULT_MAX_PIXELS = 150_000_000
# PIL refuses larger images outright (its decompression-bomb limit), whatever our limit says.
PIL_MAX_PIXELS = 2 * Image.MAX_IMAGE_PIXELS
# Images whose long side is at least twice this are shrunk by an integer factor while decoding; the
# vision towers resize to 224-384 anyway, and a 12000 x 10000 picture would otherwise take gigabytes.
DECODE_SIDE = 2048
_SIXTEEN_BIT = {"I;16", "I;16B", "I;16L", "I;16N", "I"}


def _unreadable(path, sample_id: str, e: Exception) -> ImageError:
    return ImageError(f"sample {sample_id!r}: image {path} is unreadable or corrupt ({e}); replace the file")


def _too_large(path, sample_id: str, size: str, limit: int) -> ImageError:
    return ImageError(
        f"sample {sample_id!r}: image {path} is {size}, over the limit of {limit / 1e6:.0f} Mpixels "
        "(a decompression bomb?); replace it or raise --max-image-pixels",
        "image too large",
    )


@contextlib.contextmanager
def _open(path):
    """Image.open without PIL's DecompressionBombWarning (89-179 Mpixels): --max-image-pixels is the
    limit that decides, and PIL's own hard limit above it still raises."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)
        with Image.open(path) as raw:
            yield raw


def check_image(path: str | Path, sample_id: str, max_pixels: int = DEFAULT_MAX_PIXELS) -> tuple[int, int]:
    """Open the header only (no decode): the size, or ImageError for an unreadable or too large file."""
    try:
        with _open(path) as raw:
            width, height = raw.size
    except Image.DecompressionBombError as e:
        raise _too_large(path, sample_id, f"over {PIL_MAX_PIXELS / 1e6:.0f} Mpixels", PIL_MAX_PIXELS) from e
    except (UnidentifiedImageError, OSError, ValueError) as e:
        raise _unreadable(path, sample_id, e) from e
    if width * height > max_pixels:
        raise _too_large(
            path, sample_id, f"{width}x{height} = {width * height / 1e6:.0f} Mpixels", max_pixels
        )
    return width, height


def _to_rgb(raw: Image.Image) -> Image.Image:
    """RGB as LLaVA's convert("RGB"), except 16-bit grey, which PIL would clip to black and white."""
    if raw.mode in _SIXTEEN_BIT:
        grey = np.clip(np.round(np.asarray(raw, dtype=np.float64) / 257.0), 0, 255).astype(np.uint8)
        return Image.fromarray(grey, mode="L").convert("RGB")
    return raw.convert("RGB")


def load_image(path: str | Path, sample_id: str, pad: tuple[int, int, int] | None) -> tuple[Image.Image, str]:
    """Return the RGB image padded with `pad` and its content key; a clear error for unreadable files.
    pad=None: not padded (a family whose processor takes the image as it is: dynamic resolution, tiles).

    Images up to 2 x DECODE_SIDE on their long side decode exactly as in LLaVA; larger ones are
    shrunk by an integer factor (JPEG while decoding, via draft) so that memory stays bounded."""
    try:
        with _open(path) as raw:
            factor = max(raw.size) // DECODE_SIDE
            if factor >= 2:
                raw.draft("RGB", (raw.width // factor, raw.height // factor))  # JPEG only; else a no-op
            image = _to_rgb(raw)
    except (UnidentifiedImageError, Image.DecompressionBombError, OSError, ValueError) as e:
        raise _unreadable(path, sample_id, e) from e
    factor = max(image.size) // DECODE_SIDE
    if factor >= 2:
        image = image.reduce(factor)
    if pad is not None:
        image = pad_to_square(image, pad)
    return image, image_key(image)
