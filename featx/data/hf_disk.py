"""Hugging Face datasets saved to disk (``hf-disk:PATH[?image=COL&label=COL]``).

PATH is what ``Dataset.save_to_disk`` or ``DatasetDict.save_to_disk`` wrote; it is opened with
``datasets.load_from_disk`` only, which reads the local Arrow files (memory-mapped) and never the
Hub. The splits of a DatasetDict are featx's splits (``validation``, ``valid`` and ``dev`` are
``val``). The image column is the ``datasets.Image`` feature (else a binary column of encoded
images); the label column is the ``ClassLabel`` feature, whose names become the classes (else
an integer or string column called label, labels, class or target). ``?image=`` and ``?label=``
name the columns when that guess is ambiguous or wrong. Images are decoded by featx's own
decoder from the stored bytes (``Image(decode=False)``), as files of a folder are.
"""

from __future__ import annotations

import logging
import os
from contextlib import contextmanager
from pathlib import Path
from urllib.parse import parse_qsl, urlencode

import numpy as np

from ..errors import UsageError, did_you_mean
from .images import ImageDecodeError
from .optional import require
from .packed import PackedSource, warn_problems
from .sources import _SPLIT_DIRS, _check_same_numbers, _natural_sorted

log = logging.getLogger(__name__)

OPTIONS = ("image", "label")
LABEL_NAMES = ("label", "labels", "class", "target")
PATH_NAMES = ("image", "img", "path", "file", "filename", "image_path")
OFFLINE_VARIABLES = ("HF_DATASETS_OFFLINE", "HF_HUB_OFFLINE")


class ArrowSource(PackedSource):
    """Rows of the splits of a saved dataset, in split order; the tables are opened on first use in
    each process (DataLoader workers receive the path, not the open tables)."""

    def __init__(self, spec, root, parts: list[tuple[str | None, int]], image_column: str, image_kind: str,
                 label_column: str | None, containers, ids, labels, splits, classes, problems, hash_content=False):
        super().__init__(spec, root, containers, ids, labels, splits, classes, problems, hash_content,
                         options={"image_column": image_column, "label_column": label_column})
        self.parts = parts
        self.offsets = np.cumsum([0] + [n for _, n in parts])
        self.image_column, self.image_kind = image_column, image_kind
        self._tables: list | None = None

    def __getstate__(self):
        return {**self.__dict__, "_tables": None}

    def _locate(self, i: int) -> tuple[int, int]:
        part = int(np.searchsorted(self.offsets, i, side="right") - 1)
        return part, i - int(self.offsets[part])

    def location(self, i: int) -> str:
        part, j = self._locate(i)
        split = self.parts[part][0]
        return f"{self.root}, {'split ' + repr(split) + ', ' if split is not None else ''}row {j}"

    def encoded(self, i: int) -> bytes | Path:
        if self._tables is None:
            self._tables = _image_tables(self.root, self.parts, self.image_column, self.image_kind)
        part, j = self._locate(i)
        value = self._tables[part][j][self.image_column]
        if isinstance(value, dict):  # datasets.Image without decoding: {"bytes": ..., "path": ...}
            value = value.get("bytes") or value.get("path")
        if isinstance(value, (bytes, bytearray, memoryview)) and len(value):
            return bytes(value)
        if isinstance(value, str) and value:
            return _image_path(self.root, value)
        raise ImageDecodeError(f"no image in the row (column {self.image_column!r} is empty)")


def load_hf_disk(text: str, hash_content: bool = False) -> ArrowSource:
    path, options = _parse(text)
    root = Path(path).expanduser()
    if not root.is_dir():
        raise UsageError(f"hf-disk: {str(root)!r} is not a directory. Give the folder that Dataset.save_to_disk or "
                         "DatasetDict.save_to_disk wrote.")
    root = root.resolve()
    loaded = _load(root)
    datasets = require("datasets", "hf-disk: (Hugging Face datasets saved to disk)")
    if isinstance(loaded, datasets.DatasetDict):
        named = [(name, loaded[name]) for name in loaded]
        _check_splits(root, [name for name, _ in named])
    else:
        named = [(None, loaded)]
    features = named[0][1].features
    image_column, image_kind = _image_column(datasets, root, features, options.get("image"))
    label_column, label_kind = _label_column(datasets, root, features, options.get("label"))
    for name, ds in named[1:]:
        for column in filter(None, (image_column, label_column)):
            if column not in ds.features or ds.features[column] != features[column]:
                raise UsageError(f"hf-disk:{root}: split {name!r} does not have the column {column!r} of split "
                                 f"{named[0][0]!r} with the same type; featx reads one schema for all splits.")

    ids, splits, raw, problems, containers = [], [], [], {}, []
    external: list[Path] = []
    for name, ds in named:
        n = ds.num_rows
        start = len(ids)
        ids += [f"{name}/{j:06d}" if name is not None else f"{j:06d}" for j in range(n)]
        splits += [_SPLIT_DIRS[name.lower()] if name is not None else ""] * n
        raw += _label_values(ds, label_column, label_kind) if label_column else [None] * n
        for j, why in _missing_images(ds, root, image_column, image_kind, external).items():
            problems[start + j] = why
        containers += [Path(f["filename"]) for f in ds.cache_files]
    if not ids:
        raise UsageError(f"hf-disk:{root} has no rows.")
    classes, labels = _classes(datasets, root, features, label_column, label_kind, raw, problems)
    spec = f"hf-disk:{root}" + (f"?{urlencode(sorted(options.items()))}" if options else "")
    warn_problems(spec, ids, problems, "have no image or an invalid label")
    unlabelled = sum(1 for i, lab in enumerate(labels) if lab < 0 and i not in problems)
    if unlabelled:
        log.warning("%s: %d row(s) have no label%s and are kept as unlabelled (-1), not probed", spec, unlabelled,
                    "" if label_column else " column (name one with ?label=COL)")
    return ArrowSource(spec, root, [(name, ds.num_rows) for name, ds in named], image_column, image_kind,
                       label_column, containers + sorted(set(external)), ids, labels, splits, classes, problems,
                       hash_content=hash_content)


