"""What ``predict`` returns: one row per image, the predicted class and the top-k classes with their
scores, and the CSV file it is written as (atomically: a file appears complete or not at all).

CSV columns: ``id``, ``path``, ``prediction``, then ``top1``, ``top1_<kind>`` ... ``topK``,
``topK_<kind>``, then ``error``. ``<kind>`` names what the scores are: ``probability``
(predict_proba, or a fine-tuned network's softmax), ``decision`` (decision_function, for heads
without probabilities such as linear SVMs: larger is more confident, not a probability) or
``vote`` (heads with neither). Classes rank by score, ties by class order. An unreadable
image has an empty prediction and its reason in ``error``.
"""

from __future__ import annotations

import csv
import io
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from .._fileio import atomic_write_bytes


@dataclass
class PredictionTable:
    """Predictions for ``ids``/``paths`` (in the order the images were given).

    ``scores[i, j]`` is image ``i``'s score for ``classes[j]`` (NaN where the image could not be
    read); ``predicted[i]`` is the class the head or network predicts (None where unreadable);
    ``errors[i]`` is '' or why the image could not be read. ``source`` says what predicted: the
    kind of result, its folder, model, layer and head.
    """

    ids: list[str]
    paths: list[str]
    classes: list[str]
    scores: np.ndarray
    predicted: list[str | None]
    errors: list[str]
    score_kind: str
    top_k: int
    source: dict = field(default_factory=dict)
    out: Path | None = None

    def __len__(self) -> int:
        return len(self.ids)

    @property
    def n_ok(self) -> int:
        return sum(1 for e in self.errors if not e)

    @property
    def failed(self) -> list[tuple[str, str]]:
        """(path, reason) of every image that could not be read."""
        return [(p, e) for p, e in zip(self.paths, self.errors) if e]

    def top(self, i: int) -> list[tuple[str, float]]:
        """Image ``i``'s ``top_k`` classes, best first, with their scores ([] when unreadable)."""
        if self.errors[i]:
            return []
        order = np.argsort(-self.scores[i], kind="stable")[: self.top_k]
        return [(self.classes[j], float(self.scores[i, j])) for j in order]

    def columns(self) -> list[str]:
        ranks = [c for k in range(1, self.top_k + 1) for c in (f"top{k}", f"top{k}_{self.score_kind}")]
        return ["id", "path", "prediction", *ranks, "error"]

    def rows(self) -> list[dict]:
        """One dict per image, keyed by :meth:`columns` (scores as floats, empty cells as '')."""
        out = []
        for i in range(len(self)):
            row = {"id": self.ids[i], "path": self.paths[i], "prediction": self.predicted[i] or ""}
            top = self.top(i)
            for k in range(1, self.top_k + 1):
                name, score = top[k - 1] if k <= len(top) else ("", "")
                row[f"top{k}"], row[f"top{k}_{self.score_kind}"] = name, score
            row["error"] = self.errors[i]
            out.append(row)
        return out

    def to_csv(self, path: str | Path | None = None) -> str:
        """The CSV text; with ``path`` also written there atomically (its folder is created)."""
        buffer = io.StringIO(newline="")
        writer = csv.DictWriter(buffer, fieldnames=self.columns(), lineterminator="\n")
        writer.writeheader()
        for row in self.rows():
            writer.writerow({k: format(v, ".6g") if isinstance(v, float) else v for k, v in row.items()})
        text = buffer.getvalue()
        if path is not None:
            path = Path(path)
            path.parent.mkdir(parents=True, exist_ok=True)
            atomic_write_bytes(path, lambda fh: fh.write(text.encode("utf-8")))
        return text
