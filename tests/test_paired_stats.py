"""Paired statistics between two classifiers scored on the same rows (``featx compare``)."""

from __future__ import annotations

import json

import numpy as np
import pytest

from featx.comparison.stats import PairedComparison, holm, paired_comparison
from featx.errors import UsageError

pytest.importorskip("statsmodels")
from statsmodels.stats.contingency_tables import mcnemar  # noqa: E402
from statsmodels.stats.multitest import multipletests  # noqa: E402


def predictions(only_a: int, only_b: int, both: int, neither: int, n_classes: int = 3, seed: int = 0):
    """Labels and two prediction vectors with the given agreement table, rows shuffled."""
    rng = np.random.default_rng(seed)
    n = only_a + only_b + both + neither
    y = rng.integers(0, n_classes, size=n)
    wrong = (y + 1) % n_classes
    right_a = np.r_[np.ones(only_a), np.zeros(only_b), np.ones(both), np.zeros(neither)].astype(bool)
    right_b = np.r_[np.zeros(only_a), np.ones(only_b), np.ones(both), np.zeros(neither)].astype(bool)
    order = rng.permutation(n)
    right_a, right_b = right_a[order], right_b[order]
    return y, np.where(right_a, y, wrong), np.where(right_b, y, wrong)


def statsmodels_p(y, pred_a, pred_b) -> float:
    ra, rb = pred_a == y, pred_b == y
    table = [[np.sum(ra & rb), np.sum(ra & ~rb)], [np.sum(~ra & rb), np.sum(~ra & ~rb)]]
    return float(mcnemar(table, exact=True).pvalue)


@pytest.mark.parametrize("table", [(10, 2, 50, 8), (3, 3, 20, 4), (0, 7, 30, 1), (1, 0, 5, 0), (40, 25, 300, 35),
                                   (13, 14, 0, 0), (0, 0, 10, 3)])
def test_p_value_is_exact_mcnemar(table):
    y, a, b = predictions(*table)
    result = paired_comparison(y, a, b)
    assert (result.only_a, result.only_b) == table[:2]
    assert result.p_value == pytest.approx(statsmodels_p(y, a, b), rel=1e-9, abs=1e-12)


def test_p_value_on_random_predictions():
    rng = np.random.default_rng(7)
    for trial in range(20):
        n = int(rng.integers(5, 400))
        y = rng.integers(0, 4, size=n)
        a = np.where(rng.random(n) < rng.uniform(0.3, 0.95), y, rng.integers(0, 4, size=n))
        b = np.where(rng.random(n) < rng.uniform(0.3, 0.95), y, rng.integers(0, 4, size=n))
        result = paired_comparison(y, a, b, seed=trial)
        assert result.p_value == pytest.approx(statsmodels_p(y, a, b), rel=1e-9, abs=1e-12)
        assert result.difference == pytest.approx(np.mean(a == y) - np.mean(b == y))


def brute_force_interval(y, a, b, seed: int, n_resamples: int) -> tuple[float, float]:
    """Rows resampled by index, both classifiers together: the textbook paired bootstrap."""
    rng = np.random.default_rng(seed)
    d = (a == y).astype(float) - (b == y).astype(float)
    idx = rng.integers(0, len(d), size=(n_resamples, len(d)))
    lo, hi = np.percentile(d[idx].mean(axis=1), [2.5, 97.5])
    return float(lo), float(hi)


@pytest.mark.parametrize("table", [(60, 30, 300, 110), (25, 25, 400, 50), (5, 80, 200, 215)])
def test_bootstrap_interval_matches_resampling_rows(table):
    y, a, b = predictions(*table, seed=3)
    result = paired_comparison(y, a, b, seed=11, n_resamples=2000)
    lo, hi = brute_force_interval(y, a, b, seed=12345, n_resamples=2000)
    assert result.ci[0] == pytest.approx(lo, abs=0.01)
    assert result.ci[1] == pytest.approx(hi, abs=0.01)
    assert result.ci[0] <= result.difference <= result.ci[1]


