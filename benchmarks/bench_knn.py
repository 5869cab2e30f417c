"""k-NN probe benchmark: featx's device engine against scikit-learn's cosine brute force.

Both score the k-NN head's grid the way the probe does (one neighbour search at the largest
k, every k voted from it), on the same standardised float32 features, with the same thread
budget, each in a fresh process in the same run. scikit-learn is timed on float32 input (what
the probe passes it today: float32 distances) and on float64 input (the answers the engine
reproduces). Reported per thread budget and repetition (ratios only mean something within one
repetition: the machine may be shared): the seconds, the speed ratios, how many predictions
differ from each, how many queries needed scikit-learn's rule on their whole row of distances
(equal distances at the k-th place) at each k, and whether the CPU has bfloat16 dot products (the
engine screens in bfloat16 there, in a process that has torch loaded). The engine is timed twice:
with torch loaded (a user's session) and in a torch-free process (a probe worker).

Features: one layer of a featx cache entry (the train rows are searched, the test rows are the
queries) or, without one, a synthetic clustered set of 60,000 x 448 float32 rows in 10 classes
and 10,000 queries. ``python -m benchmarks.bench_knn [--entry PATH [--layer NAME]] [--threads 1 2]
[--repeat 2] [--quick]`` runs it alone.
"""

from __future__ import annotations

import argparse
import json
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np

KS = (1, 5, 10, 20, 50)  # the knn head's grid in featx.probing.heads


