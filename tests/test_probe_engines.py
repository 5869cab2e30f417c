"""Probe heads on a device: engines against their scikit-learn counterparts, bounded selection,
and what results.json records about both."""

import json

import numpy as np
import pytest
import torch
from sklearn.datasets import load_digits
from sklearn.neighbors import KNeighborsClassifier

import featx
from featx.errors import UsageError
from featx.probing.engines import portable, resolve_device
from featx.probing.fit import run_cell
from featx.probing.heads import HEADS, Engine, Head, _array_api_logreg
from featx.probing.protocol import bounded_folds, stratified_sample, validation_folds

from .conftest import TINY, make_folder, run_python

CUDA = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


@pytest.fixture(scope="module")
def digits():
    X, y = load_digits(return_X_y=True)
    X = X.astype(np.float32)
    rng = np.random.default_rng(0)
    order = rng.permutation(len(y))
    train, test = np.sort(order[:1400]), np.sort(order[1400:])
    folds = validation_folds(y[train], None, 0)
    return X, y, train, test, folds


def _cell(head, digits, device="cpu"):
    X, y, train, test, folds = digits
    meta = {"layer": "pixels", "index": 0, "depth": 0.0, "order": 0, "width": X.shape[1], "pool": "none"}
    return run_cell(meta, head, X, y, train, test, folds, 10, 0, device=device)


def _array_api_head(device_type: str) -> Head:
    """The CUDA engine of logreg, allowed on ``device_type``: scikit-learn on torch tensors there."""
    engine = Engine("array-api", _array_api_logreg, (device_type,), arrays="torch", torch_on=(device_type,))
    return Head("logreg", (engine,), HEADS["logreg"].grid, warm_start=True)


def test_array_api_logreg_on_torch_tensors_matches_numpy(digits):
    """Acceptance: the same chosen C and test accuracy within 0.5 points, on the CPU."""
    numpy_cell = _cell(HEADS["logreg"], digits)
    tensor_cell = _cell(_array_api_head("cpu"), digits)
    assert tensor_cell.row["engine"] == "array-api" and numpy_cell.row["engine"] == "scikit-learn"
    assert tensor_cell.row["params"] == numpy_cell.row["params"]
    assert abs(tensor_cell.row["test_top1"] - numpy_cell.row["test_top1"]) <= 0.005
    # the model comes back as scikit-learn on numpy: usable without torch
    scaler, clf = tensor_cell.model[0], tensor_cell.model[-1]
    assert isinstance(clf.coef_, np.ndarray) and isinstance(scaler.mean_, np.ndarray)
    X, y, train, test, folds = digits
    assert np.array_equal(tensor_cell.model.predict(X[test]), tensor_cell.test_pred)


@CUDA
def test_array_api_logreg_on_cuda_matches_numpy(digits):
    numpy_cell = _cell(HEADS["logreg"], digits)
    cuda_cell = _cell(HEADS["logreg"], digits, device="cuda")
    assert cuda_cell.row["engine"] == "array-api" and cuda_cell.row["device"] == "cuda"
    assert cuda_cell.row["params"] == numpy_cell.row["params"]
    assert abs(cuda_cell.row["test_top1"] - numpy_cell.row["test_top1"]) <= 0.005


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=CUDA)])
def test_knn_head_predicts_as_scikit_learn(digits, device):
    """Acceptance: identical predictions to scikit-learn's cosine k-NN at the chosen k."""
    X, y, train, test, folds = digits
    cell = _cell(HEADS["knn"], digits, device=device)
    assert cell.row["engine"] == "featx"
    k = cell.row["params"]["n_neighbors"]
    plain = HEADS["knn"].pipeline(len(train), 0, {"n_neighbors": k})
    plain.steps[-1] = ("clf", KNeighborsClassifier(n_neighbors=k, metric="cosine", algorithm="brute"))
    plain.fit(X[train].astype(np.float64), y[train])
    assert np.array_equal(cell.test_pred, plain.predict(X[test].astype(np.float64)))


def test_cpu_keeps_numpy_engines_where_they_are_as_fast():
    assert HEADS["logreg"].engine("cpu").name == "scikit-learn"
    assert HEADS["mlp"].engine("cpu").name == "scikit-learn"
    assert HEADS["knn"].engine("cpu").name == "featx"
    assert HEADS["mlp"].engine("cuda:1").name == "torch"


@pytest.mark.parametrize("native", [True, False])
def test_bfloat16_mlp_only_where_the_cpu_multiplies_bfloat16_and_precision_allows(monkeypatch, native):
    from featx import _blas

    monkeypatch.setattr(_blas, "native_bfloat16", lambda: native)
    assert HEADS["mlp"].engine("cpu", "auto").name == ("torch-bfloat16" if native else "scikit-learn")
    assert HEADS["mlp"].engine("cpu", "float32").name == "scikit-learn"
    assert HEADS["logreg"].engine("cpu", "auto").name == "scikit-learn"  # full precision whatever is asked
    assert HEADS["mlp"].engine("cuda", "auto").name == "torch"


