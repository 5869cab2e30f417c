"""Splits that keep the test set out of every decision.

The test split is the source's own ``test`` split, or, for sources without one, a seeded
stratified split that is recorded with the results. Hyper-parameters are chosen on a
stratified hold-out of the training rows (or on k folds of them); only the refit model ever
sees the test rows, once.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from sklearn.model_selection import StratifiedKFold, train_test_split

from ..errors import DataError, UsageError

TEST_FRACTION = 0.2
VALIDATION_FRACTION = 0.2


@dataclass(frozen=True)
class Splits:
    """Row indices of the training and test samples, and where the test split came from."""

    train: np.ndarray
    test: np.ndarray
    test_source: str  # "dataset": the source's own test split; "seeded": made here
    seed: int

    def describe(self) -> dict:
        return {"train": int(len(self.train)), "test": int(len(self.test)), "test_source": self.test_source,
                "seed": self.seed, "test_fraction": None if self.test_source == "dataset" else TEST_FRACTION}


def assign_splits(labels: np.ndarray, splits: np.ndarray, seed: int = 0,
                  test_fraction: float = TEST_FRACTION) -> Splits:
    """Train/test rows of the labelled samples (unlabelled ones, label -1, are left out)."""
    labels = np.asarray(labels)
    splits = np.asarray(splits).astype(str)
    labelled = np.flatnonzero(labels >= 0)
    if len(labelled) == 0:
        raise DataError("The entry has no labelled samples; a probe needs labels (label -1 means unlabelled).")
    classes, counts = np.unique(labels[labelled], return_counts=True)
    if len(classes) < 2:
        raise DataError(f"Only one class ({int(classes[0])}) has labelled samples; a probe needs at least two.")
    is_test = splits[labelled] == "test"
    if is_test.any() and (~is_test).any():
        return Splits(labelled[~is_test], labelled[is_test], "dataset", seed)
    if counts.min() < 2:
        raise DataError(
            f"Class {int(classes[counts.argmin()])} has a single labelled sample; a stratified test split "
            "needs at least two per class."
        )
    train, test = train_test_split(labelled, test_size=test_fraction, random_state=seed,
                                   stratify=labels[labelled])
    return Splits(np.sort(train), np.sort(test), "seeded", seed)


def validation_folds(y_train: np.ndarray, cv: int | None, seed: int,
                     fraction: float = VALIDATION_FRACTION) -> list[tuple[np.ndarray, np.ndarray]]:
    """(fit, validation) index pairs within the training rows: one hold-out, or ``cv`` folds."""
    y_train = np.asarray(y_train)
    _, counts = np.unique(y_train, return_counts=True)
    if cv is not None:
        if not isinstance(cv, (int, np.integer)) or cv < 2:
            raise UsageError(f"--cv must be an integer >= 2, got {cv!r}.")
        if counts.min() < cv:
            raise DataError(
                f"--cv {cv} needs at least {cv} training samples per class; the smallest class has "
                f"{int(counts.min())}. Use fewer folds or the default hold-out."
            )
        folds = StratifiedKFold(n_splits=cv, shuffle=True, random_state=seed)
        return list(folds.split(np.zeros(len(y_train)), y_train))
    if counts.min() < 2:
        raise DataError(
            f"A class has only {int(counts.min())} training sample; choosing hyper-parameters needs at least "
            "two per class (one to fit, one to validate)."
        )
    idx = np.arange(len(y_train))
    n_val = max(int(round(fraction * len(y_train))), len(counts))
    fit, val = train_test_split(idx, test_size=n_val, random_state=seed, stratify=y_train)
    return [(np.sort(fit), np.sort(val))]
