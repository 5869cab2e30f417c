"""Training hyper-parameters, checked once at the boundary with messages that say what is valid."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, replace

from ..errors import UsageError
from .freeze import check_unfreeze
from .optim import OPTIMIZERS

HEAD_INITS = ("lpft", "random")
BN_STATS = ("auto", "frozen", "update")
#: per optimiser: (head learning rate, weight decay) when not given
OPTIMIZER_DEFAULTS = {"adamw": (1e-3, 0.01), "sgd": (1e-2, 1e-4)}


def _number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _integer(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


@dataclass(frozen=True)
class TrainOptions:
    """How the network is trained. ``None`` means: the default for the optimiser or device."""

    epochs: int = 5
    lr: float | None = None  # head; default 1e-3 (AdamW) or 1e-2 (SGD)
    backbone_lr_ratio: float = 0.1
    optimizer: str = "adamw"
    weight_decay: float | None = None  # default 0.01 (AdamW) or 1e-4 (SGD)
    momentum: float = 0.9  # SGD only
    warmup_epochs: float = 0.5
    head_warmup_epochs: int = 0
    freeze_below: str | int | None = None
    unfreeze: str | None = None
    label_smoothing: float = 0.0
    dropout: float = 0.0
    augment: bool = True
    batch_size: int | None = None
    val_fraction: float = 0.2
    patience: int | None = 3  # None or 0: no early stopping
    seed: int = 0
    head_init: str = "lpft"
    #: frozen: batch norm keeps its pretrained running statistics (the features the probe saw);
    #: update: the batch norms of trained blocks learn the new data's statistics;
    #: auto: frozen, except for randomly initialised weights, whose statistics mean nothing
    bn_stats: str = "auto"

    def with_defaults(self) -> TrainOptions:
        """Fill the optimiser-dependent defaults (after ``check``)."""
        lr, wd = OPTIMIZER_DEFAULTS[self.optimizer]
        return replace(self, lr=self.lr if self.lr is not None else lr,
                       weight_decay=self.weight_decay if self.weight_decay is not None else wd,
                       unfreeze=check_unfreeze(self.unfreeze), patience=self.patience or None)

    def replace(self, **changes) -> TrainOptions:
        return replace(self, **changes)

    def to_dict(self) -> dict:
        return asdict(self)

    def check(self) -> None:
        """Raise UsageError for the first invalid option."""
        if not _integer(self.epochs) or self.epochs < 1:
            raise UsageError(f"--epochs must be a positive integer, got {self.epochs!r}.")
        if self.optimizer not in OPTIMIZERS:
            raise UsageError(f"Unknown --optimizer {self.optimizer!r}. Valid: adamw (default), sgd (with momentum).")
        if self.lr is not None and (not _number(self.lr) or self.lr <= 0):
            raise UsageError(
                f"--lr must be a positive number, got {self.lr!r}. Typical values: 1e-3 for AdamW, 1e-2 for SGD."
            )
        if not _number(self.backbone_lr_ratio) or self.backbone_lr_ratio <= 0:
            raise UsageError(
                f"--backbone-lr-ratio must be a positive number (backbone lr = lr x ratio, default 0.1), got "
                f"{self.backbone_lr_ratio!r}. To keep blocks fixed, use --freeze-below."
            )
        if self.weight_decay is not None and (not _number(self.weight_decay) or self.weight_decay < 0):
            raise UsageError(f"--weight-decay must be a number >= 0, got {self.weight_decay!r}.")
        if not _number(self.momentum) or not 0 <= self.momentum < 1:
            raise UsageError(f"--momentum must lie in [0, 1), got {self.momentum!r}.")
        if not _integer(self.head_warmup_epochs) or not 0 <= self.head_warmup_epochs < self.epochs:
            raise UsageError(
                f"--head-warmup-epochs must be an integer in [0, --epochs), got {self.head_warmup_epochs!r} with "
                f"--epochs {self.epochs}: at least one epoch must train the backbone."
            )
        if not _number(self.warmup_epochs) or self.warmup_epochs < 0 or \
                self.warmup_epochs > self.epochs - self.head_warmup_epochs:
            raise UsageError(
                f"--warmup-epochs must lie in [0, {self.epochs - self.head_warmup_epochs}] (the epochs that train "
                f"the backbone), got {self.warmup_epochs!r}."
            )
        if not _number(self.label_smoothing) or not 0 <= self.label_smoothing < 1:
            raise UsageError(f"--label-smoothing must lie in [0, 1), got {self.label_smoothing!r}.")
        if not _number(self.dropout) or not 0 <= self.dropout < 1:
            raise UsageError(f"--dropout must lie in [0, 1), got {self.dropout!r}.")
        if self.batch_size is not None and (not _integer(self.batch_size) or self.batch_size < 2):
            raise UsageError(f"--batch-size must be an integer >= 2 (batch norm needs two images), got "
                             f"{self.batch_size!r}.")
        if not _number(self.val_fraction) or not 0 < self.val_fraction < 1:
            raise UsageError(
                f"--val-fraction must lie strictly between 0 and 1, got {self.val_fraction!r}: early stopping and "
                "the best checkpoint are chosen on the validation split, which cannot be empty."
            )
        if self.patience is not None and (not _integer(self.patience) or self.patience < 0):
            raise UsageError(f"--patience must be an integer >= 0 (epochs without a better validation accuracy "
                             f"before stopping; 0: never stop early), got {self.patience!r}.")
        if not _integer(self.seed) or self.seed < 0:
            raise UsageError(f"--seed must be a non-negative integer, got {self.seed!r}.")
        if self.head_init not in HEAD_INITS:
            raise UsageError(f"Unknown --head-init {self.head_init!r}. Valid: lpft (start from the probe's logistic "
                             "regression), random (plain fine-tuning).")
        if self.freeze_below is not None and not isinstance(self.freeze_below, (str, int)):
            raise UsageError(f"--freeze-below takes a layer name or ladder index, got {self.freeze_below!r}.")
        check_unfreeze(self.unfreeze)
        if self.bn_stats not in BN_STATS:
            raise UsageError(f"Unknown --bn-stats {self.bn_stats!r}. Valid: auto (frozen for pretrained weights, "
                             "update for random ones), frozen (every batch norm keeps its running statistics, so "
                             "training sees the features the probe saw), update (the batch norms of trained "
                             "blocks learn the new data's statistics).")
