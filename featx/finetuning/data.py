"""Batches of images for training and evaluation.

A batch is a list of ``(sample index, epoch)`` pairs: the epoch travels with each sample, so
augmentation needs no shared state and DataLoader workers stay interchangeable. Training
order is a permutation seeded by (seed, epoch): an epoch is the same after a resume.
"""

from __future__ import annotations

import numpy as np
import torch

from .._runtime import Device
from ..data import ImageDataset
from ..data.sources import ImageSource
from ..data.transforms import Preprocessing
from .augment import Augmentation, sample_rng


class LabelledImages(torch.utils.data.Dataset):
    """``(index, epoch)`` -> (uint8 image, label, readable); augmented when an augmentation is given."""

    def __init__(self, source: ImageSource, pre: Preprocessing, augmentation: Augmentation | None = None,
                 seed: int = 0):
        self.images = ImageDataset(source, pre)
        self.labels = np.asarray(source.labels, dtype=np.int64)
        self.augmentation, self.seed = augmentation, seed

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, item):
        index, epoch = item
        image, reason = self.images[index]
        ok = reason == ""
        if ok and self.augmentation is not None:
            image = self.augmentation(image, sample_rng(self.seed, epoch, index))
        return image, int(self.labels[index]), ok


def epoch_batches(indices: np.ndarray, batch_size: int, epoch: int, seed: int, shuffle: bool) -> list[list]:
    """Batches of ``(index, epoch)``; a trailing batch of one joins the previous one (batch norm
    cannot normalise a single image in training mode)."""
    order = np.asarray(indices, dtype=np.int64)
    if shuffle:
        order = order[np.random.default_rng([seed, epoch, 1]).permutation(len(order))]
    batches = [[(int(i), epoch) for i in order[s:s + batch_size]] for s in range(0, len(order), batch_size)]
    if len(batches) > 1 and len(batches[-1]) == 1:
        batches[-2] += batches.pop()
    return batches


def make_loader(dataset: LabelledImages, batches: list[list], workers: int, device: Device):
    return torch.utils.data.DataLoader(
        dataset,
        batch_sampler=batches,
        num_workers=workers,
        pin_memory=device.is_cuda,
        prefetch_factor=4 if workers else None,
        generator=torch.Generator(),  # leave the global generator (dropout) alone
    )
