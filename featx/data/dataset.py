"""The torch view of an image source: decoded, resized and cropped samples for a DataLoader, or
whole batches resized at once for sources that hold their pixels in one uint8 array."""

from __future__ import annotations

import math

import torch

from .images import MAX_RESIZED_PIXELS, ImageDecodeError, ImageReadError
from .sources import ImageSource
from .transforms import Preprocessing


class ImageDataset(torch.utils.data.Dataset):
    """Decode + resize + crop one sample; a failure is reported, never substituted."""

    def __init__(self, source: ImageSource, preprocessing: Preprocessing):
        self.source, self.pre = source, preprocessing

    def __len__(self) -> int:
        return len(self.source)

    def __getitem__(self, i: int):
        """(uint8 image, "") or (zeros, reason). A file that cannot be read (ImageReadError)
        is raised, not recorded: it is a fault of the environment, not of the image."""
        try:
            return self.pre.pil_to_uint8(self.source.image(i)), ""
        except ImageReadError:
            raise
        except ImageDecodeError as exc:
            reason = exc.reason or "unreadable image"
        except Exception as exc:  # MemoryError and any decoder/resizer failure belong to this image
            reason = f"cannot decode or resize image ({type(exc).__name__}: {exc})"
        size = self.pre.crop_size
        return torch.zeros(3, size, size, dtype=torch.uint8), reason


class ArrayBatches:
    """Batches of a source with a ``pixel_shape``, resized and cropped as tensors on ``device``.

    Yields what a DataLoader over :class:`ImageDataset` yields, (uint8 images, reasons), without
    PIL, worker processes or per-image work. An in-memory array cannot fail to decode, and its
    size was checked once for all images (``Preprocessing.batch_resizable``). A batch is cut into
    chunks of at most MAX_RESIZED_PIXELS pixels, the limit one image has on the PIL path, so that
    large images in large batches cannot take the memory of the whole run.
    """

    def __init__(self, source: ImageSource, preprocessing: Preprocessing, batches: list[list[int]],
                 device: torch.device):
        shape = source.pixel_shape()
        if shape is None or not preprocessing.batch_resizable(shape[0], shape[1]):
            raise ValueError(f"{source.spec} cannot be resized in batches with {preprocessing}")
        self.source, self.pre, self.batches, self.device = source, preprocessing, batches, device
        resized = preprocessing.resize_size * math.ceil(preprocessing.resize_size * max(shape[:2]) / min(shape[:2]))
        self.chunk = max(1, MAX_RESIZED_PIXELS // max(resized, shape[0] * shape[1]))

    def __len__(self) -> int:
        return len(self.batches)

    def __iter__(self):
        for rows in self.batches:
            pixels = torch.from_numpy(self.source.pixels(rows)).to(self.device)
            parts = [self.pre.batch_to_uint8(part) for part in pixels.split(self.chunk)]
            yield (parts[0] if len(parts) == 1 else torch.cat(parts)), [""] * len(rows)
