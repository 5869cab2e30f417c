"""``featx compare``: several backbones through one protocol, on the same rows, side by side.

Each backbone goes through the cache (an entry that exists is reused: no forward pass) and
through the same probe: the same seed gives the same splits, the same selection rows and the
same test rows, which is checked rather than assumed. Backbones are ranked by validation
accuracy; the test split only reports, and the leader is compared with every other backbone
on the same test rows by paired tests, so that a difference the test set cannot resolve is
called a tie.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from .. import __version__
from ..cache.entry import FeatureEntry
from ..errors import DataError, UsageError
from ..evaluation import val_score
from ..probing.protocol import SELECTION_ROWS
from ..report.advice import compare_advice
from .stats import holm, paired_comparison

log = logging.getLogger(__name__)

#: comparison.json's schema (README, "featx compare"); bump on any change of meaning
COMPARISON_VERSION = 1
ALPHA = 0.05
SHOT_SEEDS = 5


@dataclass(frozen=True)
class Contender:
    """One row of the comparison: a model with one choice of weights."""

    label: str  # as shown: the model name, plus " (random init)" for a baseline
    model: str
    weights: str | None
    baseline_of: str | None = None

    @property
    def slug(self) -> str:
        return _slug(self.label.replace(" (random init)", "-random-init"))


@dataclass
class ComparisonResults:
    """What ``compare`` found: the leaderboard, the paired tests and each backbone's probe."""

    leaderboard: list[dict]
    leader: dict
    paired: list[dict]
    curves: dict[str, list[dict]]
    protocol: dict
    dataset: str
    advice: str = ""
    shots: dict[str, dict] = field(default_factory=dict)
    probes: dict = field(default_factory=dict, repr=False)  # label -> ProbeResults
    out_dir: Path | None = None
    files: dict[str, str] = field(default_factory=dict)
    seconds: float = 0.0

    def to_dict(self) -> dict:
        return {
            "format": "featx-comparison", "version": COMPARISON_VERSION, "featx_version": __version__,
            "dataset": self.dataset, "protocol": self.protocol, "leader": self.leader,
            "leaderboard": self.leaderboard, "paired": self.paired, "curves": self.curves, "shots": self.shots,
            "advice": self.advice, "seconds": round(self.seconds, 2), "files": self.files,
        }


def parse_models(models) -> list[str]:
    """``"a,b"``, ``["a", "b"]`` or ``["a,b", "c"]`` -> ``["a", "b", "c"]``."""
    if isinstance(models, str):
        models = [models]
    names = [part.strip() for text in (models or ()) for part in str(text).split(",") if part.strip()]
    if not names:
        raise UsageError("No models given: name one or more, e.g. --model efficientnet_lite0,efficientnet_lite1.")
    return names


def contenders(models, *, baseline: bool = False, weights: str | None = None, checkpoint=None,
               arch: str | None = None) -> list[Contender]:
    """The models to compare, each once (by what it loads), plus a random-init twin of each with
    ``baseline``."""
    from ..backbones.registry import parse_model

    out, seen = [], {}
    for name in parse_models(models):
        spec = parse_model(name, weights=weights, checkpoint=checkpoint, arch=arch)
        identity = (spec.source, spec.arch, spec.weights, spec.checkpoint)
        if identity in seen:
            raise UsageError(f"Model {name!r} is listed twice (as {seen[identity]!r} before): each backbone is "
                             "compared once. Remove the repeat.")
        seen[identity] = name
        out.append(Contender(name, name, weights))
    if baseline:
        for c in list(out):
            spec = parse_model(c.model, weights=c.weights, checkpoint=checkpoint, arch=arch)
            if spec.source == "finetuned" or spec.weights == "none":
                raise UsageError(f"--baseline adds a randomly initialised copy of each model, but {c.model!r} "
                                 f"{'is a fine-tuned model' if spec.source == 'finetuned' else 'already is one'}. "
                                 "Drop --baseline, or list only pretrained models.")
            out.append(Contender(f"{c.label} (random init)", c.model, "none", baseline_of=c.label))
    return out


