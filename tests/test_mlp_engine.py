"""The torch-trained MLP head: a scikit-learn estimator with MLPClassifier's semantics."""

from __future__ import annotations

import pickle
import subprocess
import sys
import warnings

import numpy as np
import pytest
from sklearn.base import clone
from sklearn.datasets import load_digits, make_blobs
from sklearn.exceptions import ConvergenceWarning, NotFittedError
from sklearn.model_selection import train_test_split
from sklearn.neural_network import MLPClassifier
from sklearn.pipeline import Pipeline
from sklearn.preprocessing import StandardScaler
from threadpoolctl import threadpool_limits

from featx.errors import UsageError
from featx.probing.engines import torch_threads
from featx.probing.mlp import TorchMLPClassifier

from .conftest import REPO

torch = pytest.importorskip("torch")

#: the probe's MLP head, small enough for tests
HEAD = {"hidden_layer_sizes": (64,), "n_iter_no_change": 5, "early_stopping": True, "max_iter": 200}


@pytest.fixture(scope="module", autouse=True)
def _one_blas_thread():
    """As in a probe worker (and before the module's fitted fixtures): two OpenMP threads on tiny
    matrices crawl when the cores are busy."""
    with threadpool_limits(limits=1):
        yield


@pytest.fixture(scope="module")
def digits():
    """Standardised digits, a quarter held out."""
    X, y = load_digits(return_X_y=True)
    X_train, X_test, y_train, y_test = train_test_split(X, y, test_size=0.25, stratify=y, random_state=0)
    scaler = StandardScaler().fit(X_train)
    return scaler.transform(X_train), scaler.transform(X_test), y_train, y_test


@pytest.fixture(scope="module")
def blobs():
    """Three standardised, well separated clusters with string labels."""
    X, y = make_blobs(n_samples=600, centers=3, n_features=8, cluster_std=1.0, random_state=0)
    return StandardScaler().fit_transform(X).astype(np.float32), np.array(["cat", "dog", "eel"])[y]


@pytest.fixture(scope="module")
def fitted(blobs):
    X, y = blobs
    return TorchMLPClassifier(hidden_layer_sizes=(16,), random_state=0).fit(X, y)


def _weights(model):
    return model.coefs_ + model.intercepts_


# ------------------------------------------------------------------ the scikit-learn estimator interface


def test_params_clone_and_set_params():
    model = TorchMLPClassifier(hidden_layer_sizes=(32, 16), alpha=1e-2, device="cpu", random_state=3)
    params = model.get_params()
    assert params["hidden_layer_sizes"] == (32, 16) and params["alpha"] == 1e-2 and params["device"] == "cpu"
    twin = clone(model)
    assert twin is not model and twin.get_params() == params
    assert twin.set_params(alpha=0.5) is twin and twin.alpha == 0.5 and model.alpha == 1e-2
    pipe = Pipeline([("scaler", StandardScaler()), ("clf", model)])
    pipe.set_params(clf__alpha=1e-4)
    assert model.alpha == 1e-4


def test_clone_of_a_fitted_head_starts_afresh(blobs, fitted):
    """Grid selection clones one head per setting: no fitted state may leak into the clone."""
    X, y = blobs
    twin = clone(fitted)
    assert not hasattr(twin, "coefs_")
    twin.fit(X, y)
    for a, b in zip(_weights(twin), _weights(fitted)):
        np.testing.assert_array_equal(a, b)


def test_fit_predict_shapes_and_string_labels(blobs, fitted):
    X, y = blobs
    assert list(fitted.classes_) == ["cat", "dog", "eel"]
    assert fitted.n_features_in_ == 8 and fitted.n_outputs_ == 3 and fitted.out_activation_ == "softmax"
    pred = fitted.predict(X)
    assert pred.shape == (len(X),) and set(pred) <= set(fitted.classes_)
    proba = fitted.predict_proba(X)
    assert proba.shape == (len(X), 3)
    np.testing.assert_allclose(proba.sum(axis=1), 1.0, rtol=1e-5)
    assert np.array_equal(fitted.classes_[proba.argmax(axis=1)], pred)  # columns in classes_ order
    assert fitted.score(X, y) > 0.95
    assert all(isinstance(a, np.ndarray) for a in _weights(fitted))
    assert fitted.coefs_[0].dtype == np.float32  # X's precision, as sklearn keeps it


