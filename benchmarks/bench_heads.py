"""Two of the probe's per-head shortcuts against the plain way, on one entry's real features.

- ``svm_one_kernel``: the exact RBF SVM's selection over C from one kernel matrix per fold
  (``featx.probing.kernel_svm``) against libsvm fitting ``SVC(kernel="rbf")`` once per C, on the
  same standardised float32 rows of one fold, one thread each (a probe worker's budget).
- ``logreg_warm_refit``: logistic regression's refit on every training row started from the
  solution selection found at the chosen C, against a cold refit, layer by layer: seconds,
  L-BFGS iterations and test top-1 of both.

Each side runs in a fresh process in the same benchmark run; ratios are the figures.
Standalone: ``python -m benchmarks.bench_heads ENTRY [--layer NAME] [--case svm|logreg]``.
"""

from __future__ import annotations

import argparse
import json
import time

import numpy as np


def _layer_fold(entry_path: str, layer: str, seed: int = 0, selection_rows: int | None = None):
    """One layer (float32), its labels, the probe's splits and first selection fold (rows of the entry)."""
    from featx.probing.protocol import bounded_folds, selection_folds

    from .entries import entry_layer

    X, y, splits, _ = entry_layer(entry_path, layer, seed)
    folds = bounded_folds(selection_folds(splits, y, None, seed), y[splits.selection_rows], selection_rows, seed)
    fit, val = folds[0]
    return X, y, splits, splits.selection_rows[fit], splits.selection_rows[val]


def _standardised(X_fit, *others):
    from sklearn.preprocessing import StandardScaler

    scaler = StandardScaler().fit(X_fit)
    return [scaler.transform(a) for a in (X_fit, *others)]


def svm_grid_side(entry_path: str, layer: str, one_kernel: bool) -> dict:
    from sklearn.svm import SVC
    from threadpoolctl import threadpool_limits

    from featx.probing.heads import HEADS, grid_for
    from featx.probing.kernel_svm import precomputed_grid_predictions

    X, y, splits, fit, val = _layer_fold(entry_path, layer)
    X_fit, X_val = _standardised(X[fit], X[val])
    grid = grid_for(HEADS["svm"], len(splits.train), X.shape[1])
    with threadpool_limits(limits=1):
        t0 = time.perf_counter()
        if one_kernel:
            predictions = precomputed_grid_predictions(X_fit, y[fit], X_val, grid)
            if predictions is None:
                raise RuntimeError(f"the one-kernel path declined this grid or size: {grid}, {X_fit.shape}")
        else:
            predictions = [SVC(kernel="rbf", gamma="scale", **params).fit(X_fit, y[fit]).predict(X_val)
                           for params in grid]
        seconds = time.perf_counter() - t0
    scores = [float(np.mean(p == y[val])) for p in predictions]
    return {"seconds": seconds, "grid": grid, "scores": scores, "predictions": np.array(predictions),
            "chosen": grid[int(np.argmax(scores))], "fit_rows": int(len(fit)), "val_rows": int(len(val)),
            "width": int(X.shape[1])}


def _layers(entry_path: str) -> list[str]:
    import h5py

    with h5py.File(entry_path, "r") as f:
        return json.loads(f["layers"].attrs["order"])


def case_svm_one_kernel(run, entry_path: str, layer: str | None = None) -> dict:
    """On one layer (default: the entry's last, the widest of an avg-pooled ladder)."""
    layer = layer or _layers(entry_path)[-1]
    libsvm = run(svm_grid_side, entry_path, layer, False)
    ours = run(svm_grid_side, entry_path, layer, True)
    agree = (ours["predictions"] == libsvm["predictions"]).mean(axis=1)
    return {
        "entry": entry_path, "layer": layer, "fit_rows": ours["fit_rows"], "val_rows": ours["val_rows"],
        "width": ours["width"], "grid": ours["grid"],
        "libsvm_per_C_seconds": round(libsvm["seconds"], 2), "one_kernel_seconds": round(ours["seconds"], 2),
        "speedup": round(libsvm["seconds"] / ours["seconds"], 2),
        "chosen": {"libsvm_per_C": libsvm["chosen"], "one_kernel": ours["chosen"]},
        "same_choice": libsvm["chosen"] == ours["chosen"],
        "val_top1": {"libsvm_per_C": libsvm["scores"], "one_kernel": ours["scores"]},
        "identical_val_predictions_per_C": [round(float(a), 5) for a in agree],
    }