def test_devices_are_checked():
    assert resolve_device("cpu") == "cpu"
    assert resolve_device("auto") == ("cuda" if torch.cuda.is_available() else "cpu")
    with pytest.raises(UsageError, match="Valid: auto, cpu, cuda, cuda:N"):
        resolve_device("gpu")
    if not torch.cuda.is_available():
        with pytest.raises(UsageError, match="no CUDA device"):
            resolve_device("cuda")


# --------------------------------------------------------------------------- bounded selection


def test_stratified_sample_is_bounded_proportional_and_seeded():
    y = np.repeat([0, 1, 2], [600, 300, 100])
    rows = np.arange(1000) + 5
    picked = stratified_sample(rows, y, 100, seed=3)
    assert len(picked) == 100 and np.all(np.diff(picked) > 0) and set(picked) <= set(rows)
    counts = np.bincount(y[picked - 5])
    assert counts.tolist() == [60, 30, 10]
    assert np.array_equal(picked, stratified_sample(rows, y, 100, seed=3))
    assert not np.array_equal(picked, stratified_sample(rows, y, 100, seed=4))
    # every class is kept, even one too rare for its share
    rare = np.array([0] * 999 + [1])
    assert set(rare[stratified_sample(np.arange(1000), rare, 10, 0)]) == {0, 1}
    assert np.array_equal(stratified_sample(rows, y, 0, 0), rows)  # 0 = all


def test_bounded_folds_cap_fitting_and_validation_rows():
    y = np.repeat(np.arange(4), 500)
    folds = validation_folds(y, None, 0)
    (fit, val), = bounded_folds(folds, y, 600, seed=0)
    assert len(fit) == 600 and len(val) == 300
    assert set(fit) <= set(folds[0][0]) and set(val) <= set(folds[0][1])
    assert bounded_folds(folds, y, 0, 0)[0][0] is folds[0][0]


@pytest.fixture(scope="module")
def entry(tmp_path_factory):
    root = make_folder(tmp_path_factory.mktemp("engines") / "imgs", n_per_class=20, classes=("a", "b", "c"))
    cache = tmp_path_factory.mktemp("engines-cache")
    return featx.extract(f"folder:{root}", layers="layer2,pre_logits", dtype="float32", cache_dir=cache, **TINY)


def test_results_record_device_engines_and_selection_rows(entry, tmp_path):
    res = featx.probe(entry, heads="logreg,knn", out_dir=tmp_path / "out", progress=False, jobs=1,
                      selection_rows=16, device="cpu")
    protocol = json.loads((tmp_path / "out" / "results.json").read_text())["protocol"]
    assert protocol["device"] == "cpu"
    assert protocol["engines"] == {"logreg": "scikit-learn", "knn": "featx"}
    assert protocol["blas"]["libraries"] and "note" in protocol["blas"]  # the kernels the heads computed with
    rows = protocol["selection_rows"]
    assert rows["limit"] == 16 and rows["fit"] == [16] and rows["val"] == [8]
    assert rows["fit_available"][0] > 16
    assert all(r["engine"] in ("scikit-learn", "featx") and r["device"] == "cpu" for r in res.rows)
    assert all(r["n_train"] == 60 for r in res.rows)  # the refit uses every training row
    full = featx.probe(entry, heads="logreg", out_dir=False, progress=False, jobs=1, selection_rows=0)
    assert full.protocol["selection_rows"]["fit"] == full.protocol["selection_rows"]["fit_available"]
    assert protocol["backend"] == "threading" and protocol["precision"] == "auto"  # built-in heads: threads


def test_head_precision_float32_keeps_scikit_learns_mlp(entry, monkeypatch):
    from featx import _blas

    monkeypatch.setattr(_blas, "native_bfloat16", lambda: True)
    mixed = featx.probe(entry, heads="mlp", out_dir=False, progress=False, jobs=1)
    full = featx.probe(entry, heads="mlp", out_dir=False, progress=False, jobs=1, head_precision="float32")
    assert mixed.protocol["engines"] == {"mlp": "torch-bfloat16"} and mixed.rows[0]["engine"] == "torch-bfloat16"
    assert full.protocol["engines"] == {"mlp": "scikit-learn"} and full.protocol["precision"] == "float32"
    with pytest.raises(UsageError, match="Unknown head precision 'bf16'. Valid: auto, float32"):
        featx.probe(entry, heads="mlp", out_dir=False, progress=False, head_precision="bf16")


