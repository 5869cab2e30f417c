"""One (layer, head) cell of the probe grid: select on validation data, refit, test once.

The selection function receives the training rows (and the source's own validation rows,
when it has them) only; it cannot see the test rows, so no
hyper-parameter can depend on them. The test rows meet the refit model exactly once, in
``evaluate``.
"""

from __future__ import annotations

import time
import warnings
from contextlib import nullcontext
from dataclasses import dataclass

import numpy as np
from sklearn.base import clone
from sklearn.exceptions import ConvergenceWarning
from sklearn.neighbors import KNeighborsClassifier
from sklearn.preprocessing import StandardScaler
from threadpoolctl import threadpool_limits

from ..evaluation import TOP_K, classification_metrics
from .engines import array_api, device_type, portable, to_device, to_numpy, torch_threads
from .grid_prefix import fit_prefix
from .heads import Head, grid_for
from .knn import CosineKNeighborsClassifier

PATH_PATIENCE = 2
#: a warm-started estimator's fitted state that its next fit starts from (LogisticRegression's)
WARM_ATTRIBUTES = ("coef_", "intercept_", "classes_")
SCALER_BLOCK_ROWS = 8192


@dataclass
class CellResult:
    row: dict
    test_pred: np.ndarray
    model: object | None  # the refit Pipeline (None when too large to ship back, e.g. k-NN)
    val_rows: np.ndarray | None = None  # rows (of the entry's readable images) selection scored
    val_pred: np.ndarray | None = None  # the chosen parameters' predictions of them


@dataclass
class Selection:
    """What selection chose, and the chosen parameters' predictions on the validation rows, which
    let later comparisons (layers, heads, backbones) be paired on the same rows without the test."""

    params: dict
    scores: list[float]  # mean validation accuracy per evaluated grid entry
    notes: list[str]
    val_rows: np.ndarray  # rows of X scored, fold after fold
    val_pred: np.ndarray  # the chosen parameters' predictions of them
    start: dict | None = None  # a warm-started head's solution at the chosen parameters (hold-out selection)


def select(head: Head, X: np.ndarray, y: np.ndarray, folds, seed: int, device: str = "cpu",
           n_rows: int | None = None, precision: str = "float32") -> Selection:
    """Best parameters by mean validation accuracy over ``folds`` (rows of ``X``).

    Ties go to the earlier grid entry (grids are ordered from the most regularised).
    ``n_rows``: the number of rows the chosen model is refit on (default ``len(y)``), which sets
    the variant of a size-dependent head (exact or approximate SVM).
    """
    n_rows = len(y) if n_rows is None else n_rows
    val_rows = np.concatenate([np.asarray(v, dtype=np.int64) for _, v in folds]) if folds else np.zeros(0, np.int64)
    grid = feasible_grid(head, n_rows, folds, X.shape[1])
    if not grid:
        return Selection({}, [], [], val_rows[:0], np.zeros(0, np.int64))
    engine = head.engine(device, precision)
    on_device = engine.arrays == "torch"
    predictions: list[list[np.ndarray]] = [[] for _ in grid]  # per grid entry, one array per fold
    totals = np.zeros(len(grid))
    stopped = len(grid)
    notes: set[str] = set()
    solutions: list[dict | None] = [None] * len(grid)  # along a warm path: where the refit can start
    for fit_idx, val_idx in folds:
        X_fit, X_val, y_fit, y_val = X[fit_idx], X[val_idx], y[fit_idx], y[val_idx]
        truth = y_val
        if on_device:
            X_fit, X_val, y_fit = (to_device(a, device) for a in (X_fit, X_val, y_fit))
        with array_api(on_device):
            scaler = _fit_scaler(StandardScaler(), X_fit)
            X_fit, X_val = _standardise(scaler, X_fit), _standardise(scaler, X_val)
            # a fast path for the whole grid at once (k-NN, the exact SVM's kernel); None: not for this grid
            grid_pred = None if engine.predict_grid is None else engine.predict_grid(X_fit, y_fit, X_val, grid,
                                                                                     device=device)
            if grid_pred is not None:
                for i, pred in enumerate(grid_pred):
                    predictions[i].append(to_numpy(pred))
                    totals[i] += float(np.mean(predictions[i][-1] == truth))
                continue
            # the variant (e.g. exact or approximate SVM) follows the refit's size
            clf = engine.build(n_rows, seed, device, X.shape[1])
            # steps no grid entry tunes (the SVM's Nystroem map) are fitted once per fold, not once per entry
            clf, fold_grid, X_fit, X_val = fit_prefix(clf, grid, X_fit, y_fit, X_val)
            if head.warm_start:
                clf.set_params(warm_start=True)
            for i, params in enumerate(grid):
                if not head.warm_start:
                    clf = clone(clf)
                clf.set_params(**fold_grid[i])
                with warnings.catch_warnings(record=True) as caught:
                    warnings.simplefilter("always", ConvergenceWarning)
                    clf.fit(X_fit, y_fit)
                notes.update(_convergence_notes(caught, params))
                if head.warm_start and len(folds) == 1:
                    solutions[i] = {k: getattr(clf, k) for k in WARM_ATTRIBUTES if hasattr(clf, k)}
                predictions[i].append(to_numpy(clf.predict(X_val)))
                totals[i] += float(np.mean(predictions[i][-1] == truth))  # clf.score's accuracy
                if head.warm_start and len(folds) == 1 and _path_has_turned(totals[: i + 1]):
                    stopped = i + 1
                    break
    scores = list(totals[:stopped] / len(folds))
    best = int(np.argmax(scores))
    return Selection(dict(grid[best]), [float(s) for s in scores], sorted(notes), val_rows,
                     np.concatenate(predictions[best]).astype(np.int64), solutions[best])


