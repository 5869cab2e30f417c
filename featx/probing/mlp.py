"""The probe's MLP head trained in torch, with scikit-learn's MLPClassifier semantics.

:class:`TorchMLPClassifier` trains the network ``MLPClassifier`` trains (ReLU, sklearn's Adam,
L2 penalty ``0.5 * alpha * ||W||^2`` per batch row, best validation weights restored) on a CPU
or a GPU, drawing every random number (initial weights, validation split, epoch shuffles)
from numpy in sklearn's order: with two classes, or without early stopping, a float64 fit
retraces sklearn's own. With more classes the early-stopping split is stratified, which
sklearn's is not. The fitted weights are numpy arrays and prediction is numpy, so a pickled
head needs neither torch nor a GPU; :meth:`TorchMLPClassifier.to_sklearn` returns a fitted
``MLPClassifier`` that predicts identically and loads without featx.

torch is imported inside functions only: importing this module does not load it.
"""

from __future__ import annotations

import copy
import warnings
from numbers import Integral

import numpy as np
from scipy.special import expit
from sklearn.base import BaseEstimator, ClassifierMixin
from sklearn.exceptions import ConvergenceWarning
from sklearn.model_selection import train_test_split
from sklearn.neural_network import MLPClassifier
from sklearn.preprocessing import LabelBinarizer
from sklearn.utils import check_random_state, shuffle
from sklearn.utils.multiclass import check_classification_targets
from sklearn.utils.validation import check_array, check_is_fitted, check_X_y

from .engines import resolve_torch_device, torch_threads

#: parameters shared one-to-one with sklearn's MLPClassifier (its others are fixed: relu, adam)
_SHARED_PARAMS = ("hidden_layer_sizes", "alpha", "batch_size", "learning_rate_init", "max_iter", "shuffle",
                  "random_state", "tol", "early_stopping", "validation_fraction", "beta_1", "beta_2", "epsilon",
                  "n_iter_no_change")
PRECISIONS = ("float32", "bfloat16")
_GATHER_BYTES = 16 * 2**20  # rows of X copied per block into the training tensors
_FITTED = ("coefs_", "intercepts_", "classes_", "n_features_in_", "n_layers_", "n_outputs_", "out_activation_",
           "n_iter_", "t_", "loss_", "loss_curve_", "best_loss_", "validation_scores_", "best_validation_score_")