def test_binary_labels_one_logit(blobs):
    X, y = blobs
    keep = y != "eel"
    model = TorchMLPClassifier(hidden_layer_sizes=(8,), random_state=0).fit(X[keep], y[keep])
    assert model.n_outputs_ == 1 and model.out_activation_ == "logistic"
    proba = model.predict_proba(X[keep])
    assert proba.shape == (keep.sum(), 2)
    assert np.array_equal(model.classes_[proba.argmax(axis=1)], model.predict(X[keep]))


def test_pickle_round_trip_holds_no_torch_objects(blobs, fitted):
    X, _ = blobs
    blob = pickle.dumps(fitted)
    assert b"torch" not in blob  # a head fitted on a GPU unpickles on a machine without one
    again = pickle.loads(blob)
    np.testing.assert_array_equal(again.predict_proba(X), fitted.predict_proba(X))


def test_wrong_input_is_refused(blobs, fitted):
    X, y = blobs
    with pytest.raises(NotFittedError):
        TorchMLPClassifier().predict(X)
    with pytest.raises(ValueError, match="features"):
        fitted.predict(X[:, :5])
    with pytest.raises(ValueError, match="two classes"):
        TorchMLPClassifier().fit(X, np.zeros(len(X)))
    with pytest.raises(ValueError, match="hidden_layer_sizes"):
        TorchMLPClassifier(hidden_layer_sizes=(0,)).fit(X, y)


# ------------------------------------------------------------------ training: sklearn's semantics


def test_same_trajectory_as_sklearn_binary_early_stopping(digits):
    """Same draws in the same order (weights, stratified split, shuffles), same Adam and L2 term: in
    float64 the weights, validation scores and stopping epoch are scikit-learn's own."""
    X, _, y, _ = digits
    labels = np.where(y < 5, "low", "high")
    params = {**HEAD, "hidden_layer_sizes": (32,), "n_iter_no_change": 3, "random_state": 0}
    ours = TorchMLPClassifier(**params).fit(X, labels)
    theirs = MLPClassifier(**params).fit(X, labels)
    assert ours.n_iter_ == theirs.n_iter_ < params["max_iter"]
    assert ours.validation_scores_ == theirs.validation_scores_
    assert ours.best_validation_score_ == theirs.best_validation_score_ == max(ours.validation_scores_)
    np.testing.assert_allclose(ours.loss_curve_, theirs.loss_curve_, rtol=1e-6)
    for a, b in zip(_weights(ours), _weights(theirs)):  # the best epoch's weights, restored
        np.testing.assert_allclose(a, b, atol=1e-10)


def test_same_trajectory_as_sklearn_multiclass_without_early_stopping(digits):
    X, _, y, _ = digits
    params = {"hidden_layer_sizes": (32,), "early_stopping": False, "max_iter": 6, "alpha": 1e-2,
              "random_state": 1}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        ours = TorchMLPClassifier(**params).fit(X, y)
        theirs = MLPClassifier(**params).fit(X, y)
    for a, b in zip(_weights(ours), _weights(theirs)):
        np.testing.assert_allclose(a, b, atol=1e-10)


def test_accuracy_matches_sklearn_on_digits(digits):
    """The probe's head as featx configures it. sklearn does not stratify its multiclass validation
    split and this head does, so the runs differ; over three seeds they agree within a point."""
    X_train, X_test, y_train, y_test = digits
    params = {**HEAD, "hidden_layer_sizes": (128,)}
    ours = [TorchMLPClassifier(**params, random_state=s).fit(X_train, y_train).score(X_test, y_test)
            for s in range(3)]
    theirs = [MLPClassifier(**params, random_state=s).fit(X_train, y_train).score(X_test, y_test) for s in range(3)]
    assert np.mean(ours) > 0.93
    assert abs(np.mean(ours) - np.mean(theirs)) <= 0.01


