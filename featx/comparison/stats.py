"""Is classifier a better than classifier b on these test rows, or could chance explain it?

Both classifiers predict the same rows, so the comparison is paired: only the rows where they
disagree about correctness (one right, the other wrong) carry evidence. McNemar's exact test
asks whether those discordant rows split evenly; the paired bootstrap gives an interval for
the accuracy difference. Paired statistics see differences that two separate accuracy
intervals, overlapping because both carry the same row-to-row noise, would hide.

numpy and scipy only.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
from scipy.stats import binomtest

from ..errors import UsageError

ALPHA = 0.05
N_RESAMPLES = 1000


@dataclass(frozen=True)
class PairedComparison:
    """Two classifiers' predictions of the same ``n`` rows, compared row by row."""

    n: int
    accuracy_a: float
    accuracy_b: float
    difference: float  # accuracy_a - accuracy_b
    ci: tuple[float, float]  # 95% paired bootstrap percentile interval of the difference
    only_a: int  # rows a got right and b wrong
    only_b: int  # rows b got right and a wrong
    p_value: float  # exact McNemar test on the discordant rows
    alpha: float
    verdict: str  # "a" | "b" | "tie"

    def to_dict(self) -> dict:
        """Plain Python values that ``json.dumps(..., allow_nan=False)`` accepts."""
        return {
            "n": int(self.n), "accuracy_a": _finite(self.accuracy_a), "accuracy_b": _finite(self.accuracy_b),
            "difference": _finite(self.difference), "ci": [_finite(v) for v in self.ci],
            "only_a": int(self.only_a), "only_b": int(self.only_b), "p_value": _finite(self.p_value),
            "alpha": _finite(self.alpha), "verdict": self.verdict,
        }


def _finite(value) -> float | None:
    value = float(value)
    return value if math.isfinite(value) else None


def _vector(name: str, values) -> np.ndarray:
    array = np.asarray(values)
    if array.ndim != 1:
        raise UsageError(f"{name} must be a 1-D sequence of labels, one per row; got shape {array.shape}.")
    return array


def paired_comparison(y_true, pred_a, pred_b, *, seed: int = 0, alpha: float = ALPHA,
                      n_resamples: int = N_RESAMPLES) -> PairedComparison:
    """Compare predictions ``pred_a`` and ``pred_b`` of the labels ``y_true`` (same rows, same order).

    The verdict names the more accurate classifier when McNemar's exact p-value is below
    ``alpha``, else ``"tie"``. The bootstrap resamples rows jointly for both classifiers; each
    row's difference in correctness is -1, 0 or 1, so a resample is fully described by how many
    rows of each kind it draws: one multinomial draw of three counts, exact and cheap for any n.
    """
    y_true, pred_a, pred_b = _vector("y_true", y_true), _vector("pred_a", pred_a), _vector("pred_b", pred_b)
    lengths = {"y_true": len(y_true), "pred_a": len(pred_a), "pred_b": len(pred_b)}
    if len(set(lengths.values())) != 1:
        raise UsageError("The labels and both predictions must cover the same rows; got lengths "
                         + ", ".join(f"{k}={v}" for k, v in lengths.items()) + ".")
    n = len(y_true)
    if n == 0:
        raise UsageError("Nothing to compare: no rows were given (y_true is empty).")
    if not 0.0 < float(alpha) < 1.0:
        raise UsageError(f"alpha must lie strictly between 0 and 1, got {alpha!r}.")
    if isinstance(n_resamples, bool) or not isinstance(n_resamples, (int, np.integer)) or n_resamples < 1:
        raise UsageError(f"n_resamples must be a positive integer, got {n_resamples!r}.")

    right_a, right_b = pred_a == y_true, pred_b == y_true
    only_a = int(np.sum(right_a & ~right_b))
    only_b = int(np.sum(right_b & ~right_a))
    discordant = only_a + only_b
    p_value = 1.0 if discordant == 0 else float(binomtest(only_a, discordant, 0.5).pvalue)
    p_value = min(p_value, 1.0)
    if p_value < alpha:
        verdict = "a" if only_a > only_b else "b"
    else:
        verdict = "tie"
    return PairedComparison(
        n=n, accuracy_a=float(right_a.mean()), accuracy_b=float(right_b.mean()),
        difference=(only_a - only_b) / n, ci=_bootstrap_difference(only_a, only_b, n, seed, int(n_resamples)),
        only_a=only_a, only_b=only_b, p_value=p_value, alpha=float(alpha), verdict=verdict,
    )


def _bootstrap_difference(only_a: int, only_b: int, n: int, seed: int, n_resamples: int) -> tuple[float, float]:
    """95% percentile interval of the accuracy difference over ``n_resamples`` row resamples."""
    rng = np.random.default_rng(seed)
    shares = np.array([only_a, only_b, n - only_a - only_b], dtype=float) / n
    counts = rng.multinomial(n, shares, size=n_resamples)
    differences = (counts[:, 0] - counts[:, 1]) / n
    lo, hi = np.percentile(differences, [2.5, 97.5])
    return float(lo), float(hi)


def holm(p_values) -> list[float]:
    """Holm-Bonferroni adjusted p-values, in the order given.

    For one leader compared with every other candidate: each comparison's adjusted p-value can
    be held against alpha on its own while the chance of any false "better" stays below alpha.
    """
    p = np.asarray(p_values, dtype=float)
    if p.ndim != 1:
        raise UsageError(f"holm needs a 1-D sequence of p-values; got shape {p.shape}.")
    if np.isnan(p).any() or (p < 0).any() or (p > 1).any():
        raise UsageError(f"p-values must lie in [0, 1]; got {p.tolist()}.")
    m = len(p)
    order = np.argsort(p, kind="stable")
    stepped = np.maximum.accumulate(p[order] * np.arange(m, 0, -1))
    adjusted = np.empty(m)
    adjusted[order] = np.minimum(stepped, 1.0)
    return [float(v) for v in adjusted]
