"""The cache directory: finding, creating, locking, quarantining and removing entries.

Layout of the cache root::

    <slug>-<key[:16]>.h5    complete entries (visible only once complete)
    .locks/<key>.lock       one flock per key: only one process builds an entry
    .partial/<key>/         shards of an extraction in progress (resumable)
    .tmp/                   entry files being assembled (renamed into place when done)
    quarantine/             corrupt files moved aside, never read again
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import errno
import fcntl
import json
import logging
import os
import re
import shutil
import time
from pathlib import Path

import h5py
import numpy as np

from ..errors import CacheCorruptError, EntryNotFoundError
from .entry import (
    ENCODING_TYPE,
    ENCODING_VERSION,
    STR,
    FeatureEntry,
    LayerRecord,
    chunk_rows,
    config_json,
)
from .key import strings_digest
from .partial import PartialRun, fsync_dir

log = logging.getLogger(__name__)


def default_cache_dir() -> Path:
    """``$FEATX_CACHE_DIR``, else ``./cache``."""
    env = os.environ.get("FEATX_CACHE_DIR")
    return Path(env).expanduser() if env else Path("cache")


def _now() -> str:
    return _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


def _slug(text: str) -> str:
    text = text.rsplit("/", 1)[-1] if text.startswith(("folder:", "csv:")) else text
    return re.sub(r"[^A-Za-z0-9_.+-]+", "_", text).strip("_")[:40] or "x"


class CacheStore:
    """A cache root directory."""

    def __init__(self, root: str | Path | None = None):
        self.root = Path(root).expanduser() if root else default_cache_dir()

    def _ensure(self) -> None:
        for sub in ("", ".locks", ".partial", ".tmp"):
            (self.root / sub).mkdir(parents=True, exist_ok=True)

    # ---------------------------------------------------------------- lookup

    def filename(self, key: str, config: dict) -> str:
        return f"{_slug(config['dataset']['source'])}-{_slug(config['model']['name'])}-{key[:16]}.h5"

    def _candidates(self, key_prefix: str = "") -> list[Path]:
        if not self.root.is_dir():
            return []
        return sorted(p for p in self.root.glob(f"*-{key_prefix[:16]}*.h5") if p.is_file())

    def find(self, key: str, verify: bool = False) -> FeatureEntry | None:
        """The complete entry for ``key``; corrupt files are quarantined and reported as absent."""
        for path in self._candidates(key):
            if not path.name.endswith(f"-{key[:16]}.h5"):
                continue
            try:
                entry = FeatureEntry(path)
                if entry.key != key:
                    continue
                if verify:
                    entry.verify()
                return entry
            except CacheCorruptError as exc:
                self.quarantine(path, str(exc))
        return None

    def entries(self) -> list[FeatureEntry | tuple[Path, str]]:
        """Every entry; unreadable files come back as (path, reason)."""
        out: list[FeatureEntry | tuple[Path, str]] = []
        for path in self._candidates():
            try:
                out.append(FeatureEntry(path))
            except CacheCorruptError as exc:
                out.append((path, str(exc)))
        return out

    def resolve(self, ref) -> FeatureEntry:
        """An entry from a FeatureEntry, a file path, a file name or a key prefix."""
        if isinstance(ref, FeatureEntry):
            return ref
        text = str(ref)
        path = Path(text).expanduser()
        if path.suffix == ".h5" and path.is_file():
            try:
                return FeatureEntry(path)
            except CacheCorruptError as exc:
                self.quarantine(path, str(exc))
                raise
        if (self.root / text).is_file():
            return self.resolve(self.root / text)
        if re.fullmatch(r"[0-9a-f]{4,64}", text):
            hits = [e for e in self.entries() if isinstance(e, FeatureEntry) and e.key.startswith(text)]
            if len(hits) == 1:
                return hits[0]
            if len(hits) > 1:
                raise EntryNotFoundError(
                    f"Key prefix {text!r} matches {len(hits)} entries; give more characters: "
                    + ", ".join(e.key[:16] for e in hits)
                )
        known = [e for e in self.entries() if isinstance(e, FeatureEntry)]
        listing = "; ".join(f"{e.key[:12]} ({e.dataset}, {e.model})" for e in known[:8]) or "none"
        raise EntryNotFoundError(
            f"No cache entry {text!r} in {self.root}. Entries: {listing}. "
            "Give a key prefix or a path; list them with: featx cache ls"
        )

    # ---------------------------------------------------------------- lifecycle

    def quarantine(self, path: Path, reason: str) -> Path | None:
        """Move a corrupt file aside so it is never read again."""
        qdir = self.root / "quarantine"
        qdir.mkdir(parents=True, exist_ok=True)
        target = qdir / f"{path.name}.{time.strftime('%Y%m%dT%H%M%S')}.{os.getpid()}"
        try:
            os.replace(path, target)
        except FileNotFoundError:
            return None
        (qdir / (target.name + ".reason.txt")).write_text(reason + "\n")
        log.warning("moved corrupt cache file %s to %s: %s", path, target, reason)
        return target

    def remove(self, entry: FeatureEntry) -> None:
        with self.lock(entry.key):
            entry.path.unlink(missing_ok=True)
            shutil.rmtree(self.root / ".partial" / entry.key, ignore_errors=True)

    @contextlib.contextmanager
    def lock(self, key: str):
        """Exclusive per-key lock; a second process waits, then finds the finished entry."""
        self._ensure()
        path = self.root / ".locks" / f"{key}.lock"
        fh = open(path, "a+")
        try:
            try:
                fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError as exc:
                if exc.errno not in (errno.EAGAIN, errno.EACCES):
                    raise
                fh.seek(0)
                holder = fh.read().strip() or "another process"
                log.info("waiting for %s, which is building cache entry %s", holder, key[:12])
                fcntl.flock(fh, fcntl.LOCK_EX)
            fh.seek(0)
            fh.truncate()
            fh.write(f"pid {os.getpid()}")
            fh.flush()
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)
            fh.close()

    def partial(self, key: str, plan: dict) -> PartialRun:
        self._ensure()
        return PartialRun(self.root / ".partial" / key, plan)

    # ---------------------------------------------------------------- writing

    def commit(self, key: str, config: dict, *, base: FeatureEntry | None, samples: dict | None,
               classes: list[str], ladder: dict, versions: dict, run: PartialRun,
               records: list[LayerRecord], featx_version: str) -> FeatureEntry:
        """Assemble shards (plus an existing entry) into a new file and rename it into place."""
        self._ensure()
        final = self.root / self.filename(key, config)
        tmp = self.root / ".tmp" / f"{key}.{os.getpid()}.h5"
        tmp.unlink(missing_ok=True)
        try:
            if base is not None:
                shutil.copyfile(base.path, tmp)
            with h5py.File(tmp, "a" if base is not None else "w", track_order=True) as f:
                if base is None:
                    self._write_header(f, key, config, samples, classes, ladder, versions, featx_version, run)
                f.attrs["complete"] = False
                self._write_layers(f, run, records)
                order = (json.loads(f["layers"].attrs["order"]) if base is not None else []) + [
                    r.name for r in records
                ]
                rank = {name: int(f["layers"][name].attrs["order"]) for name in order}
                f["layers"].attrs["order"] = json.dumps(sorted(order, key=rank.get))
                f.attrs["updated_utc"] = _now()
                f.attrs["complete"] = True
            with open(tmp, "rb") as fh:
                os.fsync(fh.fileno())
            os.replace(tmp, final)
            fsync_dir(self.root)
        finally:
            tmp.unlink(missing_ok=True)
        if base is not None and base.path != final:
            base.path.unlink(missing_ok=True)
        return FeatureEntry(final)

    @staticmethod
    def _write_header(f, key, config, samples, classes, ladder, versions, featx_version, run):
        f.attrs["encoding-type"] = ENCODING_TYPE
        f.attrs["encoding-version"] = ENCODING_VERSION
        f.attrs["featx_version"] = featx_version
        f.attrs["created_utc"] = _now()
        f.attrs["key"] = key
        f.attrs["config"] = config_json(config)
        f.attrs["versions"] = json.dumps(versions, sort_keys=True)
        ok = np.zeros(len(samples["id"]), dtype=bool)
        err = np.empty(len(samples["id"]), dtype=object)
        for shard in range(run.n_shards):
            start, stop = run.rows(shard)
            _, shard_ok, shard_err = run.read(shard)
            ok[start:stop], err[start:stop] = shard_ok, shard_err.astype(object)
        g = f.create_group("samples")
        checked = {"fletcher32": True}
        ids = np.asarray(samples["id"], dtype=object)
        splits = np.asarray(samples["split"], dtype=object)
        g.create_dataset("id", data=ids, dtype=STR)
        g.create_dataset("label", data=np.asarray(samples["label"], dtype=np.int64), **checked)
        g.create_dataset("split", data=splits, dtype=STR)
        g.create_dataset("ok", data=ok, **checked)
        g.create_dataset("error", data=err, dtype=STR)
        # HDF5 cannot checksum variable-length strings; a digest over them stands in
        g.attrs["strings_digest"] = strings_digest(ids, splits, err)
        f.create_dataset("classes", data=np.asarray(classes, dtype=object), dtype=STR)
        f.create_dataset("ladder", data=json.dumps(ladder), dtype=STR)
        f.create_group("layers", track_order=True)

    @staticmethod
    def _write_layers(f, run: PartialRun, records: list[LayerRecord]) -> None:
        n = run.plan["n"]
        datasets = {}
        for r in records:
            if r.name in f["layers"]:
                del f["layers"][r.name]
            dtype = np.dtype(r.dtype)
            ds = f["layers"].create_dataset(
                r.name, shape=(n, r.width), dtype=dtype,
                chunks=(chunk_rows(r.width, dtype.itemsize, n), r.width), fletcher32=True,
            )
            for k, v in r.to_attrs().items():
                ds.attrs[k] = v
            datasets[r.name] = ds
        for shard in range(run.n_shards):
            start, stop = run.rows(shard)
            arrays, _, _ = run.read(shard)
            for name, ds in datasets.items():
                ds[start:stop] = arrays[name]
