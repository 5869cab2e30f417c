"""Plots of probe results. matplotlib is imported lazily and always with the Agg backend.

Each plot is a small display object (as in scikit-learn) holding ``figure_`` and ``ax_`` so
that users can restyle it before saving.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np


def _pyplot():
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    return plt


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


@dataclass
class LayerCurveDisplay:
    """Test accuracy against relative depth, one line per head, 95% intervals shaded."""

    figure_: object
    ax_: object

    @classmethod
    def from_rows(cls, rows: list[dict], title: str = "", best: dict | None = None) -> LayerCurveDisplay:
        plt = _pyplot()
        fig, ax = plt.subplots(figsize=(8, 4.8), dpi=120)
        heads = list(dict.fromkeys(r["head"] for r in rows))
        for head in heads:
            curve = sorted((r for r in rows if r["head"] == head), key=lambda r: r["order"])
            depth = np.array([r["depth"] for r in curve])
            acc = np.array([r["test_top1"] for r in curve])
            lo = np.array([r["test_top1_ci"][0] for r in curve])
            hi = np.array([r["test_top1_ci"][1] for r in curve])
            (line,) = ax.plot(depth, acc, marker="o", label=head)
            ax.fill_between(depth, lo, hi, color=line.get_color(), alpha=0.18, linewidth=0)
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
        _pyplot().close(self.figure_)
        return Path(path)


@dataclass
class ConfusionDisplay:
    """Row-normalised confusion matrix of one head on the test split."""

    figure_: object
    ax_: object
    matrix: np.ndarray

    @classmethod
    def from_predictions(cls, y_true, y_pred, classes: list[str], title: str = "") -> ConfusionDisplay:
        plt = _pyplot()
        n = len(classes)
        matrix = np.zeros((n, n), dtype=np.int64)
        np.add.at(matrix, (np.asarray(y_true), np.asarray(y_pred)), 1)
        rates = matrix / np.maximum(matrix.sum(axis=1, keepdims=True), 1)
        size = min(12, 3 + 0.45 * n)
        fig, ax = plt.subplots(figsize=(size, size), dpi=120)
        ax.imshow(rates, cmap="Blues", vmin=0, vmax=1)
        if n <= 30:
            ax.set_xticks(range(n))
            ax.set_yticks(range(n))
            ax.set_xticklabels(classes, rotation=60, ha="right", fontsize=7)
            ax.set_yticklabels(classes, fontsize=7)
            for i in range(n):
                for j in range(n):
                    if matrix[i, j]:
                        ax.text(j, i, str(matrix[i, j]), ha="center", va="center", fontsize=6,
                                color="white" if rates[i, j] > 0.5 else "black")
        ax.set_xlabel("predicted")
        ax.set_ylabel("true")
        ax.set_title(title, fontsize=9)
        fig.tight_layout()
        return cls(fig, ax, matrix)

    def save(self, path: str | Path) -> Path:
        self.figure_.savefig(path)
        _pyplot().close(self.figure_)
        return Path(path)
