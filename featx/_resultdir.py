"""Result folders: which ones featx may write, and replacing one without a moment of absence.

A result folder (``featx probe --out``, ``featx finetune --out``, a sweep's root) is written
only when it is missing, empty, or already holds a featx result of the same kind and nothing
else featx did not write. Anything else (a user's notes, a result of another kind) is refused
with a :class:`~featx.errors.UsageError` and left untouched. Each result folder carries a
small marker file (``.featx-result.json``, ``{"kind": ...}``); folders written before the
marker existed are recognised by their own files.

A probe result is replaced whole: the new one is built in a hidden sibling folder, then
swapped in with ``renameat2(RENAME_EXCHANGE)``, so the target path always holds either the
complete old result or the complete new one. Leftover hidden siblings of a killed run are
recognisable by name (``.NAME.featx-new-PID-XXXXXXXX`` / ``.NAME.featx-old-PID-XXXXXXXX``) and
cleaned up by the next write to the same target.

Torch-free and cheap to import: the CLI checks ``--out`` before any extraction or training.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import errno
import functools
import json
import logging
import os
import re
import secrets
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from ._fileio import fsync_dir
from .errors import UsageError

log = logging.getLogger(__name__)

PROBE = "probe"
FINETUNE = "finetune"
SWEEP = "finetune-sweep"
COMPARE = "comparison"
MARKER = ".featx-result.json"

#: what each kind of result folder may hold (besides the marker and featx's own temp files)
KNOWN_FILES = {
    PROBE: {"results.json", "results.csv", "layers.png", "confusion.png", "best_head.joblib", "best_head.json",
            "linear_head.npz", "report.html"},
    FINETUNE: {"finetune.json", "model.pt", "model.json", "curves.png", "checkpoint.pt"},
    SWEEP: {"sweep", "sweep.json"},
    COMPARE: {"comparison.json", "comparison.csv", "depth.png", "shots.png", "report.html", "models"},
}
_DESCRIBE = {PROBE: "probe result", FINETUNE: "fine-tuning run", SWEEP: "fine-tuning sweep",
             COMPARE: "backbone comparison"}
_ATOMIC_TMP = re.compile(r"^\..+\.\d+\.tmp$")  # _fileio.atomic_write_bytes
RENAME_EXCHANGE = 2
_AT_FDCWD = -100


# ------------------------------------------------------------------------------ what a folder holds


def _read_json(path: Path):
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def found_kind(folder: Path) -> str | None:
    """The kind of featx result ``folder`` holds, or None: the marker, else the result's own files."""
    folder = Path(folder)
    marker = _read_json(folder / MARKER)
    if isinstance(marker, dict) and marker.get("kind") in KNOWN_FILES:
        return marker["kind"]
    results = _read_json(folder / "results.json")
    if isinstance(results, dict) and results.get("format") == "featx-probe-results":
        return PROBE
    done = _read_json(folder / "finetune.json")
    if isinstance(done, dict) and {"fingerprint", "config"} <= done.keys():
        return FINETUNE
    if (folder / "checkpoint.pt").is_file() and not _foreign(folder, FINETUNE):
        return FINETUNE  # an interrupted run from before the marker; its checkpoint is validated on load
    if (folder / "sweep").is_dir() and not _foreign(folder, SWEEP) and all(
            found_kind(run) == FINETUNE for run in (folder / "sweep").iterdir()):
        return SWEEP  # a sweep (perhaps interrupted) from before the marker: only fine-tuning runs
    return None


def _foreign(folder: Path, kind: str) -> list[str]:
    """Names in ``folder`` that a result of ``kind`` does not write."""
    known = KNOWN_FILES[kind] | {MARKER}
    return sorted(p.name for p in folder.iterdir() if p.name not in known and not _ATOMIC_TMP.match(p.name))


def _listing(names: list[str], limit: int = 5) -> str:
    shown = ", ".join(names[:limit])
    return shown + (f" and {len(names) - limit} more" if len(names) > limit else "")


def check_target(folder, kind: str, *, replace: bool = True) -> bool:
    """Refuse a folder featx must not write; True when it already holds a result of ``kind``.

    ``replace``: the write deletes what the folder holds (a probe result is replaced whole),
    so it may hold nothing besides that result. Without it (a fine-tuning run writes its own
    files in place and deletes none of the others) other files are tolerated.
    """
    folder = Path(folder)
    if not folder.exists() and not folder.is_symlink():
        return False
    if not folder.is_dir():
        raise UsageError(f"Output folder {folder} exists and is not a folder. Choose another output folder "
                         "(--out / out_dir).")
    names = sorted(p.name for p in folder.iterdir())
    if not names:
        return False
    found = found_kind(folder)
    noun = _DESCRIBE[kind]
    fix = ("Choose another output folder (--out / out_dir), or move this folder away (or delete it yourself) if "
           "its contents are no longer needed.")
    if found is None:
        raise UsageError(f"Output folder {folder} is not empty and holds no featx result (found {_listing(names)}); "
                         f"featx writes a {noun} only into a missing or empty folder or over an earlier {noun}, "
                         f"and never touches other folders. {fix}")
    if found != kind:
        raise UsageError(f"Output folder {folder} holds a featx {_DESCRIBE[found]}, not a featx {noun}; featx "
                         f"will not replace or mix it. {fix}")
    extra = _foreign(folder, kind) if replace else []
    if extra:
        raise UsageError(f"Output folder {folder} holds a featx {noun} together with files featx did not write "
                         f"({_listing(extra)}); replacing the result would delete them. Move those files away, or "
                         "choose another output folder (--out / out_dir).")
    return True


