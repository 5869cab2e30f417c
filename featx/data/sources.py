"""Where images come from.

Every source exposes the same thing: parallel arrays of stable sample ids, integer labels
(-1 when unlabeled) and the source's own split names ("" when it has none), the class
names, a way to decode sample ``i``, and a fingerprint of its content for the cache key.
"""

from __future__ import annotations

import csv
import gzip
import hashlib
import os
import struct
from abc import ABC, abstractmethod
from pathlib import Path

import numpy as np
from PIL import Image

from ..cache.key import strings_digest
from ..errors import DatasetNotFoundError, UsageError
from .images import ImageDecodeError, decode_image, to_rgb

IMAGE_EXTENSIONS = (
    ".jpg", ".jpeg", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm", ".pgm", ".pbm",
)


class ImageSource(ABC):
    """A labelled image collection with stable ids."""

    #: canonical spec, e.g. ``fashion-mnist`` or ``folder:/abs/path``
    spec: str
    classes: list[str]
    ids: np.ndarray  # object (str)
    labels: np.ndarray  # int64, -1 = unlabeled
    splits: np.ndarray  # object (str), "" = no split
    #: images held in memory (cheap to decode) rather than files
    in_memory: bool = False

    def __len__(self) -> int:
        return len(self.ids)

    @abstractmethod
    def image(self, i: int) -> Image.Image:
        """Decoded RGB image of sample ``i``; raises ImageDecodeError."""

    @abstractmethod
    def content_digest(self) -> str:
        """Digest of what the images are (file stats or pixel bytes)."""

    def location(self, i: int) -> str:
        """Where sample ``i`` lives, for error messages."""
        return str(self.ids[i])

    def fingerprint(self) -> dict:
        """Identity of the exact sample list and content; part of the cache key."""
        return {
            "source": self.spec,
            "n": len(self),
            "samples": strings_digest(self.ids, self.labels, self.splits),
            "classes": list(self.classes),
            "content": self.content_digest(),
        }

    def subset(self, indices: np.ndarray) -> ImageSource:
        return SubsetSource(self, np.asarray(indices, dtype=np.int64))


class SubsetSource(ImageSource):
    def __init__(self, base: ImageSource, indices: np.ndarray):
        self.base, self.indices = base, indices
        self.spec, self.classes, self.in_memory = base.spec, base.classes, base.in_memory
        self.ids = base.ids[indices]
        self.labels = base.labels[indices]
        self.splits = base.splits[indices]

    def image(self, i: int) -> Image.Image:
        return self.base.image(int(self.indices[i]))

    def location(self, i: int) -> str:
        return self.base.location(int(self.indices[i]))

    def content_digest(self) -> str:
        h = hashlib.sha256(self.base.content_digest().encode())
        h.update(self.indices.tobytes())
        return h.hexdigest()


class ArraySource(ImageSource):
    """Images held in memory as uint8 arrays (N,H,W) or (N,H,W,C)."""

    in_memory = True

    def __init__(self, spec, images, labels, splits, ids, classes):
        self.spec = spec
        self.images = np.ascontiguousarray(images)
        self.labels = np.asarray(labels, dtype=np.int64)
        self.splits = np.asarray(splits, dtype=object)
        self.ids = np.asarray(ids, dtype=object)
        self.classes = list(classes)
        self._digest: str | None = None

    def image(self, i: int) -> Image.Image:
        return to_rgb(Image.fromarray(self.images[i]))

    def content_digest(self) -> str:
        if self._digest is None:
            h = hashlib.sha256(repr((self.images.shape, self.images.dtype.str)).encode())
            h.update(memoryview(self.images).cast("B"))
            self._digest = h.hexdigest()
        return self._digest


class FileSource(ImageSource):
    """Images stored as files; fingerprinted by relative path, size and mtime."""

    def __init__(self, spec, root: Path, paths: list[Path], labels, splits, ids, classes):
        self.spec, self.root = spec, root
        self.paths = paths
        self.labels = np.asarray(labels, dtype=np.int64)
        self.splits = np.asarray(splits, dtype=object)
        self.ids = np.asarray(ids, dtype=object)
        self.classes = list(classes)

    def image(self, i: int) -> Image.Image:
        return decode_image(self.paths[i])

    def location(self, i: int) -> str:
        return str(self.paths[i])

    def content_digest(self) -> str:
        h = hashlib.sha256()
        for p in self.paths:
            try:
                st = p.stat()
                h.update(f"{p}\t{st.st_size}\t{st.st_mtime_ns}\n".encode())
            except OSError:
                h.update(f"{p}\tmissing\n".encode())
        return h.hexdigest()