def feasible_grid(head: Head, n: int, folds, n_features: int | None = None) -> list[dict]:
    """The head's grid without neighbour counts larger than the smallest fitting set: with the
    dataset's own validation split every training row fits, and a k above that cannot be refit."""
    n_fit = min((len(fit) for fit, _ in folds), default=n)
    return [p for p in grid_for(head, n, n_features) if p.get("n_neighbors", 0) <= n_fit]


def _fit_scaler(scaler: StandardScaler, X) -> StandardScaler:
    """``scaler.fit(X)`` a block of rows at a time: fitted on a whole float32 array, scikit-learn
    computes the variance through a float64 copy of it (614 MB for 60,000 x 1,280 features)."""
    if not isinstance(X, np.ndarray) or len(X) <= SCALER_BLOCK_ROWS:
        return scaler.fit(X)
    for start in range(0, len(X), SCALER_BLOCK_ROWS):
        scaler.partial_fit(X[start:start + SCALER_BLOCK_ROWS])
    return scaler


def _standardise(scaler: StandardScaler, X):
    """Rows taken out of the shared features are this cell's own copy: numpy ones are scaled in
    place, so a worker holds the widest layer's training rows once, not twice."""
    return scaler.transform(X, copy=False) if isinstance(X, np.ndarray) else scaler.transform(X)


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


def evaluate(model, X_test, y_test: np.ndarray, n_classes: int, seed: int) -> tuple[dict, np.ndarray]:
    """The single use of the test rows, scored by ``featx.evaluation`` like fine-tuning's."""
    classes = getattr(model, "classes_", None)
    classes = None if classes is None else to_numpy(classes)
    scores = None
    if n_classes > TOP_K and classes is not None and len(classes) > TOP_K:
        scores = _scores(model, X_test)
        scores = None if scores is None else to_numpy(scores)
    if scores is not None and _predicts_first_argmax(model):
        pred = classes[np.argmax(scores, axis=1)]  # the same answer without a second neighbour search
    else:
        pred = to_numpy(model.predict(X_test))
    metrics = classification_metrics(y_test, pred, scores, n_classes=n_classes, classes=classes, seed=seed)
    return metrics, pred


def _predicts_first_argmax(model) -> bool:
    """Whether ``predict`` is by definition the first argmax of ``predict_proba``, which ``_scores``
    returned: true of uniform-weight k-NN (a vote tie goes to the lowest class index in both), whose
    every call is a full neighbour search (on the main job's 1,280-wide layers, 17 s of a worker)."""
    clf = model.steps[-1][1] if hasattr(model, "steps") else model
    if isinstance(clf, KNeighborsClassifier):
        return clf.weights == "uniform"
    return isinstance(clf, CosineKNeighborsClassifier)


