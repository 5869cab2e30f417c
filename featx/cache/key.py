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
from collections.abc import Mapping
from typing import Any

from .._digest import canonical_json, file_digest, strings_digest

__all__ = ["FORMAT_VERSION", "canonical_json", "config_key", "file_digest", "strings_digest"]

#: Bump when the layout of an entry, the meaning of a key field, or the features computed for
#: the same key change (pooling, preprocessing, layer taps); tests/test_golden_features.py fails
#: when features change without a bump. 2: the key names the device type, TF32 switches and the
#: versions of featx, timm, torchvision, torch and Pillow.
FORMAT_VERSION = 2


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
