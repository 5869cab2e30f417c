"""The device k-NN engine gives scikit-learn's cosine brute-force answers, ties included."""

from __future__ import annotations

import pickle
from pathlib import Path

import numpy as np
import pytest
import torch
from sklearn.base import clone
from sklearn.metrics.pairwise import cosine_distances
from sklearn.neighbors import KNeighborsClassifier
from sklearn.preprocessing import normalize
from sklearn.utils.estimator_checks import check_estimator

from featx.errors import UsageError
from featx.probing import knn
from featx.probing.knn import CosineKNeighborsClassifier, score_grid


def sklearn_knn(X, y, k):
    return KNeighborsClassifier(n_neighbors=k, metric="cosine", algorithm="brute").fit(np.asarray(X, np.float64), y)


def assert_same_as_sklearn(X, y, Q, k, **params):
    ref, ours = sklearn_knn(X, y, k), CosineKNeighborsClassifier(n_neighbors=k, **params).fit(X, y)
    Q64 = np.asarray(Q, np.float64)
    ref_dist, ref_ind = ref.kneighbors(Q64)
    dist, ind = ours.kneighbors(Q)
    assert np.array_equal(ind, ref_ind)
    np.testing.assert_allclose(dist, ref_dist, rtol=0, atol=1e-12)
    assert np.array_equal(ours.predict(Q), ref.predict(Q64))
    assert np.array_equal(ours.predict_proba(Q), ref.predict_proba(Q64))


def random_data(seed=0, n=400, d=24, n_queries=150, n_classes=5):
    rng = np.random.default_rng(seed)
    return rng.normal(size=(n, d)), rng.integers(0, n_classes, n), rng.normal(size=(n_queries, d))


def clustered_with_duplicates(seed=0):
    """Groups of identical training rows carrying different labels, rows 1e-9 apart (one float32
    distance, distinct float64 ones), zero rows, and queries that equal training rows or sit between
    clusters: many equal and nearly equal distances."""
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(6, 12))
    base = centres[rng.integers(0, 6, 60)] + 0.2 * rng.normal(size=(60, 12))
    X = np.repeat(base, 5, axis=0)
    X += 1e-9 * rng.normal(size=X.shape) * (rng.random((len(X), 1)) < 0.4)
    X[rng.choice(len(X), 8, replace=False)] = 0.0
    order = rng.permutation(len(X))
    X, y = X[order], rng.integers(0, 3, len(X))
    Q = np.vstack([base[rng.integers(0, 60, 40)], centres + 0.3 * rng.normal(size=(6, 12)), np.zeros((2, 12)),
                   rng.normal(size=(40, 12))])
    return X, y, Q