def synthetic_features(out_dir: str, n_fit: int = 60_000, n_query: int = 10_000, dim: int = 448, n_classes: int = 10,
                       seed: int = 0) -> str:
    """Classes of four overlapping sub-clusters in a 32-dimensional latent space, mapped linearly to
    ``dim`` features plus noise: low intrinsic dimension like real features, and a k-NN accuracy
    in the 80s (at 60,000 rows), so that votes are contested."""
    rng = np.random.default_rng(seed)
    latent, n = 32, n_fit + n_query
    centres = 0.5 * rng.normal(size=(n_classes, latent))
    modes = centres.repeat(4, axis=0) + 0.25 * rng.normal(size=(4 * n_classes, latent))
    mode = rng.integers(0, len(modes), n)
    projection = rng.normal(size=(latent, dim)) / np.sqrt(latent)
    X = ((modes[mode] + rng.normal(size=(n, latent))) @ projection + rng.normal(size=(n, dim))).astype(np.float32)
    return _save(out_dir, X[:n_fit], mode[:n_fit] // 4, X[n_fit:], mode[n_fit:] // 4)


def entry_features(out_dir: str, entry_path: str, layer: str | None = None, seed: int = 0) -> str:
    """One layer of a cache entry, train rows against test rows (the last layer unless named)."""
    from .entries import entry_layer

    X, y, splits, layer = entry_layer(entry_path, layer, seed)
    return _save(out_dir, X[splits.train], y[splits.train], X[splits.test], y[splits.test], layer=layer)


def _save(out_dir, X_fit, y_fit, X_query, y_query, **meta) -> str:
    """Standardised on the searched rows, as the probe's pipeline does (float32 stays float32)."""
    from sklearn.preprocessing import StandardScaler

    scaler = StandardScaler().fit(X_fit)
    path = Path(out_dir) / "features.npz"
    np.savez(path, X_fit=scaler.transform(X_fit), y_fit=y_fit, X_query=scaler.transform(X_query), y_query=y_query,
             meta=json.dumps({"n_fit": len(X_fit), "n_query": len(X_query), "dim": X_fit.shape[1], **meta}))
    return str(path)


def _load(path: str, dtype) -> tuple:
    data = np.load(path)
    return (data["X_fit"].astype(dtype), data["y_fit"], data["X_query"].astype(dtype), data["y_query"],
            json.loads(str(data["meta"])))


def sklearn_grid(path: str, ks, dtype: str, threads: int) -> dict:
    """featx's knn_score_grid, returning the predictions for every k instead of their accuracy."""
    from sklearn.neighbors import KNeighborsClassifier
    from threadpoolctl import threadpool_limits

    X_fit, y_fit, X_query, y_query, _ = _load(path, np.dtype(dtype))
    with threadpool_limits(limits=threads):
        t0 = time.perf_counter()
        k_max = min(max(ks), len(X_fit))
        model = KNeighborsClassifier(n_neighbors=k_max, metric="cosine", algorithm="brute").fit(X_fit, y_fit)
        labels = np.searchsorted(model.classes_, y_fit)[model.kneighbors(X_query, return_distance=False)]
        predictions = []
        for k in ks:
            votes = np.zeros((len(X_query), len(model.classes_)), dtype=np.int32)
            rows = np.repeat(np.arange(len(X_query)), min(k, k_max))
            np.add.at(votes, (rows, labels[:, : min(k, k_max)].ravel()), 1)
            predictions.append(model.classes_[votes.argmax(axis=1)])
        seconds = time.perf_counter() - t0
    return {"seconds": seconds, "predictions": np.array(predictions), "y_query": y_query}


def engine_grid(path: str, ks, threads: int, device: str, torch_loaded: bool = True) -> dict:
    """featx.probing.knn.grid_predictions, timed: all that score_grid does but the accuracy.

    ``torch_loaded``: torch imported first (untimed, as in a session that uses it); else the process stays
    as a probe worker is, torch-free unless the engine imports it (then the import is in the time)."""
    torch_import = None
    if torch_loaded:
        t0 = time.perf_counter()
        import torch

        torch_import = time.perf_counter() - t0
        torch.set_num_threads(threads)
    import sys

    from threadpoolctl import threadpool_limits

    from featx.probing import knn

    X_fit, y_fit, X_query, y_query, _ = _load(path, np.float32)
    with threadpool_limits(limits=threads):
        t0 = time.perf_counter()
        predictions, deferred = knn.grid_predictions(X_fit, y_fit, X_query, ks, device=device)
        seconds = time.perf_counter() - t0
    scores = [float(np.mean(p == y_query)) for p in predictions]
    return {"seconds": seconds, "predictions": np.array(predictions), "scores": scores, "deferred_queries": deferred,
            "torch_import_seconds": torch_import, "native_bfloat16": device == "cpu" and knn._native_bfloat16(),
            "torch_loaded_after": "torch" in sys.modules}


def case_knn(run, entry_path: str | None = None, ks=KS, threads: int = 2, device: str = "cpu",
             n_fit: int = 60_000, n_query: int = 10_000, layer: str | None = None) -> dict:
    """One comparison at one thread budget (``benchmarks.run``'s k-NN suite)."""
    result = case_knn_runs(run, entry_path, layer, ks, (threads,), 1, device, n_fit, n_query)
    return {key: value for key, value in result.items() if key != "runs"} | result["runs"][0]


def case_knn_runs(run, entry_path: str | None = None, layer: str | None = None, ks=KS, threads=(1, 2),
                  repeat: int = 2, device: str = "cpu", n_fit: int = 60_000, n_query: int = 10_000) -> dict:
    """``repeat`` comparisons at each thread budget, on features prepared once."""
    out_dir = tempfile.mkdtemp(prefix="featx-bench-knn-")
    try:
        if entry_path:
            path = run(entry_features, out_dir, entry_path, layer)
        else:
            path = run(synthetic_features, out_dir, n_fit, n_query)
        meta = _load(path, np.float32)[-1]
        runs = [_compare(run, path, ks, n_threads, device) for n_threads in threads for _ in range(repeat)]
    finally:
        shutil.rmtree(out_dir, ignore_errors=True)
    return {"features": "entry" if entry_path else "synthetic", "entry": entry_path, **meta, "ks": list(ks),
            "device": device, "summary": _summary(runs, ks), "runs": runs}


def _summary(runs: list[dict], ks) -> dict:
    """Per thread budget, each repetition's ratios (never mixed across repetitions) and what all of them share."""
    out = {}
    for n_threads in dict.fromkeys(r["threads"] for r in runs):
        mine = [r for r in runs if r["threads"] == n_threads]
        out[f"{n_threads}_threads"] = {
            "speedup_vs_float64": [round(r["speedup_vs_float64"], 2) for r in mine],
            "speedup_vs_float32": [round(r["speedup"], 2) for r in mine],
            "featx_seconds": [round(r["featx_seconds"], 2) for r in mine],
            "identical_to_sklearn_float64": all(r["identical_to_sklearn_float64"] for r in mine),
            "torch_free_process_speedup_vs_float64": [round(r["torch_free_process"]["speedup_vs_float64"], 2)
                                                      for r in mine],
            "queries_on_whole_rows_at_largest_k": [r["queries_on_whole_rows"][str(max(ks))] for r in mine],
        }
    return out


def _compare(run, path: str, ks, threads: int, device: str) -> dict:
    """scikit-learn (float32, float64) and the engine, one after the other, each in a fresh process."""
    sk32 = run(sklearn_grid, path, ks, "float32", threads)
    sk64 = run(sklearn_grid, path, ks, "float64", threads)
    ours = run(engine_grid, path, ks, threads, device)
    worker = run(engine_grid, path, ks, threads, device, False)
    y = sk32["y_query"]

    def per_k(values):
        return {str(k): v for k, v in zip(ks, values)}

    return {
        "threads": threads,
        "sklearn_float32_seconds": sk32["seconds"], "sklearn_float64_seconds": sk64["seconds"],
        "featx_seconds": ours["seconds"], "featx_torch_import_seconds": ours["torch_import_seconds"],
        "speedup": sk32["seconds"] / ours["seconds"],
        "speedup_vs_float64": sk64["seconds"] / ours["seconds"],
        "identical_to_sklearn_float64": bool(np.array_equal(ours["predictions"], sk64["predictions"])),
        "differ_from_sklearn_float64": per_k(int(n) for n in (ours["predictions"] != sk64["predictions"]).sum(1)),
        "differ_from_sklearn_float32": per_k(int(n) for n in (ours["predictions"] != sk32["predictions"]).sum(1)),
        "queries_on_whole_rows": per_k(ours["deferred_queries"]),
        "cpu_native_bfloat16": ours["native_bfloat16"],
        # the engine as a probe worker runs it: no torch loaded beforehand (bfloat16 screen only for huge searches)
        "torch_free_process": {
            "featx_seconds": worker["seconds"], "imported_torch": worker["torch_loaded_after"],
            "speedup_vs_float64": sk64["seconds"] / worker["seconds"], "speedup": sk32["seconds"] / worker["seconds"],
            "identical_to_sklearn_float64": bool(np.array_equal(worker["predictions"], sk64["predictions"]))},
        "accuracy": {"featx": per_k(ours["scores"]),
                     "sklearn_float32": per_k(float(np.mean(p == y)) for p in sk32["predictions"]),
                     "sklearn_float64": per_k(float(np.mean(p == y)) for p in sk64["predictions"])},
    }


def main(argv=None) -> None:
    from .run import isolated

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--entry", help="A featx cache entry (.h5); default: synthetic features.")
    parser.add_argument("--layer", help="The entry's layer to search (default: its last).")
    parser.add_argument("--quick", action="store_true", help="12,000 x 2,000 rows instead of 60,000 x 10,000.")
    parser.add_argument("--threads", type=int, nargs="+", default=[1, 2],
                        help="Thread budgets, the same for scikit-learn and the engine (default: 1 2).")
    parser.add_argument("--repeat", type=int, default=2, help="Comparisons per thread budget (default: 2).")
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args(argv)
    if args.layer and not args.entry:
        parser.error("--layer needs --entry")
    sizes = (12_000, 2_000) if args.quick else (60_000, 10_000)
    result = case_knn_runs(isolated, args.entry, args.layer, threads=args.threads, repeat=args.repeat,
                           device=args.device, n_fit=sizes[0], n_query=sizes[1])
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
