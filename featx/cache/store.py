"""The cache directory: finding, creating, locking, quarantining and removing entries.

Layout of the cache root::

    <slug>-<key[:16]>.h5    complete entries (visible only once complete)
    .locks/<key>.lock       one flock per key: only one process builds an entry
    .partial/<key>/         shards of an extraction in progress (resumable)
    .tmp/                   entry files being assembled (renamed into place when done)
    .dist/<token>/          heartbeats of the ranks of a torchrun extraction in progress
    quarantine/             corrupt files moved aside, never read again

Only files directly in the root (resolved, symlinks followed) are ever moved or deleted, and
only when proven corrupt (:class:`CacheCorruptError`) or asked to (``featx cache rm``/``gc``).
A path anywhere else is opened read-only. Killed runs leave ``.tmp`` files, ``.partial``
runs and quarantined files; :meth:`CacheStore.gc` removes those no live process holds.
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
from dataclasses import dataclass
from pathlib import Path

import h5py
import numpy as np

from .._digest import strings_digest
from .._fileio import fsync_dir
from .._text import slug
from ..errors import CacheCorruptError, CacheFormatError, CacheUnavailableError, EntryNotFoundError, UsageError
from ..layer import Layer
from .entry import (
    ENCODING_TYPE,
    ENCODING_VERSION,
    STR,
    FeatureEntry,
    chunk_rows,
    config_json,
    metadata_digest,
    str_array,
)
from .partial import PartialRun

log = logging.getLogger(__name__)


def default_cache_dir() -> Path:
    """``$FEATX_CACHE_DIR``, else ``./cache``."""
    env = os.environ.get("FEATX_CACHE_DIR")
    return Path(env).expanduser() if env else Path("cache")


def _now() -> str:
    return _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


#: sub-folders of the root that hold featx's own working files, never entries
RESERVED = (".locks", ".partial", ".tmp", ".dist", "quarantine")
#: a torchrun heartbeat folder untouched this long belongs to no live job (peers give up far sooner)
DIST_IDLE_DAYS = 1.0


@dataclass(frozen=True)
class Leftover:
    """What a killed run left behind: a ``.tmp`` file, a ``.partial`` run or a quarantined file."""

    kind: str  # "tmp", "partial", "dist" or "quarantine"
    path: Path
    size: int
    age_days: float


class CacheStore:
    """A cache root directory."""

    def __init__(self, root: str | Path | None = None):
        self.root = Path(root).expanduser() if root else default_cache_dir()

    def _ensure(self) -> None:
        try:
            for sub in ("", ".locks", ".partial", ".tmp"):
                (self.root / sub).mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise self._unwritable(exc) from exc

    def _unwritable(self, exc: OSError) -> CacheUnavailableError:
        return CacheUnavailableError(
            f"Cannot write to the feature cache {self.root}: {exc.strerror or exc}. Entries already there "
            "can still be read; to build new ones give a writable folder with --cache-dir or FEATX_CACHE_DIR."
        )

    # ---------------------------------------------------------------- ownership

    def owns(self, path: str | Path) -> bool:
        """True for an entry file directly in the root, after resolving symlinks and ``..``.

        Only such files may be quarantined or deleted; anything else is the user's.
        """
        try:
            root = self.root.resolve()
            target = Path(path).resolve()
        except (OSError, RuntimeError):
            return False
        return target.parent == root

    def _refuse_outside(self, path: Path, verb: str) -> None:
        if not self.owns(path):
            raise UsageError(
                f"Refusing to {verb} {path}: it is outside the cache root {self.root.resolve()} (or in one "
                "of its working folders). featx only deletes its own entry files; delete this one yourself "
                "if you mean to."
            )

    # ---------------------------------------------------------------- lookup

    def filename(self, key: str, config: dict) -> str:
        return f"{slug(config['dataset']['source'])}-{slug(config['model']['name'])}-{key[:16]}.h5"

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
            except CacheFormatError as exc:  # another format: absent, the rebuild replaces it
                log.info("%s", exc)
            except CacheCorruptError as exc:  # environmental errors propagate: the entry is left alone
                self.quarantine(path, str(exc))
        return None

    def entries(self) -> list[FeatureEntry | tuple[Path, str]]:
        """Every entry; unreadable files come back as (path, reason)."""
        out: list[FeatureEntry | tuple[Path, str]] = []
        for path in self._candidates():
            try:
                out.append(FeatureEntry(path))
            except (CacheCorruptError, CacheUnavailableError, CacheFormatError) as exc:
                out.append((path, str(exc)))
        return out

    def resolve(self, ref, owned: bool = False) -> FeatureEntry:
        """An entry from a FeatureEntry, a file path, a file name (with or without .h5) or a key prefix.

        ``owned=True`` (for deleting) refuses anything that is not an entry file of this cache.
        """
        if isinstance(ref, FeatureEntry):
            if owned:
                self._refuse_outside(ref.path, "delete")
            return ref
        text = str(ref)
        named = (Path(text).expanduser(), self.root / text, self.root / f"{text}.h5")  # a path, a name, a stem
        path = next((p for p in named if p.is_file()), None)
        if path is not None:
            return self._open_file(path, owned)
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

    def _open_file(self, path: Path, owned: bool) -> FeatureEntry:
        """Open a named file: quarantined only if it is this cache's own entry, else read-only."""
        if owned:
            self._refuse_outside(path, "delete")
        real = path.resolve()
        root = self.root.resolve()
        working = next((d for d in RESERVED if (root / d) in real.parents), None)
        if path.suffix != ".h5" or working:
            why = f"it is in {working}/" if working else "entries are .h5 files"
            raise EntryNotFoundError(
                f"{path} is not a featx cache entry ({why}). Entries are the .h5 files directly in {root}; "
                "list them with: featx cache ls"
            )
        try:
            return FeatureEntry(path)
        except CacheCorruptError as exc:
            if self.owns(path):
                self.quarantine(path, str(exc))
                raise
            raise CacheCorruptError(f"{exc} It is not in the cache root {root}, so it was left untouched.") from exc

    # ---------------------------------------------------------------- lifecycle

    def quarantine(self, path: Path, reason: str) -> Path | None:
        """Move a corrupt entry file aside so it is never read again.

        Only the cache's own entry files move. When the move fails (read-only cache) the file is
        left where it is and skipped; the caller carries on. Returns the new path, or None.
        """
        path = Path(path)
        if not self.owns(path):
            log.warning("not moving %s: it is not an entry file of the cache %s (%s)", path, self.root, reason)
            return None
        qdir = self.root / "quarantine"
        target = qdir / f"{path.name}.{time.strftime('%Y%m%dT%H%M%S')}.{os.getpid()}"
        try:
            qdir.mkdir(parents=True, exist_ok=True)
            os.replace(path, target)
        except FileNotFoundError:
            return None
        except OSError as exc:
            log.warning("could not move corrupt cache file %s to %s (%s); it is left in place and skipped: %s",
                        path, qdir, exc.strerror or exc, reason)
            return None
        try:
            (qdir / (target.name + ".reason.txt")).write_text(reason + "\n")
        except OSError:
            pass
        log.warning("moved corrupt cache file %s to %s: %s", path, target, reason)
        return target

    def remove(self, entry: FeatureEntry) -> None:
        """Delete an entry of this cache (and its interrupted run); refuses any other file."""
        self._refuse_outside(entry.path, "delete")
        with self.lock(entry.key):
            entry.path.unlink(missing_ok=True)
            shutil.rmtree(self.root / ".partial" / entry.key, ignore_errors=True)

    @contextlib.contextmanager
    def lock(self, key: str):
        """Exclusive per-key lock; a second process waits, then finds the finished entry."""
        self._ensure()
        path = self.root / ".locks" / f"{key}.lock"
        try:
            fh = open(path, "a+")
        except OSError as exc:
            raise self._unwritable(exc) from exc
        try:
            if not _try_flock(fh):
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

    @contextlib.contextmanager
    def _try_lock(self, key: str | None, create: bool):
        """Yields True when no process holds ``key``'s lock (then holds it), False otherwise."""
        path = self.root / ".locks" / f"{key}.lock"
        if key is None or not (create or path.exists()):
            yield True
            return
        path.parent.mkdir(parents=True, exist_ok=True)
        fh = open(path, "a+")
        try:
            if not _try_flock(fh):
                yield False
                return
            try:
                yield True
            finally:
                fcntl.flock(fh, fcntl.LOCK_UN)
        finally:
            fh.close()

    def _leftover_candidates(self) -> list[tuple[str, Path, str | None]]:
        """(kind, path, key whose lock guards it) for everything under .tmp, .partial, quarantine."""
        def children(sub: str) -> list[Path]:
            d = self.root / sub
            return sorted(d.iterdir()) if d.is_dir() else []

        def key_of(name: str) -> str | None:
            head = name.split(".", 1)[0]
            return head if re.fullmatch(r"[0-9a-f]{64}", head) else None

        return ([("tmp", p, key_of(p.name)) for p in children(".tmp")]
                + [("partial", p, key_of(p.name)) for p in children(".partial")]
                + [("dist", p, None) for p in children(".dist")]
                + [("quarantine", p, None) for p in children("quarantine")])

    def gc(self, dry_run: bool = False, older_than_days: float = 0.0) -> list[Leftover]:
        """Remove (or with ``dry_run`` only list) what killed runs left behind.

        A ``.tmp`` file or ``.partial`` run counts as abandoned only while no process holds its
        key's lock; the lock is held while it is removed, so a run cannot resume into it.
        Items younger than ``older_than_days`` (newest modification inside) are kept.
        """
        if older_than_days < 0:
            raise UsageError(f"--older-than must be zero or a positive number of days, got {older_than_days}.")
        done = []
        for kind, path, key in self._leftover_candidates():
            size, age = _size_and_age(path)
            if age < older_than_days:
                continue
            if kind == "dist" and age < DIST_IDLE_DAYS:
                continue  # ranks of a live torchrun job touch their heartbeats every batch
            with self._try_lock(key, create=not dry_run) as free:
                if not free:
                    continue
                if not dry_run:
                    try:
                        shutil.rmtree(path) if path.is_dir() and not path.is_symlink() else path.unlink()
                    except FileNotFoundError:
                        continue
                    except OSError as exc:
                        log.warning("could not remove %s: %s", path, exc.strerror or exc)
                        continue
            done.append(Leftover(kind, path, size, age))
        return done

    def leftovers(self) -> list[Leftover]:
        """Abandoned leftovers that ``gc`` would remove now."""
        return self.gc(dry_run=True)

    def partial(self, key: str, plan: dict) -> PartialRun:
        self._ensure()
        return PartialRun(self.root / ".partial" / key, plan)

    # ---------------------------------------------------------------- writing

    def commit(self, key: str, config: dict, *, base: FeatureEntry | None, samples: dict | None,
               classes: list[str], ladder: dict, versions: dict, run: PartialRun,
               records: list[Layer], featx_version: str, history: dict | None = None) -> FeatureEntry:
        """Assemble shards (plus an existing entry) into a new file and rename it into place.

        ``history``: what this run cost (images, seconds, device, parameters), appended to the
        entry's ``runs`` attribute so that a cache hit can still say how fast extraction was."""
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
                else:
                    self._merge_status(f["samples"], run)
                f.attrs["complete"] = False
                self._write_layers(f, run, records)
                order = (json.loads(f["layers"].attrs["order"]) if base is not None else []) + [
                    r.name for r in records
                ]
                rank = {name: int(f["layers"][name].attrs["order"]) for name in order}
                f["layers"].attrs["order"] = json.dumps(sorted(order, key=rank.get))
                f.attrs["metadata_digest"] = metadata_digest(f)
                f.attrs["updated_utc"] = _now()
                if history is not None:
                    runs = json.loads(f.attrs.get("runs", "[]"))
                    f.attrs["runs"] = json.dumps([*runs, {**history, "utc": f.attrs["updated_utc"]}])
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
        ok, err = _run_status(run)
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
    def _merge_status(g, run: PartialRun) -> None:
        """An image is ok only if every pass read it; the first reason it failed is kept."""
        new_ok, new_err = _run_status(run)
        old_err = str_array(g["error"])
        g["ok"][...] = g["ok"][()].astype(bool) & new_ok
        err = np.asarray([old or new for old, new in zip(old_err, new_err)], dtype=object)
        g["error"][...] = err
        g.attrs["strings_digest"] = strings_digest(str_array(g["id"]), str_array(g["split"]), err)

    @staticmethod
    def _write_layers(f, run: PartialRun, records: list[Layer]) -> None:
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


def _try_flock(fh) -> bool:
    """Take ``fh``'s exclusive lock if no other process holds it."""
    try:
        fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as exc:
        if exc.errno not in (errno.EAGAIN, errno.EACCES):
            raise
        return False
    return True


def _size_and_age(path: Path) -> tuple[int, float]:
    """Bytes under ``path`` and days since anything in it last changed."""
    files = [path] if not path.is_dir() else [p for p in path.rglob("*") if p.is_file()] + [path]
    size, newest = 0, 0.0
    for p in files:
        try:
            st = p.lstat()
        except OSError:
            continue
        size += st.st_size if p.is_file() else 0
        newest = max(newest, st.st_mtime)
    return size, max(0.0, (time.time() - newest) / 86400)


def _run_status(run: PartialRun) -> tuple[np.ndarray, np.ndarray]:
    """ok flags and error texts of every row of a finished run."""
    ok = np.zeros(run.plan["n"], dtype=bool)
    err = np.empty(run.plan["n"], dtype=object)
    for shard in range(run.n_shards):
        start, stop = run.rows(shard)
        shard_ok, shard_err = run.status(shard)
        ok[start:stop], err[start:stop] = shard_ok, [str(e) for e in shard_err]
    return ok, err
