"""The probe's fast paths against the straightforward loop they replace: the same scores, choices
and predictions, on tiny data."""

import numpy as np
import pytest
from sklearn.base import clone
from sklearn.datasets import load_digits
from sklearn.preprocessing import StandardScaler

from featx.probing import heads
from featx.probing.fit import run_cell, select
from featx.probing.grid_prefix import split_untouched_steps
from featx.probing.heads import HEADS, grid_for
from featx.probing.protocol import validation_folds


@pytest.fixture(scope="module")
def digits():
    X, y = load_digits(return_X_y=True)
    X = X.astype(np.float32)
    order = np.random.default_rng(0).permutation(len(y))
    train, test = np.sort(order[:600]), np.sort(order[600:900])
    return X, y, train, test


@pytest.fixture
def small_svm(monkeypatch):
    """The SVM head's large-N variant (Nystroem map + LinearSVC) at a size a test can afford."""
    monkeypatch.setattr(heads, "SVM_EXACT_MAX_ROWS", 100)
    monkeypatch.setattr(heads, "NYSTROEM_COMPONENTS", 64)


def _meta():
    return {"layer": "pixels", "index": 0, "depth": 0.0, "order": 0, "width": 64, "pool": "none"}


def test_nystroem_map_fitted_once_gives_the_loop_s_scores_and_predictions(digits, small_svm):
    X, y, train, _ = digits
    head = HEADS["svm"]
    folds = [(train[f], train[v]) for f, v in validation_folds(y[train], 2, 0)]  # two folds: the map per fold
    chosen = select(head, X, y, folds, seed=0, n_rows=len(train))
    grid = grid_for(head, len(train), X.shape[1])
    assert [list(p) for p in grid] == [["svm__C"]] * 2  # the Nystroem variant was the one exercised
    scores, preds = [], []
    for params in grid:  # the straightforward loop: a fresh pipeline per grid entry and fold
        fold_preds = []
        for fit, val in folds:
            scaler = StandardScaler().fit(X[fit])
            model = clone(head.engine().build(len(train), 0, "cpu", X.shape[1])).set_params(**params)
            model.fit(scaler.transform(X[fit]), y[fit])
            fold_preds.append(model.predict(scaler.transform(X[val])))
        preds.append(np.concatenate(fold_preds))
        scores.append(np.mean([np.mean(p == y[v]) for p, (_, v) in zip(fold_preds, folds)]))
    assert chosen.scores == pytest.approx(scores, abs=0)
    best = int(np.argmax(scores))
    assert chosen.params == grid[best]
    assert np.array_equal(chosen.val_pred, preds[best])


def test_untouched_steps_split_only_before_the_first_tuned_step():
    model = heads._svm(200_000, 0)
    prefix, rest, grid = split_untouched_steps(model, [{"svm__C": 1.0}, {"svm__C": 10.0}])
    assert [name for name, _ in prefix.steps] == ["rbf"] and type(rest).__name__ == "LinearSVC"
    assert grid == [{"C": 1.0}, {"C": 10.0}]
    # a grid that tunes the first step, a plain estimator, or a Pipeline-level parameter: nothing shared
    assert split_untouched_steps(model, [{"rbf__gamma": 0.1}])[0] is None
    assert split_untouched_steps(heads._logreg(10, 0), [{"C": 1.0}])[0] is None
    assert split_untouched_steps(model, [{"memory": None}])[0] is None


def test_svm_variant_follows_the_refit_rows_with_a_source_validation_split(digits, small_svm):
    """With the source's own val split, selection stands for train + val rows but the refit uses
    train only: the grid's keys must be those of the model that is refit (SVC's "C" here, below the
    exact-SVM limit), or setting the chosen parameters on it fails."""
    X, y, _, test = digits
    train, val = np.arange(0, 90), np.arange(90, 150)
    selection_rows = np.concatenate([train, val])
    folds = [(np.arange(len(train)), np.arange(len(train), len(selection_rows)))]
    cell = run_cell(_meta(), HEADS["svm"], X, y, train, test, folds, 10, 0, selection_rows=selection_rows)
    assert list(cell.row["params"]) == ["C"]
    assert type(cell.model[-1]).__name__ == "SVC"
    assert [list(g["params"]) for g in cell.row["grid"]] == [["C"], ["C"]]


def test_cells_go_out_costliest_head_first_then_widest_layer():
    from types import SimpleNamespace

    from featx.probing.schedule import longest_first

    narrow, wide = SimpleNamespace(width=16), SimpleNamespace(width=1280)
    named = {name: SimpleNamespace(name=name) for name in ("logreg", "knn", "svm", "mlp", "tree")}
    cells = [(layer, named[h]) for layer in (narrow, wide) for h in ("logreg", "knn", "svm", "mlp", "tree")]
    order = [(layer.width, head.name) for layer, head in longest_first(cells)]
    assert order == [(1280, "svm"), (16, "svm"), (1280, "mlp"), (16, "mlp"), (1280, "tree"), (16, "tree"),
                     (1280, "logreg"), (16, "logreg"), (1280, "knn"), (16, "knn")]


def test_svm_variant_follows_rows_and_width():
    """libsvm's exact SVM costs rows^2 x width: exact where that fits, Nystroem above."""
    assert heads.svm_is_exact(12_000, 1_280) and heads.svm_is_exact(20_000, 1_280)
    assert not heads.svm_is_exact(12_000 * 2, 16)  # above the row cap, whatever the width
    assert heads.svm_is_exact(10_000, 5_120) and not heads.svm_is_exact(12_000, 5_120)
    assert heads.svm_is_exact(20_000, 16) == heads.svm_is_exact(20_000, heads.SVM_NARROW)
    assert heads.svm_is_exact(10_000) and not heads.svm_is_exact(10_001)  # width unknown: the widest rule
    assert type(heads._svm(12_000, 0, 1_280)).__name__ == "SVC"
    assert type(heads._svm(12_000, 0, 5_120)).__name__ == "Pipeline"
    assert grid_for(HEADS["svm"], 12_000, 1_280) == [{"C": 1.0}, {"C": 10.0}]
    assert grid_for(HEADS["svm"], 12_000, 5_120) == [{"svm__C": 1.0}, {"svm__C": 10.0}]


