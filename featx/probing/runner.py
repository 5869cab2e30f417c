"""``featx.probe``: every cached layer × every head, compared under one honest protocol.

It reads the cache only (no model is ever loaded), loads each layer once as float32, and
runs the (layer, head) cells in parallel through joblib with BLAS pools capped to one thread
per worker, so cores are never oversubscribed; the same code runs on a Dask cluster via
joblib's Dask backend. Because every cell computes single-threaded with fixed seeds, serial
and parallel runs give the same numbers.
"""

from __future__ import annotations

import logging
import os
import sys
import time
from contextlib import nullcontext
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np
from threadpoolctl import threadpool_limits

from .. import __version__
from .._blas import blas_in_use
from .._progress import progress_bar
from .._resultdir import PROBE, check_target
from .._runtime import available_cores
from ..cache.entry import FeatureEntry
from ..cache.store import CacheStore
from ..errors import UnknownLayerError, UsageError
from ..evaluation import val_score
from ..layer import Ladder
from .engines import device_type, portable, resolve_device, torch_threads
from .fit import CellResult, run_cell
from .heads import HEADS, resolve_heads
from .linear_head import LinearHead
from .protocol import (
    SELECTION_ROWS,
    VALIDATION_FRACTION,
    Splits,
    assign_splits,
    bounded_folds,
    check_split_sizes,
    selection_folds,
    selection_method,
)
from .schedule import longest_first
from .shared import SharedLayers
from .stream import stream_cell

log = logging.getLogger(__name__)

#: results.json's schema (README, probe): 2 = metrics from featx.evaluation, the keys finetune.json shares
RESULTS_VERSION = 2

BACKENDS = ("auto", "loky", "threading", "dask")
#: the heads' precision: "auto" lets a head compute in part in bfloat16 where the device multiplies it
#: natively (the MLP's training on CPUs with AVX512-BF16 or AMX); "float32" keeps every head in full precision
PRECISIONS = ("auto", "float32")
_WARNED: set[str] = set()  # notes about this process's settings already shown


@dataclass
class Predictions:
    """Every cell's predictions, row for row: what paired comparisons of layers, heads and
    backbones need (the same rows judged by two classifiers), kept out of results.json.

    Rows count the entry's readable images; ``cells[(layer, head)]`` holds ``val_rows`` (the rows
    selection scored), ``val_pred`` (the chosen parameters' predictions of them) and ``test_pred``
    (of ``test``)."""

    ids: np.ndarray
    y: np.ndarray
    train: np.ndarray
    test: np.ndarray
    cells: dict[tuple[str, str], dict[str, np.ndarray | None]] = field(default_factory=dict)

    def test_pred(self, row: dict) -> np.ndarray:
        return self.cells[(row["layer"], row["head"])]["test_pred"]


@dataclass
class ProbeResults:
    """What ``probe`` found: one row per (layer, head), the best cell, advice and the files written."""

    rows: list[dict]
    best: dict
    recommendation: str
    protocol: dict
    entry: dict
    out_dir: Path | None = None
    files: dict[str, str] = field(default_factory=dict)
    seconds: float = 0.0
    predictions: Predictions | None = field(default=None, repr=False)

    def best_per_head(self) -> dict[str, dict]:
        out: dict[str, dict] = {}
        for row in self.rows:
            cur = out.get(row["head"])
            if cur is None or val_score(row) > val_score(cur):
                out[row["head"]] = row
        return out

    def to_dict(self) -> dict:
        return {
            "format": "featx-probe-results", "version": RESULTS_VERSION, "featx_version": __version__,
            "entry": self.entry, "protocol": self.protocol, "best": self.best,
            "best_per_head": self.best_per_head(), "recommendation": self.recommendation,
            "rows": self.rows, "seconds": round(self.seconds, 2), "files": self.files,
        }


def check_options(backend: str = "auto", head_precision: str = "auto") -> None:
    """Refuse a bad ``backend`` or ``head_precision`` (before any extraction, when a command extracts first)."""
    if backend not in BACKENDS:
        raise UsageError(f"Unknown backend {backend!r}. Valid: {', '.join(BACKENDS)}.")
    if head_precision not in PRECISIONS:
        raise UsageError(f"Unknown head precision {head_precision!r}. Valid: {', '.join(PRECISIONS)}.")


def resolve_backend(backend: str, heads) -> str:
    """``auto``: threads when every head is built in (their fits spend their time in BLAS, libsvm,
    liblinear or torch, which release the GIL), loky processes when a custom estimator's Python may
    hold it."""
    if backend != "auto":
        return backend
    return "threading" if all(h is HEADS.get(h.name) for h in heads) else "loky"


