"""Preprocessing: resize and crop as uint8, normalise on the device.

Workers only resize and crop; the float conversion and mean/std normalisation happen
batched on the device. That moves 4x fewer bytes between processes (and to the GPU) and
keeps one description, ``Preprocessing``, that the cache key records in full. Images held
in memory as one uint8 array skip PIL and workers: whole batches are resized and cropped
as tensors on the device (``batch_to_uint8``), within a couple of grey levels of PIL.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, replace

import torch
from PIL import Image
from torchvision.transforms import InterpolationMode
from torchvision.transforms import functional as TF
from torchvision.transforms.v2 import functional as TF2

from ..errors import UsageError
from .images import ImageDecodeError, check_dimensions

INTERPOLATIONS = {
    "nearest": InterpolationMode.NEAREST,
    "bilinear": InterpolationMode.BILINEAR,
    "bicubic": InterpolationMode.BICUBIC,
}
#: what the batched tensor resize reproduces within a couple of grey levels of PIL; PIL's nearest
#: picks other source pixels than torch's, which would move whole edges
TENSOR_INTERPOLATIONS = ("bilinear", "bicubic")
#: timm's eval crops: ``center`` (shorter side to resize_size, centre crop), ``squash`` (both
#: sides to resize_size, centre crop), ``border`` (longer side to resize_size, pad, centre crop)
CROP_MODES = ("center", "squash", "border")


@dataclass(frozen=True)
class Preprocessing:
    """Everything that turns a decoded image into the model's input tensor."""

    crop_size: int
    resize_size: int  # shorter side before the centre crop
    interpolation: str
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    crop_mode: str = "center"
    #: why the crop is what it is (``featx.data.crop_rule``): ``model``, ``upscaled: no crop`` or
    #: ``explicit``; None where no rule chose it (a model's own default, an entry made before the rule)
    crop_rule: str | None = None

    def __post_init__(self):
        if self.crop_mode not in CROP_MODES:
            raise UsageError(f"Unknown crop mode {self.crop_mode!r}; valid: {', '.join(CROP_MODES)}.")

    @property
    def crop_pct(self) -> float:
        return self.crop_size / self.resize_size

    def to_dict(self) -> dict:
        d = asdict(self)
        d["mean"], d["std"] = list(self.mean), list(self.std)
        if self.crop_mode == "center":
            # the crop every entry before crop modes used: leaving it out keeps their cache keys,
            # and any other mode changes the features, so it is named in the key
            del d["crop_mode"]
        del d["crop_rule"]
        if self.crop_rule not in (None, "explicit"):
            # an explicit --crop-pct is left out, so its entries keep the keys they had before the rule;
            # the other rules are named, so that entries chosen by different rules never share a key
            d["crop_pct"] = round(self.crop_pct, 4)
            d["crop_rule"] = self.crop_rule
        return d

    @classmethod
    def from_dict(cls, d: dict) -> Preprocessing:
        return cls(
            int(d["crop_size"]), int(d["resize_size"]), str(d["interpolation"]),
            tuple(float(v) for v in d["mean"]), tuple(float(v) for v in d["std"]),
            str(d.get("crop_mode", "center")), d.get("crop_rule"),
        )

    def override(self, image_size: int | None = None, crop_pct: float | None = None,
                 interpolation: str | None = None) -> Preprocessing:
        """Apply user overrides; the crop ratio of the model is kept unless given."""
        if image_size is not None and (not isinstance(image_size, int) or image_size < 8):
            raise UsageError(f"--image-size must be an integer >= 8, got {image_size!r}.")
        if crop_pct is not None and not (0.1 <= crop_pct <= 1.0):
            raise UsageError(f"--crop-pct must lie in [0.1, 1.0], got {crop_pct!r}.")
        if interpolation is not None and interpolation not in INTERPOLATIONS:
            raise UsageError(
                f"Unknown interpolation {interpolation!r}; valid: {', '.join(INTERPOLATIONS)}."
            )
        crop = image_size or self.crop_size
        pct = crop_pct if crop_pct is not None else self.crop_pct
        resize = int(math.floor(crop / pct + 1e-9))
        return replace(
            self, crop_size=crop, resize_size=max(resize, crop),
            interpolation=interpolation or self.interpolation,
        )

    def pil_to_uint8(self, img: Image.Image) -> torch.Tensor:
        """RGB PIL image -> uint8 tensor (3, crop, crop); absurd sizes are refused before resizing
        (ImageDecodeError), so one image cannot exhaust the memory of the whole run."""
        check_dimensions(*img.size, resize_to=self.resize_size)
        mode = INTERPOLATIONS[self.interpolation]
        if self.crop_mode == "border":
            from timm.data.transforms import ResizeKeepRatio, center_crop_or_pad

            img = ResizeKeepRatio(self.resize_size, interpolation=self.interpolation, longest=1.0)(img)
            fill = [round(255 * m) for m in self.mean]  # the mean colour (~0 once normalised), as in timm
            img = center_crop_or_pad(img, [self.crop_size, self.crop_size], fill=fill)
        else:
            size = [self.resize_size] * 2 if self.crop_mode == "squash" else self.resize_size
            img = TF.resize(img, size, interpolation=mode, antialias=True)
            img = TF.center_crop(img, [self.crop_size, self.crop_size])
        return TF.pil_to_tensor(img)

    def batch_resizable(self, height: int, width: int) -> bool:
        """Whether ``batch_to_uint8`` may stand in for ``pil_to_uint8`` on images of this size: bilinear or
        bicubic, no border padding (timm pads with PIL), and a size ``check_dimensions`` accepts."""
        if self.crop_mode == "border" or self.interpolation not in TENSOR_INTERPOLATIONS:
            return False
        try:
            check_dimensions(width, height, resize_to=self.resize_size)
        except ImageDecodeError:
            return False
        return True

    def batch_to_uint8(self, batch: torch.Tensor) -> torch.Tensor:
        """uint8 (B, H, W) grey or (B, H, W, 3) RGB -> uint8 (B, 3, crop, crop) on the batch's device: one
        antialiased resize and one crop for the whole batch. Grey images are resized as one channel and
        broadcast to three (PIL's grey-to-RGB conversion copies the channel): a view, as is the crop,
        because the normaliser's float copy is the cheapest place to lay the pixels out."""
        x = batch.unsqueeze(1) if batch.ndim == 3 else batch.permute(0, 3, 1, 2)
        size = [self.resize_size] * 2 if self.crop_mode == "squash" else self.resize_size
        x = TF2.resize(x, size, interpolation=INTERPOLATIONS[self.interpolation], antialias=True)
        return TF2.center_crop(x, [self.crop_size, self.crop_size]).expand(-1, 3, -1, -1)

    def normalizer(self, device: torch.device):
        """Batched uint8 -> normalised float32 on ``device``."""
        scale = torch.tensor([1.0 / (255.0 * s) for s in self.std], device=device).view(1, 3, 1, 1)
        shift = torch.tensor([m / s for m, s in zip(self.mean, self.std)], device=device).view(1, 3, 1, 1)

        def normalise(batch: torch.Tensor) -> torch.Tensor:
            return batch.to(device=device, dtype=torch.float32, non_blocking=True).mul_(scale).sub_(shift)

        return normalise
