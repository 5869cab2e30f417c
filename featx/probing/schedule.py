"""The order in which the probe's (layer, head) cells go to the workers: longest first.

Cells differ in cost by two orders of magnitude (on a 12,000-row Fashion-MNIST entry, one CPU
thread: the Nystroem SVM 120-470 s per layer, not in order of width, LinearSVC 74 s and the MLP
38 s on the 1,280-wide layer, k-NN 3 s). Dispatched shallow layer first, the last cells
were the widest layer's SVM and MLP, and one worker finished minutes after the other. Sent
longest first (the classic LPT rule), the small cells fill the gaps at the end. The order only
changes when a cell runs, never what it computes: each cell is seeded and single-threaded.
"""

from __future__ import annotations

#: heads from the costliest per cell to the cheapest, as measured (see above); heads not listed
#: (custom estimators) go between the MLP and logistic regression
HEADS_BY_COST = ("svm", "linsvm", "mlp", "logreg", "knn")


def head_rank(name: str) -> float:
    return HEADS_BY_COST.index(name) if name in HEADS_BY_COST else HEADS_BY_COST.index("mlp") + 0.5


def longest_first(cells: list[tuple]) -> list[tuple]:
    """``(record, head, ...)`` tuples: costliest heads first, and within a head the widest layer
    first; ties keep their given order."""
    return sorted(cells, key=lambda cell: (head_rank(cell[1].name), -cell[0].width))
