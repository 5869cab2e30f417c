"""Ranking backbones: several models through one probe protocol, compared on the same rows."""

from .._lazy import lazy_getattr

__all__ = ["compare", "ComparisonResults"]

__getattr__ = lazy_getattr(globals(), {"compare": ".runner", "ComparisonResults": ".runner"})
