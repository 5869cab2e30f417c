"""One evaluation for the probe and fine-tuning: the same metrics, the same bootstrap, the same
keys, and the same numbers for the same predictions, whichever stage computes them.

Metrics are checked against scikit-learn computed independently on the same vectors; the
probe's numbers are checked against the algorithm the README documents (exact binomial
bootstrap, scikit-learn's macro-F1 over the labels in the true or predicted labels).
"""

from __future__ import annotations

import json
import shutil
from types import SimpleNamespace

import numpy as np
import pytest
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import accuracy_score, balanced_accuracy_score, f1_score, top_k_accuracy_score
from sklearn.neighbors import KNeighborsClassifier
from sklearn.pipeline import Pipeline
from sklearn.preprocessing import StandardScaler

import featx
from featx._fileio import write_json
from featx._text import slug
from featx.data import open_dataset
from featx.errors import UsageError
from featx.evaluation import BOOTSTRAP, METRIC_KEYS, bootstrap_interval, classification_metrics, val_score
from featx.finetuning import finetune
from featx.finetuning.metrics import score_logits
from featx.finetuning.plan import ProbeResult, plan_explicit
from featx.finetuning.runner import _probe_comparison
from featx.probing.fit import evaluate
from featx.probing.knn import CosineKNeighborsClassifier
from featx.probing.protocol import check_split_sizes

from .conftest import TINY, TINY_MODEL, make_folder

TINY_FT = {"model": TINY_MODEL, "weights": "none", "image_size": 32, "progress": False, "workers": 0,
           "batch_size": 16}


def _problem(n: int = 400, n_classes: int = 8, seed: int = 0):
    """Labels, noisy logits (one column per class) and their argmax predictions."""
    rng = np.random.default_rng(seed)
    y = rng.integers(0, n_classes, n)
    logits = rng.normal(size=(n, n_classes))
    logits[np.arange(n), y] += 1.0
    return y, logits, logits.argmax(1)


class _Fitted:
    """A fitted classifier's public surface: what ``evaluate`` receives from the probe's grid."""

    def __init__(self, logits, classes):
        self.classes_, self._logits = np.asarray(classes), logits

    def predict(self, X):
        return self.classes_[self._logits[X].argmax(1)]

    def predict_proba(self, X):
        return self._logits[X]


# ------------------------------------------------------------------------ the metrics themselves


def test_metrics_match_scikit_learn_on_the_same_vectors():
    y, logits, pred = _problem()
    m = classification_metrics(y, pred, logits, n_classes=8, seed=3)
    assert set(m) == set(METRIC_KEYS)
    assert m["test_top1"] == accuracy_score(y, pred)
    assert m["balanced_accuracy"] == balanced_accuracy_score(y, pred)
    assert m["macro_f1"] == f1_score(y, pred, average="macro", labels=np.union1d(y, pred), zero_division=0)
    assert m["test_top5"] == top_k_accuracy_score(y, logits, k=5, labels=np.arange(8))
    assert classification_metrics(y[:50] % 4, pred[:50] % 4, logits[:50, :4], n_classes=4, seed=3)["test_top5"] is None


def test_macro_f1_counts_classes_predicted_or_true_and_ignores_classes_absent_from_both():
    y = np.array([0, 0, 1, 1])
    pred = np.array([0, 2, 1, 1])  # class 2 is predicted once, never true; class 3 occurs nowhere
    m = classification_metrics(y, pred, n_classes=4, seed=0)
    per_class = f1_score(y, pred, labels=[0, 1, 2], average=None, zero_division=0)
    assert m["macro_f1"] == pytest.approx(per_class.mean())  # (2/3 + 1 + 0) / 3
    assert m["macro_f1"] < f1_score(y, pred, labels=[0, 1], average="macro", zero_division=0)  # not true-only


def test_the_bootstrap_is_the_documented_binomial_draw():
    correct = np.r_[np.ones(170, bool), np.zeros(30, bool)]
    lo, hi = bootstrap_interval(correct, seed=11)
    means = np.random.default_rng(11).binomial(200, 0.85, size=BOOTSTRAP) / 200
    assert (lo, hi) == tuple(np.percentile(means, [2.5, 97.5]))
    assert lo <= correct.mean() <= hi
    assert bootstrap_interval(correct, seed=11) == (lo, hi)  # deterministic for a seed
    assert bootstrap_interval(correct, seed=12) != (lo, hi)
    sigma = np.sqrt(0.85 * 0.15 / 200)  # the binomial spread of an accuracy over 200 images
    assert hi - lo == pytest.approx(2 * 1.96 * sigma, rel=0.15)
    assert all(np.isnan(bootstrap_interval(np.array([], bool), seed=0)))