def logreg_refit_side(entry_path: str, layers: list[str], warm: bool) -> dict:
    """Per layer: selection as the probe runs it (bounded sample, warm path over C), then the refit
    on every training row timed alone, cold or from selection's solution."""
    import warnings

    from sklearn.base import clone
    from sklearn.exceptions import ConvergenceWarning
    from threadpoolctl import threadpool_limits

    from featx.probing.fit import _start_from, select
    from featx.probing.heads import HEADS
    from featx.probing.protocol import SELECTION_ROWS

    head = HEADS["logreg"]
    out = {}
    for layer in layers:
        X, y, splits, fit, val = _layer_fold(entry_path, layer, selection_rows=SELECTION_ROWS)
        with threadpool_limits(limits=1):
            chosen = select(head, X, y, [(fit, val)], seed=0, n_rows=len(splits.train))
            model = head.pipeline(len(splits.train), 0, chosen.params, "cpu", X.shape[1])
            X_train, X_test = _standardised(X[splits.train], X[splits.test])
            clf = clone(model.named_steps["clf"])
            if warm:
                _start_from(clf, chosen.start, y[splits.train])
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", ConvergenceWarning)
                t0 = time.perf_counter()
                clf.fit(X_train, y[splits.train])
                seconds = time.perf_counter() - t0
        out[layer] = {"params": chosen.params, "refit_seconds": round(seconds, 2), "iterations": int(clf.n_iter_[0]),
                      "test_top1": float(np.mean(clf.predict(X_test) == y[splits.test])),
                      "test_pred": clf.predict(X_test)}
    return out


def case_logreg_warm_refit(run, entry_path: str, layers: list[str] | None = None) -> dict:
    layers = layers or _layers(entry_path)
    cold = run(logreg_refit_side, entry_path, layers, False)
    warm = run(logreg_refit_side, entry_path, layers, True)
    cells = {}
    for layer in layers:
        c, w = cold[layer], warm[layer]
        cells[layer] = {"C": c["params"].get("C"), "same_C": c["params"] == w["params"],
                        "seconds": {"cold": c["refit_seconds"], "warm": w["refit_seconds"]},
                        "iterations": {"cold": c["iterations"], "warm": w["iterations"]},
                        "test_top1": {"cold": c["test_top1"], "warm": w["test_top1"]},
                        "identical_test_predictions": round(float(np.mean(c["test_pred"] == w["test_pred"])), 5)}
    total_cold = sum(v["seconds"]["cold"] for v in cells.values())
    total_warm = sum(v["seconds"]["warm"] for v in cells.values())
    return {"entry": entry_path, "refit_seconds": {"cold": round(total_cold, 1), "warm": round(total_warm, 1)},
            "speedup": round(total_cold / total_warm, 2),
            "max_abs_test_top1_difference": max(abs(v["test_top1"]["cold"] - v["test_top1"]["warm"])
                                                for v in cells.values()),
            "cells": cells}


def mlp_cells_side(entry_path: str, layers: list[str], large_batch: int) -> dict:
    """Whole MLP cells (bounded selection, refit, test) with ``large_batch`` rows per Adam step on
    large sets, one job, as the probe runs them."""
    from featx.probing import heads
    from featx.probing.runner import probe

    heads.MLP_LARGE_BATCH = large_batch
    t0 = time.perf_counter()
    result = probe(entry_path, heads="mlp", layers=layers, jobs=1, backend="threading", plots=False, progress=False)
    seconds = time.perf_counter() - t0
    return {"seconds": round(seconds, 1), "cells": {r["layer"]: {"fit_seconds": r["fit_seconds"], "params": r["params"],
                                                                 "test_top1": r["test_top1"]} for r in result.rows}}


def case_mlp_batch(run, entry_path: str, layers=("blocks.4", "pre_logits"), rounds: int = 2) -> dict:
    """scikit-learn's 200 rows per Adam step against featx's 400 on the main job's entry, alternating."""
    sides = [(batch, run(mlp_cells_side, entry_path, list(layers), batch))
             for _ in range(rounds) for batch in (200, 400)]
    return {"entry": entry_path, "layers": list(layers),
            "seconds": {str(b): [r["seconds"] for bb, r in sides if bb == b] for b in (200, 400)},
            "speedups": [round(sides[i][1]["seconds"] / sides[i + 1][1]["seconds"], 2)
                         for i in range(0, len(sides), 2)],
            "runs": [{"batch": b, **r} for b, r in sides]}


def main(argv=None) -> None:
    from .run import isolated

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("entry", help="A featx cache entry (.h5).")
    parser.add_argument("--layer", help="svm: the layer (default: the entry's last); logreg: one layer only.")
    parser.add_argument("--case", choices=("svm", "logreg"), default="svm")
    args = parser.parse_args(argv)
    if args.case == "svm":
        result = case_svm_one_kernel(isolated, args.entry, args.layer)
    else:
        result = case_logreg_warm_refit(isolated, args.entry, [args.layer] if args.layer else None)
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
