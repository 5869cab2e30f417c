"""Datasets by name: built-ins, Fashion-MNIST, torchvision sets, folders, CSV files, WebDataset shards
and Hugging Face datasets saved to disk."""

from __future__ import annotations

import re
from collections.abc import Callable
from pathlib import Path

import numpy as np

from .._lazy import lazy_getattr
from ..errors import UnknownDatasetError, UsageError, did_you_mean
from .sources import (
    ImageSource,
    default_data_root,
    load_csv,
    load_digits_source,
    load_fashion_mnist,
    load_folder,
)
from .torchvision_sets import TORCHVISION_DATASETS, load_torchvision

__all__ = [
    "ImageSource",
    "Preprocessing",
    "ImageDataset",
    "open_dataset",
    "stratified_limit",
    "smallest_working_limit",
    "dataset_names",
]

BUILTIN = ("digits", "fashion-mnist")
#: ``PREFIX:`` of datasets read from the user's files, and what follows the prefix
PREFIXES = {"folder": "PATH", "csv": "FILE", "wds": "GLOB", "hf-disk": "PATH"}

# torch and torchvision load on first use of what needs them: naming datasets needs neither
__getattr__ = lazy_getattr(globals(), {"ImageDataset": ".dataset", "Preprocessing": ".transforms"})


def dataset_names() -> list[str]:
    return list(BUILTIN) + sorted(TORCHVISION_DATASETS)


def open_dataset(spec: str, data_root: str | Path | None = None, download: bool = True,
                 hash_content: bool = False) -> ImageSource:
    """Resolve a dataset spec (``digits``, ``fashion-mnist``, ``cifar10``, ``folder:PATH``, ``csv:FILE``,
    ``wds:GLOB``, ``hf-disk:PATH``).

    ``hash_content``: fingerprint image files by the sha256 of their bytes instead of their
    size, times and inode (folders, CSV files, tar shards and Arrow files; in-memory sets always
    hash their pixels).
    """
    if not isinstance(spec, str) or not spec.strip():
        raise UnknownDatasetError("A dataset is required, e.g. digits, fashion-mnist, folder:PATH or csv:FILE.")
    spec = spec.strip()
    root = Path(data_root).expanduser() if data_root else None
    kind, colon, rest = spec.partition(":")
    if kind in PREFIXES and not rest.strip():
        raise UnknownDatasetError(f"{kind}: needs a {PREFIXES[kind]} after the colon, e.g. {kind}:{PREFIXES[kind]}.")
    if kind in ("folder", "csv"):
        return (load_folder if kind == "folder" else load_csv)(rest, hash_content=hash_content)
    if kind == "wds":
        from .wds import load_wds

        return load_wds(rest, hash_content=hash_content)
    if kind == "hf-disk":
        from .hf_disk import load_hf_disk

        return load_hf_disk(rest, hash_content=hash_content)
    if colon and re.fullmatch(r"[A-Za-z][\w-]*", kind) and not Path(spec).exists():
        raise UnknownDatasetError(
            f"Unknown dataset prefix {kind + ':'!r} in {spec!r}.{did_you_mean(kind, PREFIXES)} Valid prefixes: "
            + ", ".join(f"{p}:{what}" for p, what in PREFIXES.items()) + "."
        )
    name = spec.lower().replace("_", "-")
    aliases = {"fashionmnist": "fashion-mnist", "fmnist": "fashion-mnist", "oxford-pets": "oxford-iiit-pet"}
    name = aliases.get(name, name)
    if name == "digits":
        return load_digits_source()
    if name == "fashion-mnist":
        return load_fashion_mnist(root, download)
    if name in TORCHVISION_DATASETS:
        return load_torchvision(name, root or default_data_root(), download)
    if Path(spec).is_dir():
        raise UnknownDatasetError(f"{spec!r} is a directory; write folder:{spec} to use it as an image folder.")
    raise UnknownDatasetError(
        f"Unknown dataset {spec!r}.{did_you_mean(name, dataset_names())} Valid: "
        + ", ".join(dataset_names())
        + ", folder:PATH (one sub-folder per class), csv:FILE (path,label[,split]), wds:GLOB (WebDataset tar "
        "shards) or hf-disk:PATH (a Hugging Face dataset saved with save_to_disk)."
    )


def stratified_limit(source: ImageSource, limit: int | None, seed: int = 0) -> ImageSource:
    """A seeded subset of ``limit`` samples keeping split and class proportions."""
    if limit is None:
        return source
    if not isinstance(limit, (int, np.integer)) or limit < 1:
        raise UsageError(f"--limit must be a positive integer, got {limit!r}.")
    n = len(source)
    if limit >= n:
        return source
    rng = np.random.default_rng(seed)
    strata = [f"{s}\x00{y}" for s, y in zip(source.splits, source.labels)]
    keys, inverse = np.unique(np.asarray(strata, dtype=object), return_inverse=True)
    counts = np.bincount(inverse, minlength=len(keys))
    quota = counts * (limit / n)
    take = np.floor(quota).astype(np.int64)
    # largest remainders get the leftover places, ties broken by the seeded generator
    order = np.lexsort((rng.random(len(keys)), -(quota - take)))
    take[order[: limit - int(take.sum())]] += 1
    chosen = []
    for k in range(len(keys)):
        members = np.flatnonzero(inverse == k)
        chosen.append(rng.choice(members, size=int(take[k]), replace=False))
    return source.subset(np.sort(np.concatenate(chosen)))


def smallest_working_limit(source: ImageSource, works: Callable[[ImageSource], bool], start: int,
                           seed: int = 0) -> int | None:
    """The smallest ``--limit`` above ``start`` whose seeded subset ``works`` (None: not even all of it).

    Doubling then bisection; the answer is checked, so an uneven boundary costs a larger
    suggestion, never a wrong one.
    """
    n = len(source)
    if not works(source):
        return None
    lo, hi = max(int(start), 1), n
    step = max(lo, 1)
    while lo + step < n and not works(stratified_limit(source, lo + step, seed)):
        lo, step = lo + step, step * 2
    hi = min(n, lo + step)
    while hi - lo > 1:
        mid = (lo + hi) // 2
        if works(stratified_limit(source, mid, seed)):
            hi = mid
        else:
            lo = mid
    return hi
