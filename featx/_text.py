"""Short text helpers shared by the cache and the result folders."""

from __future__ import annotations

import re

_PATH_SOURCES = ("folder:", "csv:", "finetuned:")


def slug(text: str) -> str:
    """A short file-name-safe form of a dataset or model name (a path source keeps its last part).

    Cosmetic only: files are found by the key that follows the slug, never by the slug.
    """
    text = text.rsplit("/", 1)[-1] if text.startswith(_PATH_SOURCES) else text
    return re.sub(r"[^A-Za-z0-9_.+=-]+", "_", text).strip("_")[:40] or "x"