def write_marker(folder: Path, kind: str) -> None:
    """Mark ``folder`` as a result of ``kind`` (written first, so an interrupted run is recognised)."""
    from . import __version__

    path = Path(folder) / MARKER
    if _read_json(path) == {"kind": kind, "featx_version": __version__}:
        return
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps({"kind": kind, "featx_version": __version__}) + "\n")
    os.replace(tmp, path)


def claim(folder, kind: str) -> Path:
    """Check ``folder`` for an in-place result of ``kind``, create it and mark it."""
    folder = Path(folder)
    check_target(folder, kind, replace=False)
    folder.mkdir(parents=True, exist_ok=True)
    write_marker(folder, kind)
    return folder


# ------------------------------------------------------------------------------ atomic replacement


@functools.lru_cache(maxsize=1)
def _libc():
    """The C library of this process (its symbols are visible through the main program)."""
    try:
        return ctypes.CDLL(None, use_errno=True)
    except OSError:
        name = ctypes.util.find_library("c")
        return ctypes.CDLL(name, use_errno=True) if name else None


def _renameat2(src: Path, dst: Path, flags: int) -> None:
    libc = _libc()
    fn = getattr(libc, "renameat2", None) if libc is not None else None
    if fn is None:
        raise OSError(errno.ENOSYS, "renameat2 is not available on this system", str(src))
    fn.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    fn.restype = ctypes.c_int
    if fn(_AT_FDCWD, os.fsencode(src), _AT_FDCWD, os.fsencode(dst), flags) != 0:
        code = ctypes.get_errno()
        raise OSError(code, os.strerror(code), str(src), None, str(dst))


def exchange(a, b) -> None:
    """Swap the paths ``a`` and ``b`` (both must exist) in one atomic step.

    Uses ``renameat2(RENAME_EXCHANGE)``. Only where the kernel or filesystem refuses it
    (EINVAL, ENOSYS: old kernels, some network filesystems, non-Linux systems) does it fall
    back to three renames through a hidden ``.NAME.featx-old-*`` sibling; then there is a short
    window in which ``b`` is missing, and a crash inside it leaves the old ``b`` in that
    sibling, which the next :func:`staged` write to ``b`` renames back into place.
    """
    a, b = Path(a), Path(b)
    try:
        _renameat2(a, b, RENAME_EXCHANGE)
        return
    except OSError as exc:
        if exc.errno not in (errno.EINVAL, errno.ENOSYS):
            raise
        log.debug("renameat2(RENAME_EXCHANGE) refused for %s (%s); swapping with renames", b, exc)
    old = _sibling(b, "old")
    os.rename(b, old)
    try:
        os.rename(a, b)
    except OSError:
        os.rename(old, b)  # put the old one back before reporting the failure
        raise
    os.rename(old, a)


def _sibling(target: Path, role: str) -> Path:
    return target.parent / f".{target.name}.featx-{role}-{os.getpid()}-{secrets.token_hex(4)}"


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def clean_stale(target: Path) -> None:
    """Remove hidden siblings left by killed writes to ``target``; restore an old result the
    rename fallback of :func:`exchange` had moved aside when the target itself is missing."""
    target = Path(target)
    if not target.parent.is_dir():
        return
    pattern = re.compile(rf"^\.{re.escape(target.name)}\.featx-(new|old)-(\d+)-[0-9a-f]{{8}}$")
    for path in sorted(target.parent.iterdir()):
        m = pattern.match(path.name)
        if not m or int(m.group(2)) == os.getpid() or _pid_alive(int(m.group(2))):
            continue
        if m.group(1) == "old" and not target.exists() and found_kind(path) is not None:
            log.warning("restoring %s from %s, left by an interrupted replacement", target, path.name)
            os.rename(path, target)
            continue
        log.info("removing %s, left by an interrupted write to %s", path, target)
        shutil.rmtree(path, ignore_errors=True)


def _fsync_tree(folder: Path) -> None:
    """Flush every file of ``folder`` to disk, so the swap never installs empty files."""
    for path in [*folder.rglob("*"), folder]:
        fsync_dir(path)


def install(new: Path, target: Path) -> None:
    """Put the complete folder ``new`` at ``target``; an old ``target`` is swapped out, then removed."""
    if target.exists() and any(target.iterdir()):
        exchange(new, target)  # from here on ``new`` names the old result
        shutil.rmtree(new, ignore_errors=True)
    else:
        os.rename(new, target)  # onto a missing or empty folder: atomic
    fsync_dir(target.parent)


@contextmanager
def staged(target, kind: str) -> Iterator[Path]:
    """Build a result of ``kind`` in a hidden sibling folder, then swap it in at ``target``.

    ``target`` is checked before anything is written and again just before the swap. If the
    body raises, the temporary folder is removed and ``target`` is untouched.
    """
    # absolute, so ``--out .`` has a real name and parent; a symlink keeps pointing at the new result
    target = Path(target).resolve() if Path(target).is_symlink() else Path(os.path.abspath(target))
    clean_stale(target)  # first: it may put back a result an interrupted replacement had moved aside
    check_target(target, kind)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = _sibling(target, "new")
    tmp.mkdir()
    try:
        write_marker(tmp, kind)
        yield tmp
        check_target(target, kind)  # files may have appeared while the result was computed
        _fsync_tree(tmp)
        install(tmp, target)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
