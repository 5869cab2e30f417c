"""Cosine k-NN on a torch device with scikit-learn's exact answers.

scikit-learn's brute-force cosine k-NN computes every query-to-training distance in float64
and partially sorts each row of that matrix (about 30 s for 10,000 queries against 60,000 rows
of 448 features on 2 cores; ``benchmarks/bench_knn.py``). Here a float32 product on the device
(CUDA, or numpy's BLAS on the CPU) finds each query's ``k + margin`` most similar training rows,
and scikit-learn's float64 distances (its own ``normalize``, the same BLAS product) decide
wherever float32 could be wrong, so neighbours and votes are scikit-learn's:

* a proven bound on the float32 error says which candidates float64 could put in another
  order; where such a group straddles a requested k-th place, its members are ranked by their
  float64 distances. The same bound shows that no training row outside the candidates can be
  as near as the k-th neighbour;
* a query the bound cannot clear, and a query whose answer depends on how scikit-learn orders
  *equal* float64 distances, gets its whole row of float64 distances and scikit-learn's own
  selection on it. scikit-learn orders equal distances with ``np.argpartition`` and then
  ``np.argsort`` of the whole distance row: not by training row, nor by any rule that a few
  candidates could reproduce;
* votes have uniform weights, and a tie between classes goes to the lowest index in
  ``classes_``, as in scikit-learn's ``predict`` (``scipy.stats.mode``) and ``predict_proba``.

What this costs beyond the float32 product is kept small: ``fit`` puts the training rows at unit
norm once (float64 ``normalize``, rounded to float32); float64 unit rows are made only for the
candidates being ranked (``normalize`` works row by row, so they are bit for bit those of the
whole set); and on the CPU the selection reads each similarity row once, for the maxima of small
groups of training rows, and then ranks only the members of the ``k + margin`` best groups.

The answers are those of scikit-learn on float64 data: float32 input is widened to float64
(exactly). scikit-learn given float32 features ranks by float32 distances and may differ on
near-ties; :meth:`CosineKNeighborsClassifier.to_sklearn` keeps the training rows in float64,
so the exported model computes in float64 whatever it is given. On data where *different*
rows tie in exact arithmetic (small integer features), scikit-learn's own answers change with
the number of queries per call and the BLAS thread count (rounding decides), and the engine's
can differ from any one call's.

torch is imported inside functions only: ``import featx.probing`` stays torch-free.
"""

from __future__ import annotations

import contextlib
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from numbers import Integral

import numpy as np
from sklearn.base import BaseEstimator, ClassifierMixin
from sklearn.neighbors import KNeighborsClassifier
from sklearn.preprocessing import normalize
from sklearn.utils.multiclass import check_classification_targets
from sklearn.utils.validation import check_array, check_is_fitted, check_X_y

from .._blas import native_bfloat16 as _native_bfloat16
from .engines import resolve_torch_device

#: float32 similarities held per block of query rows when ``block_rows`` is None: OpenBLAS reads all training
#: rows once per block, so 128 MB blocks were 5-15% faster than 64 MB ones on a 2-core AMD EPYC (256 MB: no faster)
BLOCK_BYTES = 128 * 2**20
#: training rows per group on the CPU: a similarity row is read once for its group maxima, and only the members
#: of the best groups are ranked (16 float32 similarities are one 64-byte cache line of a group's maxima)
GROUP_ROWS = 16
#: float64 rows put at unit norm at a time: mostly in cache (a float64 copy of the whole set costs page faults),
#: and few calls to ``normalize`` (its input checks cost about a millisecond a call)
_UNIT_CHUNK_BYTES = 4 * 2**20
#: float64 distances held per block of the queries that scikit-learn's own rule has to settle
_FULL_ROWS_BYTES = 64 * 2**20
#: bfloat16 similarities held per block of query rows by the CPU screen, in one reused buffer. The screen alone took
#: 19% less time with 128 MB blocks than with 64 MB ones, but whole k-NN cells on the main job's two 1,280-wide
#: layers took 16.5 s against 16.2 s, and the probe's threads, running those two cells at once, peaked 80-220 MB
#: lower (by hand, two tries: 3.32 and 3.18 GB against 3.40 GB)
SCREEN_BLOCK_BYTES = 64 * 2**20
#: multiply-adds (queries x training rows x features) from which a bfloat16 screen repays its own set-up (a bfloat16
#: copy of the training rows, their rounding errors); and from which it repays importing torch into a process
#: without it (1.5 s and about 470 MB of memory: a probe without the bfloat16 MLP, whose largest search on the main
#: job is 7.7e11, stays torch-free)
SCREEN_MIN_WORK = 1e9
SCREEN_IMPORT_WORK = 1e12
#: queries whose kept rows get their float32 similarities at a time (16 x 2m rows gathered: in cache)
_RESCORE_ROWS = 16
#: OpenBLAS's double-precision kernel takes query rows four at a time; ranking candidates in full
#: groups of four rounds every product as scikit-learn's one large product does
_GEMM_ROWS = 4


