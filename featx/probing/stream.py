"""Probing a layer too large for memory: linear heads trained by SGD over row chunks.

Used when a layer's float32 features exceed the memory budget (e.g. ``--pool none`` on a big
dataset). Only linear heads stream: ``logreg`` becomes SGD with the log loss, ``linsvm`` SGD
with the hinge loss, with ``alpha`` (L2 strength) on a grid. The protocol is the same:
scaler and selection on training rows only (the first validation split), refit on all
training rows, the test rows evaluated once.
"""

from __future__ import annotations

import logging
import time

import numpy as np
from sklearn.linear_model import SGDClassifier
from sklearn.pipeline import Pipeline
from sklearn.preprocessing import StandardScaler

from ..evaluation import classification_metrics
from .fit import CellResult
from .protocol import Splits

log = logging.getLogger(__name__)

CHUNK_BYTES = 64 * 1024**2
MIN_EPOCHS, MAX_EPOCHS, TARGET_UPDATES = 3, 50, 200_000  # SGD needs enough updates, not just passes
ALPHAS = (1e-5, 1e-4, 1e-3)
LOSSES = {"logreg": "log_loss", "linsvm": "hinge"}


class _Rows:
    """Chunks of one layer's rows, restricted to the kept (readable) samples."""

    def __init__(self, entry, layer: str, ok: np.ndarray):
        self.entry, self.layer, self.ok = entry, layer, ok

    def chunks(self, wanted: np.ndarray):
        """(X, kept rows) for the kept rows in ``wanted`` (a boolean mask over kept rows)."""
        for start, X in self.entry.iter_rows(self.layer, self.ok, chunk_bytes=CHUNK_BYTES):
            kept = np.arange(start, start + len(X))
            take = wanted[kept]
            if take.any():
                yield X[take], kept[take]


def _fit_sgd(rows: _Rows, mask, y, loss, alpha, seed, classes, scaler):
    clf = SGDClassifier(loss=loss, alpha=alpha, random_state=seed)
    epochs = int(np.clip(np.ceil(TARGET_UPDATES / max(1, mask.sum())), MIN_EPOCHS, MAX_EPOCHS))
    for _ in range(epochs):
        for X, idx in rows.chunks(mask):
            clf.partial_fit(scaler.transform(X), y[idx], classes=classes)
    return clf


def _scaler(rows: _Rows, mask) -> StandardScaler:
    scaler = StandardScaler()
    for X, _ in rows.chunks(mask):
        scaler.partial_fit(X)
    return scaler


def stream_cell(entry, record, heads, ok, y, splits: Splits, folds, n_classes, seed) -> list[CellResult]:
    rows = _Rows(entry, record.name, ok)
    linear = [h for h in heads if h.name in LOSSES]
    skipped = [h.name for h in heads if h.name not in LOSSES]
    if skipped:
        log.warning("layer %s is streamed: only linear heads run on it (skipped: %s)", record.name, ", ".join(skipped))
    n = len(y)
    train_mask = np.zeros(n, bool)
    train_mask[splits.train] = True
    test_mask = np.zeros(n, bool)
    test_mask[splits.test] = True
    fit_idx, val_idx = folds[0]
    fit_mask, val_mask = np.zeros(n, bool), np.zeros(n, bool)
    fit_mask[splits.selection_rows[fit_idx]] = True  # folds index train (then the source's val rows)
    val_mask[splits.selection_rows[val_idx]] = True
    classes = np.unique(y[splits.train])

    out = []
    for head in linear:
        t0 = time.perf_counter()
        loss = LOSSES[head.name]
        scaler = _scaler(rows, fit_mask)
        scores = []
        for alpha in ALPHAS:
            clf = _fit_sgd(rows, fit_mask, y, loss, alpha, seed, classes, scaler)
            hits = sum(int((clf.predict(scaler.transform(X)) == y[idx]).sum()) for X, idx in rows.chunks(val_mask))
            scores.append(hits / max(1, int(val_mask.sum())))
        alpha = ALPHAS[int(np.argmax(scores))]
        scaler = _scaler(rows, train_mask)
        clf = _fit_sgd(rows, train_mask, y, loss, alpha, seed, classes, scaler)
        fit_seconds = time.perf_counter() - t0
        pred = np.empty(n, dtype=np.int64)
        for X, idx in rows.chunks(test_mask):  # the single pass over the test rows
            pred[idx] = clf.predict(scaler.transform(X))
        pred = pred[splits.test]
        metrics = classification_metrics(y[splits.test], pred, n_classes=n_classes, classes=classes, seed=seed)
        row = {
            "layer": record.name, "index": record.index, "depth": record.depth, "order": record.order,
            "width": record.width, "pool": record.pool, "head": head.name,
            "params": {"alpha": alpha, "solver": f"sgd-{loss}-streamed"},
            "val_top1": float(max(scores)),
            "grid": [{"params": {"alpha": a}, "val_top1": float(s)} for a, s in zip(ALPHAS, scores)],
            **metrics, "fit_seconds": round(fit_seconds, 3), "n_train": int(train_mask.sum()),
            "n_test": int(test_mask.sum()),
            "notes": ["streamed from disk (layer larger than the memory budget)"]
            + ([f"skipped heads: {', '.join(skipped)}"] if skipped else []),
        }
        out.append(CellResult(row, pred, Pipeline([("scaler", scaler), ("clf", clf)])))
    return out
