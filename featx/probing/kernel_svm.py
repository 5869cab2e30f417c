"""The exact RBF SVM's grid over C from one kernel matrix.

libsvm computes RBF kernel values itself, row by row in double precision, and for every C
again; on 9,600 rows of 1,280 features that is about 50 s per fit on one core. The kernel does
not depend on C, so selection computes it once per fold (a blocked float32 matrix product,
a few seconds) and fits ``SVC(kernel="precomputed")`` for each C in about a second: the same
optimisation problem, with kernel values that differ from libsvm's by float32 rounding. The
chosen C is then refit as a plain ``SVC(kernel="rbf")``, so the saved head needs no featx.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from sklearn.svm import SVC

#: the float64 kernel of the fitting rows is held in memory once per fold (800 MB at 10,000
#: rows, the bounded selection's default); above this many bytes libsvm computes its own per C
KERNEL_MAX_BYTES = 1 << 30
BLOCK_ROWS = 2048


def scale_gamma(X: np.ndarray) -> float:
    """``SVC(gamma="scale")``'s gamma for these (standardised) rows."""
    var = float(np.var(X, dtype=np.float64))
    return 1.0 / (X.shape[1] * var) if var > 0 else 1.0


def rbf_kernel_matrix(A: np.ndarray, B: np.ndarray, gamma: float) -> np.ndarray:
    """exp(-gamma * |a - b|^2) for every pair, float64, computed a block of rows at a time in float32."""
    A = np.asarray(A, dtype=np.float32)
    B = np.asarray(B, dtype=np.float32)
    out = np.empty((len(A), len(B)), dtype=np.float64)
    b_norms = np.einsum("ij,ij->i", B, B)
    for start in range(0, len(A), BLOCK_ROWS):
        a = A[start:start + BLOCK_ROWS]
        d = a @ B.T
        d *= -2.0
        d += np.einsum("ij,ij->i", a, a)[:, None]
        d += b_norms[None, :]
        np.maximum(d, 0.0, out=d)
        d *= -gamma
        np.exp(d, out=d)
        out[start:start + len(a)] = d
    return out


def precomputed_grid_predictions(X_fit, y_fit, X_val, grid: Sequence[dict]) -> list[np.ndarray] | None:
    """Validation predictions of ``SVC(kernel="rbf", gamma="scale", C=c)`` for every grid entry,
    from one kernel; None when the grid tunes more than C (the Nystroem variant's ``svm__C``) or
    the kernel would not fit in ``KERNEL_MAX_BYTES``."""
    if not isinstance(X_fit, np.ndarray) or any(set(params) != {"C"} for params in grid):
        return None
    if 8 * len(X_fit) ** 2 > KERNEL_MAX_BYTES:
        return None
    gamma = scale_gamma(X_fit)
    K_fit = rbf_kernel_matrix(X_fit, X_fit, gamma)
    models = [SVC(kernel="precomputed", C=params["C"]).fit(K_fit, y_fit) for params in grid]
    del K_fit  # a precomputed-kernel SVC keeps no copy of it; the validation kernel comes in blocks
    predictions: list[list[np.ndarray]] = [[] for _ in models]
    for start in range(0, len(X_val), BLOCK_ROWS):
        K_val = rbf_kernel_matrix(X_val[start:start + BLOCK_ROWS], X_fit, gamma)
        for pred, model in zip(predictions, models):
            pred.append(model.predict(K_val))
    return [np.concatenate(pred) if pred else np.asarray(y_fit)[:0] for pred in predictions]