def _margin(k: int) -> int:
    """Extra candidates per query. A query goes to scikit-learn only when its k-th and last float32
    similarities are within twice the float32 error bound (1.1e-4 for 448 features)."""
    return 8 + k // 4


class CosineKNeighborsClassifier(ClassifierMixin, BaseEstimator):
    """``KNeighborsClassifier(metric="cosine", algorithm="brute")`` with the search on a torch device.

    Same neighbours, votes, probabilities and predictions as scikit-learn on float64 data,
    including its choices between equal distances (those queries get scikit-learn's selection on
    their whole row of distances) and its vote tie rule (the lowest class index wins).

    n_neighbors : neighbours that vote, with uniform weights.
    device : "cpu", "cuda", "cuda:N", "auto" or a ``torch.device``; where the float32 search runs
        (on the CPU: numpy's BLAS threads for the product, torch's current thread count for the selection).
    block_rows : query rows per similarity block; None sizes blocks to about 128 MB.

    The fitted state is numpy only (``_fit_X`` in the input's float precision and its unit rows in
    float32, no torch tensors), so the estimator clones and pickles like any other (pickles leave the
    unit rows out); the device is looked up on every call.
    """

    def __init__(self, n_neighbors=5, device="cpu", block_rows=None):
        self.n_neighbors = n_neighbors
        self.device = device
        self.block_rows = block_rows

    def fit(self, X, y):
        X, y = check_X_y(X, y, dtype=(np.float64, np.float32), order="C")
        check_classification_targets(y)
        _check_positive_int("n_neighbors", self.n_neighbors)
        if self.block_rows is not None:
            _check_positive_int("block_rows", self.block_rows)
        if not _on_cpu(self.device):
            resolve_torch_device(self.device)  # a bad device fails here, not at the first prediction
        self.classes_, self._y = np.unique(y, return_inverse=True)
        self._fit_X = X
        self._fit_unit32 = _float32_units(X)
        self.n_features_in_ = X.shape[1]
        self.n_samples_fit_ = X.shape[0]
        return self

    def __getstate__(self):
        state = dict(super().__getstate__())  # object.__getstate__ hands over the instance's own __dict__
        state.pop("_fit_unit32", None)  # derived from _fit_X: not worth a third of the pickle
        return state

    def __setstate__(self, state):
        super().__setstate__(state)
        if "_fit_X" in state:
            self._fit_unit32 = _float32_units(self._fit_X)

    def kneighbors(self, X, n_neighbors=None, return_distance=True):
        """Distances (float64, ascending) and training-row indices of each query's neighbours."""
        X = self._check_queries(X)
        k = self._check_k(self.n_neighbors if n_neighbors is None else n_neighbors)
        ranking = _rank(self._fit_X, self._fit_unit32, X, range(1, k + 1), self.device, self.block_rows)
        dist, ind = ranking.distances(k), ranking.ind[:, :k].copy()
        deferred = np.flatnonzero(ranking.undecided(k, whole_order=True))
        if len(deferred):
            (dist[deferred], ind[deferred]), = _sklearn_kneighbors(X[deferred], self._fit_X, [k])
        return (dist, ind) if return_distance else ind

    def predict_proba(self, X):
        """Neighbour counts per class divided by k; columns in ``classes_`` order."""
        X = self._check_queries(X)
        k = self._check_k(self.n_neighbors)
        (counts,), _ = _vote_counts(self, X, [k])
        return counts / k

    def predict(self, X):
        """The class with the most votes; ties go to the lowest index in ``classes_``."""
        proba = self.predict_proba(X)
        return self.classes_[np.argmax(proba, axis=1)]

    def to_sklearn(self) -> KNeighborsClassifier:
        """scikit-learn's own fitted model on the same rows (kept in float64): same predictions,
        loads without featx or torch."""
        check_is_fitted(self, "classes_")
        model = KNeighborsClassifier(n_neighbors=self.n_neighbors, metric="cosine", algorithm="brute")
        return model.fit(self._fit_X.astype(np.float64), self.classes_[self._y])

    def _check_queries(self, X) -> np.ndarray:
        check_is_fitted(self, "classes_")
        X = check_array(X, dtype=(np.float64, np.float32), order="C")
        if X.shape[1] != self.n_features_in_:
            raise ValueError(f"X has {X.shape[1]} features, but {type(self).__name__} is expecting "
                             f"{self.n_features_in_} features as input.")
        return X

    def _check_k(self, k) -> int:
        _check_positive_int("n_neighbors", k)
        if k > self.n_samples_fit_:
            raise ValueError(f"Expected n_neighbors <= n_samples_fit, but n_neighbors = {k}, "
                             f"n_samples_fit = {self.n_samples_fit_}.")
        return int(k)