def test_early_stopping_stops_on_an_easy_problem(blobs):
    X, y = blobs
    with warnings.catch_warnings():
        warnings.simplefilter("error", ConvergenceWarning)
        model = TorchMLPClassifier(hidden_layer_sizes=(16,), max_iter=500, random_state=0).fit(X, y)
    assert model.n_iter_ < 500
    assert len(model.validation_scores_) == model.n_iter_ == len(model.loss_curve_)
    assert model.best_validation_score_ == max(model.validation_scores_) == 1.0
    assert model.n_iter_ >= model.n_iter_no_change + 1  # a patience of 5 epochs was waited out


def test_max_iter_reached_warns(blobs):
    X, y = blobs
    with pytest.warns(ConvergenceWarning, match="Maximum iterations"):
        model = TorchMLPClassifier(hidden_layer_sizes=(8,), max_iter=2, random_state=0).fit(X, y)
    assert model.n_iter_ == 2


def test_deterministic_for_a_fixed_seed(digits):
    """A few epochs draw everything a long run draws (weights, validation split, shuffles, early-stopping
    bookkeeping): whether two runs agree shows after a handful as well as after a hundred."""
    X_train, X_test, y_train, _ = digits
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        a, b, c = (TorchMLPClassifier(**{**HEAD, "max_iter": 8}, random_state=s).fit(X_train, y_train)
                   for s in (7, 7, 8))
    assert np.array_equal(a.predict(X_test), b.predict(X_test))
    for wa, wb in zip(_weights(a), _weights(b)):
        np.testing.assert_array_equal(wa, wb)
    assert not np.array_equal(a.coefs_[0], c.coefs_[0])


# ------------------------------------------------------------------ portability


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("binary", [False, True], ids=["multiclass", "binary"])
def test_to_sklearn_predicts_identically(digits, dtype, binary):
    X_train, X_test, y_train, y_test = digits
    if binary:
        y_train, y_test = y_train % 2, y_test % 2
    X_train, X_test = X_train.astype(dtype), X_test.astype(dtype)
    ours = TorchMLPClassifier(**HEAD, random_state=0).fit(X_train, y_train)
    theirs = ours.to_sklearn()
    assert type(theirs) is MLPClassifier and b"featx" not in pickle.dumps(theirs)
    assert theirs.get_params()["alpha"] == ours.alpha and theirs.n_iter_ == ours.n_iter_
    np.testing.assert_array_equal(theirs.predict(X_test), ours.predict(X_test))
    np.testing.assert_array_equal(theirs.predict_proba(X_test), ours.predict_proba(X_test))
    assert theirs.score(X_test, y_test) == ours.score(X_test, y_test)


def test_to_sklearn_needs_a_fitted_head():
    with pytest.raises(NotFittedError):
        TorchMLPClassifier().to_sklearn()


@pytest.mark.slow
@pytest.mark.subprocess
def test_pickled_head_predicts_without_torch(tmp_path, fitted, blobs):
    X, _ = blobs
    (tmp_path / "head.pkl").write_bytes(pickle.dumps(fitted))
    np.save(tmp_path / "X.npy", X)
    code = (
        "import pickle, sys, numpy as np\n"
        f"model = pickle.loads(open({str(tmp_path / 'head.pkl')!r}, 'rb').read())\n"
        f"print(*model.predict(np.load({str(tmp_path / 'X.npy')!r}))[:3], 'torch' in sys.modules)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, cwd=REPO,
                         env={"PYTHONPATH": str(REPO), "PATH": ""}, check=True).stdout.split()
    assert out[-1] == "False"
    assert out[:-1] == [str(v) for v in fitted.predict(X)[:3]]


# ------------------------------------------------------------------ devices and threads


def test_bad_device_is_a_usage_error_naming_the_choices(blobs):
    X, y = blobs
    for device in ("tpu", "cuda:x", 3):
        with pytest.raises(UsageError, match="cpu, cuda, cuda:N"):
            TorchMLPClassifier(device=device).fit(X, y)
    if not torch.cuda.is_available():
        with pytest.raises(UsageError, match="CUDA is not available"):
            TorchMLPClassifier(device="cuda").fit(X, y)


