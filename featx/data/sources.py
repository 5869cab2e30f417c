"""Where images come from.

Every source exposes the same thing: parallel arrays of stable sample ids, integer labels
(-1 when unlabeled) and the source's own split names ("" when it has none), the class
names, a way to decode sample ``i``, and a fingerprint of its content for the cache key.
"""

from __future__ import annotations

import codecs
import csv
import gzip
import hashlib
import heapq
import io
import logging
import os
import struct
import warnings
from abc import ABC, abstractmethod
from pathlib import Path

import numpy as np
from PIL import Image

from ..cache.key import file_digest, strings_digest
from ..errors import DatasetNotFoundError, UsageError
from .images import ALLOWED_FORMATS, ImageDecodeError, decode_image, read_with_retry, to_rgb

log = logging.getLogger(__name__)

IMAGE_EXTENSIONS = (
    ".jpg", ".jpeg", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm", ".pgm", ".pbm",
)
#: how many images ``ImageSource.sample_sizes`` looks at: the first ids in sorted order
SIZE_SAMPLE = 16


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

    def pixel_shape(self) -> tuple[int, ...] | None:
        """Shape of every image, (H, W) or (H, W, 3), when the source holds them all as one uint8
        array that can be resized batch by batch; None when images must be decoded one by one."""
        return None

    def pixels(self, rows) -> np.ndarray:
        """Raw uint8 pixels of ``rows``, stacked (only for sources with a ``pixel_shape``)."""
        raise NotImplementedError(f"{type(self).__name__} decodes its images one by one")

    def image_size(self, i: int) -> tuple[int, int] | None:
        """(width, height) of sample ``i`` when known without decoding its pixels; None otherwise."""
        return None

    def sample_sizes(self) -> list[tuple[int, int]]:
        """(width, height) of a cheap, deterministic sample of the images, the first SIZE_SAMPLE ids in
        sorted order, for choosing the crop (``featx.data.crop_rule``); sizes that cannot be read are
        left out, so the list may be empty."""
        first = heapq.nsmallest(SIZE_SAMPLE, range(len(self.ids)), key=lambda i: str(self.ids[i]))
        return [size for size in map(self.image_size, first) if size is not None]

    def source_identity(self) -> dict:
        """The fields that name the source in the fingerprint (file sources drop their location)."""
        return {"source": self.spec}

    def fingerprint(self) -> dict:
        """Identity of the exact sample list and content; part of the cache key."""
        return {
            **self.source_identity(),
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

    def pixel_shape(self) -> tuple[int, ...] | None:
        return self.base.pixel_shape()

    def pixels(self, rows) -> np.ndarray:
        return self.base.pixels(self.indices[np.asarray(rows, dtype=np.int64)])

    def sample_sizes(self) -> list[tuple[int, int]]:
        """The whole dataset's sample: a ``--limit`` subset is preprocessed as the full set is."""
        return self.base.sample_sizes()

    def source_identity(self) -> dict:
        return self.base.source_identity()

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

    def pixel_shape(self) -> tuple[int, ...] | None:
        grey = self.images.ndim == 3
        rgb = self.images.ndim == 4 and self.images.shape[-1] == 3
        return tuple(self.images.shape[1:]) if self.images.dtype == np.uint8 and (grey or rgb) else None

    def pixels(self, rows) -> np.ndarray:
        return self.images[np.asarray(rows, dtype=np.int64)]

    def image_size(self, i: int) -> tuple[int, int] | None:
        return int(self.images.shape[2]), int(self.images.shape[1])

    def sample_sizes(self) -> list[tuple[int, int]]:
        """Every image has the array's size."""
        return [self.image_size(0)] if len(self.images) and self.images.ndim >= 3 else []

    def content_digest(self) -> str:
        if self._digest is None:
            h = hashlib.sha256(repr((self.images.shape, self.images.dtype.str)).encode())
            h.update(memoryview(self.images).cast("B"))
            self._digest = h.hexdigest()
        return self._digest


class FileSource(ImageSource):
    """Images stored as files, fingerprinted by path relative to the folder (or the CSV file's
    directory), so that moving the dataset keeps its cache entries.

    By default each file contributes its size, mtime, ctime and inode: ``cp -p``, ``rsync -a``
    and ``tar x`` restore size and mtime, but no user call can set ctime, and replacing a file
    gives a new inode. ``hash_content=True`` uses the sha256 of every file's bytes instead:
    slower, but stable across copies and machines and blind to nothing.
    """

    def __init__(self, spec, root: Path, paths: list[Path], labels, splits, ids, classes,
                 hash_content: bool = False):
        self.spec, self.root = spec, root
        self.paths = paths
        self.labels = np.asarray(labels, dtype=np.int64)
        self.splits = np.asarray(splits, dtype=object)
        self.ids = np.asarray(ids, dtype=object)
        self.classes = list(classes)
        self.hash_content = bool(hash_content)

    def image(self, i: int) -> Image.Image:
        return decode_image(self.paths[i])

    def location(self, i: int) -> str:
        return str(self.paths[i])

    def image_size(self, i: int) -> tuple[int, int] | None:
        return header_size(self.paths[i])

    def source_identity(self) -> dict:
        return {
            "source": self.spec.partition(":")[0],  # folder or csv: moving or renaming keeps the key
            "location": self.spec,  # where it was read; kept with the entry, left out of the key
            "content_mode": "sha256" if self.hash_content else "stat",
        }

    def _relative(self, p: Path) -> str:
        try:
            return p.relative_to(self.root).as_posix()
        except ValueError:  # an absolute path outside the root (CSV files may list them)
            return p.as_posix()

    def content_digest(self) -> str:
        h = hashlib.sha256()
        for p in self.paths:
            h.update(f"{self._relative(p)}\t{_file_state(p, self.hash_content)}\n".encode())
        return h.hexdigest()


def header_size(path: Path) -> tuple[int, int] | None:
    """(width, height) from an image file's header (Pillow reads no pixels until asked); None for a
    file that is not an image featx opens (such a file is reported when it is decoded).

    An error of the file system (an OSError with an errno: EIO, EACCES, ENOENT...) is retried and
    then raised, as when pixels are read: a size left out by a passing fault could change the crop
    rule's choice, and with it the cache key."""

    def read() -> tuple[int, int] | None:
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # a decompression-bomb warning is for the decoder to report
                with Image.open(path, formats=list(ALLOWED_FORMATS)) as img:
                    return int(img.width), int(img.height)
        except OSError as exc:
            if exc.errno is not None:
                raise
            return None  # not an image Pillow reads: the decoder reports it
        except Exception:  # a malformed header: likewise
            return None

    return read_with_retry(read, str(path))


def _file_state(p: Path, hash_content: bool) -> str:
    """What a file's content is, as far as the fingerprint can tell without (or with) reading it."""
    try:
        if hash_content:
            return file_digest(p)
        st = p.stat()
        return f"{st.st_size}\t{st.st_mtime_ns}\t{st.st_ctime_ns}\t{st.st_ino}"
    except OSError:
        return "missing"


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
            img = read_with_retry(lambda: ds[j][0], self.location(i))  # I/O errors are not the image's
        except (OSError, ValueError, SyntaxError) as exc:
            raise ImageDecodeError(f"cannot decode image ({exc})") from None
        if not isinstance(img, Image.Image):
            img = Image.fromarray(np.asarray(img))
        return to_rgb(img)

    def image_size(self, i: int) -> tuple[int, int] | None:
        """From the dataset's pixel array (CIFAR, MNIST, SVHN, STL-10) or its image file's header."""
        ds, j = self._locate(i)
        data = getattr(ds, "data", None)
        shape = tuple(int(v) for v in getattr(data, "shape", ())[1:])
        if len(shape) == 2:  # (H, W)
            return shape[1], shape[0]
        if len(shape) == 3:  # (C, H, W) or (H, W, C)
            height, width = shape[1:] if shape[0] in (1, 3) and shape[2] not in (1, 3) else shape[:2]
            return width, height
        path = _image_file(ds, j)
        return header_size(path) if path is not None else None

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
                base = Path(ds.root) if hasattr(ds, "root") else None
                for f in sorted(base.rglob("*")) if base is not None else []:
                    if f.is_file():
                        h.update(f"{f.relative_to(base).as_posix()}\t{_file_state(f, False)}\n".encode())
        return h.hexdigest()


def _image_file(ds, j: int) -> Path | None:
    """The file of sample ``j`` of a torchvision dataset that reads its images from files."""
    for attr in ("_image_files", "_images", "_samples", "samples"):
        files = getattr(ds, attr, None)
        if isinstance(files, (list, tuple)) and 0 <= j < len(files):
            item = files[j][0] if isinstance(files[j], tuple) else files[j]
            return Path(item) if isinstance(item, (str, os.PathLike)) else None
    return None


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


def _check_same_numbers(names, where: str, rows: dict | None = None) -> None:
    """Refuse class names that are one integer written two ways (``1``, ``01``): one class or two?"""
    by_value: dict[int, list[str]] = {}
    for name in sorted(set(names)):
        if name.lstrip("-").isdigit():
            by_value.setdefault(int(name), []).append(name)
    clashes = [spellings for spellings in by_value.values() if len(spellings) > 1]
    if not clashes:
        return
    def show(name):
        return f"{name!r} (row {rows[name]})" if rows else repr(name)
    listed = "; ".join(" and ".join(show(n) for n in spellings) for spellings in clashes)
    raise UsageError(
        f"{where}: the labels {listed} are the same number written differently, so it is unclear whether "
        "they are one class or two. Write each class one way (e.g. 1, not 01), then run again."
    )


#: names that archivers, file managers and NAS boxes leave next to the data
JUNK_NAMES = {"__macosx", ".ds_store", "thumbs.db", "@eadir", "desktop.ini", "$recycle.bin", "lost+found"}


def _is_junk(name: str) -> bool:
    return name.startswith(".") or name.lower() in JUNK_NAMES


def _list_images(directory: Path, skipped: list[Path]) -> list[Path]:
    """Image files under ``directory``; hidden and system folders are not descended into."""
    found = []
    for here, dirs, files in os.walk(directory):
        here_path = Path(here)
        skipped += [here_path / d for d in dirs if _is_junk(d)]
        dirs[:] = sorted(d for d in dirs if not _is_junk(d))
        for name in files:
            if _is_junk(name):
                if Path(name).suffix.lower() in IMAGE_EXTENSIONS:
                    skipped.append(here_path / name)
            elif Path(name).suffix.lower() in IMAGE_EXTENSIONS:
                found.append(here_path / name)
    return sorted(found)


_SPLIT_DIRS = {"train": "train", "training": "train", "val": "val", "valid": "val", "validation": "val",
               "dev": "val", "test": "test", "testing": "test"}


def _visible_dirs(base: Path, skipped: list[Path]) -> list[Path]:
    dirs = sorted(p for p in base.iterdir() if p.is_dir())
    skipped += [p for p in dirs if _is_junk(p.name)]
    return [p for p in dirs if not _is_junk(p.name)]


def _split_groups(root: Path, skipped: list[Path]) -> list[tuple[str, Path]]:
    """(split, folder) pairs: train/ val/ test/ folders when the root holds them, else the root."""
    subdirs = _visible_dirs(root, skipped)
    split_dirs = [p for p in subdirs if p.name.lower() in _SPLIT_DIRS]
    if not split_dirs:
        return [("", root)]
    others = [p.name for p in subdirs if p.name.lower() not in _SPLIT_DIRS]
    if others:
        raise UsageError(
            f"{root} holds split folders ({', '.join(p.name for p in split_dirs)}) next to other folders "
            f"({', '.join(others)}). featx reads train/ val/ test/ (also training, valid, validation, dev, "
            "testing) with one sub-folder per class inside, or class folders alone; a mix would turn the split "
            "folders into classes. Move or remove the other folders."
        )
    return [(_SPLIT_DIRS[p.name.lower()], p) for p in split_dirs]


def _warn_skipped(root: Path, skipped: list[Path], loose: list[Path]) -> None:
    if skipped:
        names = sorted({p.relative_to(root).as_posix() for p in skipped})
        log.warning("skipped %d hidden or system item(s) in %s: %s%s", len(names), root, ", ".join(names[:8]),
                    " ..." if len(names) > 8 else "")
    if loose:
        names = sorted(p.relative_to(root).as_posix() for p in loose)
        log.warning("%d image(s) in %s are not inside a class folder and are left out: %s%s", len(names), root,
                    ", ".join(names[:8]), " ..." if len(names) > 8 else "")


def load_folder(path: str, hash_content: bool = False) -> FileSource:
    root = Path(path).expanduser()
    if not root.is_dir():
        raise UsageError(f"Image folder {str(root)!r} does not exist or is not a directory.")
    root = root.resolve()
    skipped: list[Path] = []
    loose: list[Path] = []
    entries = []  # (split, class name, path)
    for split, base in _split_groups(root, skipped):
        loose += [f for f in base.iterdir() if f.is_file() and f.suffix.lower() in IMAGE_EXTENSIONS
                  and not _is_junk(f.name)]
        for class_dir in _visible_dirs(base, skipped):
            entries += [(split, class_dir.name, f) for f in _list_images(class_dir, skipped)]
    _warn_skipped(root, skipped, loose)
    if not entries:
        raise UsageError(
            f"No images found in {root}. Expected one sub-folder per class (optionally under "
            "train/ val/ test/) holding files ending in " + ", ".join(IMAGE_EXTENSIONS) + "."
        )
    _check_same_numbers([c for _, c, _ in entries], f"Class folders of {root}")
    classes = _natural_sorted(c for _, c, _ in entries)
    index = {c: i for i, c in enumerate(classes)}
    return FileSource(
        f"folder:{root}", root,
        [f for _, _, f in entries],
        [index[c] for _, c, _ in entries],
        [s for s, _, _ in entries],
        [f.relative_to(root).as_posix() for _, _, f in entries],
        classes,
        hash_content=hash_content,
    )


# --------------------------------------------------------------------------- CSV

_COLUMNS = {"path": "path", "file": "path", "filename": "path", "image": "path", "label": "label",
            "class": "label", "split": "split"}
_CSV_FORMAT = ("path,label[,split] (in any order; 'file', 'filename' or 'image' also name the path column and "
               "'class' the label column)")


def _read_csv(file: Path) -> list[tuple[int, list[str]]]:
    """(line number, cells) of the non-blank rows; a file that is not UTF-8 is refused."""
    data = file.read_bytes()
    bom = len(codecs.BOM_UTF8) if data.startswith(codecs.BOM_UTF8) else 0
    try:
        text = data[bom:].decode("utf-8")
    except UnicodeDecodeError as exc:
        offset = bom + exc.start
        line = data[:offset].count(b"\n") + 1
        raise UsageError(
            f"CSV file {file} is not UTF-8 text: byte {offset} (line {line}, value 0x{data[offset]:02x}) cannot "
            f"be decoded. Re-encode it as UTF-8, e.g. `iconv -f latin1 -t utf-8 {file} > fixed.csv`, and use "
            "the new file."
        ) from None
    reader = csv.reader(io.StringIO(text, newline=""))
    rows = []
    for row in reader:
        if row and any(c.strip() for c in row):
            rows.append((reader.line_num, row))
    return rows


def _csv_header(file: Path, first: list[str]) -> list[str] | None:
    """Column names when the first row is a header; None for a file without one."""
    names = [c.strip().lower() for c in first]
    mapped = [_COLUMNS.get(n) for n in names]
    if any(mapped):
        if "path" not in mapped or "label" not in mapped or None in mapped or len(set(mapped)) < len(mapped):
            raise UsageError(f"CSV file {file} needs columns path,label[,split]; got {','.join(names)}. "
                             f"Expected: {_CSV_FORMAT}.")
        return mapped
    path = Path(first[0].strip())
    looks_like_data = path.suffix.lower() in IMAGE_EXTENSIONS or (file.parent / path).is_file()
    if not looks_like_data:
        raise UsageError(
            f"CSV file {file}: the first row ({','.join(c.strip() for c in first)}) looks like a header, but its "
            f"columns are not the ones featx reads. Expected: {_CSV_FORMAT}. Rename the columns in the first "
            "row (or remove it if it is not a header)."
        )
    return None


def _row_error(file: Path, lineno: int, what: str) -> UsageError:
    return UsageError(f"CSV file {file}, row {lineno}: {what}")


def load_csv(path: str, hash_content: bool = False) -> FileSource:
    file = Path(path).expanduser()
    if not file.is_file():
        raise UsageError(f"CSV file {str(file)!r} does not exist.")
    file = file.resolve()
    rows = _read_csv(file)
    if not rows:
        raise UsageError(f"CSV file {file} has no samples.")
    header = _csv_header(file, rows[0][1])
    if header is None:
        header = ["path", "label", "split"][: len(rows[0][1])]
        if len(header) < 2:
            raise UsageError(f"CSV file {file} needs columns path,label[,split]; its rows have one column.")
    else:
        rows = rows[1:]
    if not rows:
        raise UsageError(f"CSV file {file} has no samples.")
    col = {name: i for i, name in enumerate(header)}
    paths, raw_labels, splits, ids, linenos = [], [], [], [], []
    seen: dict[str, tuple[int, str]] = {}
    for lineno, row in rows:
        if len(row) < len(header):
            raise _row_error(file, lineno, f"expected {len(header)} columns, got {len(row)}.")
        if any(c.strip() for c in row[len(header):]):
            raise _row_error(file, lineno, f"expected {len(header)} columns, got {len(row)}; quote paths that "
                             "contain commas.")
        rel = row[col["path"]].strip()
        if not rel:
            raise _row_error(file, lineno, "no path (the path column is empty). Every row needs an image path.")
        p = Path(rel)
        full = p if p.is_absolute() else file.parent / p
        same = os.path.normpath(full)
        if same in seen:
            raise _row_error(file, lineno, f"{rel!r} is listed twice (also row {seen[same][0]}, {seen[same][1]!r}); "
                             "each image may appear once. Remove the duplicate row.")
        seen[same] = (lineno, rel)
        paths.append(full)
        ids.append(rel)
        linenos.append(lineno)
        raw_labels.append(row[col["label"]].strip())
        splits.append(row[col["split"]].strip() if "split" in col else "")
    first_row = {}
    for lab, lineno in zip(raw_labels, linenos):
        first_row.setdefault(lab, lineno)
    _check_same_numbers([lab for lab in raw_labels if lab], f"CSV file {file}", first_row)
    canonical = _csv_splits(file, splits, linenos)
    _warn_csv(file, paths, raw_labels, linenos)
    classes = _natural_sorted(lab for lab in raw_labels if lab != "")
    index = {c: i for i, c in enumerate(classes)}
    return FileSource(
        f"csv:{file}", file.parent, paths, [index.get(lab, -1) for lab in raw_labels],
        canonical, ids, classes, hash_content=hash_content,
    )


def _rows_text(linenos: list[int]) -> str:
    return ", ".join(str(n) for n in linenos[:8]) + (" ..." if len(linenos) > 8 else "")


def _csv_splits(file: Path, splits: list[str], linenos: list[int]) -> list[str]:
    """Canonical split names; unknown names, or rows without a split among rows with one, are refused."""
    canonical = [_SPLIT_DIRS.get(s.lower(), s.lower()) if s else "" for s in splits]
    unknown: dict[str, list[int]] = {}
    for value, raw, lineno in zip(canonical, splits, linenos):
        if value and value not in ("train", "val", "test"):
            unknown.setdefault(raw, []).append(lineno)
    if unknown:
        listed = "; ".join(f"{name!r} (row {_rows_text(rows)})" for name, rows in unknown.items())
        raise UsageError(
            f"CSV file {file}: unknown split {listed}. Valid splits: train, val (also valid, validation, dev) "
            "and test (also testing), or an empty split column for data without splits. Rows of other splits "
            "are never trained on silently: rename them or remove those rows."
        )
    empty = [n for value, n in zip(canonical, linenos) if not value]
    if empty and len(empty) < len(canonical):
        raise UsageError(
            f"CSV file {file}: rows {_rows_text(empty)} have no split while the others do. Write train, val or "
            "test in every row, or leave the split column empty everywhere."
        )
    return canonical


def _warn_csv(file: Path, paths: list[Path], labels: list[str], linenos: list[int]) -> None:
    unlabelled = [n for lab, n in zip(labels, linenos) if not lab]
    if unlabelled:
        log.warning("%s: %d row(s) have no label and are kept as unlabelled (-1), not probed: rows %s", file,
                    len(unlabelled), _rows_text(unlabelled))
    missing = [n for p, n in zip(paths, linenos) if not p.is_file()]
    if missing:
        log.warning("%s: %d listed image(s) do not exist and will be recorded as unreadable: rows %s", file,
                    len(missing), _rows_text(missing))
