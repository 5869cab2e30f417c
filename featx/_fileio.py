"""Durable file writes shared by every stage: a file or folder appears complete or not at all.

Torch-free and cheap to import, so the cache, the result folders and fine-tuning use the same
code; the temporary name (``.NAME.PID.tmp``) is recognised by the result-folder checks.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

import numpy as np


def fsync_dir(path: Path) -> None:
    """fsync a file or folder, best effort: some filesystems refuse it on folders."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def atomic_write_bytes(path: Path, write, *, replace: bool = True) -> None:
    """Call ``write(fileobj)`` on a temporary file, fsync it, then rename it to ``path``.

    ``replace=False`` publishes it only where no file exists, even one that appeared while it
    was written (a hard link cannot overwrite); ``FileExistsError`` otherwise.
    """
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        with open(tmp, "wb") as fh:
            write(fh)
            fh.flush()
            os.fsync(fh.fileno())
        if replace:
            os.replace(tmp, path)
        else:
            _publish_new(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()
    fsync_dir(path.parent)


def _publish_new(tmp: Path, path: Path) -> None:
    try:
        os.link(tmp, path)
    except FileExistsError:
        raise
    except OSError:  # a file system without hard links: check, then rename
        if path.exists():
            raise FileExistsError(path) from None
        os.replace(tmp, path)


def strict(obj):
    """JSON-safe copy: NaN and infinities become null, numpy scalars plain numbers."""
    if isinstance(obj, dict):
        return {str(k): strict(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [strict(v) for v in obj]
    if isinstance(obj, np.ndarray):
        return strict(obj.tolist())
    if isinstance(obj, np.generic):
        obj = obj.item()
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    if isinstance(obj, Path):
        return str(obj)
    return obj


def write_json(path: Path, obj) -> None:
    """Strict JSON (no NaN tokens, which other readers reject), written atomically."""
    text = json.dumps(strict(obj), indent=2, allow_nan=False) + "\n"
    atomic_write_bytes(Path(path), lambda fh: fh.write(text.encode()))
