"""Plots of probe results, drawn with matplotlib's object API (never pyplot's global state).

Each plot is a small display object (as in scikit-learn) holding ``figure_`` and ``ax_`` so
that users can restyle it before saving. matplotlib is imported lazily, here only.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np


def _figure(size: tuple[float, float], dpi: int = 120):
    """A figure on its own Agg canvas: no pyplot window, no backend switch, nothing to close."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=size, dpi=dpi)
    FigureCanvasAgg(fig)
    return fig


def _depth_labels(layers: list[tuple[float, str]], min_gap: float = 0.04) -> list[str]:
    """Tick labels for layers at these depths; layers closer than ``min_gap`` share one label.

    Neighbours such as EfficientNet's ``bn2`` (0.99) and ``pre_logits`` (1.00) would otherwise
    print on top of each other.
    """
    labels = [""] * len(layers)
    start = 0
    for i in range(len(layers)):
        last_of_group = i + 1 == len(layers) or layers[i + 1][0] - layers[i][0] >= min_gap
        if last_of_group:
            group = layers[start : i + 1]
            labels[i] = " / ".join(n for _, n in group) + "\n" + " / ".join(f"{d:.2f}" for d, _ in group)
            start = i + 1
    return labels


def _accuracy_curve(ax, curve: list[dict], band_alpha: float, **line_kw):
    """Test accuracy against depth as a line with its 95% interval shaded; the line and its arrays."""
    depth = np.array([p["depth"] for p in curve])
    acc = np.array([p["test_top1"] for p in curve])
    lo = np.array([p["test_top1_ci"][0] for p in curve])
    hi = np.array([p["test_top1_ci"][1] for p in curve])
    (line,) = ax.plot(depth, acc, marker="o", **line_kw)
    ax.fill_between(depth, lo, hi, color=line.get_color(), alpha=band_alpha, linewidth=0)
    return line, (depth, acc, lo, hi)


@dataclass
class LayerCurveDisplay:
    """Test accuracy against relative depth, one line per head, 95% intervals shaded."""

    figure_: object
    ax_: object

    @classmethod
    def from_rows(cls, rows: list[dict], title: str = "", best: dict | None = None) -> LayerCurveDisplay:
        fig = _figure((8, 4.8))
        ax = fig.add_subplot()
        heads = list(dict.fromkeys(r["head"] for r in rows))
        for head in heads:
            curve = sorted((r for r in rows if r["head"] == head), key=lambda r: r["order"])
            line, (depth, acc, lo, hi) = _accuracy_curve(ax, curve, band_alpha=0.18, label=head)
            ax.errorbar(depth, acc, yerr=[acc - lo, hi - acc], fmt="none", ecolor=line.get_color(), capsize=2,
                        alpha=0.8)
        layers = sorted({(r["depth"], r["layer"]) for r in rows})
        ax.set_xticks([d for d, _ in layers])
        ax.set_xticklabels(_depth_labels(layers), rotation=45, ha="right", fontsize=7)
        if best is not None:
            ax.margins(y=0.12)  # room for the label above the best point
            ax.annotate("best (validation)", (best["depth"], best["test_top1"]), xytext=(0, 14),
                        textcoords="offset points", ha="center", fontsize=8,
                        arrowprops={"arrowstyle": "->", "lw": 0.8})
        ax.set_xlabel("layer (relative depth)")
        ax.set_ylabel("test top-1 accuracy")
        ax.set_title(title or "Probe accuracy by depth", fontsize=10)
        ax.grid(alpha=0.3)
        ax.legend(title="head", fontsize=8)
        fig.tight_layout()
        return cls(fig, ax)

    def save(self, path: str | Path) -> Path:
        self.figure_.savefig(path)
        return Path(path)


