"""``report.html`` of a comparison: the leaderboard, paired tests, depth plot, advice and commands."""

from __future__ import annotations

import shlex
from pathlib import Path

from ..report.html import Code, Figure, Heading, Paragraph, Table, write_html
from ..report.reproduce import extract_command


def compare_command(results) -> str:
    """The ``featx compare`` command line that rebuilds this comparison (through the cache)."""
    first = next(iter(results.probes.values()))
    config = first.entry.get("config") or {}
    pre, pooling = config.get("preprocessing") or {}, config.get("pooling") or {}
    board = results.leaderboard
    models = [r["spec"] for r in sorted((r for r in board if not r.get("baseline_of")), key=_listed(results))]
    args = ["featx", "compare", str(results.dataset), "--model", ",".join(models)]
    if any(r.get("baseline_of") for r in board):
        args.append("--baseline")
    if results.shots:
        levels = next(iter(results.shots.values()))["points"]
        args += ["--shots", ",".join(str(p["shots"]) for p in levels)]
    args += ["--heads", ",".join(first.protocol.get("heads") or {})]
    args += ["--pool", str(pooling.get("pool", "avg"))]
    if pre.get("crop_size"):
        args += ["--image-size", str(pre["crop_size"])]
    limit = (config.get("dataset") or {}).get("limit")
    if limit:
        args += ["--limit", str(limit["n"])]
    args += ["--seed", str(results.protocol.get("seed", 0))]
    rows = results.protocol.get("selection_rows") or {}
    args += ["--selection-rows", str(int(rows.get("limit") or 0))]
    return shlex.join(args)


def _listed(results):
    order = list(results.probes)
    return lambda row: order.index(row["model"])


def report_blocks(results, figures: dict) -> list:
    from .leaderboard import leaderboard_rows

    blocks = [Paragraph(f"{len(results.leaderboard)} backbones on {results.dataset}, ranked by validation accuracy "
                        f"of each one's best layer and head; leader: {results.leader['model']}.")]
    columns = ["rank", "backbone", "layer", "head", "params", "val top-1", "test top-1", "95% CI",
               "vs leader (points)", "95% CI (points)", "McNemar p", "Holm p", "verdict", "parameters", "img/s",
               "width", "bytes on disk", "probe s"]
    rows = []
    for r in leaderboard_rows(results):
        diff = r["difference_to_leader"]
        rows.append([
            r["rank"], r["model"], r["layer"], r["head"], r["params"], round(r["val_top1"], 4),
            round(r["test_top1"], 4), f"{r['test_top1_ci_low']:.3f}-{r['test_top1_ci_high']:.3f}",
            "" if diff is None else round(100 * diff, 2),
            "" if diff is None else f"{100 * r['difference_ci_low']:+.2f} to {100 * r['difference_ci_high']:+.2f}",
            "" if r["mcnemar_p"] is None else f"{r['mcnemar_p']:.3g}",
            "" if r["p_holm"] is None else f"{r['p_holm']:.3g}", r["verdict"], r["parameters"],
            r["images_per_second"], r["width"], r["bytes_on_disk"], r["probe_seconds"]])
    blocks += [Heading("Leaderboard"), Table(columns, rows, anchor="leaderboard", highlight_row=0,
                                             caption=results.protocol["paired_tests"]),
               Heading("Advice"), Paragraph(results.advice)]
    if "depth" in figures:
        blocks.append(Figure(figures["depth"], alt="test accuracy against relative depth per backbone",
                             caption="Each backbone's best head; star: the layer chosen on validation data."))
    curve_rows = [[model, p["layer"], round(p["depth"], 3), None if p["val_top1"] is None else round(p["val_top1"], 4),
                   round(p["test_top1"], 4), f"{p['test_top1_ci'][0]:.3f}-{p['test_top1_ci'][1]:.3f}"]
                  for model, curve in results.curves.items() for p in curve]
    blocks += [Heading("Accuracy by depth"),
               Table(["backbone", "layer", "depth", "val top-1", "test top-1", "95% CI"], curve_rows, anchor="curves")]
    if results.shots:
        blocks.append(Heading("Labels needed"))
        if "shots" in figures:
            blocks.append(Figure(figures["shots"], alt="test accuracy against labelled images per class"))
        shot_rows = [[model, c["layer"], c["head"], p["shots"], p["n_train"], round(p["mean"], 4),
                      round(p["std"], 4), round(p["min"], 4), round(p["max"], 4), len(p["test_top1"])]
                     for model, c in results.shots.items() for p in c["points"]]
        blocks.append(Table(["backbone", "layer", "head", "per class", "training images", "mean", "std", "min", "max",
                             "seeds"], shot_rows, anchor="shots",
                            caption="Test accuracy against training size; a report only, never used for selection."))
    if "confusion" in figures:
        blocks += [Heading("Confusion matrix of the leader"),
                   Figure(figures["confusion"], alt="confusion matrix of the leader on the test split",
                          caption="Test split; colour: share of the true class, text: count.")]
    blocks.append(Heading("Protocol"))
    blocks.append(Table(["setting", "value"], [[k, _plain(v)] for k, v in results.protocol.items()], header=False,
                        anchor="protocol"))
    blocks += [Heading("Commands to reproduce"), Code(compare_command(results))]
    for label, probe in results.probes.items():
        layers = list(dict.fromkeys(r["layer"] for r in probe.rows))
        blocks.append(Code(f"# {label}\n{extract_command(probe.entry, layers)}"))
    return blocks


def _plain(value) -> str:
    if isinstance(value, dict):
        return "; ".join(f"{k}: {_plain(v)}" for k, v in value.items())
    if isinstance(value, (list, tuple)):
        return ", ".join(_plain(v) for v in value)
    return str(value)


def write_report(results, folder: Path, figures: dict) -> Path:
    title = f"featx compare: {results.dataset}"
    return write_html(Path(folder) / "report.html", title, report_blocks(results, figures))
