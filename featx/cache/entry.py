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

Every dataset carries a fletcher32 checksum, so flipped bits are caught when read.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import h5py
import numpy as np

from ..backbones.ladder import Ladder
from ..errors import CacheCorruptError, UnknownLayerError, close_matches
from .key import canonical_json, config_key, strings_digest

ENCODING_TYPE = "featx-features"
ENCODING_VERSION = "1"
STR = h5py.string_dtype("utf-8")
CHUNK_BYTES = 1 << 20


@dataclass(frozen=True)
class LayerRecord:
    """A layer as stored in an entry."""

    name: str
    module: str
    index: int
    depth: float
    raw_shape: tuple[int, ...]
    kind: str
    pool: str
    width: int
    dtype: str
    order: int = 0  # execution order in the forward pass

    def to_attrs(self) -> dict:
        return {"module": self.module, "index": self.index, "depth": self.depth, "order": self.order,
                "raw_shape": np.asarray(self.raw_shape, dtype=np.int64), "kind": self.kind,
                "pool": self.pool, "width": self.width}


@dataclass
class Features:
    """Features of one layer, float32, with their sample metadata (bad images excluded)."""

    X: np.ndarray
    y: np.ndarray
    ids: np.ndarray
    split: np.ndarray
    layer: LayerRecord
    classes: list[str]


def _str_array(ds) -> np.ndarray:
    return np.asarray(ds.asstr()[()], dtype=object)


def chunk_rows(width: int, itemsize: int, n: int) -> int:
    return int(max(1, min(n, CHUNK_BYTES // max(1, width * itemsize))))


class FeatureEntry:
    """Read access to a complete entry. Opening checks structure; ``verify`` checks every byte."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        try:
            with h5py.File(self.path, "r") as f:
                self._read_meta(f)
        except CacheCorruptError:
            raise
        except (OSError, KeyError, ValueError, TypeError) as exc:
            raise CacheCorruptError(f"{self.path} is not a readable featx entry ({exc}).") from None
        self._samples: dict[str, np.ndarray] | None = None

    def _read_meta(self, f: h5py.File) -> None:
        a = f.attrs
        if a.get("encoding-type") != ENCODING_TYPE:
            raise CacheCorruptError(f"{self.path} is not a featx feature entry.")
        if str(a.get("encoding-version")) != ENCODING_VERSION:
            raise CacheCorruptError(
                f"{self.path} has format version {a.get('encoding-version')}; this featx reads {ENCODING_VERSION}."
            )
        if not bool(a.get("complete", False)):
            raise CacheCorruptError(f"{self.path} was never completed.")
        self.key = str(a["key"])
        self.config = json.loads(a["config"])
        if config_key(self.config) != self.key:
            raise CacheCorruptError(f"{self.path}: its configuration does not hash to its key.")
        self.created = str(a.get("created_utc", ""))
        self.updated = str(a.get("updated_utc", self.created))
        self.versions = json.loads(a.get("versions", "{}"))
        self.classes = [str(c) for c in f["classes"].asstr()[()]]
        self.ladder = Ladder.from_dict(json.loads(f["ladder"].asstr()[()]))
        self.n_samples = int(f["samples/id"].shape[0])
        for name in ("label", "split", "ok", "error"):
            if f[f"samples/{name}"].shape[0] != self.n_samples:
                raise CacheCorruptError(f"{self.path}: /samples/{name} has the wrong length.")
        order = json.loads(f["layers"].attrs["order"])
        if sorted(order) != sorted(f["layers"].keys()):
            raise CacheCorruptError(f"{self.path}: the layer list does not match the stored layers.")
        self.layers: list[LayerRecord] = []
        for name in order:
            ds = f["layers"][name]
            at = ds.attrs
            if ds.ndim != 2 or ds.shape[0] != self.n_samples or ds.shape[1] != int(at["width"]):
                raise CacheCorruptError(f"{self.path}: layer {name} has shape {ds.shape}.")
            self.layers.append(LayerRecord(
                name, str(at["module"]), int(at["index"]), float(at["depth"]),
                tuple(int(v) for v in at["raw_shape"]), str(at["kind"]), str(at["pool"]),
                int(at["width"]), ds.dtype.name, int(at.get("order", at["index"])),
            ))

    # ------------------------------------------------------------------ metadata

    @property
    def layer_names(self) -> list[str]:
        return [layer.name for layer in self.layers]

    @property
    def model(self) -> str:
        return self.config["model"]["name"]

    @property
    def dataset(self) -> str:
        return self.config["dataset"]["source"]

    @property
    def size_bytes(self) -> int:
        return self.path.stat().st_size

    def layer(self, name: str) -> LayerRecord:
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
                        "id": _str_array(g["id"]), "label": g["label"][()], "split": _str_array(g["split"]),
                        "ok": g["ok"][()].astype(bool), "error": _str_array(g["error"]),
                    }
                except OSError as exc:
                    raise CacheCorruptError(f"{self.path}: sample metadata failed its checksum ({exc}).") from None
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
            raise CacheCorruptError(f"{self.path} cannot be opened ({exc}).") from None

    # ------------------------------------------------------------------ features

    def load(self, layer: str, include_bad: bool = False) -> Features:
        """float32 features of ``layer`` with labels, ids and splits."""
        record = self.layer(layer)
        s = self.samples()
        keep = np.ones(self.n_samples, dtype=bool) if include_bad else s["ok"]
        with self._open() as f:
            try:
                X = f["layers"][record.name][()]
            except OSError as exc:  # fletcher32 mismatch or a truncated chunk
                raise CacheCorruptError(f"{self.path}: layer {record.name} failed its checksum ({exc}).") from None
        X = np.asarray(X[keep], dtype=np.float32)
        return Features(X, s["label"][keep], s["id"][keep], s["split"][keep], record, list(self.classes))

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
                raise CacheCorruptError(f"{self.path} failed its checksums ({exc}).") from None

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
            "layers": [
                {"name": r.name, "index": r.index, "depth": r.depth, "raw_shape": list(r.raw_shape),
                 "pool": r.pool, "width": r.width, "dtype": r.dtype}
                for r in self.layers
            ],
            "config": self.config,
            "versions": self.versions,
        }

    def __repr__(self) -> str:
        return (f"FeatureEntry({self.key[:12]}, model={self.model!r}, dataset={self.dataset!r}, "
                f"samples={self.n_samples}, layers={self.layer_names})")


def config_json(config: dict) -> str:
    return canonical_json(config)
