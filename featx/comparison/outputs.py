"""Result files of ``featx compare``, written into the staged comparison folder."""

from __future__ import annotations

import csv
from pathlib import Path

from .._fileio import write_json
from .leaderboard import CSV_COLUMNS, leaderboard_rows


def write_comparison(results, folder: Path, plots: bool = True) -> None:
    from ..report.plots import BackboneCurveDisplay, ConfusionDisplay, LearningCurveDisplay

    folder = Path(folder)
    files = {"json": "comparison.json", "csv": "comparison.csv"}
    figures = {}
    if plots:
        figures["depth"] = BackboneCurveDisplay.from_comparison(
            results.curves, results.leaderboard, title=f"{results.dataset}: probe accuracy by depth").figure_
        figures["depth"].savefig(folder / "depth.png")
        files["plot"] = "depth.png"
        lead = results.probes[results.leader["model"]]
        pred = lead.predictions
        figures["confusion"] = ConfusionDisplay.from_predictions(
            pred.y[pred.test], pred.test_pred(lead.best), lead.entry["classes"],
            title=f"{results.leader['model']}: {lead.best['head']} on {lead.best['layer']}").figure_
        if results.shots:
            figures["shots"] = LearningCurveDisplay.from_shots(
                results.shots, title=f"{results.dataset}: test accuracy against labels per class").figure_
            figures["shots"].savefig(folder / "shots.png")
            files["shots_plot"] = "shots.png"
    files["models"] = "models/"
    with open(folder / "comparison.csv", "w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=CSV_COLUMNS)
        w.writeheader()
        w.writerows(leaderboard_rows(results))
    from .report import write_report

    files["report"] = write_report(results, folder, figures).name
    results.files = files
    write_json(folder / "comparison.json", results.to_dict())
