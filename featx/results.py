"""``featx.load_results``: any result folder featx writes, read back as one small object.

A probe (``featx probe``/``run``), a comparison (``featx compare``), a fine-tuning run and a
fine-tuning sweep each write one JSON file with a ``format`` name and a schema ``version``.
This module finds that file, checks both before trusting a single key, and exposes the
parts users reach for under the same names whatever the kind: ``rows``, ``best``,
``protocol``. Files from before a schema carried its version are read as the version they are.

Torch-free and cheap to import (JSON and the folder rules only); pandas is imported by
:meth:`Results.to_frame` alone.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path

from ._resultdir import COMPARE, FINETUNE, PROBE, SWEEP, found_kind
from .errors import MissingDependencyError, ResultsFormatError, ResultsNotFoundError, UsageError

__all__ = ["Results", "load_results", "SCHEMAS"]


@dataclass(frozen=True)
class Schema:
    """One kind of result file: its name, its ``format`` and the schema versions this featx reads."""

    kind: str
    file: str
    format: str
    #: versions this featx reads, oldest first; the last is the one it writes
    versions: tuple[int, ...]
    #: keys that identify a file written before it carried ``format``/``version`` (read as version 1)
    unversioned_keys: frozenset[str] = frozenset()
    #: keys every readable file holds, with their JSON type
    required: dict[str, type] = field(default_factory=dict)
    command: str = ""


SCHEMAS = {
    PROBE: Schema(PROBE, "results.json", "featx-probe-results", (1, 2),
                  required={"rows": list, "best": dict, "protocol": dict, "entry": dict},
                  command="featx probe / featx run"),
    COMPARE: Schema(COMPARE, "comparison.json", "featx-comparison", (1,),
                    required={"leaderboard": list, "leader": dict, "protocol": dict}, command="featx compare"),
    FINETUNE: Schema(FINETUNE, "finetune.json", "featx-finetune-result", (1, 2),
                     unversioned_keys=frozenset({"fingerprint", "config", "history", "test"}),
                     required={"history": list, "test": dict, "config": dict, "layer": str},
                     command="featx finetune"),
    SWEEP: Schema(SWEEP, "sweep.json", "featx-finetune-sweep", (1, 2),
                  unversioned_keys=frozenset({"grid", "rows", "chosen"}),
                  required={"rows": list, "chosen": dict, "grid": dict}, command="featx finetune --sweep"),
}
_BY_FILE = {s.file: s for s in SCHEMAS.values()}
_EXPECTED = ("results.json (featx probe, featx run), comparison.json (featx compare), finetune.json "
             "(featx finetune) or sweep.json (featx finetune --sweep)")


@dataclass(frozen=True, eq=False)
class Results:
    """A result folder read back: the same attributes for every kind.

    ``kind``: ``"probe"``, ``"comparison"``, ``"finetune"`` or ``"finetune-sweep"``.
    ``rows``: probe, one per (layer, head) cell; comparison, the leaderboard (best first);
    finetune, one per epoch (epoch 0 = before training); sweep, one per grid point.
    ``best``: the best cell; the leader; the test metrics with ``layer``, ``best_epoch`` and
    ``val_top1``; the chosen grid point. ``protocol``: how the numbers were obtained (for
    fine-tuning, the run's configuration; for a sweep, its grid). ``entry``: the probe's cache
    entry (None for other kinds; a comparison has :attr:`models`). ``raw``: the parsed JSON.
    """

    kind: str
    path: Path
    schema_version: int
    rows: list[dict]
    best: dict
    protocol: dict
    entry: dict | None
    raw: dict = field(repr=False)

    @property
    def file(self) -> Path:
        """The JSON file this was read from."""
        return self.path / SCHEMAS[self.kind].file

    @cached_property
    def models(self) -> dict[str, Results]:
        """A comparison's backbones, by leaderboard name, each its own probe result (``models/NAME``);
        empty for other kinds."""
        out = {}
        if self.kind != COMPARE:
            return out
        root = self.path.resolve()
        for row in self.rows:
            folder = (self.path / str(row.get("results", ""))).resolve()
            if not row.get("results") or not folder.is_relative_to(root) or folder == root:
                raise ResultsFormatError(f"{self.file} is damaged: leaderboard row {row.get('model')!r} does not "
                                         "name its probe folder (models/NAME) inside the comparison folder.")
            out[row["model"]] = load_results(folder, kind=PROBE)
        return out

    def to_frame(self):
        """``rows`` as a pandas DataFrame, one row each; an interval column (``test_top1_ci``) is
        also split into ``_low`` and ``_high`` number columns beside it."""
        try:
            import pandas as pd
        except ImportError:
            raise MissingDependencyError("Results.to_frame needs pandas: pip install pandas "
                                         "(or pip install 'featx[pandas]').") from None
        frame = pd.DataFrame.from_records(self.rows)
        for name in [c for c in frame.columns if str(c).endswith(("_ci", "_ci95"))]:
            low, high = zip(*(_bounds(v) for v in frame[name])) if len(frame) else ((), ())
            at = frame.columns.get_loc(name) + 1
            frame.insert(at, f"{name}_low", pd.Series(low, index=frame.index, dtype="float64"))
            frame.insert(at + 1, f"{name}_high", pd.Series(high, index=frame.index, dtype="float64"))
        return frame

    def __repr__(self) -> str:
        best = self.best
        where = " ".join(str(best[k]) for k in ("model", "layer", "head") if best.get(k) is not None)
        score = next((f"{k} {best[k]:.4f}" for k in ("test_top1", "top1") if isinstance(best.get(k), (int, float))),
                     "")
        return (f"Results(kind={self.kind!r}, path={str(self.path)!r}, schema_version={self.schema_version}, "
                f"rows={len(self.rows)}, best={where}{': ' + score if score else ''})")


def _bounds(value) -> tuple[float, float]:
    if isinstance(value, (list, tuple)) and len(value) == 2:
        return tuple(float("nan") if v is None else float(v) for v in value)
    return float("nan"), float("nan")


# ------------------------------------------------------------------------------ finding and checking


def load_results(path: str | os.PathLike, *, kind: str | None = None) -> Results:
    """The featx result in folder ``path`` (or in the JSON file ``path`` names).

    ``kind``: refuse any other kind of result (``"probe"``, ``"comparison"``, ``"finetune"``,
    ``"finetune-sweep"``). Raises :class:`~featx.errors.ResultsNotFoundError` for a path that
    holds no finished result (of that kind) and :class:`~featx.errors.ResultsFormatError` for a
    damaged file or a schema version this featx does not read.
    """
    if kind is not None and kind not in SCHEMAS:
        raise UsageError(f"Unknown result kind {kind!r}. Valid: {', '.join(SCHEMAS)}.")
    folder, schema = _locate(Path(path).expanduser())
    if kind is not None and schema.kind != kind:
        raise ResultsNotFoundError(f"{folder} holds a featx {schema.kind} result ({schema.file}), not a {kind} "
                                   f"result ({SCHEMAS[kind].file}, written by {SCHEMAS[kind].command}).")
    version, data = _read(folder / schema.file, schema)
    return _build(folder, schema, version, data)


def _locate(path: Path) -> tuple[Path, Schema]:
    """The result folder and its schema; a path that holds no finished result is refused."""
    if path.is_file():
        if path.name not in _BY_FILE:
            raise ResultsNotFoundError(f"{path} is not a featx result file: expected a result folder, or its "
                                       f"{_EXPECTED}.")
        return path.parent, _BY_FILE[path.name]
    if not path.exists():
        raise ResultsNotFoundError(f"No featx result at {path}: it does not exist. Give the folder that a featx "
                                   "command wrote (its --out), e.g. featx-results/<entry>.")
    if not path.is_dir():
        raise ResultsNotFoundError(f"{path} is not a featx result: expected a result folder holding {_EXPECTED}.")
    kind = found_kind(path)
    if kind is None:  # no marker: a result copied without it, or a folder of something else
        kind = next((s.kind for s in SCHEMAS.values() if (path / s.file).is_file()), None)
    if kind is None:
        names = sorted(p.name for p in path.iterdir())
        found = ", ".join(names[:5]) + (f" and {len(names) - 5} more" if len(names) > 5 else "") or "nothing"
        hint = (" It looks like a feature cache: read features with featx.load_features(ENTRY, LAYER)."
                if any(n.endswith(".h5") for n in names) else "")
        raise ResultsNotFoundError(f"{path} holds no featx result: expected {_EXPECTED}; found {found}.{hint}")
    schema = SCHEMAS[kind]
    if not (path / schema.file).is_file():
        raise ResultsNotFoundError(f"{path} holds an unfinished featx {kind} result: no {schema.file} yet (it is "
                                   f"written last). Run the same {schema.command} command again to finish it.")
    return path, schema


def _read(file: Path, schema: Schema) -> tuple[int, dict]:
    """The parsed file with its schema version, after checking format, version and shape."""
    expected = f"a {schema.format} file as {schema.command} writes it"
    try:
        data = json.loads(file.read_bytes())
    except OSError as exc:
        raise ResultsFormatError(f"{file} cannot be read: {exc.strerror or exc}.") from exc
    except ValueError as exc:  # also UnicodeDecodeError
        raise ResultsFormatError(f"{file} is damaged: not valid JSON ({exc}); expected {expected}.") from None
    if not isinstance(data, dict):
        raise ResultsFormatError(f"{file} is damaged: it holds a JSON {type(data).__name__}, expected {expected}.")
    fmt, version = data.get("format"), data.get("version")
    if fmt is None and version is None and schema.unversioned_keys and schema.unversioned_keys <= data.keys():
        version = 1  # written before the file carried its format and version
    elif fmt != schema.format:
        raise ResultsFormatError(f"{file} has format {fmt!r}, expected {schema.format!r} ({expected}).")
    readable = ", ".join(map(str, schema.versions))
    if not isinstance(version, int) or isinstance(version, bool) or version < 1:
        raise ResultsFormatError(f"{file} has no valid schema version ({version!r}); this featx reads "
                                 f"{schema.format} versions {readable}.")
    if version not in schema.versions:
        from . import __version__

        newer = version > schema.versions[-1]
        raise ResultsFormatError(
            f"{file} is {schema.format} schema version {version}; featx {__version__} reads versions {readable}. "
            + ("It was written by a newer featx: upgrade featx to read it (pip install -U featx)." if newer
               else "Re-run the command that wrote it."))
    for key, json_type in schema.required.items():
        if not isinstance(data.get(key), json_type):
            noun = {list: "array", dict: "object", str: "string"}[json_type]
            raise ResultsFormatError(f"{file} is damaged: {key!r} is missing or not a JSON {noun}.")
    rows_key = {PROBE: "rows", COMPARE: "leaderboard", FINETUNE: "history", SWEEP: "rows"}[schema.kind]
    if not all(isinstance(row, dict) for row in data[rows_key]):
        raise ResultsFormatError(f"{file} is damaged: {rows_key!r} holds something other than JSON objects.")
    return version, data


def _build(folder: Path, schema: Schema, version: int, data: dict) -> Results:
    if schema.kind == PROBE:
        rows, best, protocol, entry = data["rows"], data["best"], data["protocol"], data["entry"]
    elif schema.kind == COMPARE:
        rows, best, protocol, entry = data["leaderboard"], data["leader"], data["protocol"], None
    elif schema.kind == FINETUNE:
        best = {"layer": data["layer"], "head_init": data.get("head_init"), "best_epoch": data.get("best_epoch"),
                "val_top1": data.get("best_val_top1"), **data["test"]}
        rows, protocol, entry = data["history"], data["config"], None
    else:
        rows, best, protocol, entry = data["rows"], data["chosen"], {"grid": data["grid"]}, None
    return Results(kind=schema.kind, path=folder, schema_version=version, rows=rows, best=best,
                   protocol=protocol, entry=entry, raw=data)
