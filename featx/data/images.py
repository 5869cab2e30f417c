"""Decoding images safely.

A file that cannot be decoded is reported, never replaced: the caller gets the reason and
records the sample as not ok. Decompression bombs (images whose header claims far more
pixels than any real photo) are refused before their pixels are allocated.
"""

from __future__ import annotations

import io
import warnings
from pathlib import Path

import numpy as np
from PIL import Image, UnidentifiedImageError

#: Images above this many pixels are refused as decompression bombs (PIL's default is 89.5M).
MAX_IMAGE_PIXELS = 89_478_485


class ImageDecodeError(Exception):
    """Internal: an image could not be decoded; ``reason`` is short and user-facing."""

    def __init__(self, reason: str):
        super().__init__(reason)
        self.reason = reason


def to_rgb(img: Image.Image) -> Image.Image:
    """Three 8-bit channels whatever the source mode (grayscale, 16-bit, palette, alpha, CMYK)."""
    if img.mode == "RGB":
        return img
    if img.mode in ("I;16", "I;16B", "I;16L", "I", "F"):
        arr = np.asarray(img, dtype=np.float64)
        lo, hi = float(arr.min()), float(arr.max())
        scale = 255.0 / (hi - lo) if hi > lo else 0.0
        img = Image.fromarray(((arr - lo) * scale).round().astype(np.uint8), mode="L")
    if img.mode in ("RGBA", "LA", "PA") or (img.mode == "P" and "transparency" in img.info):
        rgba = img.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        img = Image.alpha_composite(background, rgba)
    return img.convert("RGB")


def decode_image(source: str | Path | bytes) -> Image.Image:
    """Open and fully decode an image; raise ImageDecodeError with a short reason."""
    if isinstance(source, (str, Path)):
        path = Path(source)
        try:
            size = path.stat().st_size
        except OSError as exc:
            raise ImageDecodeError(f"cannot read file: {exc.strerror or exc}") from None
        if size == 0:
            raise ImageDecodeError("empty file (0 bytes)")
        opener = path
    else:
        if len(source) == 0:
            raise ImageDecodeError("empty file (0 bytes)")
        opener = io.BytesIO(source)
    previous = Image.MAX_IMAGE_PIXELS
    try:
        Image.MAX_IMAGE_PIXELS = MAX_IMAGE_PIXELS
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(opener) as img:
                img.load()
                return to_rgb(img)
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        raise ImageDecodeError(f"decompression bomb refused ({exc})") from None
    except UnidentifiedImageError:
        raise ImageDecodeError("not a recognised image format") from None
    except (OSError, SyntaxError, ValueError, EOFError) as exc:
        text = str(exc) or type(exc).__name__
        if "truncated" in text.lower():
            raise ImageDecodeError(f"truncated image ({text})") from None
        raise ImageDecodeError(f"cannot decode image ({text})") from None
    finally:
        Image.MAX_IMAGE_PIXELS = previous
