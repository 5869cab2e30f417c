"""Result files of a probe, written into a temporary folder and swapped into place at once.

A probe that fails half-way leaves nothing behind, an earlier result folder is only replaced
by a complete new one (never leaving a moment without one), and a folder that holds anything
but a probe result is refused untouched (see ``featx._resultdir``).
"""

from __future__ import annotations

import csv
import json
from pathlib import Path

from .. import __version__
from .._fileio import strict, write_json
from .._resultdir import PROBE, staged

CSV_COLUMNS = ["layer", "index", "depth", "width", "pool", "head", "params", "val_top1", "test_top1",
               "test_top1_ci_low", "test_top1_ci_high", "test_top5", "balanced_accuracy", "macro_f1",
               "fit_seconds", "n_train", "n_test", "best"]


def write_csv(path: Path, rows: list[dict], best: dict) -> None:
    with open(path, "w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=CSV_COLUMNS)
        w.writeheader()
        for r in rows:
            w.writerow({
                **{k: r.get(k) for k in CSV_COLUMNS if k in r},
                "params": json.dumps(strict(r["params"]), sort_keys=True),
                "test_top1_ci_low": r["test_top1_ci"][0], "test_top1_ci_high": r["test_top1_ci"][1],
                "best": r["layer"] == best["layer"] and r["head"] == best["head"],
            })


def write_results(results, target: Path, best_cell, entry, ids, y, splits, plots: bool = True,
                  linear_head=None) -> None:
    """Every output file of a probe into ``target``, which is replaced whole or not at all.

    ``linear_head``: the probe's logistic-regression head at the best layer (anything with
    ``save(folder)``), written as ``linear_head.npz`` when given.
    """
    import joblib
    import sklearn

    from .html import write_html
    from .plots import ConfusionDisplay, LayerCurveDisplay
    from .probe_html import probe_report_blocks, probe_report_title

    target = Path(target)
    files = {"json": "results.json", "csv": "results.csv"}
    with staged(target, PROBE) as tmp:
        best = best_cell.row
        joblib.dump(best_cell.model, tmp / "best_head.joblib")
        write_json(tmp / "best_head.json", {
            "layer": best["layer"], "head": best["head"], "params": best["params"], "classes": entry.classes,
            "entry_key": entry.key, "pool": best["pool"], "featx_version": __version__,
            "sklearn_version": sklearn.__version__,
            "input": f"float32 features of layer {best['layer']} from cache entry {entry.key[:12]}",
            "warning": "a pickle runs code when loaded: only load files you trust (joblib.load)",
        })
        files["best_head"] = "best_head.joblib"
        if linear_head is not None:  # built by the probe: reporting does not depend on probing
            files["linear_head"] = linear_head.save(tmp).name
        layer_png = confusion_png = None
        if plots:  # each figure rendered once: the report embeds the bytes of its PNG file
            title = f"{entry.dataset} × {entry.model}"
            layer_png = LayerCurveDisplay.from_rows(results.rows, title=title, best=best).save(
                tmp / "layers.png").read_bytes()
            confusion_png = ConfusionDisplay.from_predictions(
                y[splits.test], best_cell.test_pred, entry.classes,
                title=f"{best['head']} on {best['layer']}: test top-1 {best['test_top1']:.3f}",
            ).save(tmp / "confusion.png").read_bytes()
            files.update(plot="layers.png", confusion="confusion.png")
        files["report"] = "report.html"
        results.files = files
        write_html(tmp / "report.html", probe_report_title(results),
                   probe_report_blocks(results, layer_png, confusion_png))
        write_csv(tmp / "results.csv", results.rows, best)
        write_json(tmp / "results.json", results.to_dict())
    results.out_dir = target