# --------------------------------------------------------------------------- opening


def _parse(text: str) -> tuple[str, dict[str, str]]:
    """PATH and the ``?image=COL&label=COL`` options."""
    path, mark, query = text.partition("?")
    if not mark or Path(text).expanduser().exists():
        return text, {}
    try:
        pairs = parse_qsl(query, keep_blank_values=True, strict_parsing=True)
    except ValueError:
        raise UsageError(f"hf-disk:{text}: cannot read the options {query!r}; write ?image=COL&label=COL.") from None
    options: dict[str, str] = {}
    for key, value in pairs:
        if key not in OPTIONS:
            raise UsageError(f"hf-disk: unknown option {key!r}.{did_you_mean(key, OPTIONS)} Valid options: "
                             "image=COL (the image column), label=COL (the label column).")
        if not value or key in options:
            raise UsageError(f"hf-disk: option {key} needs one column name, e.g. ?{key}=COL.")
        options[key] = value
    return path, options


@contextmanager
def offline_environment():
    """``datasets`` told not to reach the Hub while it is imported and used here; variables the user
    set are left as they are, and the ones added are removed afterwards."""
    added = [name for name in OFFLINE_VARIABLES if name not in os.environ]
    for name in added:
        os.environ[name] = "1"
    try:
        yield
    finally:
        for name in added:
            os.environ.pop(name, None)


def _load(root: Path):
    with offline_environment():
        datasets = require("datasets", "hf-disk: (Hugging Face datasets saved to disk)")
        try:
            return datasets.load_from_disk(str(root), keep_in_memory=False)
        except FileNotFoundError as exc:
            raise UsageError(
                f"hf-disk:{root} is not a dataset written by save_to_disk ({exc}). Expected dataset_info.json and "
                "state.json (a Dataset) or dataset_dict.json (a DatasetDict) in it."
            ) from None


def _image_tables(root: Path, parts, column: str, kind: str) -> list:
    """Each split reduced to its image column, images left as bytes for featx's decoder."""
    loaded = _load(root)
    datasets = require("datasets", "hf-disk: (Hugging Face datasets saved to disk)")
    tables = []
    for name, _ in parts:
        ds = (loaded[name] if name is not None else loaded).select_columns([column])
        if kind == "image":
            ds = ds.cast_column(column, datasets.Image(decode=False))
        tables.append(ds)
    return tables


def _image_path(root: Path, value: str) -> Path:
    p = Path(value).expanduser()
    return p if p.is_absolute() else root / p


def _check_splits(root: Path, names: list[str]) -> None:
    unknown = [n for n in names if n.lower() not in _SPLIT_DIRS]
    if unknown:
        raise UsageError(
            f"hf-disk:{root} has split(s) {', '.join(map(repr, unknown))} that featx does not know. Valid splits: "
            "train, validation (also val, valid, dev) and test (also testing). Save the dataset without them, e.g. "
            "DatasetDict({k: d[k] for k in ('train', 'test')}).save_to_disk(...), or rename them."
        )


# --------------------------------------------------------------------------- columns


def _kinds(datasets, features, classify) -> dict[str, str]:
    return {name: kind for name, feature in features.items() if (kind := classify(datasets, feature))}


def _image_kind(datasets, feature) -> str | None:
    if isinstance(feature, datasets.Image):
        return "image"
    if isinstance(feature, datasets.Value) and feature.dtype in ("binary", "large_binary"):
        return "bytes"
    if isinstance(feature, datasets.Value) and feature.dtype in ("string", "large_string"):
        return "path"
    return None


def _label_kind(datasets, feature) -> str | None:
    if isinstance(feature, datasets.ClassLabel):
        return "classlabel"
    if isinstance(feature, datasets.Value) and feature.dtype.startswith(("int", "uint")):
        return "int"
    if isinstance(feature, datasets.Value) and feature.dtype in ("string", "large_string"):
        return "string"
    return None


def _columns_text(features) -> str:
    return ", ".join(f"{name} ({feature})" for name, feature in features.items())


