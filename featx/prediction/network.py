"""Images through a network exactly as featx computed its training data: the same decoder, resize,
crop and normalisation, channels_last, the same autocast, one output row per image.

An image that cannot be decoded gets a reason instead of an output (its row is computed on a
blank image and discarded), never a crash: prediction writes no cache, so even a file the
operating system cannot read is only reported. Entries that resized in-memory datasets with the
tensor engine (``featx.extraction.plan.choose_resize_engine``) are reproduced with that engine,
image by image, so a saved copy of a training image gets the features the probe saw.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from .._progress import progress_bar
from .._runtime import Device, cpu_settings, default_workers
from ..data.images import ImageDecodeError, ImageReadError, check_dimensions, decode_image
from ..data.transforms import Preprocessing


@dataclass(frozen=True)
class RunOptions:
    """How the forward pass runs: device and precision, images per batch, loader processes."""

    device: Device
    batch_size: int
    workers: int | None = None
    progress: bool = True


class ImageFiles(torch.utils.data.Dataset):
    """Path ``i`` -> (uint8 image (3, crop, crop), "") or (zeros, reason)."""

    def __init__(self, paths: tuple[Path, ...], pre: Preprocessing, resize_engine: str = "pil"):
        self.paths, self.pre, self.resize_engine = paths, pre, resize_engine

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i: int):
        path = self.paths[i]
        try:
            if not path.is_file():
                raise ImageDecodeError("file not found" if not path.exists() else "not a file")
            image = decode_image(path)
            return (self._tensor_resized(image) if self.resize_engine == "tensor" else self.pre.pil_to_uint8(image)), ""
        except ImageDecodeError as exc:
            reason = exc.reason
        except ImageReadError as exc:
            reason = f"cannot read the file ({str(exc).split(': ', 1)[-1].split(' (')[0]})"
        except Exception as exc:  # any decoder or resizer failure belongs to this image
            reason = f"cannot decode or resize image ({type(exc).__name__}: {exc})"
        size = self.pre.crop_size
        return torch.zeros(3, size, size, dtype=torch.uint8), reason

    def _tensor_resized(self, image) -> torch.Tensor:
        """The tensor engine's resize of one image; grey images as one channel, as it resized them."""
        check_dimensions(*image.size, resize_to=self.pre.resize_size)
        pixels = np.asarray(image)
        if (pixels[..., 0] == pixels[..., 1]).all() and (pixels[..., 0] == pixels[..., 2]).all():
            pixels = pixels[..., 0]
        return self.pre.batch_to_uint8(torch.from_numpy(np.ascontiguousarray(pixels))[None])[0].contiguous()


def run_images(forward: Callable[[torch.Tensor], torch.Tensor], net: torch.nn.Module, paths: tuple[Path, ...],
               pre: Preprocessing, options: RunOptions, resize_engine: str = "pil",
               desc: str = "predict") -> tuple[np.ndarray, list[str]]:
    """(float32 outputs (N, D) of ``forward``, reasons: '' where the image was read) for ``paths``, in order."""
    dev = options.device
    workers = default_workers(dev, in_memory=False) if options.workers is None else options.workers
    workers = min(workers, max(0, (len(paths) - 1) // options.batch_size))  # no process for a single batch
    loader = torch.utils.data.DataLoader(ImageFiles(paths, pre, resize_engine), batch_size=options.batch_size,
                                         num_workers=workers, pin_memory=dev.is_cuda)
    normalise = pre.normalizer(dev.torch_device)
    outputs: list[np.ndarray] = []
    reasons: list[str] = []
    bar = progress_bar(total=len(paths), desc=desc, unit="img", disable=not options.progress)
    with cpu_settings(dev, workers):
        net.to(dev.torch_device).to(memory_format=torch.channels_last).eval()
        try:
            with torch.inference_mode():
                for images, why in loader:
                    x = normalise(images).contiguous(memory_format=torch.channels_last)
                    with dev.autocast():
                        out = forward(x)
                    outputs.append(out.float().cpu().numpy())
                    reasons += list(why)
                    bar.update(len(why))
        finally:
            bar.close()
    return np.concatenate(outputs), reasons
