"""Learning curves from cached features: how many labelled images per class does a head need?

For each level of ``k`` labelled training rows per class (and all of them), a head with fixed
hyper-parameters is fitted on seeded draws of the training rows and scored once on the test
rows. The curve reports test accuracy against labels per class, so it is a report only: it
never chooses anything (the hyper-parameters come from the probe's validation-based
selection), and no decision may be taken on its test numbers.
"""

from __future__ import annotations

import math
import warnings
from contextlib import nullcontext

import numpy as np
from sklearn.exceptions import ConvergenceWarning
from threadpoolctl import threadpool_limits

from ..errors import DataError, UsageError
from .engines import array_api, device_type, to_device, torch_threads
from .fit import evaluate
from .heads import Head, resolve_heads

ALL = "all"
SHOTS_FORM = "positive integers (labelled images per class) and 'all', comma-separated, e.g. '1,5,10,50,all'"


def parse_shots(text: str) -> tuple[int | None, ...]:
    """``"1,5,10,50,all"`` -> ``(1, 5, 10, 50, None)``: ascending, each once, ``None`` (all rows) last."""
    pieces = [p.strip().lower() for p in str(text).split(",")]
    if not any(pieces):
        raise UsageError(f"No shots given ({text!r}). Valid: {SHOTS_FORM}.")
    counts, everything = set(), False
    for piece in pieces:
        if piece == ALL:
            everything = True
            continue
        try:
            k = int(piece)
        except ValueError:
            raise UsageError(f"Shots {text!r}: {piece!r} is not a number of images per class. "
                             f"Valid: {SHOTS_FORM}.") from None
        if k <= 0:
            raise UsageError(f"Shots {text!r}: {k} images per class trains nothing. Valid: {SHOTS_FORM}.")
        counts.add(k)
    return (*sorted(counts), *((None,) if everything else ()))


def _check_shots(shots) -> None:
    if shots is None:
        return
    if isinstance(shots, bool) or not isinstance(shots, (int, np.integer)) or shots <= 0:
        raise UsageError(f"Shots must be a positive integer or None (all rows), got {shots!r}.")


def shot_rows(y, train_rows, shots: int | None, seed: int) -> np.ndarray:
    """``shots`` rows of every class among ``train_rows`` (indices into ``y``), sorted.

    Each class's rows are put in a seeded random order and the first ``shots`` taken (a class
    with fewer gives all it has), so for one seed the rows for k shots are among those for any
    larger k: a curve's steps add labels rather than swapping them. ``None``: every row.
    """
    _check_shots(shots)
    train_rows = np.asarray(train_rows)
    if shots is None:
        return train_rows.copy()
    labels = np.asarray(y)[train_rows]
    rng = np.random.default_rng(seed)
    picked = [rng.permutation(train_rows[labels == c])[:shots] for c in np.unique(labels)]
    return np.sort(np.concatenate(picked)) if picked else train_rows[:0].copy()


def _applicable_params(clf, params: dict, y_fit: np.ndarray) -> tuple[dict, list[str]]:
    """``params`` adapted to a training set of ``len(y_fit)`` rows, with a note for each change.

    A neighbour count above the number of rows becomes that number; a parameter named for
    another size variant of the head (``svm__C`` for the exact SVM's ``C``) is renamed; early
    stopping is switched off when its stratified hold-out cannot hold every class.
    """
    n_fit = len(y_fit)
    valid = clf.get_params(deep=True)
    out, notes = {}, []
    for key, value in params.items():
        if key not in valid:
            same = [v for v in valid if v.split("__")[-1] == key.split("__")[-1]]
            if len(same) != 1:
                raise UsageError(f"Parameter {key!r} does not apply to {type(clf).__name__}. "
                                 f"Valid: {', '.join(sorted(valid))}.")
            notes.append(f"{key} applied as {same[0]} ({n_fit} training rows)")
            key = same[0]
        smallest = int(np.bincount(np.unique(y_fit, return_inverse=True)[1]).min())
        if key.split("__")[-1] == "n_neighbors" and value > smallest:
            # more neighbours than a class has rows outvotes it by construction (at 1 shot every vote ties)
            notes.append(f"n_neighbors {value} clamped to {smallest} (the smallest class has {smallest} "
                         "training rows)")
            value = smallest
        out[key] = value
    early = {**valid, **out}
    if early.get("early_stopping") and not _hold_out_fits(y_fit, early.get("validation_fraction", 0.1)):
        out["early_stopping"] = False
        notes.append(f"early stopping off: its {early.get('validation_fraction', 0.1):g} hold-out of "
                     f"{n_fit} training rows cannot hold every class")
    return out, notes