def test_torch_device_objects_are_accepted(blobs):
    X, y = blobs
    model = TorchMLPClassifier(hidden_layer_sizes=(8,), max_iter=3, early_stopping=False, random_state=0,
                               device=torch.device("cpu"))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        assert model.fit(X, y).n_iter_ == 3


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_cuda_fit_matches_cpu_and_leaves_numpy_weights(digits):
    X_train, X_test, y_train, _ = digits
    X_train, X_test = X_train.astype(np.float32), X_test.astype(np.float32)
    gpu = TorchMLPClassifier(**HEAD, random_state=0, device="cuda").fit(X_train, y_train)
    cpu = TorchMLPClassifier(**HEAD, random_state=0, device="cpu").fit(X_train, y_train)
    assert all(isinstance(a, np.ndarray) for a in _weights(gpu)) and b"torch" not in pickle.dumps(gpu)
    assert np.mean(gpu.predict(X_test) == cpu.predict(X_test)) > 0.95


def test_threads_follow_the_callers_budget_and_are_restored(blobs):
    X, y = blobs
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(2)
        with torch_threads(1) as n:
            assert n == 1 and torch.get_num_threads() == 1
        assert torch.get_num_threads() == 2
        # a probe worker: BLAS limited to 1 thread, torch loaded after the limit was set (so not limited by it)
        with threadpool_limits(limits=1, user_api="blas"), torch_threads(None) as n:
            assert n == 1 and torch.get_num_threads() == 1
        TorchMLPClassifier(hidden_layer_sizes=(8,), random_state=0, n_threads=1).fit(X, y)
        assert torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(before)


# ------------------------------------------------------------------ mixed precision


def test_bfloat16_training_reaches_float32_accuracy(digits):
    """bfloat16 products, float32 weights and sums: over three seeds within a point of float32 training
    and of scikit-learn, and the fitted head is the same float32 numpy estimator."""
    X_train, X_test, y_train, y_test = digits
    X_train, X_test = X_train.astype(np.float32), X_test.astype(np.float32)
    params = {**HEAD, "hidden_layer_sizes": (128,)}
    mixed = [TorchMLPClassifier(**params, random_state=s, precision="bfloat16").fit(X_train, y_train)
             for s in range(3)]
    full = [TorchMLPClassifier(**params, random_state=s).fit(X_train, y_train).score(X_test, y_test)
            for s in range(3)]
    theirs = [MLPClassifier(**params, random_state=s).fit(X_train, y_train).score(X_test, y_test) for s in range(3)]
    scores = [m.score(X_test, y_test) for m in mixed]
    assert np.mean(scores) > 0.93
    assert abs(np.mean(scores) - np.mean(full)) <= 0.01 and abs(np.mean(scores) - np.mean(theirs)) <= 0.01
    assert all(a.dtype == np.float32 for a in _weights(mixed[0])) and b"torch" not in pickle.dumps(mixed[0])
    assert np.array_equal(mixed[0].to_sklearn().predict(X_test), mixed[0].predict(X_test))


def test_bad_precision_is_refused(blobs):
    X, y = blobs
    with pytest.raises(ValueError, match="precision must be one of float32, bfloat16, got 'half'"):
        TorchMLPClassifier(precision="half").fit(X, y)


def test_overlapping_blocks_in_threads_share_one_thread_setting():
    """torch's thread count is one per process: in the probe's threading backend two cells hold a
    budget at once, and the first to finish must not give the other the whole pool back."""
    import threading

    before = torch.get_num_threads()
    torch.set_num_threads(2)
    first_in, first_out = threading.Event(), threading.Event()
    seen = {}

    def first():
        with torch_threads(1):
            first_in.set()
            first_out.wait(5)

    try:
        worker = threading.Thread(target=first)
        worker.start()
        first_in.wait(5)
        with torch_threads(1):
            first_out.set()
            worker.join(5)
            seen["after_first_left"] = torch.get_num_threads()
        seen["after_both"] = torch.get_num_threads()
    finally:
        torch.set_num_threads(before)
    assert seen == {"after_first_left": 1, "after_both": 2}
