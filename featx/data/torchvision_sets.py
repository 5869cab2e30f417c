"""torchvision datasets by name, with their own splits.

Sets with an official validation split (Flowers102, DTD, FGVC-Aircraft, Country211) keep it
as ``val``: the probe chooses hyper-parameters on it and never trains on it.
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np

from ..errors import DatasetNotFoundError
from .sources import TorchvisionSource

log = logging.getLogger(__name__)

# name -> (torchvision class, how splits are asked for: "train" flag or a split->argument map)
TORCHVISION_DATASETS: dict[str, tuple[str, object]] = {
    "cifar10": ("CIFAR10", "train"),
    "cifar100": ("CIFAR100", "train"),
    "mnist": ("MNIST", "train"),
    "kmnist": ("KMNIST", "train"),
    "svhn": ("SVHN", {"train": "train", "test": "test"}),
    "stl10": ("STL10", {"train": "train", "test": "test"}),
    "flowers102": ("Flowers102", {"train": "train", "val": "val", "test": "test"}),
    "dtd": ("DTD", {"train": "train", "val": "val", "test": "test"}),
    "oxford-iiit-pet": ("OxfordIIITPet", {"train": "trainval", "test": "test"}),
    "food101": ("Food101", {"train": "train", "test": "test"}),
    "gtsrb": ("GTSRB", {"train": "train", "test": "test"}),
    "fgvc-aircraft": ("FGVCAircraft", {"train": "train", "val": "val", "test": "test"}),
    "country211": ("Country211", {"train": "train", "val": "valid", "test": "test"}),
    "eurosat": ("EuroSAT", None),
}


def _labels_of(ds) -> np.ndarray:
    for attr in ("targets", "labels", "_labels"):
        value = getattr(ds, attr, None)
        if value is not None:
            return np.asarray(value, dtype=np.int64).reshape(-1)
    samples = getattr(ds, "_samples", None) or getattr(ds, "samples", None)
    if samples is not None:
        return np.asarray([s[1] for s in samples], dtype=np.int64)
    log.warning("reading every sample of %s to find its labels", type(ds).__name__)
    return np.asarray([ds[i][1] for i in range(len(ds))], dtype=np.int64)


def _construct(cls, root: Path, arg_name: str | None, arg, download: bool):
    kwargs = {} if arg_name is None else {arg_name: arg}
    return cls(str(root), download=download, **kwargs)


def load_torchvision(name: str, root: Path, download: bool) -> TorchvisionSource:
    import torchvision.datasets as tvd

    cls_name, split_style = TORCHVISION_DATASETS[name]
    cls = getattr(tvd, cls_name)
    if split_style == "train":
        plan = [("train", "train", True), ("test", "train", False)]
    elif split_style is None:
        plan = [("", None, None)]
    else:
        plan = [(split, "split", arg) for split, arg in split_style.items()]

    parts = []
    for split, arg_name, arg in plan:
        try:
            ds = _construct(cls, root, arg_name, arg, download=False)
        except (RuntimeError, FileNotFoundError, OSError) as missing:
            if not download:
                raise DatasetNotFoundError(
                    f"{name} ({cls_name}) is not in {root} ({missing}); downloads are disabled. "
                    "Pass --data-root DIR pointing at a folder that holds it."
                ) from None
            try:
                ds = _construct(cls, root, arg_name, arg, download=True)
            except Exception as exc:  # urllib, socket and ssl errors have no common base
                raise DatasetNotFoundError(
                    f"{name} ({cls_name}) is not in {root} and could not be downloaded ({exc}). "
                    f"Download it once on a machine with internet access into {root} "
                    "(or pass --data-root DIR where it already lies)."
                ) from None
        parts.append((split, ds))

    labels = np.concatenate([_labels_of(ds) for _, ds in parts])
    classes = getattr(parts[0][1], "classes", None)
    if not classes:
        classes = [str(c) for c in range(int(labels.max()) + 1)] if len(labels) else []
    return TorchvisionSource(name, parts, labels, list(classes), root)