def score_grid(X_fit, y_fit, X_val, y_val, ks: Sequence[int], device="cpu") -> list[float]:
    """Validation accuracy for every k in ``ks`` from one search at the largest k.

    Each score is what ``KNeighborsClassifier(n_neighbors=k, metric="cosine")`` fitted on the
    float64 rows would score; a k above ``len(X_fit)`` counts as ``len(X_fit)``.
    """
    predictions, _ = grid_predictions(X_fit, y_fit, X_val, ks, device)
    y_val = np.asarray(y_val)
    return [float(np.mean(p == y_val)) for p in predictions]


def grid_predictions(X_fit, y_fit, X_val, ks: Sequence[int], device="cpu") -> tuple[list[np.ndarray], list[int]]:
    """Predictions for every k in ``ks`` from one search at the largest k (as in :func:`score_grid`),
    and how many queries needed scikit-learn's rule on their whole distance row at each k."""
    ks = [int(k) for k in ks]
    model = CosineKNeighborsClassifier(n_neighbors=min(max(ks), len(X_fit)), device=device).fit(X_fit, y_fit)
    X_val = model._check_queries(X_val)
    counts, deferred = _vote_counts(model, X_val, [min(k, model.n_samples_fit_) for k in ks])
    return [model.classes_[c.argmax(axis=1)] for c in counts], deferred


# ---------------------------------------------------------------------- the search


@dataclass
class _Ranking:
    """Each query's candidates in scikit-learn's distance order, wherever a requested top k depends on it."""

    ind: np.ndarray  # (n, m) training rows
    run: np.ndarray  # (n, m) consecutive candidates whose float32 order may differ from the float64 one share a run
    dist: np.ndarray  # (n, m) float64 distances where a run had to be put in exact order; NaN elsewhere
    certified: np.ndarray  # (n,) no training row outside the candidates is as near as the largest k-th one
    rows: tuple  # (query rows, training rows) as given, for the distances kneighbors returns

    def undecided(self, k: int, whole_order: bool) -> np.ndarray:
        """Queries whose top k the candidates do not settle: not certified, or a choice among equal
        distances at the k-th place (``whole_order``: anywhere in the top k, which orders them)."""
        equal = (self.run[:, :-1] == self.run[:, 1:]) & (self.dist[:, :-1] == self.dist[:, 1:])
        out = ~self.certified
        if k < self.ind.shape[1]:
            out |= equal[:, k - 1]
        if whole_order and k > 1:
            out |= np.any(equal[:, : k - 1], axis=1)
        return out

    def distances(self, k: int) -> np.ndarray:
        return _distances(_exact_similarities(*self.rows, self.ind[:, :k]))