def _hold_out_fits(y_fit: np.ndarray, fraction: float) -> bool:
    """Whether a stratified hold-out of ``fraction`` leaves every class on both sides (and 2+ rows)."""
    _, counts = np.unique(y_fit, return_counts=True)
    n = len(y_fit)
    n_val = math.ceil(fraction * n)
    return counts.min() >= 2 and n_val >= max(2, len(counts)) and n - n_val >= len(counts)


def _fit_and_score(head: Head, X, y, rows, test_rows, params, seed, n_classes, device) -> tuple[float, list[str]]:
    engine = head.engine(device)
    on_device = engine.arrays == "torch"
    model = head.pipeline(len(rows), seed, None, device, X.shape[1])
    clf = model.named_steps["clf"]
    applied, notes = _applicable_params(clf, params, y[rows])
    clf.set_params(**applied)
    X_fit, y_fit, X_test = X[rows], y[rows], X[test_rows]
    if on_device:
        X_fit, y_fit, X_test = (to_device(a, device) for a in (X_fit, y_fit, X_test))
    with array_api(on_device):
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always", ConvergenceWarning)
            model.fit(X_fit, y_fit)
        if any(issubclass(w.category, ConvergenceWarning) for w in caught):
            notes.append("did not converge")
        metrics, _ = evaluate(model, X_test, y[test_rows], n_classes, seed)
    return float(metrics["test_top1"]), notes


def learning_curve(X, y, train_rows, test_rows, head, params: dict, shots, seeds: int, n_classes: int,
                   device: str = "cpu") -> dict:
    """Test accuracy of ``head`` with fixed ``params`` at each level of ``shots`` per class.

    ``shots``: a tuple as from :func:`parse_shots` (or its text); ``None``/"all" uses every
    training row once, other levels are drawn with seeds ``0 .. seeds-1``. ``std`` is over the
    seeds (population, 0 for one seed). A report, never a selection: the test rows are scored,
    so nothing may be chosen by these numbers.
    """
    if isinstance(shots, str):
        shots = parse_shots(shots)
    shots = [None if isinstance(k, str) and k.strip().lower() == ALL else k for k in shots]
    for k in shots:
        _check_shots(k)
    if isinstance(seeds, bool) or not isinstance(seeds, (int, np.integer)) or seeds < 1:
        raise UsageError(f"seeds must be a positive integer (how many draws per level), got {seeds!r}.")
    head = resolve_heads([head])[0]
    params = dict(params or {})
    y = np.asarray(y)
    train_rows, test_rows = np.asarray(train_rows), np.asarray(test_rows)
    if len(test_rows) == 0:
        raise DataError("A learning curve needs test rows to score; none were given.")
    if len(np.unique(y[train_rows])) < 2:
        raise DataError("A learning curve needs training rows of at least two classes.")

    torch_budget = torch_threads(1) if device_type(device) in head.engine(device).torch_on else nullcontext()
    points, notes = [], []
    with threadpool_limits(limits=1), torch_budget:
        for k in dict.fromkeys(shots):
            level = ALL if k is None else k
            where = "all training rows" if k is None else f"{k} shot(s) per class"
            scores = []
            for seed in range(1 if k is None else int(seeds)):
                rows = shot_rows(y, train_rows, k, seed)
                score, fit_notes = _fit_and_score(head, X, y, rows, test_rows, params, seed, n_classes, device)
                scores.append(score)
                for note in fit_notes:
                    note = f"{where}: {note}"
                    if note not in notes:
                        notes.append(note)
            points.append({"shots": level, "n_train": int(len(rows)), "test_top1": scores,
                           "mean": float(np.mean(scores)), "std": float(np.std(scores)),
                           "min": float(np.min(scores)), "max": float(np.max(scores))})
    return {"head": head.name, "params": _plain(params), "seeds": list(range(int(seeds))), "points": points,
            "notes": notes}


def _plain(params: dict) -> dict:
    return {k: (v.item() if hasattr(v, "item") else v) for k, v in params.items()}