def test_the_probes_numbers_are_unchanged_for_the_same_predictions():
    """``evaluate`` as the probe shipped it: top-1, binomial CI, balanced accuracy and
    scikit-learn's default macro-F1 (zero_division=0), top-5 over the model's classes."""
    rng = np.random.default_rng(5)
    X = rng.normal(size=(300, 6))
    y = (X[:, 0] * 2 + X[:, 1] + rng.normal(scale=1.5, size=300)).round().clip(-3, 3).astype(int) + 3
    model = Pipeline([("s", StandardScaler()), ("c", LogisticRegression(max_iter=2000))]).fit(X[:200], y[:200])
    metrics, pred = evaluate(model, X[200:], y[200:], n_classes=7, seed=4)
    yt = y[200:]
    correct = pred == yt
    means = np.random.default_rng(4).binomial(100, correct.mean(), size=1000) / 100
    assert metrics["test_top1"] == float(correct.mean())
    assert metrics["test_top1_ci"] == [float(v) for v in np.percentile(means, [2.5, 97.5])]
    assert metrics["balanced_accuracy"] == float(balanced_accuracy_score(yt, pred))
    assert metrics["macro_f1"] == float(f1_score(yt, pred, average="macro", zero_division=0))
    assert metrics["test_top5"] == float(top_k_accuracy_score(yt, model.predict_proba(X[200:]), k=5,
                                                              labels=model.classes_))


def test_the_same_predictions_give_the_same_numbers_in_both_stages():
    y, logits, _ = _problem(n=250, n_classes=7, seed=2)
    probe_metrics, _ = evaluate(_Fitted(logits, np.arange(7)), np.arange(len(y)), y, n_classes=7, seed=9)
    tuned = score_logits(y, logits, n_classes=7, seed=9)
    assert {k: tuned[k] for k in METRIC_KEYS} == probe_metrics
    assert tuned["n_test"] == len(y)


class _NoSecondSearch(CosineKNeighborsClassifier):
    def predict(self, X):
        raise AssertionError("evaluate searched the neighbours twice")


def test_knn_test_predictions_come_from_the_same_search_as_its_scores_and_keep_the_tie_rule():
    """A k-NN head's predictions are the first argmax of its vote shares (ties to the lowest class
    index): ``evaluate`` takes them from the one search that gave the top-5 scores."""
    rng = np.random.default_rng(3)
    X, y = rng.normal(size=(600, 12)), rng.integers(0, 8, 600)
    for clf in (_NoSecondSearch(n_neighbors=4), KNeighborsClassifier(n_neighbors=4, metric="cosine")):
        model = Pipeline([("scaler", StandardScaler()), ("clf", clf)]).fit(X[:400], y[:400])
        votes = model.predict_proba(X[400:])
        assert np.any(np.sort(votes, axis=1)[:, -1] == np.sort(votes, axis=1)[:, -2])  # vote ties occur
        metrics, pred = evaluate(model, X[400:], y[400:], n_classes=8, seed=0)
        expected = KNeighborsClassifier(n_neighbors=4, metric="cosine").fit(
            model[:-1].transform(X[:400]), y[:400]).predict(model[:-1].transform(X[400:]))
        np.testing.assert_array_equal(pred, expected)
        assert metrics["test_top1"] == float(np.mean(expected == y[400:]))
    weighted = Pipeline([("clf", KNeighborsClassifier(n_neighbors=4, weights="distance"))]).fit(X[:400], y[:400])
    np.testing.assert_array_equal(evaluate(weighted, X[400:], y[400:], n_classes=8, seed=0)[1],
                                  weighted.predict(X[400:]))  # not an argmax of its probabilities: predicted


def test_validation_ranking_helper_puts_missing_scores_last():
    assert val_score({"val_top1": 0.5}) == 0.5 and val_score({"val_top1": None}) == -1.0 and val_score({}) == -1.0


# ------------------------------------------------------------------------ both stages' files


@pytest.fixture(scope="module")
def both_runs(tmp_path_factory):
    """A tiny probe and a tiny fine-tuning run on the same synthetic images."""
    root = tmp_path_factory.mktemp("eval")
    images = make_folder(root / "images", n_per_class=12)
    cache = root / "cache"
    entry = featx.extract(f"folder:{images}", layers="layer3", cache_dir=cache, **TINY)
    probe = featx.probe(entry, heads="logreg", out_dir=root / "probe", progress=False, jobs=1, cache_dir=cache)
    tuned = finetune(f"folder:{images}", layer="layer3", epochs=1, out_dir=root / "ft", cache_dir=cache,
                     **TINY_FT)
    return root, images, probe, tuned


