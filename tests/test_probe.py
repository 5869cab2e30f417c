"""The probe: leak-free protocol, outputs, parallel = serial, streaming, Dask, bad input."""

import json
import math

import numpy as np
import pytest
from sklearn.neighbors import KNeighborsClassifier
from sklearn.tree import DecisionTreeClassifier

import featx
from featx.errors import DataError, UnknownLayerError, UsageError
from featx.probing import assign_splits, validation_folds
from featx.probing.heads import HEADS, knn_score_grid
from featx.probing.protocol import Splits

from .conftest import TINY, make_folder, noisy_copy

FAST = "logreg,knn"


@pytest.fixture(scope="module")
def entry(tmp_path_factory):
    root = make_folder(tmp_path_factory.mktemp("probe") / "imgs", n_per_class=16, classes=("a", "b", "c", "d"))
    cache = tmp_path_factory.mktemp("probe-cache")
    return featx.extract(f"folder:{root}", layers="layer1,layer3,pre_logits", dtype="float32",
                         cache_dir=cache, **TINY)


def test_probe_writes_every_output(entry, tmp_path):
    res = featx.probe(entry, heads=FAST, out_dir=tmp_path / "out", progress=False, jobs=1)
    out = tmp_path / "out"
    for name in ("results.json", "results.csv", "layers.png", "confusion.png", "best_head.joblib",
                 "best_head.json", "linear_head.npz"):
        assert (out / name).is_file(), name
    text = (out / "results.json").read_text()
    data = json.loads(text, parse_constant=lambda c: pytest.fail(f"non-strict JSON token {c}"))
    assert len(data["rows"]) == 6 and data["best"]["layer"] in entry.layer_names
    assert data["protocol"]["splits"]["test_source"] == "dataset"
    assert [r["layer"] for r in res.rows][::2] == entry.layer_names  # depth order
    for r in res.rows:
        lo, hi = r["test_top1_ci"]
        assert 0 <= lo <= r["test_top1"] <= hi <= 1
        assert r["n_test"] == 64 and r["fit_seconds"] > 0 and r["test_top5"] is None  # 4 classes: no top-5
    assert res.recommendation.startswith("Best:")
    assert (out / "results.csv").read_text().count("\n") == 7


def test_best_head_pickle_predicts_like_the_row(entry, tmp_path):
    import joblib

    res = featx.probe(entry, heads=FAST, out_dir=tmp_path / "o", progress=False, jobs=1)
    model = joblib.load(tmp_path / "o" / "best_head.joblib")
    f = entry.load(res.best["layer"])
    test = f.split == "test"
    assert model.score(f.X[test], f.y[test]) == pytest.approx(res.best["test_top1"])


def test_test_split_never_influences_selection(entry, tmp_path, monkeypatch):
    """Scramble the test labels and features: every choice made on validation data stays the same."""
    base = featx.probe(entry, heads=FAST, out_dir=False, progress=False, jobs=1)
    s = entry.samples()
    test = s["split"] == "test"
    rng = np.random.default_rng(7)
    scrambled_labels = s["label"].copy()
    scrambled_labels[test] = rng.permutation(scrambled_labels[test])[::-1]
    noisy = noisy_copy(entry, test, tmp_path / "noisy", rng, scale=100.0)
    monkeypatch.setattr(type(entry), "samples", lambda self: {**s, "label": scrambled_labels})
    tampered = featx.probe(noisy, heads=FAST, out_dir=False, progress=False, jobs=1)
    for a, b in zip(base.rows, tampered.rows):
        assert (a["layer"], a["head"]) == (b["layer"], b["head"])
        assert a["params"] == b["params"] and a["grid"] == b["grid"] and a["val_top1"] == b["val_top1"]
    assert (base.best["layer"], base.best["head"]) == (tampered.best["layer"], tampered.best["head"])
    assert [r["test_top1"] for r in base.rows] != [r["test_top1"] for r in tampered.rows]  # the test did change


