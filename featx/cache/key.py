"""Content-addressed cache keys.

The key of a feature entry is the sha256 of a canonical JSON document that spells out
everything that determines the features: model, weights digest, preprocessing, pooling,
storage dtype, compute precision, device type (and its TF32 switches), the versions of the
code that computes them (featx, timm, torchvision, torch, Pillow), dataset fingerprint and the
format version. Defaults are
written out, never implied, so that changing a default can never silently reuse a stale
entry. Python's per-process ``hash()`` is never involved.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

#: Bump when the layout of an entry, the meaning of a key field, or the features computed for
#: the same key change (pooling, preprocessing, layer taps); tests/test_golden_features.py fails
#: when features change without a bump. 2: the key names the device type, TF32 switches and the
#: versions of featx, timm, torchvision, torch and Pillow.
FORMAT_VERSION = 2


def _normalise(obj: Any) -> Any:
    if isinstance(obj, Mapping):
        out = {}
        for k, v in obj.items():
            if not isinstance(k, str):
                raise TypeError(f"cache key fields must have string names, got {k!r}")
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
            raise ValueError(f"cache key fields must be finite numbers, got {obj!r}")
        # repr() round-trips exactly and is stable across platforms.
        return float(repr(obj))
    if isinstance(obj, Path):
        return str(obj)
    # numpy scalars and similar
    if hasattr(obj, "item"):
        return _normalise(obj.item())
    raise TypeError(f"cannot put {type(obj).__name__} into a cache key: {obj!r}")


def canonical_json(obj: Any) -> str:
    """One byte-exact JSON text for a description, whatever the key order or process."""
    return json.dumps(
        _normalise(obj), sort_keys=True, separators=(",", ":"), ensure_ascii=False, allow_nan=False
    )


def config_key(config: Mapping[str, Any]) -> str:
    """sha256 hex digest of the canonical JSON of ``config``.

    ``config["dataset"]["location"]`` (where a folder or CSV file was read) is recorded but not
    hashed: the dataset's identity is its relative paths and content, so a moved dataset keeps
    its entries.
    """
    dataset = config.get("dataset") if isinstance(config, Mapping) else None
    if isinstance(dataset, Mapping) and "location" in dataset:
        config = {**config, "dataset": {k: v for k, v in dataset.items() if k != "location"}}
    return hashlib.sha256(canonical_json(config).encode("utf-8")).hexdigest()


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
