"""Typed errors raised by featx.

The library never prints or exits; it raises one of these. The command line maps
``UsageError`` to exit code 2 and every other ``FeatxError`` to exit code 1, and shows
the message without a traceback.
"""

from __future__ import annotations

import difflib
from collections.abc import Iterable

__all__ = [
    "FeatxError",
    "UsageError",
    "UnknownModelError",
    "UnknownLayerError",
    "UnknownDatasetError",
    "DatasetNotFoundError",
    "WeightsUnavailableError",
    "WeightsMismatchError",
    "BadImageError",
    "FeatureOverflowError",
    "CacheCorruptError",
    "CacheUnavailableError",
    "CacheFormatError",
    "EntryNotFoundError",
    "DataError",
    "ResultsNotFoundError",
    "ResultsFormatError",
    "MissingDependencyError",
    "close_matches",
]


class FeatxError(Exception):
    """Base class of every error featx raises on purpose."""

    exit_code = 1


class UsageError(FeatxError, ValueError):
    """The user asked for something that does not exist or is not allowed (exit code 2)."""

    exit_code = 2


class UnknownModelError(UsageError):
    """A model name that no registry knows."""


class UnknownLayerError(UsageError):
    """A layer name, glob or index that does not match the model's layer ladder."""


class UnknownDatasetError(UsageError):
    """A dataset spec that featx cannot interpret."""


class EntryNotFoundError(UsageError):
    """A cache entry name, key prefix or path that matches nothing (or more than one entry)."""


class DatasetNotFoundError(FeatxError):
    """A known dataset whose files are not on this machine and cannot be downloaded."""


class WeightsUnavailableError(FeatxError):
    """Pretrained weights are not on this machine and cannot be downloaded."""


class WeightsMismatchError(FeatxError):
    """A weights file does not fit the architecture (missing, unexpected or misshapen tensors)."""


class BadImageError(FeatxError):
    """An image could not be decoded (raised only in ``strict`` mode)."""


class FeatureOverflowError(FeatxError):
    """Activations are not finite or do not fit the requested storage dtype."""


class CacheCorruptError(FeatxError):
    """A cache file is truncated, inconsistent or fails its checksums."""


class CacheUnavailableError(FeatxError):
    """A cache file cannot be opened or moved right now (locked, no permission, too many open
    files, read-only disk). Nothing proves it damaged, so it is left exactly where it is."""


class CacheFormatError(FeatxError):
    """A cache entry written in another format version; featx treats it as absent and rebuilds it."""


class DataError(FeatxError):
    """The data cannot support the requested analysis (no labels, one class, NaN features...)."""


class ResultsNotFoundError(UsageError):
    """A path that holds no finished featx result, or a result of another kind than the one asked for."""


class ResultsFormatError(FeatxError):
    """A result file that is damaged, or written under a schema version this featx cannot read."""


class MissingDependencyError(FeatxError, ImportError):
    """An optional package a feature needs is not installed (the message names the pip command)."""


def close_matches(word: str, candidates: Iterable[str], n: int = 5) -> list[str]:
    """Suggestions for a mistyped name: difflib ratio first, then substring hits."""
    candidates = list(dict.fromkeys(candidates))
    found = difflib.get_close_matches(word, candidates, n=n, cutoff=0.6)
    low = word.lower()
    for cand in candidates:
        if len(found) >= n:
            break
        if low and low in cand.lower() and cand not in found:
            found.append(cand)
    return found


def did_you_mean(word: str, candidates: Iterable[str], n: int = 5) -> str:
    """A ``did you mean ...?`` clause, empty when nothing is close."""
    found = close_matches(word, candidates, n=n)
    if not found:
        return ""
    return " Did you mean " + ", ".join(repr(f) for f in found) + "?"
