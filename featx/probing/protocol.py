"""Splits that keep the test set out of every decision.

The test split is the source's own ``test`` split, or, for sources without one, a seeded
stratified split that is recorded with the results. Hyper-parameters are chosen on the
source's own ``val`` split when it has one (the model is then refit on the ``train`` rows
only, so the validation rows stay validation rows); otherwise on a stratified hold-out of the
training rows (or on k folds of them). Only the refit model ever sees the test rows, once.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field

import numpy as np
from sklearn.model_selection import StratifiedKFold, train_test_split

from ..errors import DataError, UsageError

log = logging.getLogger(__name__)

TEST_FRACTION = 0.2
VALIDATION_FRACTION = 0.2
#: the split names featx understands ("" = the source has no split); sources map their own
#: spellings (valid, validation, testing, ...) onto these
KNOWN_SPLITS = ("train", "val", "test", "")


def _no_rows() -> np.ndarray:
    return np.empty(0, dtype=np.int64)


@dataclass(frozen=True)
class Splits:
    """Row indices of the training, validation (source's own, may be empty) and test samples."""

    train: np.ndarray
    test: np.ndarray
    test_source: str  # "dataset": the source's own test split; "seeded": made here
    seed: int
    val: np.ndarray = field(default_factory=_no_rows)  # the source's own validation split

    @property
    def selection_rows(self) -> np.ndarray:
        """Rows the selection folds index into: train, then the source's validation rows."""
        return np.concatenate([self.train, self.val]) if len(self.val) else self.train

    def describe(self) -> dict:
        out = {"train": int(len(self.train)), "test": int(len(self.test)), "test_source": self.test_source,
               "seed": self.seed, "test_fraction": None if self.test_source == "dataset" else TEST_FRACTION}
        if len(self.val):
            out["val"] = int(len(self.val))
        return out

    def roles(self, split_names: np.ndarray, folds) -> dict:
        """Which of the source's split names served training, selection and test, and how many rows."""
        names = np.asarray(split_names).astype(str)
        selection = self.val if len(self.val) else self.train[np.unique(np.concatenate([v for _, v in folds]))]

        def role(rows):
            return {"splits": sorted({n or "(none)" for n in names[rows]}), "n": int(len(rows))}

        return {"train": role(self.train), "selection": role(selection), "test": role(self.test)}


def check_split_names(splits: np.ndarray) -> None:
    """Refuse split names featx does not know, rather than train on their rows silently."""
    unknown = sorted(set(np.asarray(splits).astype(str)) - set(KNOWN_SPLITS))
    if unknown:
        raise UsageError(
            f"The data has rows in split(s) {', '.join(repr(u) for u in unknown)}, which featx does not know. "
            "Valid splits: train, val (validation, used to choose hyper-parameters) and test; they are never "
            "merged into training silently. Rename those splits or leave their rows out of the dataset."
        )


def assign_splits(labels: np.ndarray, splits: np.ndarray, seed: int = 0,
                  test_fraction: float = TEST_FRACTION) -> Splits:
    """Train/val/test rows of the labelled samples (unlabelled ones, label -1, are left out)."""
    labels = np.asarray(labels)
    splits = np.asarray(splits).astype(str)
    check_split_names(splits)
    labelled = np.flatnonzero(labels >= 0)
    if len(labelled) == 0:
        raise DataError("The entry has no labelled samples; a probe needs labels (label -1 means unlabelled).")
    classes, counts = np.unique(labels[labelled], return_counts=True)
    if len(classes) < 2:
        raise DataError(f"Only one class ({int(classes[0])}) has labelled samples; a probe needs at least two.")
    names = splits[labelled]
    is_test, is_val = names == "test", names == "val"
    val = labelled[is_val]
    rest = labelled[~is_test & ~is_val]
    if is_test.any() and len(rest):
        return Splits(rest, labelled[is_test], "dataset", seed, val)
    if is_test.any() and len(val):
        raise UsageError("The data has val and test splits but no train split: nothing to train on that is not "
                         "used to choose or to test. Add a train split (train/ folder or split=train rows).")
    pool = labelled[~is_val]
    pool_classes, pool_counts = np.unique(labels[pool], return_counts=True)
    if len(pool) == 0 or pool_counts.min() < 2:
        raise DataError(
            f"Class {int(pool_classes[pool_counts.argmin()]) if len(pool) else int(classes[0])} has a single "
            "labelled sample outside the validation split; a stratified test split needs at least two per class."
        )
    train, test = train_test_split(pool, test_size=test_fraction, random_state=seed, stratify=labels[pool])
    return Splits(np.sort(train), np.sort(test), "seeded", seed, val)


def single_sample_class(counts, classes, class_names=None) -> str | None:
    """The problem when a class has fewer than two training images, else None: the validation
    hold-out is stratified, so every class needs one image to fit on and one to validate on."""
    counts = np.asarray(counts)
    if len(counts) == 0 or counts.min() >= 2:
        return None
    return (f"class {_name(classes[counts.argmin()], class_names)} has {int(counts.min())} training image(s); "
            "choosing on a validation hold-out needs at least 2 per class (one to fit, one to validate)")


def require_two_per_class(y_train: np.ndarray, class_names=None, stage: str = "the probe protocol",
                          hint: str = "Use more images (a larger --limit).") -> None:
    """UsageError when a class has a single training image, in the probe and fine-tuning alike:
    the images are the user's choice (the dataset, ``--limit``), and so is the fix."""
    classes, counts = np.unique(np.asarray(y_train), return_counts=True)
    problem = single_sample_class(counts, classes, class_names)
    if problem:
        raise UsageError(f"Too few images for {stage}: {problem}. {hint}".strip())


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
    require_two_per_class(y_train)  # normally caught earlier, with class names (check_split_sizes)
    idx = np.arange(len(y_train))
    n_val = max(int(round(fraction * len(y_train))), len(counts))
    fit, val = train_test_split(idx, test_size=n_val, random_state=seed, stratify=y_train)
    return [(np.sort(fit), np.sort(val))]


def selection_folds(splits: Splits, y: np.ndarray, cv: int | None, seed: int) -> list[tuple[np.ndarray, np.ndarray]]:
    """(fit, validation) pairs indexing ``splits.selection_rows``.

    With the source's own validation split there is exactly one pair: fit on train, score on
    val (no hold-out, no k folds); otherwise the folds come from the training rows.
    """
    if not len(splits.val):
        return validation_folds(np.asarray(y)[splits.train], cv, seed)
    if cv is not None:
        validation_folds(np.asarray(y)[splits.train], cv, seed)  # the same argument checks
        log.warning("--cv %s is not used: the dataset has its own validation split (%d images), which chooses "
                    "the hyper-parameters", cv, len(splits.val))
    n_train = len(splits.train)
    return [(np.arange(n_train), np.arange(n_train, n_train + len(splits.val)))]


#: hyper-parameters are chosen on at most this many fitting rows (and half as many validation
#: rows) per fold, a stratified sample; the chosen model is then refit on every training row.
#: On Fashion-MNIST (48,000 fitting rows) this picks the same best cell as selecting on all rows, its test
#: accuracy within 0.04 points, in half the probe's time (README).
SELECTION_ROWS = 10_000


def stratified_sample(rows: np.ndarray, labels: np.ndarray, n: int, seed: int) -> np.ndarray:
    """At most ``n`` of ``rows``, every class in proportion and present at least once, sorted."""
    rows = np.asarray(rows)
    if n <= 0 or len(rows) <= n:
        return rows
    rng = np.random.default_rng(seed)
    classes, inverse, counts = np.unique(np.asarray(labels), return_inverse=True, return_counts=True)
    quota = np.maximum(1, np.floor(counts * n / len(rows)).astype(int))
    order = np.argsort(-(counts * n / len(rows) - np.floor(counts * n / len(rows))), kind="stable")
    for c in order[: max(0, n - int(quota.sum()))]:  # largest remainders fill up to n
        quota[c] += 1
    picked = [rng.choice(np.flatnonzero(inverse == c), size=min(q, counts[c]), replace=False)
              for c, q in enumerate(quota)]
    return np.sort(rows[np.concatenate(picked)])


def bounded_folds(folds, y_selection: np.ndarray, max_rows: int | None, seed: int) -> list[tuple[np.ndarray,
                                                                                                  np.ndarray]]:
    """The selection folds with at most ``max_rows`` fitting and ``max_rows // 2`` validation rows
    each (stratified, seeded); ``max_rows`` None or 0 keeps every row."""
    if not max_rows:
        return list(folds)
    y_selection = np.asarray(y_selection)
    return [(stratified_sample(fit, y_selection[fit], max_rows, seed),
             stratified_sample(val, y_selection[val], max(max_rows // 2, 1), seed + 1)) for fit, val in folds]


def selection_method(splits: Splits, cv: int | None) -> str:
    if len(splits.val):
        return "the dataset's own validation split"
    return f"{cv}-fold cross-validation" if cv else "stratified hold-out"


# ---------------------------------------------------------------------------- size checks


def _name(label, class_names) -> str:
    if class_names is not None and 0 <= int(label) < len(class_names):
        return repr(str(class_names[int(label)]))
    return str(int(label))


def split_shortfall(labels: np.ndarray, splits: np.ndarray, cv: int | None = None, seed: int = 0,
                    test_fraction: float = TEST_FRACTION, class_names=None) -> str | None:
    """What the protocol could not do with these labels and splits, or None when it can run.

    Computed from labels and split names only, so it runs before any image is read. Data
    without two labelled classes is left to ``assign_splits`` (its own errors).
    """
    labels = np.asarray(labels)
    names = np.asarray(splits).astype(str)
    check_split_names(names)
    keep = labels >= 0
    y, names = labels[keep], names[keep]
    classes = np.unique(y)
    if len(classes) < 2:
        return None
    rest = (names != "test") & (names != "val")
    if (names == "test").any() and (names == "val").any() and not rest.any():
        return "there is no train split (only val and test)"
    if (names == "test").any() and rest.any():
        train_y = y[rest]
    else:
        pool = y[names != "val"]
        problem = _seeded_test_shortfall(pool, classes, test_fraction, class_names)
        if problem:
            return problem
        train_y, _ = train_test_split(pool, test_size=test_fraction, random_state=seed, stratify=pool)
    counts = np.array([(train_y == c).sum() for c in classes])
    if counts.min() == 0:
        return f"class {_name(classes[counts.argmin()], class_names)} has no image in the training split"
    if (names == "val").any():
        return None
    return _selection_shortfall(counts, classes, cv, class_names)


def _seeded_test_shortfall(pool, classes, test_fraction, class_names) -> str | None:
    counts = np.array([(pool == c).sum() for c in classes])
    if counts.min() < 2:
        return (f"class {_name(classes[counts.argmin()], class_names)} has {int(counts.min())} labelled image(s); "
                "the seeded test split needs at least 2 per class (one to test, one to train)")
    n_test = math.ceil(test_fraction * len(pool))
    if n_test < len(classes):
        return (f"the seeded test split ({test_fraction:.0%} of {len(pool)} labelled images = {n_test}) is smaller "
                f"than the number of classes ({len(classes)}); every class needs an image in the test split")
    if len(pool) - n_test < len(classes):
        return (f"the training split ({len(pool) - n_test} images) is smaller than the number of classes "
                f"({len(classes)})")
    return None


def _selection_shortfall(counts, classes, cv, class_names) -> str | None:
    smallest = _name(classes[counts.argmin()], class_names)
    if cv is not None and isinstance(cv, (int, np.integer)) and cv >= 2 and counts.min() < cv:
        return (f"--cv {cv} needs {cv} training images per class; class {smallest} has {int(counts.min())}")
    if cv is None:
        problem = single_sample_class(counts, classes, class_names)
        if problem:
            return problem
        n = int(counts.sum())
        n_val = max(int(round(VALIDATION_FRACTION * n)), len(classes))
        if n - n_val < len(classes):
            return (f"the selection hold-out leaves {n - n_val} of {n} training images to fit on, fewer than the "
                    f"{len(classes)} classes")
    return None


def check_split_sizes(labels, splits, cv: int | None = None, seed: int = 0, class_names=None,
                      hint: str = "") -> None:
    """UsageError naming the short split or class, before any fit."""
    problem = split_shortfall(labels, splits, cv, seed, class_names=class_names)
    if problem:
        raise UsageError(f"Too few images for the probe protocol: {problem}. {hint}".strip())