def _named(root: Path, features, column: str, role: str):
    if column not in features:
        raise UsageError(f"hf-disk:{root} has no column {column!r} (?{role}=).{did_you_mean(column, features)} "
                         f"Columns: {_columns_text(features)}.")
    return features[column]


def _image_column(datasets, root: Path, features, chosen: str | None) -> tuple[str, str]:
    if chosen is not None:
        kind = _image_kind(datasets, _named(root, features, chosen, "image"))
        if kind is None:
            raise UsageError(f"hf-disk:{root}: column {chosen!r} is {features[chosen]}; an image column is a "
                             "datasets.Image, binary (encoded image bytes) or string (image paths) column.")
        return chosen, kind
    kinds = _kinds(datasets, features, _image_kind)
    for wanted in ("image", "bytes"):
        found = [name for name, kind in kinds.items() if kind == wanted]
        if len(found) == 1:
            return found[0], wanted
        if len(found) > 1:
            raise UsageError(f"hf-disk:{root} has several image columns ({', '.join(found)}); choose one with "
                             f"hf-disk:{root}?image=COL.")
    named = [name for name in features if name.lower() in PATH_NAMES and kinds.get(name) == "path"]
    if named:
        return named[0], "path"
    raise UsageError(f"hf-disk:{root} has no image column. Columns: {_columns_text(features)}. featx reads a "
                     "datasets.Image column, a binary column of encoded images, or a column of image paths named "
                     "with ?image=COL.")


def _label_column(datasets, root: Path, features, chosen: str | None) -> tuple[str | None, str | None]:
    if chosen is not None:
        kind = _label_kind(datasets, _named(root, features, chosen, "label"))
        if kind is None:
            raise UsageError(f"hf-disk:{root}: column {chosen!r} is {features[chosen]}; a label column is a "
                             "ClassLabel, integer or string column.")
        return chosen, kind
    kinds = _kinds(datasets, features, _label_kind)
    found = [name for name, kind in kinds.items() if kind == "classlabel"]
    if len(found) > 1:
        raise UsageError(f"hf-disk:{root} has several ClassLabel columns ({', '.join(found)}); choose one with "
                         f"hf-disk:{root}?label=COL.")
    if found:
        return found[0], "classlabel"
    named = [name for name in features if name.lower() in LABEL_NAMES and name in kinds]
    return (named[0], kinds[named[0]]) if named else (None, None)


# --------------------------------------------------------------------------- rows


def _label_values(ds, column: str, kind: str) -> list:
    values = ds.with_format("arrow")[column].to_pylist()
    if kind == "string":
        return [v if v else None for v in values]
    return values


def _missing_images(ds, root: Path, column: str, kind: str, external: list[Path]) -> dict[int, str]:
    """Rows without an image; the image files that rows name instead of holding bytes go to ``external``
    (their state is part of the fingerprint, as a folder's files are)."""
    import pyarrow.compute as pc

    problems: dict[int, str] = {}
    start = 0
    for chunk in ds.with_format("arrow")[column].chunks:
        if kind == "image":
            no_bytes = pc.or_kleene(chunk.is_null(), chunk.field("bytes").is_null())
            paths = chunk.field("path")
        elif kind == "bytes":
            no_bytes, paths = chunk.is_null(), None
        else:
            no_bytes, paths = np.ones(len(chunk), dtype=bool), chunk
        rows = np.flatnonzero(np.asarray(no_bytes, dtype=bool))
        names = paths.take(rows).to_pylist() if paths is not None and len(rows) else [None] * len(rows)
        for row, name in zip(rows, names):
            if name:
                external.append(_image_path(root, name))
            else:
                problems[start + int(row)] = f"no image in the row (column {column!r} is empty)"
        start += len(chunk)
    return problems


def _classes(datasets, root: Path, features, column: str | None, kind: str | None, raw: list,
             problems: dict[int, str]) -> tuple[list[str], list[int]]:
    """Class names and each row's class index (-1 unlabelled); invalid values become problems."""
    if column is None:
        return [], [-1] * len(raw)
    if kind == "classlabel":
        names = list(features[column].names)
        labels = []
        for i, value in enumerate(raw):
            if value is None or value == -1:  # datasets writes -1 for "no label" (e.g. hidden test labels)
                labels.append(-1)
            elif 0 <= value < len(names):
                labels.append(int(value))
            else:
                problems.setdefault(i, f"invalid label {value}: the ClassLabel {column!r} has {len(names)} names")
                labels.append(-1)
        return names, labels
    if kind == "int":
        for i, value in enumerate(raw):
            if value is not None and value < -1:
                problems.setdefault(i, f"invalid label {value} in column {column!r}: class indices are >= 0 "
                                       "(-1 means unlabelled)")
        values = [None if v is None or v == -1 or i in problems else str(v) for i, v in enumerate(raw)]
    else:
        values = list(raw)
        _check_same_numbers([v for v in values if v is not None], f"hf-disk:{root}, column {column!r}")
    names = _natural_sorted(v for v in values if v is not None)
    index = {c: k for k, c in enumerate(names)}
    return names, [index[v] if v is not None and i not in problems else -1 for i, v in enumerate(values)]