def compare(
    dataset,
    models,
    *,
    baseline: bool = False,
    heads=None,
    cv: int | None = None,
    seed: int = 0,
    jobs: int | None = None,
    backend: str = "auto",
    scheduler: str | None = None,
    out_dir: str | os.PathLike | None = None,
    plots: bool = True,
    progress: bool = True,
    device: str = "auto",
    selection_rows: int | None = SELECTION_ROWS,
    head_precision: str = "auto",
    shots: str | Sequence[int | None] | None = None,
    shot_seeds: int = SHOT_SEEDS,
    alpha: float = ALPHA,
    weights: str | None = None,
    checkpoint=None,
    arch: str | None = None,
    **extract_options,
) -> ComparisonResults:
    """Extract (through the cache) and probe every model in ``models`` on ``dataset`` under one
    protocol, rank them on validation data and compare them on the same test rows.

    ``models``: ``"a,b"`` or a list. ``baseline``: add each model with random weights as a
    reference row. ``shots``: ``"1,5,10,all"`` adds learning curves (test accuracy against
    labelled images per class) at each backbone's best layer and head. Writes comparison.json,
    comparison.csv, depth.png, report.html and each model's probe result (``models/NAME``) into
    ``out_dir`` (default ``featx-results/compare-<dataset>``; ``False`` writes nothing).
    """
    from .._resultdir import COMPARE, check_target, staged
    from ..api import check_probe_data
    from ..extraction import extract
    from ..probing import probe
    from ..probing.heads import resolve_heads
    from ..probing.runner import check_options
    from ..probing.shots import parse_shots

    t_start = time.perf_counter()
    resolve_heads(heads)  # a mistyped head is refused before any extraction
    check_options(backend=backend, head_precision=head_precision)
    if not 0 < alpha < 1:
        raise UsageError(f"alpha must be between 0 and 1, got {alpha!r}.")
    shot_levels = parse_shots(shots) if isinstance(shots, str) else tuple(shots) if shots else ()
    rows = contenders(models, baseline=baseline, weights=weights, checkpoint=checkpoint, arch=arch)
    source = check_probe_data(dataset, limit=extract_options.get("limit"), seed=seed, cv=cv,
                              data_root=extract_options.get("data_root"),
                              download=extract_options.get("download", True),
                              hash_content=extract_options.get("hash_content", False))
    target = None if out_dir is False else Path(out_dir) if out_dir else \
        Path("featx-results") / f"compare-{_slug(source.spec)}"
    if target is not None:
        check_target(target, COMPARE)  # refused before any extraction

    entries = []
    for c in rows:
        log.info("%s: extracting through the cache", c.label)
        entries.append(extract(source, c.model, weights=c.weights, checkpoint=checkpoint, arch=arch, seed=seed,
                               device=device, progress=progress, **extract_options))

    def run_probes(folder: Path | None) -> ComparisonResults:
        probes = {}
        for c, entry in zip(rows, entries):
            log.info("%s: probing", c.label)
            probes[c.label] = probe(entry, heads=heads, layers=extract_options.get("layers") or "auto", cv=cv,
                                    seed=seed, jobs=jobs, backend=backend, scheduler=scheduler,
                                    out_dir=folder / "models" / c.slug if folder is not None else False,
                                    cache_dir=extract_options.get("cache_dir"), plots=plots, progress=progress,
                                    device=device, selection_rows=selection_rows, head_precision=head_precision,
                                    advice_dir=target / "models" / c.slug if target is not None else None)
        results = summarise(rows, entries, probes, alpha=alpha, seed=seed, root=target)
        if shot_levels:
            results.shots = _learning_curves(rows, entries, probes, shot_levels, shot_seeds)
        results.seconds = time.perf_counter() - t_start
        if folder is not None:
            from .outputs import write_comparison

            write_comparison(results, folder, plots=plots)
        return results

    if target is None:
        return run_probes(None)
    with staged(target, COMPARE) as tmp:
        results = run_probes(tmp)
    results.out_dir = target
    return results


