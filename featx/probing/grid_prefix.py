"""Pipeline steps that no grid entry touches, fitted once per fold instead of once per entry.

A head such as the large-N SVM is ``Pipeline([rbf Nystroem map, LinearSVC])`` with a grid over
the SVM's C only. The map (seeded, so the same for every C) used to be fitted and applied to
the fitting and validation rows again for each C; here it is fitted once per fold and every C
fits the rest of the pipeline on the transformed rows. The predictions are those of the
straightforward loop, bit for bit (tests/test_probe_speedups.py), as long as the shared steps
are seeded (an unseeded random step would draw once per fold instead of once per grid entry).
"""

from __future__ import annotations

from collections.abc import Sequence

from sklearn.base import clone
from sklearn.pipeline import Pipeline


def split_untouched_steps(estimator, grid: Sequence[dict]) -> tuple[Pipeline | None, object, list[dict]]:
    """(leading steps no grid key names, the remaining estimator, the grid re-keyed for it)."""
    if not isinstance(estimator, Pipeline) or len(estimator.steps) < 2:
        return None, estimator, list(grid)
    tuned = {key.split("__", 1)[0] for params in grid for key in params}
    if any("__" not in key for params in grid for key in params):
        return None, estimator, list(grid)  # a Pipeline-level parameter: keep the pipeline whole
    cut = next((i for i, (name, _) in enumerate(estimator.steps) if name in tuned), len(estimator.steps) - 1)
    if cut == 0:
        return None, estimator, list(grid)
    prefix = Pipeline(estimator.steps[:cut])
    rest_steps = estimator.steps[cut:]
    if len(rest_steps) == 1:
        _, rest = rest_steps[0]
        regrid = [{key.split("__", 1)[1]: v for key, v in params.items()} for params in grid]
        return prefix, rest, regrid
    return prefix, Pipeline(rest_steps), list(grid)


def fit_prefix(estimator, grid: Sequence[dict], X_fit, y_fit, X_val):
    """Fit the untouched leading steps once: (rest estimator, its grid, transformed X_fit, X_val).

    Without such steps, the estimator, grid and rows come back unchanged.
    """
    prefix, rest, regrid = split_untouched_steps(clone(estimator), grid)
    if prefix is None:
        return estimator, list(grid), X_fit, X_val
    X_fit = prefix.fit_transform(X_fit, y_fit)
    return rest, regrid, X_fit, prefix.transform(X_val)