def test_custom_heads_run_in_processes_unless_asked():
    from sklearn.linear_model import RidgeClassifier

    from featx.probing.heads import resolve_heads
    from featx.probing.runner import resolve_backend

    builtin, custom = resolve_heads("logreg,knn,mlp"), resolve_heads({"ridge": RidgeClassifier()})
    assert resolve_backend("auto", builtin) == "threading"
    assert resolve_backend("auto", builtin + custom) == "loky"  # its Python may hold the GIL: processes
    assert resolve_backend("threading", custom) == "threading" and resolve_backend("loky", builtin) == "loky"


def test_a_blas_note_is_recorded_every_time_and_shown_once(entry, monkeypatch, caplog):
    from featx.probing import runner

    note = "OpenBLAS computes with its Haswell (AVX2) kernels on a CPU with AVX-512: a test's note."
    monkeypatch.setattr(runner, "blas_in_use", lambda: {"libraries": ["openblas test"], "openblas_coretype": None,
                                                        "note": note})
    monkeypatch.setattr(runner, "_WARNED", set())
    with caplog.at_level("WARNING", logger="featx"):
        first = featx.probe(entry, heads="logreg", out_dir=False, progress=False, jobs=1)
        second = featx.probe(entry, heads="logreg", out_dir=False, progress=False, jobs=1)
    assert first.protocol["blas"]["note"] == second.protocol["blas"]["note"] == note
    assert [r.getMessage() for r in caplog.records].count(note) == 1


@pytest.mark.parametrize("bad", [-1, 2.5, "many"])
def test_bad_selection_rows_are_refused(entry, bad):
    with pytest.raises(UsageError, match="--selection-rows must be a non-negative integer"):
        featx.probe(entry, heads="logreg", out_dir=False, progress=False, selection_rows=bad)


@pytest.mark.slow
@pytest.mark.subprocess
def test_saved_knn_head_loads_without_featx(entry, tmp_path):
    """best_head.joblib is plain scikit-learn even when a torch engine fitted it."""
    featx.probe(entry, heads="knn", out_dir=tmp_path / "out", progress=False, jobs=1)
    code = (
        "import sys; sys.modules['featx'] = None\n"  # any reference to featx in the pickle fails
        "import joblib, numpy as np\n"
        f"m = joblib.load({str(tmp_path / 'out' / 'best_head.joblib')!r})\n"
        "print(type(m[-1]).__module__, m.predict(np.zeros((2, m[0].n_features_in_), np.float32)).shape)"
    )
    res = run_python(code)
    assert res.returncode == 0, res.stderr
    assert res.stdout.split()[0].startswith("sklearn.") and "(2,)" in res.stdout


def test_portable_turns_torch_estimators_into_scikit_learn(digits):
    X, y, train, test, folds = digits
    model = HEADS["knn"].pipeline(len(train), 0, {"n_neighbors": 5}).fit(X[train], y[train])
    before = model.predict(X[test])
    model = portable(model)
    assert isinstance(model[-1], KNeighborsClassifier)
    assert np.array_equal(model.predict(X[test]), before)


def test_cli_default_selection_rows_is_the_protocols():
    from featx import _cli_options as cli_options
    from featx.probing import protocol

    assert cli_options.SELECTION_ROWS == protocol.SELECTION_ROWS


def test_threads_leave_the_blas_pool_as_they_found_it(entry):
    """Each cell's own limit would put the shared pool back to its size under the other cell: the grid
    holds it at one thread per cell and gives it back afterwards."""
    from featx.probing.engines import blas_thread_limit

    before = blas_thread_limit()
    res = featx.probe(entry, heads="logreg,knn", out_dir=False, progress=False, jobs=2, backend="threading")
    assert res.protocol["backend"] == "threading" and blas_thread_limit() == before


def test_threads_computing_with_torch_start_from_one_torch_thread(entry, monkeypatch):
    """A thread that first computes during a threading grid takes torch's process-wide count: the grid holds
    it at one (at the core count, the bfloat16 MLP's cells oversubscribed the cores), then puts it back."""
    import threading

    from featx import _blas
    from featx.probing import runner

    monkeypatch.setattr(_blas, "native_bfloat16", lambda: True)
    seen, real = [], runner.run_cell

    def cell(*args, **kwargs):
        probe_thread = threading.Thread(target=lambda: seen.append(torch.get_num_threads()))
        probe_thread.start()
        probe_thread.join()
        return real(*args, **kwargs)

    monkeypatch.setattr(runner, "run_cell", cell)
    before = torch.get_num_threads()
    res = featx.probe(entry, heads="mlp,logreg", out_dir=False, progress=False, jobs=2, backend="threading")
    assert res.protocol["engines"]["mlp"] == "torch-bfloat16"
    assert seen and set(seen) == {1} and torch.get_num_threads() == before
