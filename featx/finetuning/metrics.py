"""Test metrics of a classifier, with a bootstrap interval for top-1 accuracy."""

from __future__ import annotations

import numpy as np
from sklearn.metrics import balanced_accuracy_score, f1_score

BOOTSTRAP_SAMPLES = 1000


def bootstrap_interval(correct: np.ndarray, seed: int = 0, samples: int = BOOTSTRAP_SAMPLES,
                       level: float = 0.95) -> tuple[float, float]:
    """Percentile interval of the mean of ``correct`` over test sets resampled with replacement."""
    correct = np.asarray(correct, dtype=np.float64)
    n = len(correct)
    if n == 0:
        return float("nan"), float("nan")
    rng = np.random.default_rng(seed)
    means = np.empty(samples)
    chunk = max(1, 2_000_000 // n)
    for start in range(0, samples, chunk):
        stop = min(samples, start + chunk)
        means[start:stop] = correct[rng.integers(0, n, size=(stop - start, n))].mean(axis=1)
    tail = (1 - level) / 2
    lo, hi = np.quantile(means, [tail, 1 - tail])
    return float(lo), float(hi)


def classification_metrics(y: np.ndarray, logits: np.ndarray, seed: int = 0) -> dict:
    """top-1 (with a 95% bootstrap interval), top-5 when there are more than 5 classes,
    balanced accuracy and macro-F1."""
    y = np.asarray(y)
    logits = np.asarray(logits)
    pred = logits.argmax(axis=1)
    correct = pred == y
    out = {
        "n": int(len(y)),
        "top1": float(correct.mean()) if len(y) else float("nan"),
        "top1_ci95": list(bootstrap_interval(correct, seed)),
        "balanced_accuracy": float(balanced_accuracy_score(y, pred)) if len(y) else float("nan"),
        "macro_f1": float(f1_score(y, pred, average="macro", labels=np.unique(y))) if len(y) else float("nan"),
    }
    if logits.shape[1] > 5:
        top5 = np.argsort(-logits, axis=1)[:, :5]
        out["top5"] = float((top5 == y[:, None]).any(axis=1).mean())
    return out