def test_mlp_steps_follow_the_refit_rows(digits, monkeypatch):
    """400 rows per Adam step from 20,000 refit rows on (selection builds the same estimator, for the
    refit's row count); scikit-learn's 200 below."""
    assert heads._mlp(60_000, 0).batch_size == 400 and heads._mlp(19_999, 0).batch_size == 200
    assert heads._torch_mlp(60_000, 0, "cpu").batch_size == 400
    X, y, train, test = digits
    folds = validation_folds(y[train], None, 0)
    for large_from, expected in ((500, 400), (20_000, 200)):  # digits' 600 training rows: large, then not
        monkeypatch.setattr(heads, "MLP_LARGE_BATCH_ROWS", large_from)
        cell = run_cell(_meta(), HEADS["mlp"], X, y, train, test, folds, 10, 0)
        assert cell.model.named_steps["clf"].batch_size == expected


def test_rbf_kernel_matrix_matches_scikit_learn(digits):
    from sklearn.metrics.pairwise import rbf_kernel

    from featx.probing.kernel_svm import rbf_kernel_matrix, scale_gamma

    X = StandardScaler().fit_transform(digits[0][:300]).astype(np.float32)
    gamma = scale_gamma(X)
    assert gamma == pytest.approx(1.0 / (X.shape[1] * X.astype(np.float64).var()))
    ours = rbf_kernel_matrix(X, X[:170], gamma)
    assert ours.dtype == np.float64 and ours.shape == (300, 170)
    assert np.allclose(ours, rbf_kernel(X.astype(np.float64), X[:170].astype(np.float64), gamma=gamma), atol=1e-6)


@pytest.mark.parametrize("kernel_fits", [True, False])
def test_exact_svm_selection_from_one_kernel_matches_libsvm_per_c(digits, monkeypatch, kernel_fits):
    """One precomputed kernel per fold for every C: the choices and validation predictions of libsvm
    computing its own kernel per C (float32 rounding of the kernel aside). When the kernel does
    not fit its memory budget, selection is libsvm's own loop."""
    from sklearn.svm import SVC

    from featx.probing import kernel_svm

    if not kernel_fits:
        monkeypatch.setattr(kernel_svm, "KERNEL_MAX_BYTES", 1000)
    served, original = [], kernel_svm.precomputed_grid_predictions
    monkeypatch.setattr(kernel_svm, "precomputed_grid_predictions",
                        lambda *args: served.append(original(*args)) or served[-1])
    X, y, train, _ = digits
    head = HEADS["svm"]
    folds = [(train[f], train[v]) for f, v in validation_folds(y[train], 2, 0)]
    grid = [{"C": 0.1}, {"C": 1.0}, {"C": 10.0}]
    monkeypatch.setattr(heads, "_svm_grid", lambda n, d=None: grid)  # a grid on which C matters here
    chosen = select(head, X, y, folds, seed=0, n_rows=len(train))
    scores, preds = [], []
    for params in grid:
        fold_preds = []
        for fit, val in folds:
            scaler = StandardScaler().fit(X[fit])
            model = SVC(kernel="rbf", gamma="scale", **params).fit(scaler.transform(X[fit]), y[fit])
            fold_preds.append(model.predict(scaler.transform(X[val])))
        preds.append(np.concatenate(fold_preds))
        scores.append(np.mean([np.mean(p == y[v]) for p, (_, v) in zip(fold_preds, folds)]))
    assert chosen.params == grid[int(np.argmax(scores))]
    best = int(np.argmax(scores))
    assert len(served) == len(folds) and all((p is not None) == kernel_fits for p in served)
    if kernel_fits:
        assert chosen.scores == pytest.approx(scores, abs=2 / len(train))
        assert np.mean(chosen.val_pred == preds[best]) >= 0.99
    else:
        assert chosen.scores == pytest.approx(scores, abs=0)
        assert np.array_equal(chosen.val_pred, preds[best])
    assert original(X[:10], y[:10], X[10:20], [{"svm__C": 1.0}]) is None  # the Nystroem variant's grid


def test_logreg_refit_starts_from_the_selected_solution_and_reaches_the_cold_fit(digits):
    """The refit at the chosen C starts from selection's coefficients: fewer L-BFGS iterations to
    the same (strictly convex) optimum, and a saved head without warm_start."""
    from sklearn.linear_model import LogisticRegression

    X, y, train, test = digits
    folds = validation_folds(y[train], None, 0)
    cell = run_cell(_meta(), HEADS["logreg"], X, y, train, test, folds, 10, 0)
    clf = cell.model[-1]
    assert clf.get_params()["warm_start"] is False
    scaler = StandardScaler().fit(X[train])
    cold = LogisticRegression(max_iter=1000, tol=1e-4, C=cell.row["params"]["C"]).fit(scaler.transform(X[train]),
                                                                                      y[train])
    assert clf.n_iter_[0] < cold.n_iter_[0]
    assert np.mean(cell.model.predict(X[test]) == cold.predict(scaler.transform(X[test]))) >= 0.99
    assert cell.row["test_top1"] == pytest.approx(cold.score(scaler.transform(X[test]), y[test]), abs=0.01)