def test_bootstrap_is_seeded():
    y, a, b = predictions(30, 20, 100, 50)
    assert paired_comparison(y, a, b, seed=4).ci == paired_comparison(y, a, b, seed=4).ci
    assert paired_comparison(y, a, b, seed=4).ci != paired_comparison(y, a, b, seed=5).ci


def test_identical_predictions_tie():
    y, a, _ = predictions(0, 0, 70, 30)
    result = paired_comparison(y, a, a.copy())
    assert result.verdict == "tie" and result.p_value == 1.0 and result.difference == 0.0
    assert result.ci == (0.0, 0.0) and result.only_a == result.only_b == 0
    assert result.accuracy_a == result.accuracy_b == pytest.approx(0.7)


@pytest.mark.parametrize("swap", [False, True])
def test_clearly_better_classifier_wins(swap):
    y, better, worse = predictions(60, 5, 200, 35)
    a, b = (worse, better) if swap else (better, worse)
    result = paired_comparison(y, a, b)
    assert result.verdict == ("b" if swap else "a")
    assert result.p_value < 1e-6
    assert (result.ci[1] < 0) if swap else (result.ci[0] > 0)


def test_alpha_decides_the_verdict():
    y, a, b = predictions(12, 4, 60, 10)  # p = 0.077
    assert paired_comparison(y, a, b).verdict == "tie"
    assert paired_comparison(y, a, b, alpha=0.1).verdict == "a"


def test_to_dict_is_strict_json():
    y, a, b = predictions(8, 3, 40, 9)
    result = paired_comparison(y, a, b)
    assert isinstance(result, PairedComparison)
    data = json.loads(json.dumps(result.to_dict(), allow_nan=False))
    assert data["n"] == 60 and data["only_a"] == 8 and data["verdict"] == "tie"
    assert data["ci"] == list(result.ci)


def test_string_labels():
    y = np.array(["cat", "dog", "owl", "cat"])
    result = paired_comparison(y, y, np.array(["cat", "cat", "owl", "dog"]))
    assert (result.only_a, result.only_b, result.accuracy_a, result.accuracy_b) == (2, 0, 1.0, 0.5)


@pytest.mark.parametrize("args, message", [
    (([0, 1, 2], [0, 1], [0, 1, 2]), "same rows"),
    (([], [], []), "no rows"),
    (([[0, 1]], [[0, 1]], [[0, 1]]), "1-D"),
    ((5, 5, 5), "1-D"),
])
def test_bad_inputs_say_what_is_wrong(args, message):
    with pytest.raises(UsageError, match=message):
        paired_comparison(*args)


def test_bad_options():
    with pytest.raises(UsageError, match="alpha"):
        paired_comparison([0, 1], [0, 1], [1, 1], alpha=1.5)
    with pytest.raises(UsageError, match="n_resamples"):
        paired_comparison([0, 1], [0, 1], [1, 1], n_resamples=0)


def test_holm_by_hand():
    # sorted: 0.01 * 4 = 0.04, 0.02 * 3 = 0.06, 0.03 * 2 = 0.06, 0.5 * 1 = 0.5
    assert holm([0.03, 0.5, 0.01, 0.02]) == pytest.approx([0.06, 0.5, 0.04, 0.06])
    # monotone: 0.05 * 1 = 0.05 is raised to the earlier 0.04 * 2 = 0.08; capped at 1
    assert holm([0.05, 0.04]) == pytest.approx([0.08, 0.08])
    assert holm([0.6, 0.9, 0.7]) == pytest.approx([1.0, 1.0, 1.0])
    assert holm([0.2]) == [0.2]
    assert holm([]) == []


def test_holm_matches_statsmodels():
    rng = np.random.default_rng(1)
    for _ in range(20):
        p = rng.uniform(0, 0.2, size=int(rng.integers(1, 12))) ** rng.uniform(0.5, 3)
        p[rng.random(len(p)) < 0.2] = p[0]  # ties
        expected = multipletests(p, method="holm")[1]
        assert holm(p) == pytest.approx(list(expected), rel=1e-12)


def test_holm_rejects_non_probabilities():
    for bad in ([0.1, 1.2], [-0.1], [float("nan")], [[0.1, 0.2]]):
        with pytest.raises(UsageError):
            holm(bad)
