"""Probe benchmark: ``featx.probe`` against a plain scikit-learn script doing the same work.

The plain script is what a careful user would write by hand: the same splits (featx's
protocol functions), scikit-learn's estimators with the same grids on float64 features, a
fresh ``Pipeline(StandardScaler, clf)`` for every grid point (no warm start, one search per k),
selection on every training row, one fit at a time, default BLAS threads. Both are timed in the same
run, each in a fresh process; the ratio and the per-cell test accuracies are reported.
"""

from __future__ import annotations

import json
import time

import numpy as np


def plain_sklearn(entry_path: str, heads: list[str], seed: int = 0) -> dict:
    import h5py
    from sklearn.pipeline import Pipeline
    from sklearn.preprocessing import StandardScaler

    from featx.probing import heads as h
    from featx.probing.heads import HEADS, grid_for
    from featx.probing.protocol import assign_splits, validation_folds

    PLAIN = {"logreg": h._logreg, "linsvm": h._linsvm, "svm": h._svm, "mlp": h._mlp, "knn": h._knn}  # scikit-learn

    t0 = time.perf_counter()
    cells = {}
    with h5py.File(entry_path, "r") as f:
        ok = f["samples/ok"][()].astype(bool)
        y = f["samples/label"][()][ok]
        split = f["samples/split"].asstr()[()][ok]
        layers = json.loads(f["layers"].attrs["order"])
        splits = assign_splits(y, split, seed)
        (fit, val), = validation_folds(y[splits.train], None, seed)
        fit, val = splits.train[fit], splits.train[val]
        for layer in layers:
            X = f["layers"][layer][()][ok].astype(np.float64)  # what a hand-written script feeds scikit-learn
            for name in heads:
                head = HEADS[name]
                grid = grid_for(head, len(splits.train), X.shape[1])
                scores = []
                for params in grid:
                    pipe = Pipeline([("scaler", StandardScaler()), ("clf", PLAIN[name](len(splits.train), seed,
                                                                                       X.shape[1]))])
                    pipe.set_params(**{f"clf__{k}": v for k, v in params.items()})
                    scores.append(pipe.fit(X[fit], y[fit]).score(X[val], y[val]))
                best = grid[int(np.argmax(scores))]
                final = Pipeline([("scaler", StandardScaler()), ("clf", PLAIN[name](len(splits.train), seed,
                                                                                    X.shape[1]))])
                final.set_params(**{f"clf__{k}": v for k, v in best.items()})
                final.fit(X[splits.train], y[splits.train])
                cells[f"{layer}/{name}"] = {"params": best, "test_top1": float(final.score(X[splits.test],
                                                                                           y[splits.test]))}
    return {"seconds": time.perf_counter() - t0, "cells": cells}


def featx_probe(entry_path: str, heads: list[str], seed: int = 0) -> dict:
    import featx

    t0 = time.perf_counter()
    res = featx.probe(entry_path, heads=",".join(heads), seed=seed, out_dir=False, progress=False)
    cells = {f"{r['layer']}/{r['head']}": {"params": r["params"], "test_top1": r["test_top1"]} for r in res.rows}
    return {"seconds": time.perf_counter() - t0, "cells": cells, "jobs": res.protocol["jobs"]}


def ensure_entry(image_size: int, limit: int | None, pool: str = "avg") -> str:
    import featx

    entry = featx.extract("fashion-mnist", image_size=image_size, limit=limit, pool=pool, progress=False)
    return str(entry.path)


def case_probe_vs_plain(run, image_size: int, limit: int | None, heads: list[str]) -> dict:
    path = run(ensure_entry, image_size, limit)
    plain = run(plain_sklearn, path, heads)
    ours = run(featx_probe, path, heads)
    diffs = {k: ours["cells"][k]["test_top1"] - plain["cells"][k]["test_top1"] for k in plain["cells"]}
    best_plain = max(v["test_top1"] for v in plain["cells"].values())
    best_ours = max(v["test_top1"] for v in ours["cells"].values())
    return {
        "entry": path, "image_size": image_size, "limit": limit, "heads": heads,
        "plain_seconds": plain["seconds"], "featx_seconds": ours["seconds"], "jobs": ours["jobs"],
        "speedup": plain["seconds"] / ours["seconds"], "target": ">= 3x at equal accuracy (within 0.3 points)",
        "max_abs_accuracy_difference": max(abs(d) for d in diffs.values()),
        "best_test_top1": {"plain": best_plain, "featx": best_ours},
        "cells": {k: {"plain": plain["cells"][k], "featx": ours["cells"][k]} for k in plain["cells"]},
    }


def featx_probe_rows(entry_path: str, heads: list[str], selection_rows: int, seed: int = 0) -> dict:
    import featx

    t0 = time.perf_counter()
    res = featx.probe(entry_path, heads=",".join(heads), seed=seed, out_dir=False, progress=False,
                      selection_rows=selection_rows)
    cells = {f"{r['layer']}/{r['head']}": {"params": r["params"], "test_top1": r["test_top1"],
                                           "val_top1": r["val_top1"]} for r in res.rows}
    return {"seconds": time.perf_counter() - t0, "cells": cells, "best": f"{res.best['layer']}/{res.best['head']}",
            "best_test_top1": res.best["test_top1"], "selection_rows": res.protocol["selection_rows"]}


def case_selection(run, entry_path: str, heads: list[str], sizes=(0, 10_000, 5_000), measured=None) -> dict:
    """Hyper-parameters chosen on a bounded sample of the training rows against all of them (0):
    the chosen cells, their test accuracy, and the probe time. ``measured``: {size: result} already
    taken on this entry (e.g. by the ``featx run`` case, whose probe used the default size)."""
    out = {size: run(featx_probe_rows, entry_path, heads, size) for size in sizes}
    out.update(measured or {})
    full = out[0]
    compared = {}
    for size, res in out.items():
        if size == 0:
            continue
        diffs = {k: res["cells"][k]["test_top1"] - full["cells"][k]["test_top1"] for k in full["cells"]}
        compared[str(size)] = {
            "seconds": round(res["seconds"], 1), "speedup": round(full["seconds"] / res["seconds"], 2),
            "best": res["best"], "same_best_cell": res["best"] == full["best"],
            "best_test_top1_difference": round(res["best_test_top1"] - full["best_test_top1"], 4),
            "same_params": sum(res["cells"][k]["params"] == full["cells"][k]["params"] for k in full["cells"]),
            "cells": len(full["cells"]), "max_abs_cell_difference": round(max(abs(d) for d in diffs.values()), 4),
            "selection_rows": res["selection_rows"],
        }
    return {"entry": entry_path, "heads": heads, "full_seconds": round(full["seconds"], 1), "full_best": full["best"],
            "full_best_test_top1": full["best_test_top1"], "bounded": compared,
            "target": "same best cell, test top-1 within 0.3 points of selecting on every row",
            "cells": {str(size): res["cells"] for size, res in out.items()}}
