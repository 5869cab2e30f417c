"""Run the benchmarks and write JSON results: ``python -m benchmarks.run [--quick] [--only NAME]``.

Every case runs its measurements in fresh processes, one at a time, and reports ratios of
timings taken in the same run (machines are noisy; absolute seconds are kept for context).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import multiprocessing as mp
import os
import platform
import sys
import time
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results"


def _child(fn, args, kwargs, queue):
    try:
        queue.put(("ok", fn(*args, **kwargs)))
    except BaseException as exc:  # reported in the parent
        queue.put(("error", f"{type(exc).__name__}: {exc}"))


def isolated(fn, *args, env: dict | None = None, **kwargs):
    """Call ``fn`` in a fresh process (spawned: no inherited thread pools or heap).

    ``env`` is set for the child only, before it imports anything (e.g. OMP_WAIT_POLICY).
    """
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    proc = ctx.Process(target=_child, args=(fn, args, kwargs, queue))
    saved = {k: os.environ.get(k) for k in env or {}}
    os.environ.update(env or {})
    try:
        proc.start()
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
    status, value = queue.get()
    proc.join()
    if status != "ok":
        raise RuntimeError(value)
    return value


def machine() -> dict:
    """What the figures were measured on: the numpy heads' BLAS kernels included (a pinned
    OPENBLAS_CORETYPE changes the probe's speed, not the forward pass's)."""
    import torch

    from featx._blas import blas_in_use

    return {"python": platform.python_version(), "torch": torch.__version__, "cpus": len(os.sched_getaffinity(0)),
            "platform": platform.platform(), "cuda": torch.cuda.is_available(), "blas": blas_in_use()}


def extract_suite(quick: bool) -> dict:
    from . import bench_extract as b
    from . import bench_floor

    n = 1000 if quick else 4000
    cases = {
        "floor_96px": lambda: bench_floor.case_floor(isolated, 2000 if quick else 10_000, 96),
        "overhead_96px": lambda: b.case_overhead(isolated, n, 96),
        "overhead_224px": lambda: b.case_overhead(isolated, n // 2, 224),
        "one_pass_vs_per_layer": lambda: b.case_one_pass(isolated, n // 2, 96),
        "cache_hit_vs_cold": lambda: b.case_cache_hit(isolated, n, 96),
        "peak_memory": lambda: b.case_memory(isolated, (n // 2, 4 * n), 64),
        "cpu_settings_96px": lambda: b.case_cpu(isolated, n // 2, 96),
        "cpu_settings_224px": lambda: b.case_cpu(isolated, n // 4, 224),
    }
    return cases


def probe_suite(quick: bool) -> dict:
    from . import bench_heads
    from . import bench_probe as b

    heads = ["logreg", "linsvm", "knn", "mlp", "svm"]
    return {
        "probe_vs_plain_sklearn": lambda: b.case_probe_vs_plain(isolated, 96, 3000 if quick else 14000, heads),
        "probe_vs_plain_sklearn_full": lambda: b.case_probe_vs_plain(isolated, 96, 5000 if quick else None,
                                                                     ["logreg", "knn"]),
        "svm_one_kernel": lambda: bench_heads.case_svm_one_kernel(
            isolated, isolated(b.ensure_entry, 96, 3000 if quick else 14000)),
    }


def startup_suite(quick: bool) -> dict:
    from . import bench_startup as b

    baseline = os.environ.get("FEATX_BENCH_BASELINE", "HEAD")  # a git revision to compare this tree with
    return {"cache_ls": lambda: b.case_cache_ls(baseline, 3 if quick else 5)}


def knn_suite(quick: bool) -> dict:
    from . import bench_knn as b

    n_fit, n_query = (12_000, 2_000) if quick else (60_000, 10_000)
    cases = {
        "knn_engine_vs_sklearn": lambda: b.case_knn(isolated, threads=2, n_fit=n_fit, n_query=n_query),
        "knn_engine_vs_sklearn_1thread": lambda: b.case_knn(isolated, threads=1, n_fit=n_fit, n_query=n_query),
    }
    # real features too: a featx cache entry (.h5), else the run suite's Fashion-MNIST entry if it was built
    entry = os.environ.get("FEATX_BENCH_KNN_ENTRY")
    if entry is None:
        with contextlib.suppress(RuntimeError):
            entry = _entry_in(Path(__file__).resolve().parents[1] / "cache" / "bench-run")
    for layer in ("blocks.4", "pre_logits") if entry and not quick else ():
        cases[f"knn_{layer}"] = lambda layer=layer: b.case_knn(isolated, entry, threads=2, layer=layer)
    return cases


def _entry_in(cache_dir: Path) -> str:
    entries = sorted(cache_dir.glob("*.h5"))
    if len(entries) != 1:
        raise RuntimeError(f"expected the one entry of the run case in {cache_dir}, found {len(entries)}: run it first")
    return str(entries[0])


def run_suite(quick: bool) -> dict:
    """The main job (``featx run``) against the hardware, then what its probe chose against
    selecting on every row, on the entry that run built."""
    from . import bench_heads
    from . import bench_probe as p
    from . import bench_run as b

    cache = Path(__file__).resolve().parents[1] / "cache" / "bench-run"

    def selection():
        """Full selection against the run case's probe (the default bounded selection, same entry)."""
        done = json.loads((RESULTS / "run.json").read_text())["run_vs_floor"]["run"]
        if Path(done["entry"]).resolve() != Path(_entry_in(cache)).resolve():
            raise RuntimeError("the run case's entry is gone: run it first")
        best = f"{done['best']['layer']}/{done['best']['head']}"
        ours = {"seconds": done["probe_seconds"], "cells": done["cells"], "best": best,
                "best_test_top1": done["best"]["test_top1"], "selection_rows": done["protocol"]["selection_rows"]}
        return p.case_selection(isolated, done["entry"], ["logreg", "knn", "mlp"], sizes=(0,),
                                measured={ours["selection_rows"]["limit"]: ours})

    return {
        "run_vs_floor": lambda: b.case_run_vs_floor(isolated, str(cache), 10_000 if quick else None),
        # the same where OpenBLAS picks its own kernels (the run above keeps a pinned OPENBLAS_CORETYPE)
        "run_vs_floor_openblas_own_kernels": lambda: b.case_run_vs_floor(
            isolated, str(cache), 10_000 if quick else None, {"OPENBLAS_CORETYPE": None}),
        "selection_rows": selection,
        "logreg_warm_refit": lambda: bench_heads.case_logreg_warm_refit(isolated, _entry_in(cache)),
        "mlp_batch": lambda: bench_heads.case_mlp_batch(isolated, _entry_in(cache)),
        "blas_kernels": lambda: b.case_blas_kernels(_entry_in(cache)),
        "head_precision": lambda: b.case_head_precision(_entry_in(cache)),
    }