class TorchvisionSource(ImageSource):
    """Samples of one or more torchvision dataset objects (one per split)."""

    def __init__(self, spec, parts: list[tuple[str, object]], labels, classes, root: Path):
        self.spec, self.root = spec, root
        self.parts = parts
        self.offsets = np.cumsum([0] + [len(ds) for _, ds in parts])
        self.labels = np.asarray(labels, dtype=np.int64)
        splits, ids = [], []
        for split, ds in parts:
            splits += [split] * len(ds)
            ids += [f"{split or 'all'}/{j:06d}" for j in range(len(ds))]
        self.splits = np.asarray(splits, dtype=object)
        self.ids = np.asarray(ids, dtype=object)
        self.classes = list(classes)
        self.in_memory = all(hasattr(getattr(ds, "data", None), "shape") for _, ds in parts)

    def _locate(self, i: int):
        part = int(np.searchsorted(self.offsets, i, side="right") - 1)
        return self.parts[part][1], i - int(self.offsets[part])

    def image(self, i: int) -> Image.Image:
        ds, j = self._locate(i)
        try:
            img = ds[j][0]
        except (OSError, ValueError, SyntaxError) as exc:
            raise ImageDecodeError(f"cannot decode image ({exc})") from None
        if not isinstance(img, Image.Image):
            img = Image.fromarray(np.asarray(img))
        return to_rgb(img)

    def content_digest(self) -> str:
        h = hashlib.sha256(self.spec.encode())
        for split, ds in self.parts:
            h.update(f"{split}:{type(ds).__name__}:{len(ds)}".encode())
            data = getattr(ds, "data", None)
            if isinstance(data, np.ndarray):
                h.update(memoryview(np.ascontiguousarray(data)).cast("B"))
            elif data is not None and hasattr(data, "numpy"):
                h.update(memoryview(np.ascontiguousarray(data.numpy())).cast("B"))
            else:
                for f in sorted(Path(ds.root).rglob("*")) if hasattr(ds, "root") else []:
                    if f.is_file():
                        st = f.stat()
                        h.update(f"{f}\t{st.st_size}\t{st.st_mtime_ns}\n".encode())
        return h.hexdigest()


# --------------------------------------------------------------------------- built-ins


def load_digits_source() -> ArraySource:
    from sklearn.datasets import load_digits

    d = load_digits()
    images = np.round(d.images * (255.0 / 16.0)).astype(np.uint8)
    n = len(images)
    return ArraySource(
        "digits",
        images,
        d.target,
        [""] * n,
        [f"{i:04d}" for i in range(n)],
        [str(c) for c in d.target_names],
    )


FASHION_MNIST_CLASSES = [
    "T-shirt/top", "Trouser", "Pullover", "Dress", "Coat",
    "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot",
]
_FMNIST_FILES = {
    "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}
DEBIAN_FASHION_MNIST = Path("/usr/share/datasets/fashion-mnist")


def read_idx(path: Path) -> np.ndarray:
    """Read an IDX file (optionally gzipped), the format of MNIST-style datasets."""
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rb") as fh:
        data = fh.read()
    if len(data) < 4 or data[0] != 0 or data[1] != 0 or data[2] != 0x08:
        raise DatasetNotFoundError(f"{path} is not an unsigned-byte IDX file.")
    ndim = data[3]
    shape = struct.unpack(">" + "I" * ndim, data[4 : 4 + 4 * ndim])
    arr = np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * ndim)
    if arr.size != int(np.prod(shape)):
        raise DatasetNotFoundError(f"{path} is truncated: expected {int(np.prod(shape))} values.")
    return arr.reshape(shape)


def _find_idx(directory: Path, stem: str) -> Path | None:
    for name in (stem + ".gz", stem, stem.replace("-idx", ".idx")):
        if (directory / name).is_file():
            return directory / name
    return None


def fashion_mnist_dirs(data_root: Path | None) -> list[Path]:
    dirs = []
    for base in [data_root, Path(os.environ["FEATX_DATA"]) if os.environ.get("FEATX_DATA") else None]:
        if base is not None:
            dirs += [base / "fashion-mnist", base, base / "FashionMNIST" / "raw"]
    dirs.append(DEBIAN_FASHION_MNIST)
    return dirs


def load_fashion_mnist(data_root: Path | None, download: bool) -> ArraySource:
    searched = fashion_mnist_dirs(data_root)
    for d in searched:
        files = {s: [_find_idx(d, stem) for stem in stems] for s, stems in _FMNIST_FILES.items()}
        if all(p is not None for ps in files.values() for p in ps):
            break
    else:
        d = None
    if d is None and download:
        root = (data_root or default_data_root())
        try:
            from torchvision.datasets import FashionMNIST

            for train in (True, False):
                FashionMNIST(str(root), train=train, download=True)
        except Exception as exc:  # network errors come in many types
            raise DatasetNotFoundError(_fmnist_missing(searched, f"download failed: {exc}")) from None
        return load_fashion_mnist(root, download=False)
    if d is None:
        raise DatasetNotFoundError(_fmnist_missing(searched, "downloads are disabled"))

    images, labels, splits, ids = [], [], [], []
    for split, (img_path, lab_path) in files.items():
        x, y = read_idx(img_path), read_idx(lab_path)
        if len(x) != len(y):
            raise DatasetNotFoundError(f"{img_path} and {lab_path} disagree on the number of samples.")
        images.append(x)
        labels.append(y.astype(np.int64))
        splits += [split] * len(x)
        ids += [f"{split}/{j:05d}" for j in range(len(x))]
    return ArraySource(
        "fashion-mnist", np.concatenate(images), np.concatenate(labels), splits, ids,
        FASHION_MNIST_CLASSES,
    )