def run_cell(layer: dict, head: Head, X: np.ndarray, y: np.ndarray, train: np.ndarray, test: np.ndarray,
             folds, n_classes: int, seed: int, keep_model: bool = True, blas_threads: int = 1,
             selection_rows: np.ndarray | None = None, device: str = "cpu",
             precision: str = "float32") -> CellResult:
    """Select, refit on all training rows, test once. Runs inside a joblib worker.

    ``folds`` index ``selection_rows`` (default: the training rows); with the source's own
    validation split those are train followed by val, and the refit still uses ``train`` only.
    The model comes back as plain scikit-learn on numpy (``engines.portable``).
    """
    t0 = time.perf_counter()
    selection_rows = train if selection_rows is None else selection_rows
    engine = head.engine(device, precision)
    on_device = engine.arrays == "torch"
    torch_budget = torch_threads(blas_threads) if device_type(device) in engine.torch_on else nullcontext()
    with threadpool_limits(limits=blas_threads), torch_budget:
        # folds as rows of X: only the (bounded) selection rows are ever copied out of the shared array
        row_folds = [(selection_rows[fit], selection_rows[val]) for fit, val in folds]
        # the variant of a size-dependent head (exact or Nystroem SVM) and its grid's keys follow the
        # rows of the refit, which is what selection chooses for (train only, with a source val split)
        chosen = select(head, X, y, row_folds, seed, device, n_rows=len(train), precision=precision)
        params, grid_scores, notes = chosen.params, chosen.scores, chosen.notes
        X_train, y_train, X_test = X[train], y[train], X[test]
        if on_device:
            X_train, y_train, X_test = (to_device(a, device) for a in (X_train, y_train, X_test))
        with array_api(on_device):
            model = head.pipeline(len(train), seed, params, device, X.shape[1], precision)
            scaler, clf = model.named_steps["scaler"], model.named_steps["clf"]
            X_train = _standardise(_fit_scaler(scaler, X_train), X_train)  # the pipeline, fitted step by step
            # numpy only: the array API's warm start on device tensors is not exercised here (no GPU)
            warm = _start_from(clf, chosen.start, y_train) if head.warm_start and not on_device else False
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always", ConvergenceWarning)
                clf.fit(X_train, y_train)
            if warm:
                clf.set_params(warm_start=False)  # the saved head is the plain estimator
            del X_train
            notes = sorted(set(notes) | set(_convergence_notes(caught, params)))
            fit_seconds = time.perf_counter() - t0
            metrics, pred = evaluate(model, X_test, y[test], n_classes, seed)
    grid = feasible_grid(head, len(train), folds, X.shape[1])  # the grid select() walked
    row = {
        **layer, "head": head.name, "params": _plain(params),
        "val_top1": max(grid_scores) if grid_scores else None,
        "grid": [{"params": _plain(p), "val_top1": s} for p, s in zip(grid, grid_scores)],  # evaluated part
        **metrics, "fit_seconds": round(fit_seconds, 3), "n_train": int(len(train)), "n_test": int(len(test)),
        "engine": engine.name, "device": device, "notes": notes,
    }
    return CellResult(row, pred.astype(np.int64), portable(model) if keep_model else None, chosen.val_rows,
                      chosen.val_pred)


def _start_from(clf, start: dict | None, y_train) -> bool:
    """Start the refit from selection's solution at the chosen parameters (same model, same C, the
    training rows a superset of the sample): on a 60,000 x 1,280 layer, L-BFGS then took 224
    iterations instead of 361 to the same optimum. Only when the classes are the same."""
    if not start or "coef_" not in start or "classes_" not in start:
        return False
    if not np.array_equal(to_numpy(start["classes_"]), np.unique(to_numpy(y_train))):
        return False
    clf.set_params(warm_start=True)
    clf.coef_, clf.intercept_ = start["coef_"], start["intercept_"]
    return True


def _plain(params: dict) -> dict:
    return {k: (v.item() if hasattr(v, "item") else v) for k, v in params.items()}