class TorchMLPClassifier(ClassifierMixin, BaseEstimator):
    """One or more ReLU layers trained with Adam in torch; scikit-learn's MLPClassifier semantics.

    Parameters mean what they mean for ``sklearn.neural_network.MLPClassifier`` (solver
    ``adam``, activation ``relu``); the defaults are the probe head's (early stopping with a
    patience of 5 epochs), not MLPClassifier's. Two are torch's own:

    device : "cpu", "cuda", "cuda:N", "auto" or a ``torch.device``; where training runs (a string
        keeps the pickled estimator free of torch objects).
    n_threads : torch intra-op threads while fitting. None: the smallest BLAS limit in force
        (so ``threadpoolctl.threadpool_limits`` governs torch too), never more than torch's own
        setting. torch's global setting is restored when ``fit`` returns.
    precision : "float32" (the input's precision) or "bfloat16": the products of training take
        bfloat16 inputs and sum in float32, while the weights, Adam's moments and the loss stay
        float32 (mixed precision). On CPUs that multiply bfloat16 natively (AVX512-BF16, AMX) an
        epoch took 2.1-2.6x less time than in float32, to the same test accuracy within the
        seed-to-seed spread (``BENCHMARKS.md``). Prediction is float32 numpy either way.
    """

    def __init__(self, hidden_layer_sizes=(512,), alpha=1e-4, batch_size="auto", learning_rate_init=1e-3,
                 max_iter=200, shuffle=True, random_state=None, tol=1e-4, early_stopping=True,
                 validation_fraction=0.1, beta_1=0.9, beta_2=0.999, epsilon=1e-8, n_iter_no_change=5,
                 device="cpu", n_threads=None, precision="float32"):
        self.hidden_layer_sizes = hidden_layer_sizes
        self.alpha = alpha
        self.batch_size = batch_size
        self.learning_rate_init = learning_rate_init
        self.max_iter = max_iter
        self.shuffle = shuffle
        self.random_state = random_state
        self.tol = tol
        self.early_stopping = early_stopping
        self.validation_fraction = validation_fraction
        self.beta_1 = beta_1
        self.beta_2 = beta_2
        self.epsilon = epsilon
        self.n_iter_no_change = n_iter_no_change
        self.device = device
        self.n_threads = n_threads
        self.precision = precision

    # ------------------------------------------------------------------ fitting

    def fit(self, X, y):
        X, y = check_X_y(X, y, dtype=(np.float64, np.float32))
        check_classification_targets(y)
        hidden = self._hidden_sizes()
        if self.precision not in PRECISIONS:
            raise ValueError(f"precision must be one of {', '.join(PRECISIONS)}, got {self.precision!r}.")
        device = resolve_torch_device(self.device)
        binarizer = LabelBinarizer().fit(y)
        if len(binarizer.classes_) < 2:
            raise ValueError(f"{type(self).__name__} needs at least two classes; y has 1 class: "
                             f"{binarizer.classes_.tolist()}.")
        y_onehot = binarizer.transform(y).astype(bool)  # (n, 1) for two classes, as sklearn trains one logit
        self.classes_ = binarizer.classes_
        self.n_features_in_ = X.shape[1]
        self.n_outputs_ = y_onehot.shape[1]
        self.out_activation_ = "softmax" if self.n_outputs_ > 1 else "logistic"
        units = [X.shape[1], *hidden, self.n_outputs_]
        self.n_layers_ = len(units)

        rng = check_random_state(self.random_state)  # consumed in sklearn's order: weights, split, shuffles
        weights = [_glorot_uniform(rng, fan_in, fan_out, X.dtype) for fan_in, fan_out in zip(units[:-1], units[1:])]
        train_idx, val_idx = self._split(y_onehot, rng)
        target = y_onehot.argmax(axis=1) if self.n_outputs_ > 1 else y_onehot[:, 0]
        with torch_threads(self.n_threads):
            self._train(X, target, weights, train_idx, val_idx, rng, device)
        return self

    def _hidden_sizes(self) -> list[int]:
        sizes = self.hidden_layer_sizes
        sizes = list(sizes) if hasattr(sizes, "__iter__") else [sizes]
        if not sizes or any(not isinstance(s, Integral) or s <= 0 for s in sizes):
            raise ValueError(f"hidden_layer_sizes must be positive integers, got {self.hidden_layer_sizes!r}.")
        return [int(s) for s in sizes]

    def _split(self, y_onehot: np.ndarray, rng) -> tuple[np.ndarray, np.ndarray | None]:
        rows = np.arange(len(y_onehot))
        if not self.early_stopping:
            return rows, None
        train_idx, val_idx = train_test_split(rows, random_state=rng, test_size=self.validation_fraction,
                                              stratify=y_onehot if _can_stratify(y_onehot, self.validation_fraction)
                                              else None)
        if len(val_idx) < 2:
            raise ValueError("The validation set is too small. Increase 'validation_fraction' or the size of "
                             "your dataset.")
        return train_idx, val_idx

    def _batch_size(self, n: int) -> int:
        if self.batch_size == "auto":
            return min(200, n)
        if self.batch_size < 1 or self.batch_size > n:
            warnings.warn("Got `batch_size` less than 1 or larger than sample size. It is going to be clipped",
                          stacklevel=3)
        return int(np.clip(self.batch_size, 1, n))

    def _train(self, X, target, weights, train_idx, val_idx, rng, device) -> None:
        import torch
        import torch.nn.functional as F

        float_dtype = torch.float32 if X.dtype == np.float32 else torch.float64  # X's precision, as sklearn
        # the products' inputs; the rows are stored in it once (half the memory in bfloat16)
        compute = torch.bfloat16 if self.precision == "bfloat16" else float_dtype

        def tensor(a, dtype=float_dtype):
            return torch.as_tensor(np.ascontiguousarray(a)).to(device=device, dtype=dtype)

        def rows_of_X(rows):
            """``X[rows]`` in the compute dtype, gathered a block at a time: no full-size float32 copy on the way."""
            out = torch.empty((len(rows), X.shape[1]), dtype=compute, device=device)
            step = max(1, _GATHER_BYTES // (X.itemsize * max(1, X.shape[1])))
            for start in range(0, len(rows), step):
                out[start:start + step] = tensor(X[rows[start:start + step]], compute)
            return out

        binary = self.n_outputs_ == 1
        label_dtype = float_dtype if binary else torch.long
        X_train, y_train = rows_of_X(train_idx), tensor(target[train_idx], label_dtype)
        if val_idx is not None:
            X_val, y_val = rows_of_X(val_idx), tensor(target[val_idx], label_dtype)
        coefs = [tensor(w).requires_grad_() for w, _ in weights]
        intercepts = [tensor(b).requires_grad_() for _, b in weights]
        adam = _Adam(coefs + intercepts, float(self.learning_rate_init), float(self.beta_1), float(self.beta_2),
                     float(self.epsilon))

        def logits(x):
            for i, (w, b) in enumerate(zip(coefs, intercepts)):
                x = torch.addmm(b.to(compute), x, w.to(compute))  # no-op casts in full precision
                if i < len(coefs) - 1:
                    x = torch.relu(x)
            x = x.to(float_dtype)  # the loss and the validation score in full precision
            return x.squeeze(1) if binary else x

        def data_loss(z, y):
            return F.binary_cross_entropy_with_logits(z, y) if binary else F.cross_entropy(z, y)

        n = len(train_idx)
        batch = self._batch_size(n)
        order = np.arange(n)
        self.loss_curve_, self.t_, self._no_improvement_count = [], 0, 0
        self.validation_scores_ = [] if val_idx is not None else None
        self.best_validation_score_ = -np.inf if val_idx is not None else None
        self.best_loss_ = None if val_idx is not None else np.inf
        best = None
        self.n_iter_ = 0
        for _ in range(self.max_iter):
            if self.shuffle:
                order = shuffle(order, random_state=rng)
            epoch_order = torch.as_tensor(order, device=device)
            total = torch.zeros((), device=device)
            for start in range(0, n, batch):
                rows = epoch_order[start:start + batch]
                loss = data_loss(logits(X_train.index_select(0, rows)), y_train.index_select(0, rows))
                loss.backward()
                with torch.no_grad():
                    penalty = 0.5 * float(self.alpha) / len(rows)
                    for w in coefs:  # sklearn's L2 term, 0.5 * alpha * ||W||^2 / batch rows, on weights only
                        w.grad.add_(w, alpha=2 * penalty)
                    total += (loss + penalty * sum(torch.dot(w.view(-1), w.view(-1)) for w in coefs)) * len(rows)
                adam.step()
            self.n_iter_ += 1
            self.t_ += n
            self.loss_ = float(total) / n
            self.loss_curve_.append(self.loss_)
            if val_idx is not None:
                with torch.no_grad():
                    z = logits(X_val)
                    hits = (z > 0) == (y_val > 0.5) if binary else z.argmax(1) == y_val
                    score = int(hits.sum()) / len(hits)
                improved = self._record_validation(score)
                if improved:
                    best = [p.detach().clone() for p in coefs + intercepts]
            else:
                self._record_loss()
            if self._no_improvement_count > self.n_iter_no_change:
                break
            if self.n_iter_ == self.max_iter:
                warnings.warn(f"Stochastic Optimizer: Maximum iterations ({self.max_iter}) reached and the "
                              "optimization hasn't converged yet.", ConvergenceWarning, stacklevel=3)
        params = best if best is not None else [p.detach() for p in coefs + intercepts]
        arrays = [p.cpu().numpy().copy() for p in params]
        self.coefs_, self.intercepts_ = arrays[:len(coefs)], arrays[len(coefs):]

    def _record_validation(self, score: float) -> bool:
        """sklearn's rule: a miss is any epoch not ``tol`` above the best; the best weights are kept."""
        self.validation_scores_.append(score)
        self._no_improvement_count = 0 if score >= self.best_validation_score_ + self.tol else (
            self._no_improvement_count + 1)
        if score > self.best_validation_score_:
            self.best_validation_score_ = score
            return True
        return False

    def _record_loss(self) -> None:
        last = self.loss_curve_[-1]
        self._no_improvement_count = self._no_improvement_count + 1 if last > self.best_loss_ - self.tol else 0
        self.best_loss_ = min(self.best_loss_, last)

    # ------------------------------------------------------------------ prediction (numpy, as sklearn computes it)

    def _forward(self, X) -> np.ndarray:
        check_is_fitted(self, "coefs_")
        X = check_array(X, dtype=(np.float64, np.float32))
        if X.shape[1] != self.n_features_in_:
            raise ValueError(f"X has {X.shape[1]} features, but {type(self).__name__} is expecting "
                             f"{self.n_features_in_} features as input.")
        out = X
        for i, (w, b) in enumerate(zip(self.coefs_, self.intercepts_)):
            out = out @ w
            out += b
            if i < len(self.coefs_) - 1:
                np.maximum(out, 0, out=out)
        if self.out_activation_ == "logistic":
            return expit(out, out=out).ravel()
        out = out - out.max(axis=1)[:, np.newaxis]
        np.exp(out, out=out)
        out /= out.sum(axis=1)[:, np.newaxis]
        return out

    def predict_proba(self, X) -> np.ndarray:
        """Class probabilities, columns in ``classes_`` order."""
        p = self._forward(X)
        return np.vstack([1 - p, p]).T if p.ndim == 1 else p

    def predict_log_proba(self, X) -> np.ndarray:
        return np.log(self.predict_proba(X))

    def predict(self, X) -> np.ndarray:
        p = self._forward(X)
        return self.classes_[(p > 0.5).astype(int) if p.ndim == 1 else p.argmax(axis=1)]

    # ------------------------------------------------------------------ portability

    def to_sklearn(self) -> MLPClassifier:
        """The fitted network as scikit-learn's own ``MLPClassifier``: same predictions, loads without featx."""
        check_is_fitted(self, "coefs_")
        clf = MLPClassifier(activation="relu", solver="adam", **{k: getattr(self, k) for k in _SHARED_PARAMS})
        for name in _FITTED:
            setattr(clf, name, copy.deepcopy(getattr(self, name)))
        clf._label_binarizer = LabelBinarizer().fit(self.classes_)
        return clf


def _can_stratify(y_onehot: np.ndarray, fraction: float) -> bool:
    """Whether every class can appear on both sides of the split; when not (a class with a single
    example, fewer validation rows than classes), the split is a plain shuffle, as sklearn's is."""
    n, n_classes = len(y_onehot), max(2, y_onehot.shape[1])
    counts = y_onehot.sum(axis=0) if y_onehot.shape[1] > 1 else np.bincount(y_onehot[:, 0], minlength=2)
    n_val = int(np.ceil(fraction * n))
    return counts.min() >= 2 and n_val >= n_classes and n - n_val >= n_classes


class _Adam:
    """sklearn's Adam, step for step: torch.optim.Adam adds epsilon after the bias correction of the
    second moment, sklearn before it, which changes the steps of weights whose gradients are tiny
    (e.g. on constant features) and with them the epoch at which early stopping fires."""

    def __init__(self, params, lr: float, beta_1: float, beta_2: float, epsilon: float):
        import torch

        self.params, self.lr, self.beta_1, self.beta_2, self.epsilon = params, lr, beta_1, beta_2, epsilon
        self.ms = [torch.zeros_like(p) for p in params]
        self.vs = [torch.zeros_like(p) for p in params]
        self.denominators = [torch.empty_like(p) for p in params]
        self.t = 0

    def step(self) -> None:
        import torch

        self.t += 1
        lr = float(self.lr * np.sqrt(1 - self.beta_2**self.t) / (1 - self.beta_1**self.t))
        with torch.no_grad():
            for p, m, v, denominator in zip(self.params, self.ms, self.vs, self.denominators):
                g, p.grad = p.grad, None
                m.mul_(self.beta_1).add_(g, alpha=1 - self.beta_1)
                v.mul_(self.beta_2).addcmul_(g, g, value=1 - self.beta_2)
                torch.sqrt(v, out=denominator).add_(self.epsilon)
                p.addcdiv_(m, denominator, value=-lr)


def _glorot_uniform(rng, fan_in: int, fan_out: int, dtype) -> tuple[np.ndarray, np.ndarray]:
    """sklearn's initialisation for ReLU networks: same draws, same order, same dtype."""
    bound = np.sqrt(6.0 / (fan_in + fan_out))
    coef = rng.uniform(-bound, bound, (fan_in, fan_out))
    intercept = rng.uniform(-bound, bound, fan_out)
    return coef.astype(dtype, copy=False), intercept.astype(dtype, copy=False)


