"""Probe heads: plain scikit-learn estimators, each with its hyper-parameter grid.

Every head is used as ``Pipeline([("scaler", StandardScaler()), ("clf", estimator)])`` with
the scaler fitted on training rows only. A grid is an ordered list of parameter settings:
heads that support warm starts (logistic regression along increasing C) walk it in order,
reusing the previous solution; k-NN scores every k from one neighbour search.

A head may have several engines (``featx.probing.engines``): on a GPU, logistic regression is
scikit-learn's own on torch tensors (array API) and the MLP trains in torch; on the CPU numpy
is as fast for those in float32, so scikit-learn's are kept, except that under head precision
``auto`` the MLP trains with torch's bfloat16 products on CPUs that multiply bfloat16 natively.
k-NN searches with its own engine everywhere
(``featx.probing.knn``): a blocked float32 product with top-k (after a bfloat16 screen on CPUs
with bfloat16 dot products), 2.4-7x faster than scikit-learn's on a CPU, with its exact answers.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import numpy as np
from sklearn.base import BaseEstimator, clone
from sklearn.kernel_approximation import Nystroem
from sklearn.linear_model import LogisticRegression
from sklearn.neighbors import KNeighborsClassifier
from sklearn.neural_network import MLPClassifier
from sklearn.pipeline import Pipeline
from sklearn.preprocessing import StandardScaler
from sklearn.svm import SVC, LinearSVC

from ..errors import UsageError, did_you_mean
from .engines import array_api_ready, device_type

#: libsvm's exact RBF SVM costs about rows^2 x width. On one core of this project's CPU, 9,600
#: Fashion-MNIST rows took 2-4 s per fit at 16-112 features and 50 s at 1,280, less than the
#: Nystroem approximation below (whose LinearSVC at C = 10 took 36-178 s); at 48,000 rows it takes
#: hours. So the exact SVM (the better model) is used up to this many rows and this work.
SVM_EXACT_MAX_ROWS = 20_000
SVM_EXACT_MAX_WORK = 20_000**2 * 1_280
SVM_NARROW = 128  # below this width libsvm's own work per row, not the kernel's, sets the cost
SVM_UNKNOWN_WIDTH = 5_120  # width assumed when it is not known (the exact SVM up to 10,000 rows)
NYSTROEM_COMPONENTS = 2_000
MLP_LARGE_BATCH = 400  # the MLP's rows per Adam step from MLP_LARGE_BATCH_ROWS refit rows on (200 below)
MLP_LARGE_BATCH_ROWS = 20_000


@dataclass(frozen=True)
class Engine:
    """One way to fit a head: an estimator builder and the devices it serves.

    ``arrays="torch"``: scikit-learn's own estimator, fitted on torch tensors on the device
    through its array API. ``predict_grid``: a fast path that predicts for the whole grid at once.
    """

    name: str
    build: Callable[..., BaseEstimator]  # (n_train, seed, device, n_features) -> unfitted estimator
    devices: tuple[str, ...] = ("cpu", "cuda")
    arrays: str = "numpy"
    predict_grid: Callable | None = field(default=None, compare=False)
    torch_on: tuple[str, ...] = ()  # device types where it computes with torch (whose threads then need a budget)
    reduced_precision: bool = False  # computes in bfloat16 in part: only under precision "auto"
    available: Callable[[], bool] | None = field(default=None, compare=False)  # e.g. the CPU's bfloat16 support


def _sklearn_engine(build: Callable[..., BaseEstimator], predict_grid: Callable | None = None) -> Engine:
    """scikit-learn's estimator from ``build(n_train, seed, n_features)``, on any device's numpy copy."""
    return Engine("scikit-learn", lambda n, seed, device, n_features=None: build(n, seed, n_features),
                  predict_grid=predict_grid)


@dataclass(frozen=True)
class Head:
    """A named probe head: its engines (the first that serves the device fits) and what to tune."""

    name: str
    engines: tuple[Engine, ...]
    grid: Sequence[dict]
    warm_start: bool = False
    description: str = ""

    def engine(self, device: str = "cpu", precision: str = "float32") -> Engine:
        kind = device_type(device)
        usable = [e for e in self.engines if kind in e.devices and (e.arrays != "torch" or array_api_ready())
                  and (precision == "auto" or not e.reduced_precision) and (e.available is None or e.available())]
        return usable[0] if usable else self.engines[-1]

    def pipeline(self, n_train: int, seed: int, params: dict | None = None, device: str = "cpu",
                 n_features: int | None = None, precision: str = "float32") -> Pipeline:
        clf = self.engine(device, precision).build(n_train, seed, device, n_features)
        if params:
            clf.set_params(**params)
        return Pipeline([("scaler", StandardScaler()), ("clf", clf)])


def _logreg(n, seed, n_features=None):
    return LogisticRegression(max_iter=1000, tol=1e-4)


#: passes of liblinear's dual coordinate descent per LinearSVC fit. Each pass costs a sweep over
#: the data (3 s on 48,000 x 5,120 features, one core). Measured on Fashion-MNIST's widest layer:
#: 200 passes chose the same C with the same test accuracy as 1,000 and cut that cell from 43
#: to 26 minutes. Fits that stop at the cap are noted in the results.
LINSVM_MAX_ITER = 200


def _linsvm(n, seed, n_features=None):
    # the dual solver: the primal one (what dual="auto" picks when n > d) took over 18 minutes
    # for a single fit at C = 1e-4 on that layer
    return LinearSVC(dual=True, max_iter=LINSVM_MAX_ITER, random_state=seed)


def svm_is_exact(n_rows: int, n_features: int | None = None) -> bool:
    """Whether the RBF SVM head fitted on ``n_rows`` rows of ``n_features`` is libsvm's exact one."""
    width = SVM_UNKNOWN_WIDTH if n_features is None else max(int(n_features), SVM_NARROW)
    return n_rows <= SVM_EXACT_MAX_ROWS and n_rows * n_rows * width <= SVM_EXACT_MAX_WORK


