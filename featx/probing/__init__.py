"""The probe stage: scikit-learn heads on every cached layer, under a leak-free protocol."""

from .heads import DEFAULT_HEADS, HEADS, Head, custom_head
from .linear_head import LinearHead
from .protocol import Splits, assign_splits, selection_folds, validation_folds
from .runner import ProbeResults, probe

__all__ = ["probe", "ProbeResults", "Head", "HEADS", "DEFAULT_HEADS", "custom_head", "LinearHead", "Splits",
           "assign_splits", "selection_folds", "validation_folds"]