def summarise(rows: list[Contender], entries: list[FeatureEntry], probes: dict, *, alpha: float = ALPHA,
              seed: int = 0, root=None) -> ComparisonResults:
    """The leaderboard, the depth curves and the paired tests from each backbone's probe."""
    first = probes[rows[0].label]
    _check_same_rows(rows, probes)
    board = []
    for c, entry in zip(rows, entries):
        res = probes[c.label]
        best = res.best
        board.append({
            "model": c.label, "spec": c.model, "weights": c.weights or "default", "baseline_of": c.baseline_of,
            "layer": best["layer"], "head": best["head"], "depth": best["depth"], "params": best["params"],
            "val_top1": best["val_top1"], "test_top1": best["test_top1"], "test_top1_ci": best["test_top1_ci"],
            "balanced_accuracy": best["balanced_accuracy"], "macro_f1": best["macro_f1"],
            **_costs(entry, best), "probe_seconds": round(res.seconds, 2),
            "extracted_now": bool(getattr(getattr(entry, "last_run", None), "forward_pass", False)),
            "entry": entry.key, "entry_path": str(entry.path), "results": f"models/{c.slug}",
        })
    order = sorted(range(len(board)), key=lambda i: -val_score(board[i]))  # stable: earlier model wins a tie
    board = [board[i] for i in order]
    for rank, row in enumerate(board, 1):
        row["rank"] = rank
    leader = board[0]
    y_test = first.predictions.y[first.predictions.test]
    lead_pred = probes[leader["model"]].predictions.test_pred(probes[leader["model"]].best)
    paired = []
    for row in board[1:]:
        res = probes[row["model"]]
        test = paired_comparison(y_test, lead_pred, res.predictions.test_pred(res.best), seed=seed, alpha=alpha)
        paired.append({"leader": leader["model"], "other": row["model"], **test.to_dict()})
    for p, adjusted in zip(paired, holm([p["p_value"] for p in paired])):
        p["p_holm"] = adjusted
        p["verdict"] = "tie" if adjusted >= alpha else ("leader" if p["difference"] > 0 else "other")
    as_row = {"tie": "tie", "leader": "worse", "other": "better"}  # each row against the leader, on the test rows
    for row in board:
        row["verdict"] = "leader" if row is leader else as_row[next(p["verdict"] for p in paired
                                                                     if p["other"] == row["model"])]
    curves = {c.label: _curve(probes[c.label]) for c in rows}
    protocol = {
        **{k: first.protocol[k] for k in ("selection", "cv", "validation_fraction", "seed", "splits",
                                          "selection_rows", "bootstrap", "device", "heads")},
        "engines": {c.label: probes[c.label].protocol["engines"] for c in rows},
        "ranking": "validation accuracy of each backbone's best layer x head (the test split never ranks)",
        "paired_tests": f"on the same {len(y_test)} test rows: accuracy difference with a 95% paired bootstrap "
                        f"interval, exact McNemar p-value, Holm-adjusted over {len(paired)} comparison(s) with the "
                        f"leader; not significant at alpha {alpha} = tie",
        "alpha": alpha, "test_rows": int(len(y_test)),
    }
    return ComparisonResults(board, leader, paired, curves, protocol, dataset=entries[0].dataset,
                             advice=compare_advice(board, probes, root=root, seed=seed), probes=probes)


def _check_same_rows(rows: list[Contender], probes: dict) -> None:
    """Paired tests need the same test rows under the same labels; a source that changed between
    extractions (or unreadable images in one entry only) breaks that, and is refused."""
    first = probes[rows[0].label].predictions
    for c in rows[1:]:
        p = probes[c.label].predictions
        same = (len(p.ids) == len(first.ids) and np.array_equal(p.ids, first.ids) and np.array_equal(p.y, first.y)
                and np.array_equal(p.test, first.test))
        if not same:
            raise DataError(f"The entries of {rows[0].label} and {c.label} do not hold the same readable images "
                            "with the same labels, so their test rows differ and cannot be paired. Extract both "
                            "from the same dataset (same --limit and --seed); see featx cache info ENTRY --errors.")


def _costs(entry: FeatureEntry, best: dict) -> dict:
    runs = [r for r in entry.runs if r.get("images") and r.get("seconds")]
    last = runs[-1] if runs else {}
    return {
        "parameters": last.get("parameters"),
        "images_per_second": round(last["images"] / last["seconds"], 1) if last else None,
        "extraction_device": last.get("device"), "width": best["width"], "bytes_on_disk": entry.size_bytes,
    }


def _curve(results) -> list[dict]:
    """Test accuracy against depth at the backbone's best head."""
    head = results.best["head"]
    return [{k: r[k] for k in ("layer", "depth", "order", "val_top1", "test_top1", "test_top1_ci")}
            for r in sorted((r for r in results.rows if r["head"] == head), key=lambda r: r["order"])]


def _learning_curves(rows, entries, probes, shot_levels, shot_seeds: int) -> dict:
    from ..probing.heads import resolve_heads
    from ..probing.shots import learning_curve

    out = {}
    for c, entry in zip(rows, entries):
        res = probes[c.label]
        best, pred = res.best, res.predictions
        X = entry.load(best["layer"]).X
        head = resolve_heads([best["head"]])[0]
        out[c.label] = {"layer": best["layer"], "n_classes": len(entry.classes), **learning_curve(
            X, pred.y, pred.train, pred.test, head, best["params"], shot_levels, shot_seeds, len(entry.classes),
            device=res.protocol["device"])}
    return out


def _slug(text: str) -> str:
    return "".join(c if c.isalnum() or c in "._-" else "_" for c in str(text)).strip("_") or "dataset"
