"""The extraction stage: dataset -> backbone -> pooled layer activations -> cache entry."""

from .runner import RunStats, extract

__all__ = ["extract", "RunStats"]