def _rank(fit_X: np.ndarray, fit_unit32: np.ndarray, X: np.ndarray, ks, device, block_rows) -> _Ranking:
    """Candidates for every query, in exact order at each of the boundaries ``ks`` (the k-th/(k+1)-th)."""
    k_max = max(ks)
    m = k_max + _margin(k_max)
    if m >= len(fit_X):
        return _rank_all(fit_X, X)
    cand, s32, slack = _float32_candidates(fit_unit32, _float32_units(X), m, device, block_rows)
    sims = s32.astype(np.float64)  # descending
    # float64 can only reorder candidates less than 2 * slack apart in float32: chains of those are runs
    run = np.zeros(cand.shape, dtype=np.int64)
    run[:, 1:] = np.cumsum(sims[:, :-1] - sims[:, 1:] > 2 * slack, axis=1)
    # the runs a requested boundary cuts through (boundary k: between the k-th and (k+1)-th candidates)
    bounds = np.array(sorted({k for k in ks if k < m}), dtype=np.int64)
    rows, which = np.nonzero(run[:, bounds - 1] == run[:, bounds])
    cut_runs = np.zeros(cand.shape, dtype=bool)  # by run id
    cut_runs[rows, run[rows, bounds[which] - 1]] = True
    settle = np.take_along_axis(cut_runs, run, axis=1)
    dist = _distances(_exact_similarities(X, fit_X, cand, settle))
    order = np.lexsort((cand, np.where(settle, dist, 0.0), run), axis=-1)  # runs stay in place
    # the exact k_max-th neighbour is at most as far as the float32-last member of its run can be, and a
    # training row outside the candidates at least as far as the last candidate can be (the slack's factor
    # of 2 also covers the rounding of these two bounds)
    last = np.sum(run <= run[:, k_max - 1, None], axis=1) - 1
    farthest_top = _distances(sims[np.arange(len(sims)), last] - slack)
    nearest_outside = _distances(sims[:, -1] + slack)
    return _Ranking(np.take_along_axis(cand, order, axis=1), run, np.take_along_axis(dist, order, axis=1),
                    farthest_top < nearest_outside, (X, fit_X))


def _rank_all(fit_X: np.ndarray, X: np.ndarray) -> _Ranking:
    """Every training row is a candidate: all distances exact, equal distances share a run."""
    cand = np.broadcast_to(np.arange(len(fit_X)), (len(X), len(fit_X)))
    dist = _distances(_exact_similarities(X, fit_X, cand))
    order = np.lexsort((cand, dist), axis=-1)
    dist = np.take_along_axis(dist, order, axis=1)
    run = np.zeros(dist.shape, dtype=np.int64)
    run[:, 1:] = np.cumsum(dist[:, 1:] != dist[:, :-1], axis=1)
    return _Ranking(np.take_along_axis(cand, order, axis=1), run, dist, np.ones(len(dist), dtype=bool),
                    (X, fit_X))


def _unit_rows(X: np.ndarray) -> np.ndarray:
    """Rows scaled to unit norm in float64 by scikit-learn's own ``normalize`` (zero rows stay zero)."""
    return normalize(X.astype(np.float64), copy=False)


