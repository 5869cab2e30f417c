"""``featx cache export``: a cache entry's features as one .npz or .parquet file, for any language.

What is written matches :func:`featx.load_features` row for row: float32 features (a float16
entry converts exactly), labels, ids, splits and the class names, with unreadable images
dropped unless ``include_bad``. Layers are read a few MB at a time, so an entry larger than
memory exports too. The file appears complete or not at all (a temporary file renamed into
place), and an existing file is never replaced unless ``force``.

npz: ``features/<layer>`` (N, D) float32 per layer, ``label`` int64 (-1 = unlabeled), ``id``,
``split``, ``error`` (str), ``ok`` (bool), ``classes`` (C,), ``layers`` (in depth order) and
``metadata`` (a JSON string). Parquet: one row per image with columns ``id``, ``split``,
``label``, ``class_name``, ``ok``, ``error`` and ``features/<layer>`` as a fixed-size list of
float32 (Arrow's idiom for an embedding: thousands of features stay one column); the same
JSON under the schema metadata key ``featx``.
"""

from __future__ import annotations

import json
import os
import zipfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .._fileio import atomic_write_bytes
from ..errors import MissingDependencyError, UsageError, did_you_mean
from ..layer import Layer
from .entry import FeatureEntry
from .store import CacheStore

#: the export file's own schema, recorded in its metadata
EXPORT_FORMAT = "featx-features-export"
EXPORT_VERSION = 1
FORMATS = {"npz": (".npz",), "parquet": (".parquet", ".pq")}
#: features per parquet row group: large enough to read fast, small enough to hold in memory
ROW_GROUP_BYTES = 64 << 20


@dataclass(frozen=True)
class ExportedFile:
    """What :func:`export_features` wrote."""

    path: Path
    format: str
    layers: list[str]
    rows: int
    size_bytes: int


def export_features(entry, out: str | os.PathLike, *, layers=None, format: str | None = None,
                    include_bad: bool = False, force: bool = False,
                    cache_dir: str | os.PathLike | None = None) -> ExportedFile:
    """Write the features of ``layers`` (names or aliases; default: every layer of the entry) to
    ``out`` as npz or parquet (``format``, default from the file's suffix)."""
    out = Path(out).expanduser()
    _check_target(out, force)
    format = _check_format(format, out)
    if format == "parquet":
        _pyarrow()  # before any reading
    entry = CacheStore(cache_dir).resolve(entry)
    picked = _pick_layers(entry, layers)
    samples = entry.samples()
    keep = np.ones(entry.n_samples, dtype=bool) if include_bad else samples["ok"]
    meta = {
        "format": EXPORT_FORMAT, "version": EXPORT_VERSION, "featx_version": _featx_version(),
        "entry": {"key": entry.key, "model": entry.model, "dataset": entry.dataset, "path": str(entry.path)},
        "classes": list(entry.classes), "include_bad": bool(include_bad), "dtype": "float32",
        "rows": int(keep.sum()),
        "layers": [{"name": r.name, "index": r.index, "depth": r.depth, "width": r.width, "pool": r.pool,
                    "raw_shape": list(r.raw_shape), "stored_dtype": r.dtype} for r in picked],
    }
    write = _write_npz if format == "npz" else _write_parquet
    out.parent.mkdir(parents=True, exist_ok=True)
    _write_new(out, force, lambda fh: write(fh, entry, picked, samples, keep, meta))
    return ExportedFile(out, format, [r.name for r in picked], meta["rows"], out.stat().st_size)


# ------------------------------------------------------------------------------ checks


def _check_format(format: str | None, out: Path) -> str:
    by_suffix = next((name for name, suffixes in FORMATS.items() if out.suffix.lower() in suffixes), None)
    if format is None:
        if by_suffix is None:
            raise UsageError(f"Cannot tell the export format from {out.name!r}: give --format npz or parquet, or "
                             "an --out file ending in .npz or .parquet.")
        return by_suffix
    if format not in FORMATS:
        raise UsageError(f"Unknown export format {format!r}. Valid: {', '.join(FORMATS)}."
                         + did_you_mean(format, FORMATS))
    if by_suffix is not None and by_suffix != format:
        raise UsageError(f"--format {format} does not match the file name {out.name!r} (a {by_suffix} name). "
                         f"Name the file *{FORMATS[format][0]}, or drop --format.")
    return format


def _check_target(out: Path, force: bool) -> None:
    if out.is_dir():
        raise UsageError(f"{out} is a folder; --out names the file to write, e.g. {out / 'features.npz'}.")
    if out.exists() and not force:
        raise UsageError(f"{out} already exists; featx will not overwrite it. Choose another --out, or add "
                         "--force (force=True) to replace it.")


