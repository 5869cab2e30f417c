"""Sources whose images are encoded bytes inside larger files (tar shards, Arrow tables).

What they share with folders: the fingerprint is the state of the files that hold the data
(size, times, inode; or their sha256 with ``hash_content``), never the decoded pixels, and a
sample that cannot give an image (undecodable bytes, no image, an invalid label) is reported
when it is decoded: recorded as not ok with its reason, or stopping a ``--strict`` run.
"""

from __future__ import annotations

import hashlib
import io
import logging
import warnings
from abc import abstractmethod
from pathlib import Path

import numpy as np
from PIL import Image

from .images import ALLOWED_FORMATS, ImageDecodeError, decode_image
from .sources import ImageSource, _file_state, header_size

log = logging.getLogger(__name__)


class PackedSource(ImageSource):
    """Samples read by position from container files under ``root``.

    ``problems`` maps a sample to the reason it has no usable image, found when the source was
    opened (no image in the sample, an invalid label); such a sample fails at decode time like an
    undecodable file, so that the extraction records it instead of refusing the whole dataset.
    """

    def __init__(self, spec: str, root: Path, containers: list[Path], ids, labels, splits, classes,
                 problems: dict[int, str], hash_content: bool = False, options: dict | None = None):
        self.spec, self.root = spec, root
        self.containers = list(containers)
        self.ids = np.asarray(ids, dtype=object)
        self.labels = np.asarray(labels, dtype=np.int64)
        self.splits = np.asarray(splits, dtype=object)
        self.classes = list(classes)
        self.problems = dict(problems)
        self.hash_content = bool(hash_content)
        self.options = dict(options or {})

    @abstractmethod
    def encoded(self, i: int) -> bytes | Path:
        """The encoded image of sample ``i`` (bytes, or the path of an image file); raises
        ImageDecodeError when the sample holds none."""

    def image(self, i: int) -> Image.Image:
        if i in self.problems:
            raise ImageDecodeError(self.problems[i])
        return decode_image(self.encoded(i))

    def image_size(self, i: int) -> tuple[int, int] | None:
        if i in self.problems:
            return None
        try:
            data = self.encoded(i)
        except ImageDecodeError:
            return None
        return header_size(data) if isinstance(data, Path) else bytes_header_size(data)

    def source_identity(self) -> dict:
        return {
            "source": self.spec.partition(":")[0],  # wds or hf-disk: moving the data keeps the key
            "location": self.spec,  # kept with the entry, left out of the key
            "content_mode": "sha256" if self.hash_content else "stat",
            **self.options,
        }

    def content_digest(self) -> str:
        h = hashlib.sha256()
        for p in self.containers:
            try:
                name = p.relative_to(self.root).as_posix()
            except ValueError:  # an image file outside the dataset (a path column)
                name = p.as_posix()
            h.update(f"{name}\t{_file_state(p, self.hash_content)}\n".encode())
        return h.hexdigest()


def bytes_header_size(data: bytes) -> tuple[int, int] | None:
    """(width, height) from an encoded image's header; None when Pillow cannot read it (the
    decoder reports that sample)."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            with Image.open(io.BytesIO(data), formats=list(ALLOWED_FORMATS)) as img:
                return int(img.width), int(img.height)
    except Exception:
        return None


def warn_problems(where: str, ids, problems: dict[int, str], what: str) -> None:
    """One warning at open time for the samples that will be recorded as unreadable."""
    if not problems:
        return
    shown = "; ".join(f"{ids[i]}: {problems[i]}" for i in sorted(problems)[:5])
    log.warning("%s: %d sample(s) %s and will be recorded as unreadable: %s%s", where, len(problems), what,
                shown, " ..." if len(problems) > 5 else "")
