"""One (layer, head) cell of the probe grid: select on validation data, refit, test once.

The selection function receives the training rows (and the source's own validation rows,
when it has them) only; it cannot see the test rows, so no
hyper-parameter can depend on them. The test rows meet the refit model exactly once, in
``evaluate``.
"""

from __future__ import annotations

import time
import warnings
from dataclasses import dataclass

import numpy as np
from sklearn.base import clone
from sklearn.exceptions import ConvergenceWarning
from sklearn.preprocessing import StandardScaler
from threadpoolctl import threadpool_limits

from ..evaluation import TOP_K, classification_metrics
from .heads import Head, grid_for

PATH_PATIENCE = 2


@dataclass
class CellResult:
    row: dict
    test_pred: np.ndarray
    model: object | None  # the refit Pipeline (None when too large to ship back, e.g. k-NN)


def select(head: Head, X: np.ndarray, y: np.ndarray, folds, seed: int) -> tuple[dict, list[float], list[str]]:
    """Best parameters by mean validation accuracy over ``folds`` of the training rows.

    Ties go to the earlier grid entry (grids are ordered from the most regularised).
    """
    grid = feasible_grid(head, len(y), folds)
    if not grid:
        return {}, [], []
    totals = np.zeros(len(grid))
    stopped = len(grid)
    notes: set[str] = set()
    for fit_idx, val_idx in folds:
        scaler = StandardScaler().fit(X[fit_idx])
        X_fit, X_val = scaler.transform(X[fit_idx]), scaler.transform(X[val_idx])
        y_fit, y_val = y[fit_idx], y[val_idx]
        if head.score_grid is not None:
            totals += head.score_grid(X_fit, y_fit, X_val, y_val, grid)
            continue
        clf = head.build(len(y), seed)  # the variant (e.g. exact or approximate SVM) follows the training size
        if head.warm_start:
            clf.set_params(warm_start=True)
        for i, params in enumerate(grid):
            if not head.warm_start:
                clf = clone(clf)
            clf.set_params(**params)
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always", ConvergenceWarning)
                clf.fit(X_fit, y_fit)
            notes.update(_convergence_notes(caught, params))
            totals[i] += clf.score(X_val, y_val)
            if head.warm_start and len(folds) == 1 and _path_has_turned(totals[: i + 1]):
                stopped = i + 1
                break
    scores = list(totals[:stopped] / len(folds))
    best = int(np.argmax(scores))
    return dict(grid[best]), [float(s) for s in scores], sorted(notes)


def feasible_grid(head: Head, n: int, folds) -> list[dict]:
    """The head's grid without neighbour counts larger than the smallest fitting set: with the
    dataset's own validation split every training row fits, and a k above that cannot be refit."""
    n_fit = min((len(fit) for fit, _ in folds), default=n)
    return [p for p in grid_for(head, n) if p.get("n_neighbors", 0) <= n_fit]


def _path_has_turned(scores: np.ndarray, patience: int = PATH_PATIENCE) -> bool:
    """Along a warm-started regularisation path (C increasing), once validation accuracy has
    fallen for ``patience`` steps in a row after its best, the rest of the path (the slowest
    fits, at the weakest regularisation) is skipped, as path solvers such as glmnet do.
    Hold-out selection only; k-fold selection walks the whole grid."""
    best = int(np.argmax(scores))
    return len(scores) - 1 - best >= patience and all(np.diff(scores[best:]) <= 0)


def _convergence_notes(caught, params) -> list[str]:
    return [f"did not converge at {params}" for w in caught if issubclass(w.category, ConvergenceWarning)]


def _scores(model, X: np.ndarray) -> np.ndarray | None:
    for method in ("predict_proba", "decision_function"):
        if hasattr(model, method):
            try:
                return getattr(model, method)(X)
            except (AttributeError, NotImplementedError):
                continue
    return None


def evaluate(model, X_test: np.ndarray, y_test: np.ndarray, n_classes: int, seed: int) -> tuple[dict, np.ndarray]:
    """The single use of the test rows, scored by ``featx.evaluation`` like fine-tuning's."""
    pred = model.predict(X_test)
    classes = getattr(model, "classes_", None)
    scores = None
    if n_classes > TOP_K and classes is not None and len(classes) > TOP_K:
        scores = _scores(model, X_test)
    metrics = classification_metrics(y_test, pred, scores, n_classes=n_classes, classes=classes, seed=seed)
    return metrics, pred


def run_cell(layer: dict, head: Head, X: np.ndarray, y: np.ndarray, train: np.ndarray, test: np.ndarray,
             folds, n_classes: int, seed: int, keep_model: bool = True, blas_threads: int = 1,
             selection_rows: np.ndarray | None = None) -> CellResult:
    """Select, refit on all training rows, test once. Runs inside a joblib worker.

    ``folds`` index ``selection_rows`` (default: the training rows); with the source's own
    validation split those are train followed by val, and the refit still uses ``train`` only.
    """
    t0 = time.perf_counter()
    selection_rows = train if selection_rows is None else selection_rows
    with threadpool_limits(limits=blas_threads):
        X_train, y_train = X[train], y[train]
        params, grid_scores, notes = select(head, X[selection_rows], y[selection_rows], folds, seed)
        model = head.pipeline(len(train), seed, params)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always", ConvergenceWarning)
            model.fit(X_train, y_train)
        notes = sorted(set(notes) | set(_convergence_notes(caught, params)))
        fit_seconds = time.perf_counter() - t0
        metrics, pred = evaluate(model, X[test], y[test], n_classes, seed)
    grid = feasible_grid(head, len(selection_rows), folds)  # the grid select() walked
    row = {
        **layer, "head": head.name, "params": _plain(params),
        "val_top1": max(grid_scores) if grid_scores else None,
        "grid": [{"params": _plain(p), "val_top1": s} for p, s in zip(grid, grid_scores)],  # evaluated part
        **metrics, "fit_seconds": round(fit_seconds, 3), "n_train": int(len(train)), "n_test": int(len(test)),
        "notes": notes,
    }
    return CellResult(row, pred.astype(np.int64), model if keep_model else None)


def _plain(params: dict) -> dict:
    return {k: (v.item() if hasattr(v, "item") else v) for k, v in params.items()}
