"""Predicting on new images with a result featx wrote: a probe's best head or a fine-tuned network.

Modules, one job each: ``folder`` (which result a folder holds and what prediction reads from
it), ``inputs`` (the images: files, folders, CSV files), ``network`` (decode, preprocess and run
the network exactly as the cache entry or the fine-tune recorded), ``scorers`` (features to
class scores, per kind of result), ``table`` (top-k ranking, the CSV file), ``runner`` (the API).
"""

from __future__ import annotations

from .._lazy import lazy_getattr

__all__ = ["predict", "PredictionTable"]

__getattr__ = lazy_getattr(globals(), {"predict": ".runner", "PredictionTable": ".table"})