def _svm(n, seed, n_features=None):
    if svm_is_exact(n, n_features):
        return SVC(kernel="rbf", gamma="scale", random_state=seed)
    # large N: the RBF kernel through a Nystroem feature map and a linear SVM
    return Pipeline([("rbf", Nystroem(kernel="rbf", n_components=NYSTROEM_COMPONENTS, random_state=seed)),
                     ("svm", LinearSVC(dual=True, max_iter=1000, random_state=seed))])


def _svm_grid(n: int, n_features: int | None = None) -> list[dict]:
    # the same C for both variants: LinearSVC's C weighs the summed loss as SVC's does (on
    # Fashion-MNIST features, C = 0.01 and 0.1 lost 2-5 points of test accuracy to C = 10)
    key = "C" if svm_is_exact(n, n_features) else "svm__C"
    return [{key: c} for c in (1.0, 10.0)]


def mlp_batch_size(n: int) -> int:
    """Rows per Adam step for a head refit on ``n`` rows. On large sets scikit-learn's 200 spends most of
    an epoch in Adam's per-step updates of the 512-unit layer: at 60,000 rows, steps of 400 trained in
    56-71% of the time, to the same or better test accuracy (Fashion-MNIST, ``BENCHMARKS.md``)."""
    return MLP_LARGE_BATCH if n >= MLP_LARGE_BATCH_ROWS else 200


def _mlp(n, seed, n_features=None):
    return MLPClassifier(hidden_layer_sizes=(512,), early_stopping=True, n_iter_no_change=5, max_iter=200,
                         batch_size=mlp_batch_size(n), random_state=seed)


def _knn(n, seed, n_features=None):
    return KNeighborsClassifier(metric="cosine", algorithm="brute")


def knn_score_grid(X_fit, y_fit, X_val, y_val, grid: Sequence[dict]) -> list[float]:
    """Accuracy for every k from a single neighbour search at the largest k (scikit-learn)."""
    ks = [p["n_neighbors"] for p in grid]
    k_max = min(max(ks), len(X_fit))
    model = KNeighborsClassifier(n_neighbors=k_max, metric="cosine", algorithm="brute").fit(X_fit, y_fit)
    neighbours = model.kneighbors(X_val, return_distance=False)
    labels = np.searchsorted(model.classes_, y_fit)[neighbours]  # (n_val, k_max) class indices
    truth = np.searchsorted(model.classes_, y_val)
    scores = []
    for k in ks:
        votes = np.zeros((len(X_val), len(model.classes_)), dtype=np.int32)
        rows = np.repeat(np.arange(len(X_val)), min(k, k_max))
        np.add.at(votes, (rows, labels[:, : min(k, k_max)].ravel()), 1)
        scores.append(float(np.mean(votes.argmax(axis=1) == truth)))  # ties: lowest class, as sklearn
    return scores


def _exact_knn(n, seed, device, n_features=None):
    from .knn import CosineKNeighborsClassifier

    return CosineKNeighborsClassifier(device=device)


def _exact_knn_predict_grid(X_fit, y_fit, X_val, grid: Sequence[dict], device: str = "cpu") -> list:
    from .knn import grid_predictions

    return grid_predictions(X_fit, y_fit, X_val, [p["n_neighbors"] for p in grid], device=device)[0]


def _exact_svm_predict_grid(X_fit, y_fit, X_val, grid: Sequence[dict], device: str = "cpu") -> list | None:
    from .kernel_svm import precomputed_grid_predictions

    return precomputed_grid_predictions(X_fit, y_fit, X_val, grid)


