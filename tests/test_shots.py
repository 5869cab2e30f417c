"""Learning curves from cached features: parse levels, draw k rows per class, fit and score."""

from __future__ import annotations

import json

import numpy as np
import pytest
from sklearn.datasets import make_classification

from featx.errors import UsageError
from featx.probing.heads import HEADS
from featx.probing.shots import learning_curve, parse_shots, shot_rows


@pytest.fixture(scope="module")
def blobs():
    """600 rows, 4 separable classes; the first 450 (shuffled) train, the rest test."""
    X, y = make_classification(n_samples=600, n_features=16, n_informative=8, n_redundant=0, n_classes=4,
                               n_clusters_per_class=1, class_sep=2.0, random_state=0)
    rows = np.random.default_rng(0).permutation(600)
    return X.astype(np.float32), y, np.sort(rows[:450]), np.sort(rows[450:])


@pytest.mark.parametrize("text, expected", [
    ("1,5,10,50,all", (1, 5, 10, 50, None)),
    ("all, 10 ,1,10", (1, 10, None)),
    ("ALL", (None,)),
    ("3", (3,)),
])
def test_parse_shots(text, expected):
    assert parse_shots(text) == expected


@pytest.mark.parametrize("text, message", [
    ("1,five", "'five' is not a number"), ("0,5", "0 images per class"), ("-2", "-2 images per class"),
    ("", "No shots"), ("1.5", "'1.5' is not a number"), ("1,,5", "'' is not a number"),
])
def test_parse_shots_errors_show_the_valid_form(text, message):
    with pytest.raises(UsageError, match=message) as info:
        parse_shots(text)
    assert "1,5,10,50,all" in str(info.value)


def test_shot_rows_gives_k_per_class(blobs):
    _, y, train, _ = blobs
    for k in (1, 5, 20):
        rows = shot_rows(y, train, k, seed=0)
        assert set(rows) <= set(train) and len(set(rows)) == len(rows)
        assert np.array_equal(np.bincount(y[rows], minlength=4), [k] * 4)


def test_shot_rows_is_seeded_and_nested(blobs):
    _, y, train, _ = blobs
    assert np.array_equal(shot_rows(y, train, 5, seed=3), shot_rows(y, train, 5, seed=3))
    assert not np.array_equal(shot_rows(y, train, 5, seed=3), shot_rows(y, train, 5, seed=4))
    assert set(shot_rows(y, train, 5, seed=3)) <= set(shot_rows(y, train, 20, seed=3))


def test_shot_rows_small_class_and_all(blobs):
    _, y, train, _ = blobs
    small = np.concatenate([train[y[train] != 2], train[y[train] == 2][:3]])
    rows = shot_rows(y, small, 10, seed=0)
    assert np.array_equal(np.bincount(y[rows], minlength=4), [10, 10, 3, 10])
    assert np.array_equal(shot_rows(y, train, None, seed=0), train)
    with pytest.raises(UsageError, match="positive integer"):
        shot_rows(y, train, 0, seed=0)


def test_logreg_curve_rises_with_labels(blobs):
    X, y, train, test = blobs
    curve = learning_curve(X, y, train, test, HEADS["logreg"], {"C": 1.0}, parse_shots("1,10,all"), seeds=3,
                           n_classes=4)
    json.dumps(curve, allow_nan=False)
    assert curve["head"] == "logreg" and curve["params"] == {"C": 1.0} and curve["seeds"] == [0, 1, 2]
    one, ten, everything = curve["points"]
    assert [p["shots"] for p in curve["points"]] == [1, 10, "all"]
    assert [p["n_train"] for p in curve["points"]] == [4, 40, 450]
    assert len(one["test_top1"]) == 3 and len(everything["test_top1"]) == 1
    assert one["min"] <= one["mean"] <= one["max"] and everything["std"] == 0.0
    assert one["mean"] == pytest.approx(np.mean(one["test_top1"]))
    assert everything["mean"] >= one["mean"]
    assert everything["mean"] > 0.8  # separable: the full training set learns the classes


def test_knn_neighbours_clamped_to_tiny_training_sets(blobs):
    X, y, train, test = blobs
    curve = learning_curve(X, y, train, test, HEADS["knn"], {"n_neighbors": 15}, (1, None), seeds=2, n_classes=4)
    one, everything = curve["points"]
    assert everything["mean"] >= one["mean"]
    assert any("n_neighbors 15 clamped to 1" in note and note.startswith("1 shot") for note in curve["notes"])
    assert one["mean"] > 0.3  # 1-NN, not a vote of every row (all ties: always the first class, chance)
    assert not any(note.startswith("all") for note in curve["notes"])
    again = learning_curve(X, y, train, test, "knn", {"n_neighbors": 15}, "1,all", seeds=2, n_classes=4)
    assert again == curve  # seeded: the same draws, the same scores


def test_mlp_early_stopping_off_when_its_hold_out_cannot_stratify(blobs):
    X, y, train, test = blobs
    curve = learning_curve(X, y, train, test, HEADS["mlp"], {"alpha": 1e-2}, (1,), seeds=1, n_classes=4)
    assert any("early stopping off" in note for note in curve["notes"])
    assert 0.0 <= curve["points"][0]["mean"] <= 1.0


def test_bad_arguments(blobs):
    X, y, train, test = blobs
    with pytest.raises(UsageError, match="seeds"):
        learning_curve(X, y, train, test, HEADS["knn"], {}, (1,), seeds=0, n_classes=4)
    with pytest.raises(UsageError, match="does not apply"):
        learning_curve(X, y, train, test, HEADS["knn"], {"C": 1.0}, (1,), seeds=1, n_classes=4)
