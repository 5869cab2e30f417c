"""``curves.png``: training and validation loss and accuracy by epoch.

Drawn with matplotlib's object API on an Agg canvas (imported here, lazily), so the process's
pyplot backend and global state are never touched.
"""

from __future__ import annotations

import io
from pathlib import Path

from .._fileio import atomic_write_bytes


def _series(history: list[dict], key: str) -> tuple[list[int], list[float]]:
    points = [(h["epoch"], h[key]) for h in history if h.get(key) is not None and h[key] == h[key]]
    return [p[0] for p in points], [p[1] for p in points]


def plot_curves(history: list[dict], path: Path, title: str, best_epoch: int | None = None) -> Path:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from matplotlib.ticker import MaxNLocator

    fig = Figure(figsize=(9, 3.6), layout="constrained")
    FigureCanvasAgg(fig)
    loss_ax, acc_ax = fig.subplots(1, 2)
    for ax, metric, label in ((loss_ax, "loss", "loss"), (acc_ax, "top1", "top-1 accuracy")):
        for split, style in (("train", "o-"), ("val", "s-")):
            x, y = _series(history, f"{split}_{metric}")
            if x:
                ax.plot(x, y, style, label=split, markersize=4)
        if best_epoch:
            ax.axvline(best_epoch, color="0.6", linestyle=":", label=f"best (epoch {best_epoch})")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set_xlabel("epoch (0 = before training)")
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle(title, fontsize=10)
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=110)
    atomic_write_bytes(Path(path), lambda fh: fh.write(buffer.getvalue()))
    return Path(path)