def _pick_layers(entry: FeatureEntry, layers) -> list[Layer]:
    """The entry's layers by name or alias, in the order given, each once; default all, shallow to deep."""
    if layers is None or layers == [] or layers == ():
        return list(entry.layers)
    names = [layers] if isinstance(layers, str) else list(layers)
    names = [part.strip() for text in names for part in str(text).split(",") if part.strip()]
    if not names:
        raise UsageError("No layer named: give layer names (see featx cache info ENTRY), or none for all.")
    picked: dict[str, Layer] = {}
    for name in names:
        record = entry.layer(name)  # UnknownLayerError with close matches
        picked.setdefault(record.name, record)
    return list(picked.values())


def _pyarrow():
    try:
        import pyarrow
        import pyarrow.parquet
    except ImportError:
        raise MissingDependencyError("Exporting to parquet needs pyarrow: pip install pyarrow (or pip install "
                                     "'featx[parquet]'); --format npz needs nothing more.") from None
    return pyarrow, pyarrow.parquet


def _featx_version() -> str:
    from .. import __version__

    return __version__


# ------------------------------------------------------------------------------ writing


def _write_new(out: Path, force: bool, write) -> None:
    """Write ``out`` atomically; without ``force`` never over a file, even one that appeared meanwhile."""
    try:
        atomic_write_bytes(out, write, replace=force)
    except FileExistsError:
        raise UsageError(f"{out} appeared while the export was written; featx will not overwrite it. "
                         "Choose another --out, or add --force.") from None


def _text(values) -> np.ndarray:
    """A fixed-width unicode array: readable by np.load without pickles, unlike an object array."""
    return np.array([str(v) for v in values], dtype=str) if len(values) else np.zeros(0, dtype="<U1")


def _write_npz(fh, entry: FeatureEntry, layers: list[Layer], samples: dict, keep: np.ndarray, meta: dict) -> None:
    n = int(keep.sum())
    small = {
        "label": samples["label"][keep].astype(np.int64), "id": _text(samples["id"][keep]),
        "split": _text(samples["split"][keep]), "ok": samples["ok"][keep].astype(bool),
        "error": _text(samples["error"][keep]), "classes": _text(entry.classes),
        "layers": _text([r.name for r in layers]), "metadata": np.array(json.dumps(meta)),
    }
    with zipfile.ZipFile(fh, "w", compression=zipfile.ZIP_STORED, allowZip64=True) as zf:
        for name, array in small.items():
            with zf.open(f"{name}.npy", "w", force_zip64=True) as member:
                np.lib.format.write_array(member, array, allow_pickle=False)
        for record in layers:  # streamed: the header, then the rows as they are read
            with zf.open(f"features/{record.name}.npy", "w", force_zip64=True) as member:
                header = {"descr": np.lib.format.dtype_to_descr(np.dtype("<f4")), "fortran_order": False,
                          "shape": (n, record.width)}
                np.lib.format.write_array_header_1_0(member, header)
                written = 0
                for _, rows in entry.iter_rows(record.name, keep):
                    member.write(np.ascontiguousarray(rows, dtype="<f4").tobytes())
                    written += len(rows)
                if written != n:
                    raise RuntimeError(f"layer {record.name}: read {written} rows, expected {n}")


def _write_parquet(fh, entry: FeatureEntry, layers: list[Layer], samples: dict, keep: np.ndarray,
                   meta: dict) -> None:
    pa, pq = _pyarrow()
    columns = [("id", pa.string()), ("split", pa.string()), ("label", pa.int64()), ("class_name", pa.string()),
               ("ok", pa.bool_()), ("error", pa.string())]
    columns += [(f"features/{r.name}", pa.list_(pa.field("element", pa.float32(), nullable=False), r.width))
                for r in layers]
    schema = pa.schema(columns, metadata={"featx": json.dumps(meta)})
    rows = np.flatnonzero(keep)
    step = max(1, ROW_GROUP_BYTES // max(1, 4 * sum(r.width for r in layers)))
    classes = list(entry.classes)
    with pq.ParquetWriter(fh, schema) as writer:
        for start in range(0, len(rows), step):
            group = rows[start:start + step]
            mask = np.zeros(entry.n_samples, dtype=bool)
            mask[group] = True
            labels = samples["label"][group].astype(np.int64)
            arrays = [
                pa.array(samples["id"][group].astype(str).tolist(), pa.string()),
                pa.array(samples["split"][group].astype(str).tolist(), pa.string()),
                pa.array(labels, pa.int64()),
                pa.array([classes[i] if 0 <= i < len(classes) else None for i in labels.tolist()], pa.string()),
                pa.array(samples["ok"][group].astype(bool), pa.bool_()),
                pa.array(samples["error"][group].astype(str).tolist(), pa.string()),
            ]
            for (_, kind), record in zip(columns[6:], layers):
                X = np.empty((len(group), record.width), dtype=np.float32)
                for position, chunk in entry.iter_rows(record.name, mask):
                    X[position:position + len(chunk)] = chunk
                arrays.append(pa.FixedSizeListArray.from_arrays(pa.array(X.reshape(-1), pa.float32()),
                                                                type=kind))
            writer.write_table(pa.Table.from_arrays(arrays, schema=schema), row_group_size=len(group))