def test_parallel_and_serial_give_the_same_numbers(entry):
    serial = featx.probe(entry, heads="logreg,linsvm,knn,svm", out_dir=False, progress=False, jobs=1)
    parallel = featx.probe(entry, heads="logreg,linsvm,knn,svm", out_dir=False, progress=False, jobs=2)
    threads = featx.probe(entry, heads="logreg,linsvm,knn,svm", out_dir=False, progress=False, jobs=2,
                          backend="threading")
    strip = lambda rows: [{k: v for k, v in r.items() if k != "fit_seconds"} for r in rows]  # noqa: E731
    assert strip(serial.rows) == strip(parallel.rows) == strip(threads.rows)


def test_cv_protocol_and_seeded_test_split_for_sources_without_one(tmp_path):
    root = make_folder(tmp_path / "nosplit", n_per_class=12, splits=None)
    e = featx.extract(f"folder:{root}", layers="pre_logits", **TINY)
    res = featx.probe(e, heads="logreg", cv=3, out_dir=False, progress=False, jobs=1)
    split = res.protocol["splits"]
    assert split["test_source"] == "seeded" and split["test"] == 8 and split["train"] == 28
    assert res.protocol["selection"] == "3-fold cross-validation"


def test_assign_splits_and_folds_are_stratified_and_seeded():
    y = np.repeat(np.arange(3), 10)
    s = assign_splits(y, np.array([""] * 30), seed=3)
    assert s.test_source == "seeded" and np.bincount(y[s.test]).tolist() == [2, 2, 2]
    assert np.array_equal(s.test, assign_splits(y, np.array([""] * 30), seed=3).test)
    assert not np.array_equal(s.test, assign_splits(y, np.array([""] * 30), seed=4).test)
    assert set(s.train).isdisjoint(s.test)
    (fit, val), = validation_folds(y[s.train], None, seed=0)
    assert set(fit).isdisjoint(val) and len(fit) + len(val) == len(s.train)


def test_knn_fast_path_matches_scikit_learn():
    rng = np.random.default_rng(0)
    X, y = rng.normal(size=(120, 8)), rng.integers(0, 3, 120)
    Xv, yv = rng.normal(size=(40, 8)), rng.integers(0, 3, 40)
    grid = HEADS["knn"].grid
    ours = knn_score_grid(X, y, Xv, yv, grid)
    theirs = [KNeighborsClassifier(metric="cosine", algorithm="brute", **p).fit(X, y).score(Xv, yv) for p in grid]
    assert ours == pytest.approx(theirs)


def test_custom_estimator_through_the_api(entry):
    res = featx.probe(entry, heads={"tree": (DecisionTreeClassifier(random_state=0), [{"max_depth": 2},
                                                                                     {"max_depth": 4}])},
                      layers="pre_logits", out_dir=False, progress=False, jobs=1)
    assert [r["head"] for r in res.rows] == ["tree"] and res.rows[0]["params"]["max_depth"] in (2, 4)


def test_large_layers_stream_through_sgd(entry):
    in_memory = featx.probe(entry, heads="logreg", layers="layer1", out_dir=False, progress=False, jobs=1)
    res = featx.probe(entry, heads="logreg,knn", layers="layer1", memory_budget=1000, out_dir=False,
                      progress=False, jobs=1)
    (row,) = res.rows
    assert row["head"] == "logreg" and row["params"]["solver"].startswith("sgd-log_loss")
    assert "streamed" in row["notes"][0] and "knn" in row["notes"][1]
    assert row["test_top1"] >= in_memory.rows[0]["test_top1"] - 0.05 and row["test_top1"] > 0.8


@pytest.mark.slow
@pytest.mark.subprocess
def test_dask_backend_on_a_loopback_cluster(entry):
    distributed = pytest.importorskip("dask.distributed")
    with distributed.LocalCluster(n_workers=2, threads_per_worker=1, processes=True, host="127.0.0.1",
                                  dashboard_address=None) as cluster:
        res = featx.probe(entry, heads=FAST, backend="dask", scheduler=cluster.scheduler_address, out_dir=False,
                          progress=False)
    local = featx.probe(entry, heads=FAST, out_dir=False, progress=False, jobs=1)
    assert [r["test_top1"] for r in res.rows] == [r["test_top1"] for r in local.rows]