def _pick_layers(entry: FeatureEntry, layers) -> list:
    """Cached layers chosen by the same grammar as extraction; indices count cached layers."""
    if layers is None:
        return list(entry.layers)
    ladder_layers = {layer.name: layer for layer in entry.ladder.layers}
    cached = []
    for r in entry.layers:
        base = ladder_layers.get(r.name) or r
        cached.append(replace(base, index=len(cached), order=r.order))
    view = Ladder(cached, [n for n in entry.ladder.auto if n in entry.layer_names], entry.ladder.input_size)
    try:
        picked = view.select(layers, entry.model)
    except UnknownLayerError as exc:
        raise UnknownLayerError(
            f"{exc} This entry holds: {', '.join(entry.layer_names)}. Extract more with featx extract --layers."
        ) from None
    return [entry.layer(layer.name) for layer in picked]


def _memory_budget() -> int:
    try:
        available = os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        available = 8 * 1024**3
    return int(available * 0.4)


def probe(
    entry,
    heads=None,
    layers=None,
    *,
    cv: int | None = None,
    seed: int = 0,
    jobs: int | None = None,
    backend: str = "auto",
    scheduler: str | None = None,
    out_dir: str | os.PathLike | None = None,
    cache_dir: str | os.PathLike | None = None,
    memory_budget: int | None = None,
    plots: bool = True,
    progress: bool = True,
    device: str = "auto",
    selection_rows: int | None = SELECTION_ROWS,
    advice_dir: str | os.PathLike | None = None,
    head_precision: str = "auto",
) -> ProbeResults:
    """Probe the layers of a cache entry with scikit-learn heads (see design §4).

    ``heads``: names (``"logreg,knn"``), ``featx.probing.Head`` objects, or a dict of
    ``{name: estimator}`` / ``{name: (estimator, grid)}`` for any scikit-learn classifier.
    Writes results.json, results.csv, report.html, layers.png, confusion.png, best_head.joblib
    and linear_head.npz into ``out_dir`` (default ``featx-results/<entry>``; ``out_dir=False``
    writes nothing).

    ``device``: where the heads compute (``auto``, ``cpu``, ``cuda``, ``cuda:N``), as for
    extraction. ``selection_rows``: hyper-parameters are chosen on at most this many fitting
    rows per fold (a stratified sample; 0 or None = all), then refit on every training row.
    ``advice_dir``: the folder the advice's commands name (default ``out_dir``), for results
    that are moved into place afterwards (``featx compare`` writes its models' results so).
    ``head_precision``: ``auto`` trains the MLP head with bfloat16 products on CPUs that multiply
    bfloat16 natively (2-2.6x faster epochs, the same accuracy); ``float32`` keeps scikit-learn's.
    ``backend``: ``auto`` runs the built-in heads in threads of this process (their work releases
    the GIL; one copy of the process, torch loaded once) and custom heads in loky processes.
    """
    t_start = time.perf_counter()
    check_options(backend=backend, head_precision=head_precision)
    if jobs is not None and (not isinstance(jobs, int) or jobs == 0 or jobs < -1):
        raise UsageError(f"--jobs must be a positive integer or -1 (all cores), got {jobs!r}.")
    if selection_rows is not None and (not isinstance(selection_rows, (int, np.integer))
                                       or isinstance(selection_rows, bool) or selection_rows < 0):
        raise UsageError(f"--selection-rows must be a non-negative integer (0 = all rows), got {selection_rows!r}.")
    store = CacheStore(cache_dir)
    entry = store.resolve(entry)
    target = None if out_dir is False else Path(out_dir) if out_dir else Path("featx-results") / entry.path.stem
    if target is not None:
        check_target(target, PROBE)  # refuse a folder featx may not replace before any fitting
    head_list = resolve_heads(heads)
    records = _pick_layers(entry, layers)
    device = resolve_device(device)
    backend = resolve_backend(backend, head_list)

    s = entry.samples()
    ok = s["ok"]
    y, split_names, ids = s["label"][ok], s["split"][ok], s["id"][ok]
    check_split_sizes(y, split_names, seed=seed, class_names=entry.classes,
                      hint=f"The entry holds {len(y)} readable images; extract more (a larger --limit).")
    splits = assign_splits(y, split_names, seed)
    all_folds = selection_folds(splits, y, cv, seed)
    folds = bounded_folds(all_folds, y[splits.selection_rows], selection_rows, seed)
    n_classes = len(entry.classes)
    jobs = available_cores() if jobs in (None, -1) else jobs
    budget = _memory_budget() if memory_budget is None else int(memory_budget)
    blas = blas_in_use()  # workers inherit the environment, so they load the same kernels
    if blas["note"] and blas["note"] not in _WARNED:  # once per process (featx compare probes each backbone)
        _WARNED.add(blas["note"])
        log.warning(blas["note"])

    cells: list[CellResult] = []
    order = {h.name: i for i, h in enumerate(head_list)}
    streamed, in_memory = [], []
    for r in records:
        (streamed if len(y) * r.width * 4 > budget else in_memory).append(r)
    for r in streamed:
        log.info("layer %s (%s) exceeds the memory budget: streaming it through SGD", r.name, _mb(len(y) * r.width * 4))
        cells += stream_cell(entry, r, head_list, ok, y, splits, all_folds, n_classes, seed)
    cells += _run_grid(entry, in_memory, head_list, y, splits, folds, n_classes, seed, jobs, backend, scheduler,
                       progress, device, head_precision)
    cells.sort(key=lambda c: (c.row["order"], order.get(c.row["head"], 99)))

    rows = [c.row for c in cells]
    best_cell = max(cells, key=lambda c: val_score(c.row))  # max() keeps the first of equals: shallower, earlier head
    protocol = {
        "selection": selection_method(splits, cv),
        "cv": None if len(splits.val) else cv,
        "validation_fraction": None if cv or len(splits.val) else VALIDATION_FRACTION, "seed": seed,
        "splits": splits.describe(), "roles": splits.roles(split_names, folds),
        "bootstrap": "95% percentile interval, 1000 resamples",
        "selection_rows": _selection_rows(all_folds, folds, selection_rows),
        "device": device, "precision": head_precision,
        "engines": {h.name: h.engine(device, head_precision).name for h in head_list},
        "heads": {h.name: h.description for h in head_list}, "jobs": jobs, "backend": backend, "blas": blas,
        "ranking": "validation accuracy (the test split never influences selection)",
    }
    from ..report.advice import recommend

    predictions = Predictions(ids, y, splits.train, splits.test, {
        (c.row["layer"], c.row["head"]): {"val_rows": c.val_rows, "val_pred": c.val_pred, "test_pred": c.test_pred}
        for c in cells})
    results = ProbeResults(
        rows=rows, best=best_cell.row, protocol=protocol,
        recommendation=recommend(rows, best_cell.row, len(splits.train), n_classes, predictions=predictions,
                                 results_dir=advice_dir or target),
        entry={"key": entry.key, "path": str(entry.path), "model": entry.model, "dataset": entry.dataset,
               "classes": entry.classes, "config": entry.config},
        predictions=predictions,
    )
    results.seconds = time.perf_counter() - t_start
    if out_dir is not False:
        from ..report.outputs import write_results

        if best_cell.model is None:  # k-NN models hold their training data: refit here, not shipped back
            head = next(h for h in head_list if h.name == best_cell.row["head"])
            X = entry.load(best_cell.row["layer"]).X
            best_cell.model = portable(head.pipeline(len(splits.train), seed, best_cell.row["params"], device,
                                                     X.shape[1], head_precision).fit(
                X[splits.train], y[splits.train]))

        linear = _linear_head(cells, best_cell, entry, ids[splits.test])
        write_results(results, target, best_cell, entry, ids, y, splits, plots=plots, linear_head=linear)
    return results


