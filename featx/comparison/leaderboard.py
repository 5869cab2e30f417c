"""The leaderboard as flat rows, shared by comparison.csv, report.html and the terminal table."""

from __future__ import annotations

import json

from .._fileio import strict

CSV_COLUMNS = ["rank", "model", "weights", "layer", "head", "depth", "params", "val_top1", "test_top1",
               "test_top1_ci_low", "test_top1_ci_high", "difference_to_leader", "difference_ci_low",
               "difference_ci_high", "mcnemar_p", "p_holm", "verdict", "parameters", "images_per_second", "width",
               "bytes_on_disk", "probe_seconds", "entry"]


def leaderboard_rows(results) -> list[dict]:
    """The leaderboard as flat rows (CSV, HTML): each backbone with its paired test against the leader."""
    paired = {p["other"]: p for p in results.paired}
    out = []
    for row in results.leaderboard:
        p = paired.get(row["model"])
        out.append({
            **{k: row.get(k) for k in CSV_COLUMNS if k in row},
            "params": json.dumps(strict(row["params"]), sort_keys=True),
            "test_top1_ci_low": row["test_top1_ci"][0], "test_top1_ci_high": row["test_top1_ci"][1],
            "difference_to_leader": None if p is None else -p["difference"],
            "difference_ci_low": None if p is None else -p["ci"][1],
            "difference_ci_high": None if p is None else -p["ci"][0],
            "mcnemar_p": None if p is None else p["p_value"], "p_holm": None if p is None else p["p_holm"],
        })
    return out
