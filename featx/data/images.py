"""Decoding images safely.

A file that cannot be decoded is reported, never replaced: the caller gets the reason and
records the sample as not ok. Only what is wrong with an image's bytes is such a reason
(undecodable or truncated data, a format featx does not read, absurd dimensions, or any
exception the decoder raises on them). A file that cannot be *read* (I/O error, permission,
a file that vanished, a stale network handle) says nothing about the image: it is retried
briefly and then raised as :class:`ImageReadError`, which stops the run so that a later run
can try again, instead of being cached as a bad image for ever.

Only raster formats featx lists are opened (``ALLOWED_FORMATS``): Pillow picks the decoder
from the file's content, and without the list a ``.png`` holding PostScript would be handed
to Ghostscript.
"""

from __future__ import annotations

import io
import logging
import time
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

import numpy as np
from PIL import Image, UnidentifiedImageError

from ..errors import FeatxError

log = logging.getLogger(__name__)

#: Images above this many pixels are refused as decompression bombs (PIL's default is 89.5M).
MAX_IMAGE_PIXELS = 89_478_485
#: Longer side / shorter side above this is refused: resizing the shorter side to the model's
#: input would make the longer one absurdly long (a 3,000,000 x 1 PNG is 8.8 KB on disk).
MAX_ASPECT_RATIO = 100
#: Refused when resizing the shorter side to the preprocessing's size would make more pixels.
MAX_RESIZED_PIXELS = 64 * 1024**2
#: Pillow format names featx opens (the extensions featx lists); PostScript, PDF and the rest
#: are never opened whatever the file is called.
ALLOWED_FORMATS = ("JPEG", "PNG", "BMP", "GIF", "TIFF", "WEBP", "PPM")
#: Reading a file is tried this many times before an OSError is taken as an environment failure.
READ_ATTEMPTS = 3
READ_RETRY_DELAY = 0.2  # seconds before the second attempt; doubled after each failure

T = TypeVar("T")


class ImageDecodeError(Exception):
    """Internal: an image could not be decoded; ``reason`` is short and user-facing."""

    def __init__(self, reason: str):
        super().__init__(reason)
        self.reason = reason


class ImageReadError(FeatxError):
    """A file could not be read because of the environment, not the image (exit code 1).

    Raised in DataLoader workers too: the loader re-creates it in the main process from its
    formatted traceback, from which only the original one-line message is kept.
    """

    def __init__(self, message: str):
        if "Original Traceback" in message:
            message = message.rstrip().rsplit(f"{type(self).__name__}: ", 1)[-1]
        super().__init__(message)


def read_with_retry(read: Callable[[], T], location: str) -> T:
    """``read()``, retried on OSErrors that carry an errno (EIO, EACCES, ENOENT, ESTALE, ...).

    Such errors come from the operating system, not from an image's bytes; when they persist
    they become :class:`ImageReadError`. Decoder errors (no errno) pass through untouched.
    """
    delay = READ_RETRY_DELAY
    for attempt in range(1, READ_ATTEMPTS + 1):
        try:
            return read()
        except OSError as exc:
            if exc.errno is None:
                raise
            if attempt == READ_ATTEMPTS:
                cause = f"[Errno {exc.errno}] {exc.strerror or exc}"
                raise ImageReadError(
                    f"Could not read {location}: {cause} ({READ_ATTEMPTS} attempts). This is a problem "
                    "of the file system, not of the image, so nothing was recorded for it; fix the cause "
                    "(or remove the file from the dataset) and run the same command again: the shards "
                    "already written are kept."
                ) from exc
            log.warning("reading %s failed (%s); retrying in %.1f s", location, exc, delay)
            time.sleep(delay)
            delay *= 2
    raise AssertionError("unreachable")


def check_dimensions(width: int, height: int, resize_to: int | None = None) -> None:
    """Refuse sizes that no real photo has, before their pixels are allocated."""
    short, long = min(width, height), max(width, height)
    if short < 1:
        raise ImageDecodeError(f"image has no pixels ({width}x{height})")
    if long > MAX_ASPECT_RATIO * short:
        raise ImageDecodeError(
            f"absurd size refused: {width}x{height} pixels has an aspect ratio of {long / short:.0f}:1, "
            f"beyond the {MAX_ASPECT_RATIO}:1 featx accepts"
        )
    if resize_to is not None:
        resized = resize_to * int(resize_to * long / short)
        if resized > MAX_RESIZED_PIXELS:
            raise ImageDecodeError(
                f"absurd size refused: resizing {width}x{height} to a shorter side of {resize_to} would "
                f"make {resized:,} pixels (limit {MAX_RESIZED_PIXELS:,})"
            )


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


def sniff_format(data: bytes) -> str | None:
    """Which Pillow format claims these bytes, by its signature check only (no plugin is run)."""
    Image.init()
    prefix = data[:16]
    for name in Image.ID:
        accept = Image.OPEN[name][1]
        try:
            claimed = accept is not None and accept(prefix)
        except Exception:  # a signature check that cannot handle short data claims nothing
            claimed = False
        if claimed is True:
            return name
    return None


def _not_allowed(data: bytes) -> ImageDecodeError:
    found = sniff_format(data)
    if found is None:
        return ImageDecodeError("not a recognised image format")
    return ImageDecodeError(
        f"unsupported format {found} (featx opens only {', '.join(ALLOWED_FORMATS)})"
    )


def _read_file(path: Path) -> bytes:
    with open(path, "rb") as fh:
        return fh.read()


def decode_image(source: str | Path | bytes) -> Image.Image:
    """Fully decode an image held in a file or in bytes; raise ImageDecodeError with a short reason.

    Reading the file happens first and on its own, so that an OSError from the file system
    (ImageReadError) is never mistaken for a property of the image.
    """
    if isinstance(source, (str, Path)):
        path = Path(source)
        data = read_with_retry(lambda: _read_file(path), str(path))
    else:
        data = bytes(source)
    if len(data) == 0:
        raise ImageDecodeError("empty file (0 bytes)")
    previous = Image.MAX_IMAGE_PIXELS
    try:
        Image.MAX_IMAGE_PIXELS = MAX_IMAGE_PIXELS
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(io.BytesIO(data), formats=list(ALLOWED_FORMATS)) as img:
                check_dimensions(*img.size)
                img.load()
                return to_rgb(img)
    except ImageDecodeError:
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        raise ImageDecodeError(f"decompression bomb refused ({exc})") from None
    except UnidentifiedImageError:
        raise _not_allowed(data) from None
    except Exception as exc:  # anything the decoder raises on these bytes is about this image
        text = str(exc) or type(exc).__name__
        if "truncated" in text.lower():
            raise ImageDecodeError(f"truncated image ({text})") from None
        raise ImageDecodeError(f"cannot decode image ({type(exc).__name__}: {text})") from None
    finally:
        Image.MAX_IMAGE_PIXELS = previous
