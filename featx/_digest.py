"""Digests and canonical JSON shared by every stage; torch-free and cheap to import.

The cache key, dataset fingerprints, model identities and fine-tuning checkpoints all hash
the same canonical text, so a description hashes the same whichever stage computes it.
Python's per-process ``hash()`` is never involved.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any


def _normalise(obj: Any) -> Any:
    if isinstance(obj, Mapping):
        out = {}
        for k, v in obj.items():
            if not isinstance(k, str):
                raise TypeError(f"canonical JSON fields must have string names, got {k!r}")
            out[k] = _normalise(v)
        return out
    if isinstance(obj, (list, tuple)):
        return [_normalise(v) for v in obj]
    if isinstance(obj, bool) or obj is None or isinstance(obj, str):
        return obj
    if isinstance(obj, int):
        return int(obj)
    if isinstance(obj, float):
        if not math.isfinite(obj):
            raise ValueError(f"canonical JSON fields must be finite numbers, got {obj!r}")
        # repr() round-trips exactly and is stable across platforms.
        return float(repr(obj))
    if isinstance(obj, Path):
        return str(obj)
    # numpy scalars and similar
    if hasattr(obj, "item"):
        return _normalise(obj.item())
    raise TypeError(f"cannot put {type(obj).__name__} into canonical JSON: {obj!r}")


def canonical_json(obj: Any) -> str:
    """One byte-exact JSON text for a description, whatever the key order or process."""
    return json.dumps(
        _normalise(obj), sort_keys=True, separators=(",", ":"), ensure_ascii=False, allow_nan=False
    )


def file_digest(path: str | os.PathLike, chunk: int = 1 << 22) -> str:
    """sha256 of a file's bytes, prefixed with the algorithm name."""
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        while block := fh.read(chunk):
            h.update(block)
    return "sha256:" + h.hexdigest()


def strings_digest(*columns) -> str:
    """sha256 over columns of values as text; columns and values are delimited unambiguously."""
    h = hashlib.sha256()
    for column in columns:
        for value in column:
            h.update(str(value).encode("utf-8"))
            h.update(b"\x1f")
        h.update(b"\x1e")
    return h.hexdigest()