def _array_api_logreg(n, seed, device, n_features=None):
    return LogisticRegression(max_iter=1000, tol=1e-4)


def _torch_mlp(n, seed, device, n_features=None, precision="float32"):
    from .mlp import TorchMLPClassifier

    return TorchMLPClassifier(hidden_layer_sizes=(512,), early_stopping=True, n_iter_no_change=5, max_iter=200,
                              batch_size=mlp_batch_size(n), random_state=seed, device=device, precision=precision)


def _bfloat16_mlp(n, seed, device, n_features=None):
    return _torch_mlp(n, seed, device, n_features, precision="bfloat16")


def _bfloat16_mlp_pays() -> bool:
    """The CPU multiplies bfloat16 natively (elsewhere bfloat16 products are emulated, slower than
    float32) and torch is installed."""
    import importlib.util

    from .._blas import native_bfloat16

    return native_bfloat16() and importlib.util.find_spec("torch") is not None


HEADS: dict[str, Head] = {
    "logreg": Head("logreg", (Engine("array-api", _array_api_logreg, ("cuda",), arrays="torch", torch_on=("cuda",)),
                              _sklearn_engine(_logreg)),
                   [{"C": c} for c in (1e-4, 1e-3, 1e-2, 1e-1, 1.0, 10.0)], warm_start=True,
                   description="multinomial logistic regression (L-BFGS), C on a log grid"),
    "linsvm": Head("linsvm", (_sklearn_engine(_linsvm),), [{"C": c} for c in (1e-4, 1e-3, 1e-2)],
                   description="linear SVM (LinearSVC), C on a log grid"),
    "svm": Head("svm", (_sklearn_engine(_svm, predict_grid=_exact_svm_predict_grid),), [],
                description=f"RBF SVM (libsvm); above {SVM_EXACT_MAX_ROWS} training rows, or fewer but wide, an "
                f"RBF Nystroem map ({NYSTROEM_COMPONENTS} components) + linear SVM"),
    "mlp": Head("mlp", (Engine("torch", _torch_mlp, ("cuda",), torch_on=("cuda",)),
                        Engine("torch-bfloat16", _bfloat16_mlp, ("cpu",), torch_on=("cpu",), reduced_precision=True,
                               available=_bfloat16_mlp_pays),
                        _sklearn_engine(_mlp)),
                [{"alpha": a} for a in (1e-4, 1e-2)],
                description="one hidden layer of 512, early stopping, L2 alpha on a grid"),
    "knn": Head("knn", (Engine("featx", _exact_knn, predict_grid=_exact_knn_predict_grid, torch_on=("cuda",)),),
                [{"n_neighbors": k} for k in (1, 5, 10, 20, 50)],
                description="k nearest neighbours, cosine distance (exact; float32, bfloat16-screened where it pays, "
                "or on a GPU)"),
}
DEFAULT_HEADS = ("logreg", "linsvm", "knn", "mlp", "svm")


def grid_for(head: Head, n_train: int, n_features: int | None = None) -> list[dict]:
    return _svm_grid(n_train, n_features) if head.name == "svm" and not head.grid else list(head.grid)


def custom_head(name: str, estimator: BaseEstimator, grid: Sequence[dict] | None = None) -> Head:
    """Any scikit-learn classifier as a probe head (Python API)."""
    if not hasattr(estimator, "fit") or not hasattr(estimator, "predict"):
        raise UsageError(
            f"Head {name!r} must be a scikit-learn classifier (fit/predict), got {type(estimator).__name__}."
        )
    return Head(name, (_sklearn_engine(lambda n, seed, n_features, _e=estimator: clone(_e)),), list(grid or [{}]),
                description=f"custom {type(estimator).__name__}")


def resolve_heads(heads) -> list[Head]:
    """Names (``"logreg,knn"``), Head objects, or {name: estimator | (estimator, grid)}."""
    if heads is None:
        heads = DEFAULT_HEADS
    if isinstance(heads, str):
        heads = [h.strip() for h in heads.split(",") if h.strip()]
    if isinstance(heads, dict):
        out = []
        for name, value in heads.items():
            est, grid = value if isinstance(value, tuple) else (value, None)
            out.append(custom_head(name, est, grid))
        return out
    out = []
    for h in heads:
        if isinstance(h, Head):
            out.append(h)
        elif h in HEADS:
            out.append(HEADS[h])
        else:
            raise UsageError(f"Unknown head {h!r}.{did_you_mean(str(h), HEADS)} Valid heads: {', '.join(HEADS)}.")
    if not out:
        raise UsageError(f"No heads given. Valid heads: {', '.join(HEADS)}.")
    names = [h.name for h in out]
    if len(set(names)) != len(names):
        raise UsageError(f"Heads listed twice: {names}.")
    return out
