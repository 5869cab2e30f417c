"""``--sweep lr=1e-2,1e-3 epochs=1,3``: a grid of fine-tuning runs and its table.

Every grid point is a complete run in its own directory (resumable like any other run);
the table shows each point's best validation accuracy and its test accuracy. The point to
keep is the one with the best *validation* accuracy, never the best test accuracy.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Mapping

from ..errors import UsageError, did_you_mean
from ..evaluation import val_score

#: options a sweep may vary, and how their values are read
SWEEPABLE = {
    "lr": float,
    "epochs": int,
    "backbone_lr_ratio": float,
    "weight_decay": float,
    "warmup_epochs": float,
    "head_warmup_epochs": int,
    "label_smoothing": float,
    "dropout": float,
    "batch_size": int,
}


def _value(key: str, text: str):
    kind = SWEEPABLE[key]
    try:
        value = float(text)
    except ValueError:
        raise UsageError(f"--sweep: {key} takes numbers, got {text!r}.") from None
    if kind is int:
        if not math.isfinite(value) or value != int(value):
            raise UsageError(f"--sweep: {key} takes whole numbers, got {text!r}.")
        return int(value)
    return value


def parse_sweep(spec: str | Mapping | None) -> dict[str, list] | None:
    """``"lr=1e-2,1e-3 epochs=1,3"`` (or a mapping) -> ``{"lr": [0.01, 0.001], "epochs": [1, 3]}``."""
    if spec is None:
        return None
    if isinstance(spec, Mapping):
        items = [(str(k), [str(v) for v in (vals if isinstance(vals, (list, tuple)) else [vals])])
                 for k, vals in spec.items()]
    else:
        tokens = str(spec).replace(";", " ").split()
        if not tokens:
            raise UsageError("--sweep is empty. Example: --sweep 'lr=1e-2,1e-3,1e-4 epochs=1,3,5'.")
        items = []
        for token in tokens:
            key, sep, values = token.partition("=")
            if not sep or not values.strip(","):
                raise UsageError(f"--sweep: {token!r} is not KEY=V1,V2,... Example: --sweep 'lr=1e-2,1e-3 epochs=1,3'.")
            items.append((key, [v for v in values.split(",") if v]))
    grid: dict[str, list] = {}
    for key, values in items:
        name = key.strip().lower().replace("-", "_")
        if name not in SWEEPABLE:
            raise UsageError(f"--sweep cannot vary {key!r}.{did_you_mean(name, SWEEPABLE)} It varies: "
                             + ", ".join(SWEEPABLE) + ".")
        if name in grid:
            raise UsageError(f"--sweep names {name} twice; list all its values once: {name}=V1,V2.")
        parsed = [_value(name, v.strip()) for v in values]
        if not parsed:
            raise UsageError(f"--sweep: {name} has no values.")
        if len(set(parsed)) != len(parsed):
            raise UsageError(f"--sweep: {name} repeats a value ({', '.join(values)}).")
        grid[name] = parsed
    return grid


def grid_points(grid: dict[str, list]) -> list[dict]:
    keys = list(grid)
    return [dict(zip(keys, values)) for values in itertools.product(*(grid[k] for k in keys))]


def point_label(point: dict) -> str:
    """A directory name for one grid point, e.g. ``lr=0.001,epochs=3``."""
    return ",".join(f"{k}={v:g}" if isinstance(v, float) else f"{k}={v}" for k, v in point.items())


def best_row(rows: list[dict]) -> dict:
    """The point with the best validation accuracy (ties: the first)."""
    return max(rows, key=lambda r: (val_score(r), -rows.index(r)))


def format_table(rows: list[dict], grid: dict[str, list]) -> str:
    """Plain-text table: rows = the first swept option, columns = the second, cells = ``val / test``.

    With one swept option there is a single column; with more than two, the remaining options
    are spelled out in the row label.
    """
    keys = list(grid)
    row_key = keys[0]
    col_key = keys[1] if len(keys) > 1 else None
    rest = keys[2:]
    best = best_row(rows)

    def label(value):
        return f"{value:g}" if isinstance(value, float) else str(value)

    def cell(r):
        val = "-" if r["val_top1"] is None else f"{r['val_top1']:.4f}"
        test = "-" if r["test_top1"] is None else f"{r['test_top1']:.4f}"
        return f"{val} / {test}" + (" *" if r is best else "")

    row_labels, table = [], {}
    for r in rows:
        name = f"{row_key}={label(r[row_key])}" + "".join(f" {k}={label(r[k])}" for k in rest)
        if name not in table:
            row_labels.append(name)
            table[name] = {}
        table[name][label(r[col_key]) if col_key else "val / test"] = cell(r)
    columns = [label(v) for v in grid[col_key]] if col_key else ["val / test"]
    header = [f"{row_key} \\ {col_key}" if col_key else row_key] + [f"{col_key}={c}" if col_key else c
                                                                    for c in columns]
    body = [[name] + [table[name].get(c, "") for c in columns] for name in row_labels]
    widths = [max(len(line[i]) for line in [header] + body) for i in range(len(header))]
    lines = ["  ".join(text.ljust(w) for text, w in zip(line, widths)).rstrip() for line in [header] + body]
    lines.insert(1, "  ".join("-" * w for w in widths))
    lines.append("cells: best validation top-1 / test top-1; * = chosen by validation accuracy")
    return "\n".join(lines)