def _fmnist_missing(searched: list[Path], why: str) -> str:
    where = "\n  ".join(str(p) for p in searched)
    return (
        f"Fashion-MNIST was not found ({why}). Looked for train-images-idx3-ubyte.gz, "
        f"train-labels-idx1-ubyte.gz, t10k-images-idx3-ubyte.gz and t10k-labels-idx1-ubyte.gz in:\n  {where}\n"
        "Install them with `apt-get install dataset-fashion-mnist` (Debian/Ubuntu), put them in "
        "$FEATX_DATA/fashion-mnist, or run once online to download them."
    )


def default_data_root() -> Path:
    if os.environ.get("FEATX_DATA"):
        return Path(os.environ["FEATX_DATA"])
    return Path.home() / ".cache" / "featx" / "datasets"


# --------------------------------------------------------------------------- folders, CSV


def _natural_sorted(names) -> list[str]:
    names = sorted(set(names))
    if names and all(n.lstrip("-").isdigit() for n in names):
        return sorted(names, key=int)
    return names


def _list_images(directory: Path) -> list[Path]:
    return sorted(
        p for p in directory.rglob("*")
        if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS and not p.name.startswith(".")
    )


_SPLIT_DIRS = {"train": "train", "training": "train", "val": "val", "valid": "val",
               "validation": "val", "test": "test", "testing": "test"}


def load_folder(path: str) -> FileSource:
    root = Path(path).expanduser()
    if not root.is_dir():
        raise UsageError(f"Image folder {str(root)!r} does not exist or is not a directory.")
    root = root.resolve()
    subdirs = sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    split_dirs = [p for p in subdirs if p.name.lower() in _SPLIT_DIRS]
    if split_dirs and len(split_dirs) == len(subdirs):
        groups = [(_SPLIT_DIRS[p.name.lower()], p) for p in split_dirs]
    else:
        groups = [("", root)]
    entries = []  # (split, class name, path)
    for split, base in groups:
        for class_dir in sorted(p for p in base.iterdir() if p.is_dir() and not p.name.startswith(".")):
            entries += [(split, class_dir.name, f) for f in _list_images(class_dir)]
    if not entries:
        raise UsageError(
            f"No images found in {root}. Expected one sub-folder per class (optionally under "
            "train/ val/ test/) holding files ending in " + ", ".join(IMAGE_EXTENSIONS) + "."
        )
    classes = _natural_sorted(c for _, c, _ in entries)
    index = {c: i for i, c in enumerate(classes)}
    return FileSource(
        f"folder:{root}", root,
        [f for _, _, f in entries],
        [index[c] for _, c, _ in entries],
        [s for s, _, _ in entries],
        [f.relative_to(root).as_posix() for _, _, f in entries],
        classes,
    )


def load_csv(path: str) -> FileSource:
    file = Path(path).expanduser()
    if not file.is_file():
        raise UsageError(f"CSV file {str(file)!r} does not exist.")
    file = file.resolve()
    with open(file, newline="", encoding="utf-8-sig") as fh:
        rows = [r for r in csv.reader(fh) if r and any(c.strip() for c in r)]
    if rows and rows[0][0].strip().lower() in ("path", "file", "filename", "image"):
        header, rows = [c.strip().lower() for c in rows[0]], rows[1:]
    else:
        header = ["path", "label", "split"][: len(rows[0]) if rows else 2]
    if "path" not in header and header[0] in ("file", "filename", "image"):
        header[0] = "path"
    if not rows:
        raise UsageError(f"CSV file {file} has no samples.")
    col = {name: i for i, name in enumerate(header)}
    if "label" not in col:
        raise UsageError(f"CSV file {file} needs columns path,label[,split]; got {','.join(header)}.")
    paths, raw_labels, splits, ids = [], [], [], []
    for lineno, row in enumerate(rows, start=2 if header else 1):
        if len(row) < len(header):
            raise UsageError(f"{file}, row {lineno}: expected {len(header)} columns, got {len(row)}.")
        rel = row[col["path"]].strip()
        p = Path(rel)
        paths.append(p if p.is_absolute() else file.parent / p)
        ids.append(rel)
        raw_labels.append(row[col["label"]].strip())
        splits.append(row[col["split"]].strip().lower() if "split" in col else "")
    classes = _natural_sorted(lab for lab in raw_labels if lab != "")
    index = {c: i for i, c in enumerate(classes)}
    return FileSource(
        f"csv:{file}", file.parent, paths, [index.get(lab, -1) for lab in raw_labels],
        [_SPLIT_DIRS.get(s, s) for s in splits], ids, classes,
    )