def many_rows_with_duplicates(seed=0, n=6_005):
    """Enough training rows for the CPU selection's full groups of 16 (6,005: the last group is short), in
    tight clusters, a fifth of them repeated with other labels: equal float32 similarities inside the groups."""
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(20, 32))
    X = centres[rng.integers(0, 20, n - n // 5)] + 0.3 * rng.normal(size=(n - n // 5, 32))
    X = np.vstack([X, X[rng.integers(0, len(X), n // 5)]])[rng.permutation(n)]
    Q = np.vstack([X[rng.integers(0, n, 60)], centres[rng.integers(0, 20, 90)] + 0.3 * rng.normal(size=(90, 32))])
    return X, rng.integers(0, 4, n), Q


@pytest.mark.parametrize("k", [1, 5, 17])
def test_same_as_sklearn_on_random_float64(k):
    X, y, Q = random_data()
    assert_same_as_sklearn(X, y, Q, k)


@pytest.mark.parametrize("k", [3, 5, 8, 12])
def test_same_as_sklearn_with_duplicate_rows_and_equal_distances(k):
    X, y, Q = clustered_with_duplicates()
    # scikit-learn does not order equal distances by training row: an index-order rule would differ
    dist = cosine_distances(Q, X)
    by_index = np.lexsort((np.broadcast_to(np.arange(len(X)), dist.shape), dist), axis=1)[:, :k]
    assert not np.array_equal(by_index, sklearn_knn(X, y, k).kneighbors(Q, return_distance=False))
    assert_same_as_sklearn(X, y, Q, k, block_rows=16)


@pytest.mark.parametrize("k", [5, 20])
def test_same_as_sklearn_with_full_selection_groups(k):
    X, y, Q = many_rows_with_duplicates()
    assert_same_as_sklearn(X, y, Q, k, block_rows=64)  # blocks of 64, 64 and 22 queries


@pytest.mark.parametrize("n_fit", [6_005, 997])
def test_cpu_selection_returns_the_float32_top_m(n_fit):
    """The m largest float32 similarities of every query, equal ones included, from distinct training rows."""
    X, _, Q = many_rows_with_duplicates(n=n_fit)
    fit32, query32 = knn._float32_units(X), knn._float32_units(Q)
    m = 40
    cand, sims, _ = knn._float32_candidates(fit32, query32, m, "cpu", block_rows=64)
    full = np.vstack([query32[i : i + 64] @ fit32.T for i in range(0, len(Q), 64)])  # BLAS rounds per block shape
    assert np.array_equal(sims, -np.sort(-full, axis=1)[:, :m])
    assert np.array_equal(np.take_along_axis(full, cand, axis=1), sims)
    assert all(len(set(row)) == m for row in cand)


def test_unit_rows_are_sklearns_normalize_rounded_to_float32(monkeypatch):
    monkeypatch.setattr(knn, "_UNIT_CHUNK_BYTES", 8 * 24 * 7)  # seven rows at a time
    X, _, _ = random_data(n=50, d=24)
    X[[3, 20]] = 0.0
    for rows in (X, X.astype(np.float32)):
        expected = normalize(rows.astype(np.float64)).astype(np.float32)
        assert np.array_equal(knn._float32_units(rows), expected)


def test_queries_with_ties_are_answered_by_sklearn():
    X, y, Q = clustered_with_duplicates()
    _, deferred = knn._vote_counts(CosineKNeighborsClassifier().fit(X, y), Q, [5, 8])
    assert all(0 < n < len(Q) for n in deferred)


def test_vote_ties_go_to_the_lowest_class():
    rng = np.random.default_rng(2)
    X, Q = rng.normal(size=(300, 6)), rng.normal(size=(200, 6))
    y = np.array(["b", "a", "c"])[rng.integers(0, 3, 300)]
    for k in (2, 4, 6):
        ours = CosineKNeighborsClassifier(n_neighbors=k).fit(X, y)
        counts = ours.predict_proba(Q) * k
        assert np.any(np.sum(counts == counts.max(axis=1, keepdims=True), axis=1) > 1)  # tied votes occur
        assert np.array_equal(ours.predict(Q), sklearn_knn(X, y, k).predict(Q))
    assert ours.classes_.tolist() == ["a", "b", "c"]


def test_float32_input_is_widened_exactly():
    X, y, Q = random_data(seed=3)
    X32, Q32 = X.astype(np.float32), Q.astype(np.float32)
    assert_same_as_sklearn(X32, y, Q32, 7)
    ours = CosineKNeighborsClassifier(n_neighbors=7).fit(X32, y)
    assert ours._fit_X.dtype == np.float32
    assert np.array_equal(ours.to_sklearn().predict(Q32), ours.predict(Q32))


def test_float32_bound_alone_is_exact(monkeypatch):
    """No spare candidates: every query must be cleared by the error bound or handed to scikit-learn."""
    monkeypatch.setattr(knn, "_margin", lambda k: 0)
    X, y, Q = random_data(seed=4)
    assert_same_as_sklearn(X, y, Q, 9, block_rows=7)
    X, y, Q = clustered_with_duplicates(seed=1)
    assert_same_as_sklearn(X, y, Q, 6)


@pytest.mark.parametrize("data", [random_data, clustered_with_duplicates])
def test_score_grid_equals_sklearn_fitted_at_each_k(data):
    X, y, Q = data()
    y_val = np.random.default_rng(5).integers(0, 3, len(Q))
    ks = [1, 3, 5, 10, 50, 10_000]  # above len(X): scored at len(X), as today's knn_score_grid
    expected = [sklearn_knn(X, y, min(k, len(X))).score(Q, y_val) for k in ks]
    assert score_grid(X, y, Q, y_val, ks) == expected


def test_clone_and_pickle_round_trip():
    X, y, Q = random_data(seed=6)
    model = CosineKNeighborsClassifier(n_neighbors=4, block_rows=32).fit(X, y)
    assert clone(model).get_params() == model.get_params()
    assert not hasattr(clone(model), "classes_")
    assert not any(isinstance(v, torch.Tensor) for v in vars(model).values())
    assert "_fit_unit32" not in model.__getstate__() and hasattr(model, "_fit_unit32")  # recomputed, not stored
    again = pickle.loads(pickle.dumps(model))
    assert np.array_equal(again._fit_unit32, model._fit_unit32)
    assert np.array_equal(again.predict(Q), model.predict(Q))


def test_to_sklearn_predicts_identically():
    X, y, Q = clustered_with_duplicates(seed=2)
    model = CosineKNeighborsClassifier(n_neighbors=6).fit(X.astype(np.float32), y)
    exported = model.to_sklearn()
    assert type(exported) is KNeighborsClassifier and exported.n_neighbors == 6
    Q32 = Q.astype(np.float32)
    assert np.array_equal(exported.predict(Q32), model.predict(Q32))
    assert np.array_equal(exported.predict_proba(Q32), model.predict_proba(Q32))


def test_k_above_training_rows_is_an_error():
    X, y, Q = random_data(n=10)
    with pytest.raises(ValueError, match="n_neighbors <= n_samples_fit"):
        CosineKNeighborsClassifier(n_neighbors=11).fit(X, y).predict(Q)


@pytest.mark.parametrize("device", ["tpu", "cuda:x", 3])
def test_bad_device_names_the_valid_choices(device):
    X, y, _ = random_data(n=20)
    with pytest.raises(UsageError, match="Valid devices: cpu, cuda, cuda:N, auto"):
        CosineKNeighborsClassifier(device=device).fit(X, y)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message on a machine without CUDA")
def test_cuda_without_cuda_is_a_usage_error():
    X, y, _ = random_data(n=20)
    with pytest.raises(UsageError, match="CUDA is not available"):
        CosineKNeighborsClassifier(device="cuda").fit(X, y)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("data", [random_data, clustered_with_duplicates])
def test_same_as_sklearn_on_cuda(data):
    X, y, Q = data()
    assert_same_as_sklearn(X, y, Q, 5, device="cuda")
    assert_same_as_sklearn(X.astype(np.float32), y, Q.astype(np.float32), 8, device=torch.device("cuda"))
    assert score_grid(X, y, Q, y[: len(Q)], [1, 5, 20], device="cuda") == score_grid(X, y, Q, y[: len(Q)], [1, 5, 20])


REAL_ENTRIES = sorted((Path(__file__).resolve().parents[1] / "cache" / "bench-run").glob(
    "fashion-mnist-efficientnet_lite0-*.h5"))


@pytest.mark.slow
@pytest.mark.skipif(not REAL_ENTRIES, reason="needs the benchmark run's Fashion-MNIST entry")
@pytest.mark.parametrize("screen", [False, True])
def test_score_grid_equals_sklearn_on_real_features(screen, monkeypatch):
    """EfficientNet-Lite0 blocks.4 features (448 wide): 12,000 rows searched by 1,500 queries."""
    import h5py

    if screen:
        force_bfloat16_screen(monkeypatch)
    with h5py.File(REAL_ENTRIES[-1], "r") as f:
        X, y = f["layers"]["blocks.4"][:13_500].astype(np.float32), f["samples/label"][:13_500]
    X = (X - X[:12_000].mean(axis=0)) / (X[:12_000].std(axis=0) + 1e-6)
    ks = [1, 5, 10, 20, 50]
    predictions, deferred = knn.grid_predictions(X[:12_000], y[:12_000], X[12_000:], ks)
    for k, ours in zip(ks, predictions):
        assert np.array_equal(ours, sklearn_knn(X[:12_000], y[:12_000], k).predict(X[12_000:].astype(np.float64)))
    assert len(deferred) == len(ks)


def force_bfloat16_screen(monkeypatch):
    """The CPU's bfloat16 screen on any CPU and for any size of search (torch's bfloat16 product without
    native instructions is slow, but sums in float32 all the same); returns the screen's per-call kept masks."""
    kept = []
    screened_top = knn._screened_top

    def recorded(*args):
        out = screened_top(*args)
        kept.append(out[2].copy())
        return out

    monkeypatch.setattr(knn, "_native_bfloat16", lambda: True)
    monkeypatch.setattr(knn, "SCREEN_MIN_WORK", 0)
    monkeypatch.setattr(knn, "_screened_top", recorded)
    return kept


# tight clusters in 32 dimensions: more near-equal similarities past the top m than the bfloat16 bound can separate
@pytest.mark.parametrize("data, k, cleared", [(random_data, 5, 0.5), (many_rows_with_duplicates, 5, 0.0),
                                              (many_rows_with_duplicates, 20, 0.0)])
def test_bfloat16_screen_gives_sklearns_answers(data, k, cleared, monkeypatch):
    kept = force_bfloat16_screen(monkeypatch)
    X, y, Q = data()
    assert_same_as_sklearn(X, y, Q, k)
    assert kept and all(mask.mean() >= cleared for mask in kept)


def test_queries_the_bfloat16_screen_cannot_clear_are_searched_in_float32(monkeypatch):
    kept = force_bfloat16_screen(monkeypatch)
    monkeypatch.setattr(knn, "_screen_size", lambda m: m + 2)  # a tight screen: many queries not cleared
    X, y, Q = random_data(seed=7, n=2_000)
    assert_same_as_sklearn(X, y, Q, 10)
    assert kept and 0 < np.mean(np.concatenate(kept)) < 1


@pytest.mark.parametrize("n_features", [24, 448, 1280])
def test_bfloat16_error_bound_holds(n_features):
    """Against float64 similarities of scikit-learn's unit rows, near-duplicates (similarities near 1) included."""
    rng = np.random.default_rng(n_features)
    X, Q = rng.normal(size=(2_000, n_features)), rng.normal(size=(200, n_features))
    X[:1_000] = X[0] + 0.05 * rng.normal(size=(1_000, n_features))
    Q[:100] = X[0] + 0.05 * rng.normal(size=(100, n_features))
    fit, queries = torch.from_numpy(knn._float32_units(X)), torch.from_numpy(knn._float32_units(Q))
    fit16, queries16 = fit.bfloat16(), queries.bfloat16()
    bound = knn._bfloat16_error(knn._rounding_norms(fit, fit16).max(), knn._rounding_norms(queries, queries16),
                                n_features)
    error = np.abs((queries16 @ fit16.T).double().numpy() - normalize(Q) @ normalize(X).T).max(axis=1)
    assert np.all(error <= bound)
    assert np.all(bound < 0.02)  # and tight enough to screen: twice the top m keeps most queries


def test_bfloat16_screen_only_where_it_pays(monkeypatch):
    monkeypatch.setattr(knn, "_native_bfloat16", lambda: False)
    assert not knn._screen_pays(10_000, (60_000, 448), 70)
    monkeypatch.setattr(knn, "_native_bfloat16", lambda: True)
    assert knn._screen_pays(10_000, (60_000, 448), 70)
    assert not knn._screen_pays(10_000, (1_000, 448), 70)  # the screen would keep most rows
    assert not knn._screen_pays(10, (60_000, 448), 70)  # too little work to repay the screen's set-up


def test_passes_sklearn_estimator_checks():
    check_estimator(CosineKNeighborsClassifier())