@pytest.mark.slow  # one tiny extraction, probe and fine-tuning run: ~25 s on 2 cores
def test_probe_and_finetune_write_the_same_metric_keys(both_runs):
    root, _, probe, tuned = both_runs
    results = json.loads((root / "probe" / "results.json").read_text())
    saved = json.loads((root / "ft" / "finetune.json").read_text())
    assert (results["format"], results["version"]) == ("featx-probe-results", 2)
    assert (saved["format"], saved["version"]) == ("featx-finetune-result", 2)
    for row in results["rows"]:
        assert set(METRIC_KEYS) | {"n_test"} <= set(row)
    assert set(METRIC_KEYS) | {"n_test"} <= set(saved["test"])
    assert not {"top1", "top1_ci95", "top5", "n"} & set(saved["test"])  # the old finetune names are gone
    assert tuned.test_top1 == saved["test"]["test_top1"]
    assert probe.rows[0]["test_top1"] == results["rows"][0]["test_top1"]
    lo, hi = saved["test"]["test_top1_ci"]
    assert lo <= saved["test"]["test_top1"] <= hi


@pytest.mark.slow  # one tiny extraction, probe and fine-tuning run: ~25 s on 2 cores
def test_a_finished_run_of_the_old_schema_is_not_returned_as_this_one(both_runs, tmp_path):
    root, images, _, _ = both_runs
    old = tmp_path / "old"
    shutil.copytree(root / "ft", old)
    data = json.loads((old / "finetune.json").read_text())
    data.pop("format"), data.pop("version")
    test = data["test"]
    data["test"] = {"n": test["n_test"], "top1": test["test_top1"], "top1_ci95": test["test_top1_ci"]}
    (old / "finetune.json").write_text(json.dumps(data))
    before = (old / "finetune.json").read_bytes()
    with pytest.raises(UsageError, match=r"older featx \(finetune.json schema version 1, now 2"):
        finetune(f"folder:{images}", layer="layer3", epochs=1, out_dir=old, cache_dir=root / "cache", **TINY_FT)
    assert (old / "finetune.json").read_bytes() == before


def test_the_probe_comparison_leaves_out_a_difference_over_other_test_images(tmp_path):
    rows = [{"layer": "layer3", "head": "logreg", "test_top1": 0.5, "n_test": 10}]
    probe = ProbeResult(tmp_path, {"rows": rows, "best": {"layer": "layer3", "head": "logreg", "test_top1": 0.5}})
    plan = SimpleNamespace(probe=probe, layer=SimpleNamespace(name="layer3"), full=False)
    same = _probe_comparison(plan, {"test_top1": 0.75, "n_test": 10})
    assert same["delta_top1_vs_logreg"] == pytest.approx(0.25)
    assert _probe_comparison(plan, {"test_top1": 0.75, "n_test": 9})["delta_top1_vs_logreg"] is None


# ------------------------------------------------------------------------ one error, one message


def test_a_class_with_one_training_image_is_the_same_usage_error_in_both_stages(tmp_path):
    images = make_folder(tmp_path / "images", n_per_class=6)
    for extra in sorted((images / "train" / "owl").iterdir())[1:]:
        extra.unlink()  # owl: one training image, six test images
    src = open_dataset(f"folder:{images}")
    y, splits = np.asarray(src.labels), np.asarray(src.splits)
    with pytest.raises(UsageError) as probe_error:
        check_split_sizes(y, splits, class_names=src.classes)
    with pytest.raises(UsageError) as tune_error:
        plan_explicit(f"folder:{images}", model=TINY_MODEL, weights="none", image_size=32, layer="layer3")
    sentence = ("class 'owl' has 1 training image(s); choosing on a validation hold-out needs at least 2 per "
                "class (one to fit, one to validate)")
    assert f"Too few images for the probe protocol: {sentence}." in str(probe_error.value)
    assert f"Too few images for fine-tuning: {sentence}." in str(tune_error.value)
    assert probe_error.value.exit_code == tune_error.value.exit_code == 2


# ------------------------------------------------------------------------ shared small helpers


def test_one_slug_for_cache_entries_and_result_folders():
    assert slug("folder:/data/my pets/") == "x" and slug("folder:/data/my pets") == "my_pets"
    assert slug("finetuned:runs/a=1") == "a=1" and slug("timm:resnet18") == "timm_resnet18"
    assert len(slug("y" * 90)) == 40


def test_write_json_is_strict_and_atomic(tmp_path):
    path = tmp_path / "x.json"
    write_json(path, {"a": float("nan"), "b": np.float32(0.5), "c": np.arange(2), "d": tmp_path})
    assert json.loads(path.read_text()) == {"a": None, "b": 0.5, "c": [0, 1], "d": str(tmp_path)}
    assert path.read_text().endswith("\n") and [p.name for p in tmp_path.iterdir()] == ["x.json"]

