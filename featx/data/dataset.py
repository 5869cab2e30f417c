"""The torch view of an image source: decoded, resized and cropped samples for a DataLoader."""

from __future__ import annotations

import torch

from .images import ImageDecodeError, ImageReadError
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
