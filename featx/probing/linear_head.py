"""The probe's logistic regression as plain arrays, for fine-tuning to start from (LP-FT).

Stored as ``linear_head.npz`` (no pickle): the coefficients act on standardised features,
and ``folded()`` moves the standardisation into the weights so that a single linear layer on
raw pooled features gives the same logits.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from ..errors import UsageError

FILENAME = "linear_head.npz"


@dataclass
class LinearHead:
    layer: str
    labels: np.ndarray  # class indices (into the entry's classes) of the rows of coef
    n_classes: int  # classes of the entry
    coef: np.ndarray  # (len(labels), D) on standardised features
    intercept: np.ndarray  # (len(labels),)
    mean: np.ndarray  # (D,) the scaler's mean
    scale: np.ndarray  # (D,) the scaler's scale
    meta: dict = field(default_factory=dict)

    @classmethod
    def from_pipeline(cls, pipeline, layer: str, n_classes: int, meta: dict | None = None) -> LinearHead:
        """From a fitted ``Pipeline([StandardScaler, LogisticRegression])``."""
        scaler, clf = pipeline[0], pipeline[-1]
        coef = np.asarray(clf.coef_, dtype=np.float64)
        intercept = np.asarray(clf.intercept_, dtype=np.float64)
        if coef.shape[0] == 1 and len(clf.classes_) == 2:  # binary: one logit z -> (-z/2, z/2), same softmax
            coef = np.vstack([-coef[0] / 2, coef[0] / 2])
            intercept = np.array([-intercept[0] / 2, intercept[0] / 2])
        mean = getattr(scaler, "mean_", None)
        scale = getattr(scaler, "scale_", None)
        d = coef.shape[1]
        return cls(layer, np.asarray(clf.classes_, dtype=np.int64), int(n_classes), coef, intercept,
                   np.zeros(d) if mean is None else np.asarray(mean, dtype=np.float64),
                   np.ones(d) if scale is None else np.asarray(scale, dtype=np.float64), dict(meta or {}))

    def folded(self) -> tuple[np.ndarray, np.ndarray]:
        """(W, b) over all ``n_classes`` on raw features: logits = X @ W.T + b.

        Classes the probe never saw in training get zero weights and a bias of -1e4, so
        they are not predicted before fine-tuning has seen them.
        """
        w = self.coef / self.scale
        b = self.intercept - w @ self.mean
        W = np.zeros((self.n_classes, w.shape[1]))
        B = np.full(self.n_classes, -1e4)
        W[self.labels], B[self.labels] = w, b
        return W, B

    def logits(self, X: np.ndarray) -> np.ndarray:
        W, b = self.folded()
        return np.asarray(X, dtype=np.float64) @ W.T + b

    def save(self, directory: str | Path) -> Path:
        path = Path(directory) / FILENAME
        np.savez(path, labels=self.labels, coef=self.coef, intercept=self.intercept, mean=self.mean,
                 scale=self.scale, meta=np.asarray(json.dumps({**self.meta, "layer": self.layer,
                                                               "n_classes": self.n_classes})))
        return path

    @classmethod
    def load(cls, directory: str | Path) -> LinearHead:
        path = Path(directory) / FILENAME
        if not path.is_file():
            raise UsageError(
                f"{directory} holds no logistic-regression head ({FILENAME}); LP-FT starts from the probe's "
                "logreg head. Re-run featx probe with the logreg head, or pass --head-init random."
            )
        with np.load(path, allow_pickle=False) as z:
            meta = json.loads(str(z["meta"]))
            return cls(meta.pop("layer"), z["labels"], int(meta.pop("n_classes")), z["coef"], z["intercept"],
                       z["mean"], z["scale"], meta)
