"""One feature-cache entry: an HDF5 file with samples, classes, the layer ladder and features.

Layout (``encoding-type = featx-features``)::

    /                attrs: encoding-type, encoding-version, featx_version, created_utc,
                            updated_utc, key, config (canonical JSON), versions, complete
    /samples/id      vlen utf-8 (N,)   stable ids
    /samples/label   int64 (N,)        -1 = unlabeled
    /samples/split   vlen utf-8 (N,)   the source's split, "" if none
    /samples/ok      bool (N,)         False: unreadable image (see /samples/error)
    /samples/error   vlen utf-8 (N,)   why, "" when ok
    /classes         vlen utf-8 (C,)
    /ladder          JSON of the model's full layer ladder at this input size
    /layers/<name>   float16|float32 (N, D), chunked by rows, fletcher32
                     attrs: module, index, depth, raw_shape, kind, pool, width
    /layers          attrs: order (JSON list, shallow to deep)

Every dataset carries a fletcher32 checksum, so flipped bits are caught when read. HDF5
cannot checksum variable-length strings or attributes, so sha256 digests stand in for them:
``/samples`` attr ``strings_digest`` covers ids, splits and error texts, and the root attr
``metadata_digest`` covers /classes, /ladder, the layer order and every layer's attributes
(format 2). The root's config must hash to the key, and the classes must match the config.

Only proven damage (a failed checksum or digest, a bad HDF5 structure, a config that does
not hash to its key) raises :class:`CacheCorruptError`, the one error that lets the cache
quarantine a file. An error the operating system reports while opening or reading (no
permission, a lock held by a writer, too many open files, an I/O error) says nothing about
the bytes: it raises :class:`CacheUnavailableError` and the file is left alone. An entry
of another format version (format 1 had no metadata digest) raises
:class:`CacheFormatError`; the cache treats it as absent, so the next extraction rebuilds
it and the rebuilt file replaces it (it is not quarantined).
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import re
from dataclasses import dataclass
from pathlib import Path

import h5py
import numpy as np

from .._digest import canonical_json, strings_digest
from ..errors import CacheCorruptError, CacheFormatError, CacheUnavailableError, UnknownLayerError, close_matches
from ..layer import Ladder, Layer
from .key import config_key

ENCODING_TYPE = "featx-features"
ENCODING_VERSION = "2"
STR = h5py.string_dtype("utf-8")
CHUNK_BYTES = 1 << 20
READ_BYTES = 32 << 20  # rows read at a time when a layer is loaded or streamed


@dataclass
class Features:
    """Features of one layer, float32, with their sample metadata (bad images excluded)."""

    X: np.ndarray
    y: np.ndarray
    ids: np.ndarray
    split: np.ndarray
    layer: Layer
    classes: list[str]


def str_array(ds) -> np.ndarray:
    return np.asarray(ds.asstr()[()], dtype=object)


#: advice for errors the operating system reports; none of them says the file is damaged
_ENVIRONMENT_HINTS = {
    errno.EACCES: "check the file's permissions",
    errno.EPERM: "check the file's permissions",
    errno.ENOLCK: "the file system refused a lock (on NFS, set HDF5_USE_FILE_LOCKING=FALSE)",
    errno.EAGAIN: "another process holds it open for writing; retry when it has finished",
    errno.EMFILE: "too many open files: raise the limit (ulimit -n) or run fewer jobs",
    errno.ENFILE: "the system has too many open files; retry later",
    errno.EIO: "the disk reported a read error; check the storage",
    errno.ENOENT: "it disappeared while being opened (removed or replaced by another process)",
    errno.EROFS: "the file system is read-only",
}
_HDF5_ERRNO = re.compile(r"errno = (\d+)")


def _os_errno(exc: OSError) -> int | None:
    """The operating-system error behind ``exc``, if any; HDF5 format errors have none."""
    if exc.errno is not None:
        return exc.errno
    found = _HDF5_ERRNO.search(str(exc))
    if found:
        return int(found.group(1))
    return errno.EAGAIN if "unable to lock file" in str(exc) else None


def read_failure(path: Path, exc: OSError, damage: str = "not a readable HDF5 file"
                 ) -> CacheCorruptError | CacheUnavailableError:
    """The typed error for an OSError from h5py: corruption only when the bytes are at fault."""
    code = _os_errno(exc)
    if code is None:  # HDF5 read the bytes and found them wrong: bad signature, truncation, checksum
        return CacheCorruptError(f"{path} is damaged: {damage} ({exc}).")
    hint = _ENVIRONMENT_HINTS.get(code, "retry once the cause is fixed")
    return CacheUnavailableError(
        f"{path} cannot be read right now: {os.strerror(code)} ({hint}). Nothing shows the file "
        "is damaged, so it was left in place."
    )


def _plain(value):
    """An HDF5 attribute value as plain JSON-able Python."""
    if isinstance(value, np.ndarray):
        return value.tolist()
    if isinstance(value, np.generic):
        return value.item()
    return value.decode() if isinstance(value, bytes) else value


def metadata_digest(f: h5py.File) -> str:
    """sha256 over what fletcher32 cannot protect: classes, ladder, layer order, layer attributes."""
    layers = {
        name: {"attrs": {k: _plain(v) for k, v in ds.attrs.items()}, "dtype": ds.dtype.str,
               "shape": list(ds.shape)}
        for name, ds in f["layers"].items()
    }
    doc = {"classes": [str(c) for c in f["classes"].asstr()[()]], "ladder": f["ladder"].asstr()[()],
           "order": f["layers"].attrs["order"], "layers": layers}
    return hashlib.sha256(canonical_json(doc).encode("utf-8")).hexdigest()


def chunk_rows(width: int, itemsize: int, n: int) -> int:
    return int(max(1, min(n, CHUNK_BYTES // max(1, width * itemsize))))


class FeatureEntry:
    """Read access to a complete entry. Opening checks structure; ``verify`` checks every byte."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        try:
            with h5py.File(self.path, "r") as f:
                self._read_meta(f)
        except (CacheCorruptError, CacheFormatError):
            raise
        except OSError as exc:
            raise read_failure(self.path, exc) from exc
        except (KeyError, ValueError, TypeError) as exc:
            raise CacheCorruptError(f"{self.path} is not a readable featx entry ({exc}).") from exc
        self._samples: dict[str, np.ndarray] | None = None

    def _read_meta(self, f: h5py.File) -> None:
        a = f.attrs
        if a.get("encoding-type") != ENCODING_TYPE:
            raise CacheCorruptError(f"{self.path} is not a featx feature entry (no encoding-type {ENCODING_TYPE!r}).")
        if str(a.get("encoding-version")) != ENCODING_VERSION:
            raise CacheFormatError(
                f"{self.path} is in format version {a.get('encoding-version')}; this featx reads version "
                f"{ENCODING_VERSION}. It counts as absent: re-extract (featx extract with the same options) "
                "and the new entry replaces it."
            )
        if not bool(a.get("complete", False)):
            raise CacheCorruptError(f"{self.path} was never completed.")
        self.key = str(a["key"])
        self.config = json.loads(a["config"])
        if config_key(self.config) != self.key:
            raise CacheCorruptError(f"{self.path}: its configuration does not hash to its key.")
        if a.get("metadata_digest") != metadata_digest(f):
            raise CacheCorruptError(f"{self.path}: classes, ladder or layer attributes are damaged (digest mismatch).")
        self.created = str(a.get("created_utc", ""))
        self.updated = str(a.get("updated_utc", self.created))
        self.versions = json.loads(a.get("versions", "{}"))
        self.runs: list[dict] = json.loads(a.get("runs", "[]"))  # the extraction runs that built it, oldest first
        self.classes = [str(c) for c in f["classes"].asstr()[()]]
        if self.config.get("dataset", {}).get("classes", self.classes) != self.classes:
            raise CacheCorruptError(f"{self.path}: /classes does not match the classes in its configuration.")
        self.ladder = Ladder.from_dict(json.loads(f["ladder"].asstr()[()]))
        self.n_samples = int(f["samples/id"].shape[0])
        for name in ("label", "split", "ok", "error"):
            if f[f"samples/{name}"].shape[0] != self.n_samples:
                raise CacheCorruptError(f"{self.path}: /samples/{name} has the wrong length.")
        order = json.loads(f["layers"].attrs["order"])
        if sorted(order) != sorted(f["layers"].keys()):
            raise CacheCorruptError(f"{self.path}: the layer list does not match the stored layers.")
        self.layers: list[Layer] = []
        for name in order:
            ds = f["layers"][name]
            at = ds.attrs
            if ds.ndim != 2 or ds.shape[0] != self.n_samples or ds.shape[1] != int(at["width"]):
                raise CacheCorruptError(f"{self.path}: layer {name} has shape {ds.shape}.")
            self.layers.append(Layer.from_attrs(name, at, ds.dtype.name))

    # ------------------------------------------------------------------ metadata

    @property
    def layer_names(self) -> list[str]:
        return [layer.name for layer in self.layers]

    @property
    def model(self) -> str:
        return self.config["model"]["name"]

    @property
    def dataset(self) -> str:
        dataset = self.config["dataset"]
        return dataset.get("location") or dataset["source"]  # folders and CSV files: where they were read

    @property
    def size_bytes(self) -> int:
        return self.path.stat().st_size

    def layer(self, name: str) -> Layer:
        for layer in self.layers:
            if layer.name == name:
                return layer
        table = {alias: layer.name for layer in self.ladder.layers for alias in layer.aliases}
        if table.get(name) in self.layer_names:
            return self.layer(table[name])
        near = close_matches(name, self.layer_names, n=5)
        hint = f" Did you mean {', '.join(repr(n) for n in near)}?" if near else ""
        raise UnknownLayerError(
            f"Layer {name!r} is not in cache entry {self.key[:12]}.{hint} It holds: "
            + ", ".join(self.layer_names) + ". Extract more layers with featx extract --layers."
        )

    def samples(self) -> dict[str, np.ndarray]:
        """ids, label, split, ok and error arrays for every sample (bad images included)."""
        if self._samples is None:
            with self._open() as f:
                g = f["samples"]
                try:
                    samples = {
                        "id": str_array(g["id"]), "label": g["label"][()], "split": str_array(g["split"]),
                        "ok": g["ok"][()].astype(bool), "error": str_array(g["error"]),
                    }
                except OSError as exc:
                    raise read_failure(self.path, exc, "sample metadata failed its checksum") from exc
                expected = g.attrs.get("strings_digest")
            if strings_digest(samples["id"], samples["split"], samples["error"]) != expected:
                raise CacheCorruptError(f"{self.path}: sample ids, splits or errors are damaged.")
            self._samples = samples
        return self._samples

    def errors(self) -> list[tuple[str, str]]:
        s = self.samples()
        return [(str(i), str(e)) for i, e, ok in zip(s["id"], s["error"], s["ok"]) if not ok]

    def _open(self) -> h5py.File:
        try:
            return h5py.File(self.path, "r")
        except OSError as exc:
            raise read_failure(self.path, exc) from exc

    # ------------------------------------------------------------------ features

    def load(self, layer: str, include_bad: bool = False) -> Features:
        """float32 features of ``layer`` with labels, ids and splits."""
        record = self.layer(layer)
        s = self.samples()
        keep = np.ones(self.n_samples, dtype=bool) if include_bad else s["ok"]
        X = np.empty((int(keep.sum()), record.width), dtype=np.float32)
        for start, chunk in self.iter_rows(record.name, keep):
            X[start:start + len(chunk)] = chunk
        return Features(X, s["label"][keep], s["id"][keep], s["split"][keep], record, list(self.classes))

    def iter_rows(self, layer: str, keep: np.ndarray | None = None, chunk_bytes: int = READ_BYTES):
        """``(position, float32 rows)`` of ``layer`` in order, ``keep``'s rows only (default: all):
        a layer larger than memory is read a few MB at a time, and never as a whole plus a copy."""
        record = self.layer(layer)
        keep = np.ones(self.n_samples, dtype=bool) if keep is None else keep
        position = 0
        with self._open() as f:
            ds = f["layers"][record.name]
            step = max(1, chunk_bytes // max(1, ds.shape[1] * ds.dtype.itemsize))
            if ds.chunks:  # whole HDF5 chunks, each decompressed and checksummed once
                step = max(ds.chunks[0], step // ds.chunks[0] * ds.chunks[0])
            for start in range(0, ds.shape[0], step):
                wanted = keep[start:start + step]
                if not wanted.any():
                    continue
                try:
                    rows = ds[start:start + step]
                except OSError as exc:  # fletcher32 mismatch or a truncated chunk, or the disk failed
                    raise read_failure(self.path, exc, f"layer {record.name} failed its checksum") from exc
                rows = np.asarray(rows if wanted.all() else rows[wanted], dtype=np.float32)
                yield position, rows
                position += len(rows)

    def verify(self) -> None:
        """Read every dataset so that every checksum is checked."""
        self._samples = None
        self.samples()
        with self._open() as f:
            try:
                for name in self.layer_names:
                    ds = f["layers"][name]
                    step = ds.chunks[0] * 64 if ds.chunks else ds.shape[0]
                    for start in range(0, ds.shape[0], max(step, 1)):
                        ds[start:start + step]
            except OSError as exc:
                raise read_failure(self.path, exc, "it failed its checksums") from exc

    def info(self) -> dict:
        s = self.samples()
        splits, counts = np.unique(s["split"].astype(str), return_counts=True)
        return {
            "key": self.key,
            "path": str(self.path),
            "size_bytes": self.size_bytes,
            "created_utc": self.created,
            "updated_utc": self.updated,
            "model": self.model,
            "dataset": self.dataset,
            "samples": self.n_samples,
            "bad_images": int((~s["ok"]).sum()),
            "splits": {str(k) or "(none)": int(v) for k, v in zip(splits, counts)},
            "classes": self.classes,
            "layers": [_info_row(layer) for layer in self.layers],
            "config": self.config,
            "versions": self.versions,
        }

    def __repr__(self) -> str:
        return (f"FeatureEntry({self.key[:12]}, model={self.model!r}, dataset={self.dataset!r}, "
                f"samples={self.n_samples}, layers={self.layer_names})")


#: the fields ``featx cache info`` shows per layer
_INFO_FIELDS = ("name", "index", "depth", "raw_shape", "pool", "width", "dtype")


def _info_row(layer: Layer) -> dict:
    row = layer.to_dict()
    return {k: row.get(k, getattr(layer, k)) for k in _INFO_FIELDS}


def config_json(config: dict) -> str:
    return canonical_json(config)