SUITES = {"extract": extract_suite, "knn": knn_suite, "probe": probe_suite, "run": run_suite,
          "startup": startup_suite}


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--quick", action="store_true", help="Smaller inputs (a smoke run, noisier).")
    parser.add_argument("--only", action="append", help="Run only these cases (repeatable).")
    parser.add_argument("--suite", choices=sorted(SUITES), action="append", help="Suites to run (default all).")
    args = parser.parse_args(argv)
    RESULTS.mkdir(exist_ok=True)
    for suite in args.suite or sorted(SUITES):
        path = RESULTS / f"{suite}.json"
        results = json.loads(path.read_text()) if path.exists() and args.only else {}
        results["machine"] = machine()
        for name, case in SUITES[suite](args.quick).items():
            if args.only and name not in args.only:
                continue
            t0 = time.perf_counter()
            print(f"[{suite}] {name} ...", file=sys.stderr, flush=True)
            results[name] = {**case(), "bench_seconds": round(time.perf_counter() - t0, 1),
                             "finished_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                             "quick": args.quick}
            path.write_text(json.dumps(results, indent=2, sort_keys=True) + "\n")
            summary = {k: v for k, v in results[name].items() if k in ("ratio", "speedup", "memory_ratio",
                                                                          "relative_to_defaults")}
            print(f"[{suite}] {name}: {json.dumps(summary)}", file=sys.stderr, flush=True)
        print(f"wrote {path}", file=sys.stderr)


if __name__ == "__main__":
    main()
