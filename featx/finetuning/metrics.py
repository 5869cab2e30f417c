"""Fine-tuning's test metrics: the network's logits scored by ``featx.evaluation``, the code
that scores the probe, so both write the same keys with the same meaning."""

from __future__ import annotations

import numpy as np

from ..evaluation import classification_metrics


def score_logits(y: np.ndarray, logits: np.ndarray, n_classes: int, seed: int) -> dict:
    """``featx.evaluation.METRIC_KEYS`` plus ``n_test``, from logits (one column per class)."""
    y = np.asarray(y)
    logits = np.asarray(logits).reshape(len(y), n_classes)
    metrics = classification_metrics(y, logits.argmax(axis=1), logits, n_classes=n_classes, seed=seed)
    return {**metrics, "n_test": int(len(y))}
