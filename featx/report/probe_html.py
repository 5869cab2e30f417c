"""The blocks of a probe's report.html: what was probed, what won, every cell, how, and how to redo it."""

from __future__ import annotations

import json
from datetime import datetime, timezone

from .. import __version__
from .html import Code, Figure, Heading, Paragraph, Table
from .reproduce import reproduce_commands

RESULT_COLUMNS = ["layer", "depth", "width", "head", "test top-1", "95% interval", "val top-1", "balanced acc.",
                  "macro-F1", "params", "fit s", "chosen", "notes"]
MAX_LISTED_CLASSES = 30


def probe_report_title(results) -> str:
    return f"Probe: {results.entry['dataset']} × {results.entry['model']}"


def _score(value) -> str:
    return "" if value is None else f"{value:.3f}"


def _params(params: dict) -> str:
    return json.dumps(params, sort_keys=True, default=str) if params else "{}"


def _about(results) -> Table:
    entry = results.entry
    classes = entry.get("classes") or []
    listed = ", ".join(classes) if len(classes) <= MAX_LISTED_CLASSES else f"{', '.join(classes[:10])}, …"
    rows = [
        ["dataset", entry["dataset"]],
        ["model", entry["model"]],
        ["cache entry", entry["key"]],
        ["entry file", entry.get("path", "")],
        ["classes", f"{len(classes)}: {listed}"],
        ["featx version", __version__],
        ["written", datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC")],
        ["probe time", f"{results.seconds:.1f} s"],
    ]
    return Table(["item", "value"], rows, anchor="about", header=False)


def best_line(best: dict) -> str:
    lo, hi = best["test_top1_ci"]
    top5 = f", top-5 {best['test_top5']:.3f}" if best.get("test_top5") is not None else ""
    return (f"{best['head']} on {best['layer']} (relative depth {best['depth']:.2f}, "
            f"params {_params(best['params'])}), "
            f"chosen by validation top-1 {_score(best.get('val_top1'))}: test top-1 {best['test_top1']:.3f} "
            f"(95% interval {lo:.3f}–{hi:.3f}){top5}, balanced accuracy {_score(best.get('balanced_accuracy'))}, "
            f"macro-F1 {_score(best.get('macro_f1'))}.")


def results_table(results) -> Table:
    """One table row per (layer, head) row of the results, the best one highlighted."""
    best_per_head = results.best_per_head()
    rows, highlight = [], None
    for i, r in enumerate(results.rows):
        lo, hi = r["test_top1_ci"]
        if r is results.best or (r["layer"], r["head"]) == (results.best["layer"], results.best["head"]):
            highlight, chosen = i, "best overall"
        else:
            chosen = f"best {r['head']}" if best_per_head.get(r["head"]) is r else ""
        rows.append([r["layer"], f"{r['depth']:.2f}", r["width"], r["head"], _score(r["test_top1"]),
                     f"{lo:.3f}–{hi:.3f}", _score(r.get("val_top1")), _score(r.get("balanced_accuracy")),
                     _score(r.get("macro_f1")), _params(r["params"]), f"{r['fit_seconds']:.2f}", chosen,
                     "; ".join(r.get("notes") or [])])
    return Table(RESULT_COLUMNS, rows, anchor="results", highlight_row=highlight,
                 numeric=("depth", "width", "test top-1", "95% interval", "val top-1", "balanced acc.", "macro-F1",
                          "fit s"),
                 caption="Test top-1 with its 95% bootstrap interval; chosen = best by validation accuracy.")


def _splits_text(protocol: dict) -> str:
    split = protocol.get("splits") or {}
    source = ("the dataset's own test split" if split.get("test_source") == "dataset"
              else f"a seeded stratified {split.get('test_fraction')} split")
    val = f", validation {split['val']}" if split.get("val") else ""
    return f"training {split.get('train')}{val}, test {split.get('test')} ({source})"


def _roles_text(protocol: dict) -> str:
    roles = protocol.get("roles") or {}
    return "; ".join(f"{role}: {', '.join(r['splits'])} ({r['n']} rows)" for role, r in roles.items())


def _selection_rows_text(protocol: dict) -> str:
    rows = protocol.get("selection_rows")
    if not isinstance(rows, dict):
        return ""
    def counts(key):
        return ", ".join(str(n) for n in rows.get(key) or [])

    limit = f"at most {rows['limit']} fitting rows per fold" if rows.get("limit") else "every row (no limit)"
    return (f"{limit}; fitted on {counts('fit')} of {counts('fit_available')} rows, "
            f"scored on {counts('val')} of {counts('val_available')} (per fold)")


def protocol_table(results) -> Table:
    p = results.protocol
    engines = ", ".join(f"{head} {engine}" for head, engine in (p.get("engines") or {}).items())
    heads = "; ".join(f"{head}: {text}" for head, text in (p.get("heads") or {}).items())
    rows = [
        ["selection", p.get("selection", "")],
        ["ranking", p.get("ranking", "")],
        ["splits", _splits_text(p)],
        ["roles", _roles_text(p)],
        ["selection rows", _selection_rows_text(p)],
        ["cv folds", p.get("cv") or "none"],
        ["validation fraction", p.get("validation_fraction") or "—"],
        ["seed", p.get("seed", "")],
        ["device and engines", f"{p.get('device', 'cpu')}: {engines}"],
        ["heads", heads],
        ["bootstrap", p.get("bootstrap", "")],
        ["parallelism", f"jobs {p.get('jobs')}, joblib backend {p.get('backend')}"],
    ]
    blas = p.get("blas")
    if blas:
        rows.append(["BLAS", "; ".join([", ".join(blas.get("libraries") or []) or "none loaded",
                                        *([blas["note"]] if blas.get("note") else [])])])
    return Table(["setting", "value"], [[name, str(value)] for name, value in rows], anchor="protocol", header=False)


def probe_report_blocks(results, layer_figure=None, confusion_figure=None) -> list:
    """The report of a ProbeResults; the figures (matplotlib figures or PNG bytes) may be None (no plots)."""
    best = results.best
    blocks = [_about(results), Heading("Best cell"), Paragraph(best_line(best)),
              Heading("Advice"), Paragraph(results.recommendation)]
    if layer_figure is not None:
        blocks += [Heading("Accuracy by depth"),
                   Figure(layer_figure, alt="Test top-1 accuracy against relative depth, one line per head, "
                                            "95% intervals shaded",
                          caption="Test top-1 by layer; the shaded band is the 95% bootstrap interval.")]
    blocks += [Heading("Every layer and head"), results_table(results)]
    if confusion_figure is not None:
        blocks += [Heading("Confusion matrix"),
                   Figure(confusion_figure, alt=f"Confusion matrix of {best['head']} on {best['layer']} (test split)",
                          caption="Colour: share of the true class; numbers: image counts.")]
    if layer_figure is None and confusion_figure is None:
        blocks.append(Paragraph("No figures: the probe ran without plots (--no-plots)."))
    extract, probe = reproduce_commands(results)
    blocks += [Heading("Protocol"), protocol_table(results),
               Heading("Commands to reproduce"),
               Paragraph("Extract the features (a cache hit when the entry is still there), then probe them:"),
               Code(extract), Code(probe)]
    return blocks
