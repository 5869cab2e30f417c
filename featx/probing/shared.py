"""A layer's features shared by the probe's worker processes through a file.

Each (layer, head) cell runs in a worker. Passing the layer as an array would put one copy in
the parent and another in joblib's shared-memory folder, and a parent that loads the next
layer while cells still use the previous one holds two. Instead the parent streams the layer
from the cache entry into a float32 ``.npy`` file a few MB at a time, and a cell reads the rows
it needs from that file (:class:`LayerRows`): the file's pages live once, in the page cache,
and a worker's memory holds only its own copies (the training rows of the widest layer, at
most). The files take the float32 size of the probed layers on disk (``TMPDIR``) and are
removed when the probe ends.
"""

from __future__ import annotations

import hashlib
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..errors import DataError


@dataclass(frozen=True)
class LayerRows:
    """Rows of a float32 ``.npy`` file, copied out on indexing (``X[rows]``, as from an array).

    Each read maps the file, copies the rows and unmaps it again, so the file's pages are not
    counted in the worker's memory while it fits. Pickles as its path: it reaches the workers
    in a few bytes.
    """

    path: str
    shape: tuple[int, int]
    dtype = np.dtype(np.float32)

    def __len__(self) -> int:
        return self.shape[0]

    def __getitem__(self, rows) -> np.ndarray:
        mapped = np.load(self.path, mmap_mode="r")
        try:
            if isinstance(rows, slice):
                return np.array(mapped[rows])
            rows = np.asarray(rows)
            rows = np.flatnonzero(rows) if rows.dtype == bool else rows
            out = np.empty((len(rows), self.shape[1]), dtype=self.dtype)
            return np.take(mapped, rows, axis=0, out=out)
        finally:
            del mapped

    def load(self) -> np.ndarray:
        """All rows in memory (for workers that cannot see this machine's files)."""
        return np.load(self.path)


class SharedLayers:
    """Temporary float32 copies of cached layers, one file each."""

    def __init__(self, folder: str | None = None):
        self.folder = Path(tempfile.mkdtemp(prefix="featx-probe-", dir=folder))

    def add(self, entry, record, keep: np.ndarray) -> tuple[LayerRows, str]:
        """The kept rows of ``record``, and the sha1 of their float32 bytes
        (equal digests: equal features, e.g. a map whose average pooling is ``pre_logits``)."""
        path = self.folder / f"{record.index:03d}.npy"
        digest, non_finite = hashlib.sha1(), 0
        header = {"descr": np.lib.format.dtype_to_descr(np.dtype(np.float32)), "fortran_order": False,
                  "shape": (int(keep.sum()), int(record.width))}
        with open(path, "wb") as f:
            np.lib.format.write_array_header_2_0(f, header)
            for _, rows in entry.iter_rows(record.name, keep):
                non_finite += int(np.count_nonzero(~np.isfinite(rows)))
                data = np.ascontiguousarray(rows).data
                digest.update(data)
                f.write(data)
        if non_finite:
            raise DataError(
                f"Layer {record.name} holds {non_finite} non-finite values (NaN or inf); its features cannot be "
                "probed. Re-extract it with --dtype float32, or leave the layer out with --layers."
            )
        return LayerRows(str(path), header["shape"]), digest.hexdigest()

    def close(self) -> None:
        shutil.rmtree(self.folder, ignore_errors=True)

    def __enter__(self) -> SharedLayers:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