def _float32_units(X: np.ndarray) -> np.ndarray:
    """:func:`_unit_rows` rounded to float32, through one small float64 buffer (no float64 copy of the whole set)."""
    out = np.empty(X.shape, dtype=np.float32)
    rows = max(1, _UNIT_CHUNK_BYTES // (8 * max(1, X.shape[1])))
    buffer = np.empty((min(rows, len(X)), X.shape[1]))
    for start in range(0, len(X), rows):
        chunk = buffer[: min(rows, len(X) - start)]
        chunk[...] = X[start : start + rows]
        out[start : start + rows] = normalize(chunk, copy=False)
    return out


def _distances(sims: np.ndarray) -> np.ndarray:
    """cosine_distances from similarities, as scikit-learn rounds them: S *= -1; S += 1; clip to [0, 2]."""
    return np.clip(-sims + 1.0, 0.0, 2.0)


def _float32_candidates(fit_unit32, query_unit32, m: int, device, block_rows) -> tuple[np.ndarray, np.ndarray, float]:
    """The m training rows of largest float32 similarity per query, those similarities (descending), and
    a bound on their error."""
    if _on_cpu(device):  # torch only for a bfloat16 screen that pays for its import (about 500 MB)
        slack = _float32_error(fit_unit32.shape[1], 0.0)
        return (*_cpu_candidates(fit_unit32, query_unit32, m, block_rows, slack), slack)
    import torch

    dev = resolve_torch_device(device)
    with torch.inference_mode(), _ieee_float32_matmul(dev):
        slack = _float32_error(fit_unit32.shape[1], _matmul_input_rounding(dev))
        if dev.type == "cpu":
            cand, sims = _cpu_candidates(fit_unit32, query_unit32, m, block_rows, slack)
        else:
            cand, sims = _top_on_device(fit_unit32, query_unit32, m, block_rows, dev)
    return cand, sims, slack


def _cpu_candidates(fit32, query32, m: int, block_rows, slack: float) -> tuple[np.ndarray, np.ndarray]:
    """The float32 top m, through a bfloat16 screen where the CPU multiplies bfloat16 natively (the
    float32 product for the queries the screen cannot clear)."""
    if not _screen_pays(len(query32), fit32.shape, m):
        return _top_on_cpu(fit32, query32, m, block_rows)
    import torch

    from .engines import torch_threads

    with torch.inference_mode(), torch_threads(None):
        cand, sims, kept = _screened_top(fit32, query32, m, slack)
    missed = np.flatnonzero(~kept)
    if len(missed):
        cand[missed], sims[missed] = _top_on_cpu(fit32, query32[missed], m, block_rows)
    return cand, sims


def _screen_pays(n_queries: int, fit_shape: tuple[int, int], m: int) -> bool:
    """Whether a bfloat16 screen is worth it: the CPU has bfloat16 dot-product instructions (AVX512-BF16
    or AMX: a bfloat16 product runs 2.5-3.5x numpy's float32 one there, and is slower than it without),
    the screen keeps few of the training rows, and the product is large enough to repay importing
    torch, unless it is loaded already (the Python API after an extraction, a user's own session)."""
    n_fit, n_features = fit_shape
    if not _native_bfloat16() or n_fit < 8 * _screen_size(m):
        return False
    work = n_queries * n_fit * n_features  # multiply-adds: 1e11 take 0.5-1 s in float32 on 2 cores
    return work >= SCREEN_MIN_WORK and ("torch" in sys.modules or work >= SCREEN_IMPORT_WORK)


def _screen_size(m: int) -> int:
    """Rows kept per query by the bfloat16 screen: with twice the float32 top m it cleared 98.1% and 99.98%
    of the queries on Fashion-MNIST features of 448 and 1,280 dimensions (1.5 m: 67% and 97%; 3 m: all,
    but slower overall)."""
    return 2 * m


def _screened_top(fit32, query32, m: int, slack: float) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The float32 top m of each query among the ``_screen_size(m)`` rows of largest bfloat16 similarity,
    and whether that is provably the float32 top m.

    Each block's similarities are a bfloat16 product (float32 sums, rounded to bfloat16); the kept rows
    get float32 similarities of their own. A row the screen dropped has a bfloat16 similarity at most the
    smallest kept one, so its exact similarity is at most that plus the screen's error bound. Where that
    is at most the m-th float32 similarity plus the float32 bound, no dropped row can change the answer
    (the search's bound on rows outside the candidates stays as it is); other queries go to the float32 search.
    """
    import torch

    n_fit, n_features = fit32.shape
    size = _screen_size(m)
    fit = torch.from_numpy(fit32)
    fit16 = fit.bfloat16()
    queries, queries16 = torch.from_numpy(query32), torch.from_numpy(query32).bfloat16()
    screen_slack = _bfloat16_error(_rounding_norms(fit, fit16).max().item(), _rounding_norms(queries, queries16),
                                   n_features)
    block = max(1, SCREEN_BLOCK_BYTES // (2 * n_fit))
    buffer = torch.empty((min(block, len(query32)), n_fit), dtype=torch.bfloat16)
    cand = np.empty((len(query32), m), dtype=np.int64)
    sims = np.empty((len(query32), m), dtype=np.float32)
    kept = np.empty(len(query32), dtype=bool)
    for start in range(0, len(query32), block):
        stop = min(start + block, len(query32))
        block_sims = buffer[: stop - start]
        torch.mm(queries16[start:stop], fit16.T, out=block_sims)
        floor, rows = torch.topk(block_sims, size, dim=1, sorted=False)
        floor = floor.amin(dim=1).double().numpy()
        for sub in range(start, stop, _RESCORE_ROWS):
            end = min(sub + _RESCORE_ROWS, stop)
            these = rows[sub - start : end - start]
            kept_rows = torch.index_select(fit, 0, these.reshape(-1)).view(end - sub, size, n_features)
            exact = (kept_rows * queries[sub:end, None, :]).sum(-1)
            values, at = torch.topk(exact, m, dim=1, sorted=True)
            cand[sub:end], sims[sub:end] = torch.gather(these, 1, at).numpy(), values.numpy()
        kept[start:stop] = floor + screen_slack[start:stop] <= sims[start:stop, -1].astype(np.float64) + slack
    return cand, sims, kept


def _rounding_norms(rows, rows16):
    """||row - bfloat16(row)|| per row, rounded up: the float32 difference is exact (the two are within a
    factor of 2), and float32 sums of squares are within 1e-3 of the true norm for any realistic width.
    A few thousand rows at a time, in cache."""
    import torch

    step = max(1, _UNIT_CHUNK_BYTES // (4 * max(1, rows.shape[1])))
    norms = torch.cat([(rows[i : i + step] - rows16[i : i + step].float()).norm(dim=1)
                       for i in range(0, len(rows), step)])
    return norms.double().numpy() * 1.001


def _bfloat16_error(fit_rounding: float, query_rounding: np.ndarray, n_features: int) -> np.ndarray:
    """Bound per query on |bfloat16 product - float64 similarity| for float32 unit rows.

    With x~ = x + dx: |x~.y~ - x.y| <= |dx| |y~| + |x| |dy|, the norms measured (``_rounding_norms``),
    unit rows within 1e-4 of norm 1; products of bfloat16 numbers are exact in float32 and their float32
    sums add at most (d + 2) * 2**-24 |x~| |y~| in any order; the result is rounded to bfloat16 (2**-9
    relative); the float32 rows' own rounding is in ``_float32_error``. Doubled for safety.
    """
    unit_norm = 1.0 + 1e-4
    fit_norm, query_norm = unit_norm + fit_rounding, unit_norm + query_rounding
    product = query_rounding * fit_norm + unit_norm * fit_rounding
    sums = (n_features + 2) * 2.0**-24 * fit_norm * query_norm
    result = 2.0**-9 * (query_norm * fit_norm + product + sums)
    return 2 * (product + sums + result) + _float32_error(n_features, 0.0)


def _on_cpu(device) -> bool:
    """Whether ``device`` names the CPU without torch's help (a string; "auto" asks torch)."""
    return isinstance(device, str) and device.strip().lower() == "cpu"


def _top_on_cpu(fit32, query32, m: int, block_rows) -> tuple[np.ndarray, np.ndarray]:
    """numpy's product into one reused buffer (OpenBLAS, held to ``threadpoolctl`` limits like the rest
    of the probe; 1.2x to 1.8x torch's MKL on a 2-core AMD EPYC, and a fresh result per block costs page faults).

    The selection reads each similarity row once: training rows fall into groups of ``GROUP_ROWS``
    (group g: rows g, g + n_groups, ...; a strided view, so the maxima are element-wise maxima of
    contiguous slices), and some m most similar rows lie among the m groups with the largest maxima:
    those m maxima are m similarities at least as large as any row outside those groups. ``argpartition``
    picks those groups, and then the m best of their m * ``GROUP_ROWS`` members, which are sorted.
    """
    n_fit, n = len(fit32), len(query32)
    size = max(1, min(GROUP_ROWS, n_fit // (4 * m)))
    n_groups = -(-n_fit // size)  # >= m
    width = n_groups * size
    block = min(n, block_rows or max(1, BLOCK_BYTES // (4 * width)))
    buffer = np.full((block, width), -np.inf, dtype=np.float32)  # columns past n_fit stay -inf: never chosen
    members = np.arange(0, width, n_groups)[:, None]
    cand = np.empty((n, m), dtype=np.int64)
    sims = np.empty((n, m), dtype=np.float32)
    for start in range(0, n, block):
        stop = min(start + block, n)
        rows = stop - start
        block_sims = buffer[:rows]
        np.matmul(query32[start:stop], fit32.T, out=block_sims[:, :n_fit])
        group_max = block_sims.reshape(rows, size, n_groups).max(axis=1)
        best = np.argpartition(group_max, n_groups - m, axis=1)[:, n_groups - m:]
        cols = (best[:, None, :] + members).reshape(rows, -1)
        values = np.take_along_axis(block_sims, cols, axis=1)
        top = np.argpartition(values, values.shape[1] - m, axis=1)[:, values.shape[1] - m:]
        top_values = np.take_along_axis(values, top, axis=1)
        order = np.argsort(-top_values, axis=1, kind="stable")  # descending
        cand[start:stop] = np.take_along_axis(np.take_along_axis(cols, top, axis=1), order, axis=1)
        sims[start:stop] = np.take_along_axis(top_values, order, axis=1)
    return cand, sims


def _top_on_device(fit32, query32, m: int, block_rows, dev) -> tuple[np.ndarray, np.ndarray]:
    """torch's product and ``topk`` on a CUDA device, in IEEE float32 (TF32 is switched off meanwhile)."""
    import torch

    n = len(query32)
    block = min(n, block_rows or max(1, BLOCK_BYTES // (4 * len(fit32))))
    train = torch.from_numpy(fit32).to(dev)
    cand = np.empty((n, m), dtype=np.int64)
    sims = np.empty((n, m), dtype=np.float32)
    for start in range(0, n, block):
        stop = min(start + block, n)
        queries = torch.from_numpy(query32[start:stop]).to(dev)
        values, rows = torch.topk(torch.mm(queries, train.T), m, dim=1, sorted=True)
        cand[start:stop] = rows.cpu().numpy()
        sims[start:stop] = values.cpu().numpy()
    return cand, sims


def _float32_error(n_features: int, input_rounding: float) -> float:
    """Bound on |float32 similarity - float64 similarity| for unit rows of ``n_features``.

    Rounding each coordinate to float32 (and then to ``input_rounding``, the unit roundoff of
    what the matmul rounds its inputs to) moves a product of unit rows by at most 2u; a float32
    dot product of d terms adds at most about d * 2**-24 in any summation order. Doubled for
    safety: a loose bound only sends a few more queries to scikit-learn.
    """
    unit = 2.0**-24
    inputs = unit + input_rounding
    return 2 * (2.01 * inputs + 1.01 * (n_features + 2) * unit) + 1e-12


@contextlib.contextmanager
def _ieee_float32_matmul(device):
    """torch's CUDA float32 matmuls in full float32 meanwhile (TF32 would need a 40x looser bound)."""
    import torch

    if device.type != "cuda":
        yield
        return
    before = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision("highest")
    try:
        yield
    finally:
        torch.set_float32_matmul_precision(before)


def _matmul_input_rounding(device) -> float:
    """Unit roundoff of the format a float32 matmul on ``device`` rounds its inputs to (0: none).
    The CPU product is numpy's, always float32."""
    import torch

    if device.type != "cuda":
        return 0.0
    names = {torch.get_float32_matmul_precision(), str(getattr(torch.backends.cuda.matmul, "fp32_precision", "")),
             "tf32" if torch.backends.cuda.matmul.allow_tf32 else ""}
    if names & {"medium", "bf16"}:
        return 2.0**-8
    if names & {"high", "tf32"}:
        return 2.0**-11
    return 0.0


def _exact_similarities(X: np.ndarray, fit_X: np.ndarray, cand: np.ndarray,
                        wanted: np.ndarray | None = None) -> np.ndarray:
    """Float64 similarity of each query to its candidates (where ``wanted``; NaN elsewhere), rounded
    as in scikit-learn's one large BLAS product: queries go through it in full groups of four.
    Only the rows involved are put at unit norm (scikit-learn's ``normalize`` works row by row:
    the same bits as normalising the whole set)."""
    from threadpoolctl import threadpool_limits

    wanted = np.ones(cand.shape, dtype=bool) if wanted is None else wanted
    out = np.full(cand.shape, np.nan)
    active = np.flatnonzero(wanted.any(axis=1))
    if not len(active):
        return out
    needed = np.unique(cand[active][wanted[active]])
    if len(needed) == 1:  # a one-column product needs a second column (below)
        needed = np.unique(np.append(needed, (needed[0] + 1) % len(fit_X)))
    fit_unit, query_unit = _unit_rows(fit_X[needed]), _unit_rows(X[active])
    with threadpool_limits(limits=1, user_api="blas"):  # products this small only lose time to a second thread
        for start in range(0, len(active), _GEMM_ROWS):
            group = np.minimum(np.arange(start, start + _GEMM_ROWS), len(active) - 1)  # short group: repeat
            rows = active[group]
            r, c = np.nonzero(wanted[rows])
            cols, where = np.unique(np.searchsorted(needed, cand[rows[r], c]), return_inverse=True)
            if len(cols) == 1:  # OpenBLAS hands a one-column product to gemv, which rounds differently
                cols = np.append(cols, (cols[0] + 1) % len(needed))
            out[rows[r], c] = (query_unit[group] @ fit_unit[cols].T)[r, where]
    return out


def _sklearn_kneighbors(X: np.ndarray, fit_X: np.ndarray, ks: Sequence[int]) -> list[tuple[np.ndarray, np.ndarray]]:
    """scikit-learn's float64 answer (distances, indices) at every k in ``ks``, for the queries the
    candidates cannot settle.

    What ``NearestNeighbors(metric="cosine", algorithm="brute").kneighbors`` computes, with the training
    rows put at unit norm once per block of queries rather than once per call and per k (5 s of a 13 s
    search for a single such query among 60,000 x 1,280 rows): each query's whole row of float64
    distances, rounded as in :func:`_exact_similarities`, then scikit-learn's selection, which
    decides between equal distances (``argpartition`` at the k-th place, then ``argsort`` of those k).
    """
    out = [(np.empty((len(X), k)), np.empty((len(X), k), dtype=np.int64)) for k in ks]
    block = max(_GEMM_ROWS, _FULL_ROWS_BYTES // (8 * len(fit_X)) // _GEMM_ROWS * _GEMM_ROWS)
    for start in range(0, len(X), block):
        stop = min(start + block, len(X))
        dist = _distances(_all_similarities(X[start:stop], fit_X))
        for (dist_k, ind_k), k in zip(out, ks):
            part = np.argpartition(dist, k - 1, axis=1)[:, :k]
            ind_k[start:stop] = np.take_along_axis(part, np.argsort(np.take_along_axis(dist, part, axis=1)), axis=1)
            dist_k[start:stop] = np.take_along_axis(dist, ind_k[start:stop], axis=1)
    return out


def _all_similarities(X: np.ndarray, fit_X: np.ndarray) -> np.ndarray:
    """Float64 similarity of every query to every training row, bit for bit :func:`_exact_similarities`:
    queries in full groups of four (the last group padded), training rows a few thousand at a time."""
    from threadpoolctl import threadpool_limits

    n_groups = -(-len(X) // _GEMM_ROWS)
    group = np.minimum(np.arange(n_groups * _GEMM_ROWS), len(X) - 1)  # short group: repeat the last query
    query_unit = _unit_rows(X[group]).reshape(n_groups, _GEMM_ROWS, -1)
    out = np.empty((n_groups, _GEMM_ROWS, len(fit_X)))
    rows = max(2, _UNIT_CHUNK_BYTES // (8 * max(1, fit_X.shape[1])))
    with threadpool_limits(limits=1, user_api="blas"):
        for start in range(0, len(fit_X), rows):
            stop = min(start + rows, len(fit_X))
            start = min(start, stop - 2) if len(fit_X) > 1 else start  # never one column: gemv rounds differently
            out[:, :, start:stop] = np.matmul(query_unit, _unit_rows(fit_X[start:stop]).T)  # a BLAS call per group
    return out.reshape(-1, len(fit_X))[: len(X)]


def _vote_counts(model: CosineKNeighborsClassifier, X: np.ndarray, ks: Sequence[int]):
    """Neighbour counts per class, (n, n_classes) for every k, from one ranking at the largest k;
    and how many queries needed scikit-learn's rule on their whole distance row at each k."""
    ranking = _rank(model._fit_X, model._fit_unit32, X, ks, model.device, model.block_rows)
    labels = model._y[ranking.ind[:, : max(ks)]]
    undecided = [np.flatnonzero(ranking.undecided(k, whole_order=False)) for k in ks]
    rows = np.unique(np.concatenate(undecided))
    answers = _sklearn_kneighbors(X[rows], model._fit_X, ks) if len(rows) else None
    counts = []
    for (_, ind), k, these in zip(answers or [(None, None)] * len(ks), ks, undecided):
        chosen = labels[:, :k].copy()
        if len(these):
            chosen[these] = model._y[ind[np.searchsorted(rows, these)]]
        counts.append(_count(chosen, len(model.classes_)))
    return counts, [len(these) for these in undecided]


def _count(labels: np.ndarray, n_classes: int) -> np.ndarray:
    n = len(labels)
    flat = (np.arange(n)[:, None] * n_classes + labels).ravel()
    return np.bincount(flat, minlength=n * n_classes).reshape(n, n_classes)


# ---------------------------------------------------------------------- devices


def _check_positive_int(name: str, value) -> None:
    if isinstance(value, bool) or not isinstance(value, Integral) or value < 1:
        raise ValueError(f"{name} must be a positive integer, got {value!r}.")
