"""The test metrics of a classifier, shared by the probe and fine-tuning.

Both stages score their single look at the test split here, so their numbers are computed by
the same code under the same keys and can be compared with each other:

- ``test_top1``: accuracy; ``test_top1_ci``: its 95% percentile bootstrap interval;
- ``test_top5``: top-5 accuracy from the class scores, ``None`` with 5 classes or fewer (or
  without scores);
- ``balanced_accuracy``: the mean of per-class recalls;
- ``macro_f1``: the unweighted mean F1 over the classes that occur in the true or the
  predicted labels (scikit-learn's default label set), an empty class scoring 0. A class
  absent from both carries no evidence either way and is left out; a class that is predicted
  but never true counts (with F1 0), so wrong guesses into it are not hidden.

Torch-free: numpy and scikit-learn only.
"""

from __future__ import annotations

import warnings

import numpy as np
from sklearn.metrics import balanced_accuracy_score, f1_score, top_k_accuracy_score

BOOTSTRAP = 1000
TOP_K = 5
#: the keys every test evaluation carries, in the probe's rows and in ``finetune.json``'s ``test``
METRIC_KEYS = ("test_top1", "test_top1_ci", "test_top5", "balanced_accuracy", "macro_f1")


def bootstrap_interval(correct: np.ndarray, seed: int, n: int = BOOTSTRAP) -> tuple[float, float]:
    """95% percentile bootstrap interval of accuracy.

    Resampling a 0/1 vector of length m with replacement gives Binomial(m, accuracy) hits, so
    the bootstrap is drawn exactly without materialising m x n resamples.
    """
    correct = np.asarray(correct, dtype=bool)
    m = len(correct)
    if m == 0:
        return (float("nan"), float("nan"))
    rng = np.random.default_rng(seed)
    means = rng.binomial(m, correct.mean(), size=n) / m
    lo, hi = np.percentile(means, [2.5, 97.5])
    return float(lo), float(hi)


def _balanced_accuracy(y_true: np.ndarray, y_pred: np.ndarray) -> float:
    """Mean recall over the true classes; a prediction of a class absent from the test split is
    simply wrong, which scikit-learn also counts, so its warning about it says nothing new."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="y_pred contains classes not in y_true")
        return float(balanced_accuracy_score(y_true, y_pred))


def classification_metrics(y_true: np.ndarray, y_pred: np.ndarray, scores: np.ndarray | None = None, *,
                           n_classes: int, classes: np.ndarray | None = None, seed: int) -> dict:
    """``METRIC_KEYS`` for predictions ``y_pred`` of ``y_true``.

    ``scores`` (one column per entry of ``classes``, default ``0..n_classes-1``) give top-5
    when the problem has more than 5 classes; an empty test set gives NaN (null in JSON).
    """
    y_true, y_pred = np.asarray(y_true), np.asarray(y_pred)
    correct = y_pred == y_true
    empty = len(y_true) == 0
    return {
        "test_top1": float("nan") if empty else float(correct.mean()),
        "test_top1_ci": list(bootstrap_interval(correct, seed)),
        "test_top5": None if empty else _top_k(y_true, scores, n_classes, classes),
        "balanced_accuracy": float("nan") if empty else _balanced_accuracy(y_true, y_pred),
        "macro_f1": float("nan") if empty else float(f1_score(y_true, y_pred, average="macro", zero_division=0)),
    }


def _top_k(y_true: np.ndarray, scores, n_classes: int, classes, k: int = TOP_K) -> float | None:
    """Top-k accuracy, or None when it says nothing (k classes or fewer) or there are no scores."""
    if scores is None:
        return None
    scores = np.asarray(scores)
    classes = np.arange(n_classes) if classes is None else np.asarray(classes)
    if n_classes <= k or len(classes) <= k or scores.ndim != 2:
        return None
    return float(top_k_accuracy_score(y_true, scores, k=k, labels=classes))


def val_score(row: dict) -> float:
    """A row's validation accuracy for ranking (missing ranks last); never the test metrics."""
    v = row.get("val_top1")
    return -1.0 if v is None else float(v)