@dataclass
class ConfusionDisplay:
    """Confusion matrix of one head on the test split: colour = share of the true class, text = count.

    Drawn by scikit-learn's ``ConfusionMatrixDisplay`` (kept as ``display_``) on featx's figure.
    """

    figure_: object
    ax_: object
    matrix: np.ndarray  # counts, rows = true class, columns = predicted class
    display_: object = None

    @classmethod
    def from_predictions(cls, y_true, y_pred, classes: list[str], title: str = "") -> ConfusionDisplay:
        from sklearn.metrics import ConfusionMatrixDisplay, confusion_matrix

        n = len(classes)
        labels = np.arange(n)
        matrix = confusion_matrix(y_true, y_pred, labels=labels)
        size = min(12, 3 + 0.45 * n)
        fig = _figure((size, size))
        ax = fig.add_subplot()
        readable = n <= 30  # beyond that, names and counts would overlap
        display = ConfusionMatrixDisplay.from_predictions(
            y_true, y_pred, labels=labels, normalize="true", display_labels=list(classes), cmap="Blues",
            ax=ax, colorbar=False, include_values=readable, xticks_rotation=60,
            im_kw={"vmin": 0, "vmax": 1}, text_kw={"fontsize": 6},
        )
        if readable:
            for (i, j), text in np.ndenumerate(display.text_):
                text.set_text(str(matrix[i, j]) if matrix[i, j] else "")
                text.set_color("white" if display.confusion_matrix[i, j] > 0.5 else "black")
            ax.tick_params(labelsize=7)
            for label in ax.get_xticklabels():
                label.set_horizontalalignment("right")
        else:
            ax.set_xticks([])
            ax.set_yticks([])
        ax.set_xlabel("predicted")
        ax.set_ylabel("true")
        ax.set_title(title, fontsize=9)
        fig.tight_layout()
        return cls(fig, ax, matrix, display)

    def save(self, path: str | Path) -> Path:
        self.figure_.savefig(path)
        return Path(path)


@dataclass
class BackboneCurveDisplay:
    """Test accuracy against relative depth, one line per backbone at its best head (``featx compare``);
    random-init baselines dashed, 95% intervals shaded, each backbone's chosen layer marked."""

    figure_: object
    ax_: object

    @classmethod
    def from_comparison(cls, curves: dict[str, list[dict]], leaderboard: list[dict], title: str = "",
                        ) -> BackboneCurveDisplay:
        fig = _figure((8, 4.8))
        ax = fig.add_subplot()
        rows = {r["model"]: r for r in leaderboard}
        for model, curve in curves.items():
            row = rows[model]
            line, _ = _accuracy_curve(ax, curve, band_alpha=0.15, label=f"{model} ({row['head']})",
                                      linestyle="--" if row.get("baseline_of") else "-")
            ax.plot([row["depth"]], [row["test_top1"]], marker="*", markersize=13, color=line.get_color(),
                    linestyle="none")
        ax.set_xlim(-0.03, 1.03)
        ax.set_xlabel("relative depth (0 = input, 1 = embedding); star: layer chosen on validation data")
        ax.set_ylabel("test top-1 accuracy")
        ax.set_title(title or "Probe accuracy by depth, per backbone", fontsize=10)
        ax.grid(alpha=0.3)
        ax.legend(title="backbone (head)", fontsize=8)
        fig.tight_layout()
        return cls(fig, ax)

    def save(self, path: str | Path) -> Path:
        self.figure_.savefig(path)
        return Path(path)


@dataclass
class LearningCurveDisplay:
    """Test accuracy against labelled images per class (``--shots``), mean with min-max band."""

    figure_: object
    ax_: object

    @classmethod
    def from_shots(cls, shots: dict[str, dict], title: str = "") -> LearningCurveDisplay:
        fig = _figure((7, 4.4))
        ax = fig.add_subplot()
        for model, curve in shots.items():
            points = curve["points"]
            x = np.array([p["n_train"] / max(1, curve.get("n_classes", 1)) if p["shots"] == "all" else p["shots"]
                          for p in points], dtype=float)
            mean = np.array([p["mean"] for p in points])
            (line,) = ax.plot(x, mean, marker="o", label=f"{model} ({curve['head']} on {curve['layer']})")
            ax.fill_between(x, [p["min"] for p in points], [p["max"] for p in points], color=line.get_color(),
                            alpha=0.15, linewidth=0)
        ax.set_xscale("log")
        ax.set_xlabel("labelled training images per class (last point: all)")
        ax.set_ylabel("test top-1 accuracy")
        ax.set_title(title or "How many labels are needed", fontsize=10)
        ax.grid(alpha=0.3, which="both")
        ax.legend(fontsize=8)
        fig.tight_layout()
        return cls(fig, ax)

    def save(self, path: str | Path) -> Path:
        self.figure_.savefig(path)
        return Path(path)