def _linear_head(cells, best_cell, entry: FeatureEntry, test_ids) -> LinearHead | None:
    """The logistic-regression head at the best layer as plain arrays (LP-FT starts from it), if fitted."""
    best = best_cell.row
    linear = next((c for c in cells if c.row["layer"] == best["layer"] and c.row["head"] == "logreg"
                   and c.model is not None), None)
    if linear is None:
        return None
    return LinearHead.from_pipeline(linear.model, best["layer"], len(entry.classes), meta={
        "entry_key": entry.key, "params": linear.row["params"], "test_top1": linear.row["test_top1"],
        "test_ids": [str(i) for i in test_ids], "test_pred": linear.test_pred.tolist(), "classes": entry.classes,
    })


def _selection_rows(all_folds, folds, limit) -> dict:
    """What selection fitted and scored on, per fold, against what the folds held."""
    return {"limit": int(limit or 0), "fit": [int(len(f)) for f, _ in folds], "val": [int(len(v)) for _, v in folds],
            "fit_available": [int(len(f)) for f, _ in all_folds], "val_available": [int(len(v)) for _, v in all_folds]}


def _mb(n: float) -> str:
    return f"{n / 2**20:.0f} MB"


def _run_grid(entry, records, heads, y, splits: Splits, folds, n_classes, seed, jobs, backend, scheduler,
              progress, device: str = "cpu", precision: str = "float32") -> list[CellResult]:
    if not records:
        return []
    from joblib import Parallel, delayed, parallel_config

    seen: dict[str, str] = {}  # digest of a layer's features -> first layer with them
    duplicates: dict[str, str] = {}
    shared = SharedLayers()
    remote = backend == "dask" and scheduler is not None  # workers elsewhere cannot read this machine's files
    keep = entry.samples()["ok"]

    def cell_task(r, head, X):
        meta = {"layer": r.name, "index": r.index, "depth": r.depth, "order": r.order, "width": r.width,
                "pool": r.pool}
        return delayed(run_cell)(meta, head, X, y, splits.train, splits.test, folds, n_classes, seed,
                                 keep_model=head.name != "knn", selection_rows=splits.selection_rows, device=device,
                                 precision=precision)

    def tasks():
        waiting = []
        for r in records:
            X, digest = shared.add(entry, r, keep)  # once per layer, read by all its cells
            if remote:
                X = X.load()
            if digest in seen:  # e.g. the last map average-pooled is exactly pre_logits: probe it once
                duplicates[r.name] = seen[digest]
                continue
            seen[digest] = r.name
            if remote:  # a remote cell carries its layer in memory: one layer after the other, as loaded
                yield from (cell_task(r, head, X) for head in heads)
            else:
                waiting += [(r, head, X) for head in heads]
        # here every layer is written (a few seconds of disk) before the costliest cells go first
        yield from (cell_task(*cell) for cell in longest_first(waiting))

    total = len(records) * len(heads)
    bar = progress_bar(total=total, unit="cell", desc="probe", disable=not progress)
    client = None
    try:
        config = {"backend": backend, "n_jobs": jobs}
        if backend == "dask":
            client = _dask_client(scheduler, jobs)
            config = {"backend": "dask", "n_jobs": -1}
        # threads share this process's BLAS pool: one thread each for the whole grid (each cell's own limit
        # would put the pool back to its size when it ends, under the other cells)
        shared_pool = threadpool_limits(limits=1, user_api="blas") if backend == "threading" else nullcontext()
        with parallel_config(**config), shared_pool, _torch_budget(backend, heads, device, precision):
            out = []
            for cell in Parallel(return_as="generator", pre_dispatch="2*n_jobs")(tasks()):
                out.append(cell)
                bar.update(1 + sum(1 for d in duplicates.values() if d == cell.row["layer"]))
        by_layer = {r.name: r for r in records}
        for name, same_as in duplicates.items():
            r = by_layer[name]
            for cell in [c for c in out if c.row["layer"] == same_as]:
                row = {**cell.row, "layer": r.name, "index": r.index, "depth": r.depth, "order": r.order,
                       "width": r.width, "pool": r.pool,
                       "notes": [*cell.row["notes"], f"identical features to {same_as}"]}
                out.append(CellResult(row, cell.test_pred, cell.model, cell.val_rows, cell.val_pred))
        return out
    finally:
        bar.close()
        if client is not None:
            client.close()
        shared.close()


def _torch_budget(backend: str, heads, device: str, precision: str):
    """One torch thread per cell for a threading grid whose cells compute with torch. Each cell sets its
    own thread's count, but not all of torch's work follows it: with the process-wide count left at the
    core count, the bfloat16 MLP's training kept a second OpenMP thread busy per cell on two cores, and
    the MLP cells took up to 3x longer (a thread that first computes during the grid starts from it)."""
    uses_torch = any(device_type(device) in h.engine(device, precision).torch_on for h in heads)
    if backend != "threading" or not (uses_torch or "torch" in sys.modules):
        return nullcontext()
    return torch_threads(1)


def _dask_client(scheduler: str | None, jobs: int):
    try:
        from dask.distributed import Client
    except ImportError:
        raise UsageError("--backend dask needs dask.distributed: pip install 'featx[dask]'") from None
    if scheduler is None:
        return Client(processes=True, n_workers=jobs, threads_per_worker=1, dashboard_address=None)
    try:
        return Client(scheduler, timeout="20s")
    except (OSError, TimeoutError) as exc:
        raise UsageError(f"Cannot reach the Dask scheduler at {scheduler!r}: {exc}") from None