def test_probe_reads_only_the_cache(entry, monkeypatch):
    """Re-running with other heads loads no model at all."""
    def forbidden(*a, **k):
        raise AssertionError("a model was built")

    monkeypatch.setattr("featx.backbones.registry.build_model", forbidden)
    monkeypatch.setattr("featx.extraction.runner.build_model", forbidden)
    featx.probe(entry, heads="knn", out_dir=False, progress=False, jobs=1)


@pytest.mark.parametrize("kwargs, error, message", [
    ({"heads": "logreg,svn"}, UsageError, "Did you mean 'svm'"),
    ({"layers": "layr3"}, UnknownLayerError, "Did you mean 'layer3'"),
    ({"backend": "spark"}, UsageError, "Unknown backend"),
    ({"jobs": 0}, UsageError, "--jobs"),
    ({"cv": 1}, UsageError, "--cv must be an integer >= 2"),
    ({"cv": 40}, DataError, "needs at least 40 training samples per class"),
])
def test_bad_probe_input(entry, kwargs, error, message):
    with pytest.raises(error, match=message):
        featx.probe(entry, out_dir=False, progress=False, **{"heads": FAST, **kwargs})


def test_unlabelled_single_class_and_non_finite_entries_are_data_errors(tmp_path, monkeypatch):
    root = make_folder(tmp_path / "one", n_per_class=6, classes=("only",), splits=None)
    e = featx.extract(f"folder:{root}", layers="pre_logits", **TINY)
    with pytest.raises(DataError, match="at least two"):
        featx.probe(e, heads=FAST, out_dir=tmp_path / "never", progress=False)
    assert not (tmp_path / "never").exists()
    s = e.samples()
    monkeypatch.setattr(type(e), "samples", lambda self: {**s, "label": np.full_like(s["label"], -1)})
    with pytest.raises(DataError, match="no labelled samples"):
        featx.probe(e, heads=FAST, out_dir=False, progress=False)


def test_non_finite_features_are_refused_and_nothing_is_written(entry, tmp_path, monkeypatch):
    import shutil
    import tempfile

    import h5py

    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path / "tmp"))  # where the workers' shared layers go
    (tmp_path / "tmp").mkdir()

    damaged = tmp_path / "cache" / entry.path.name
    damaged.parent.mkdir()
    shutil.copy(entry.path, damaged)
    with h5py.File(damaged, "r+") as f:  # an overflow, as float16 storage of huge activations gives
        f["layers"][entry.layer_names[-1]][3, 0] = math.inf
    with pytest.raises(DataError, match=r"1 non-finite values.*--dtype float32"):
        featx.probe(damaged, heads=FAST, out_dir=tmp_path / "out", progress=False, jobs=1)
    assert not (tmp_path / "out").exists() and not list(tmp_path.glob(".out.tmp*"))
    assert not list((tmp_path / "tmp").iterdir())  # the shared layer files are gone too


def test_splits_object_describes_itself():
    s = Splits(np.arange(8), np.arange(8, 10), "seeded", 1)
    assert s.describe() == {"train": 8, "test": 2, "test_source": "seeded", "seed": 1, "test_fraction": 0.2}


def test_regularisation_path_stops_once_validation_has_turned():
    from featx.probing.fit import _path_has_turned

    assert not _path_has_turned(np.array([0.80, 0.85, 0.84]))
    assert _path_has_turned(np.array([0.80, 0.85, 0.84, 0.83]))
    assert not _path_has_turned(np.array([0.80, 0.85, 0.84, 0.845]))  # came back up: keep walking
    assert not _path_has_turned(np.array([0.80, 0.82, 0.84, 0.86]))


def test_depth_plot_labels_of_neighbouring_layers_do_not_overlap():
    from featx.report.plots import _depth_labels

    labels = _depth_labels([(0.06, "blocks.0"), (0.67, "blocks.4"), (0.99, "bn2"), (1.0, "pre_logits")])
    assert labels == ["blocks.0\n0.06", "blocks.4\n0.67", "", "bn2 / pre_logits\n0.99 / 1.00"]
