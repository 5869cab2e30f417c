"""Optimiser and learning-rate schedule.

Two learning rates: the head's, and a lower one for the backbone (pretrained features should
move less than a new head). Weight decay applies to weight matrices and kernels only, never to
biases or normalisation scales. Each group follows linear warm-up then cosine decay to zero;
the backbone's schedule starts when the head-only warm-up ends, so it gets its own warm-up.
"""

from __future__ import annotations

import math

import torch
from torch.optim.lr_scheduler import LambdaLR

from .model import FinetuneNet

OPTIMIZERS = ("adamw", "sgd")


def parameter_groups(net: FinetuneNet, lr: float, backbone_lr: float, weight_decay: float) -> list[dict]:
    """head/backbone x decay/no-decay groups; every parameter is listed even while frozen."""
    buckets: dict[tuple[str, bool], list] = {}
    for name, param in net.named_parameters():
        part = "backbone" if name.startswith("backbone.") else "head"
        buckets.setdefault((part, param.ndim >= 2), []).append(param)
    groups = []
    for (part, decay), params in sorted(buckets.items()):
        groups.append({"params": params, "name": f"{part}{'' if decay else '-no-decay'}",
                       "lr": backbone_lr if part == "backbone" else lr,
                       "weight_decay": weight_decay if decay else 0.0})
    return groups


def build_optimizer(kind: str, groups: list[dict], momentum: float) -> torch.optim.Optimizer:
    if kind == "adamw":
        return torch.optim.AdamW(groups)
    return torch.optim.SGD(groups, momentum=momentum)


class WarmupCosine:
    """Learning-rate factor at a global step: 0 before ``start``, linear warm-up, cosine to 0 at ``total``.

    A callable object rather than a lambda, so that ``LambdaLR.state_dict()`` records it.
    """

    def __init__(self, start: int, warmup: int, total: int):
        self.start, self.warmup, self.total = int(start), int(warmup), int(total)

    def __call__(self, step: int) -> float:
        s = step - self.start
        if s < 0:
            return 0.0
        if s < self.warmup:
            return (s + 1) / self.warmup
        span = max(1, self.total - self.start - self.warmup)
        progress = min(1.0, (s - self.warmup) / span)
        return 0.5 * (1.0 + math.cos(math.pi * progress))


def build_scheduler(optimizer: torch.optim.Optimizer, steps_per_epoch: int, epochs: int,
                    warmup_epochs: float, head_warmup_epochs: int) -> LambdaLR:
    total = steps_per_epoch * epochs
    warmup = int(round(warmup_epochs * steps_per_epoch))
    factors = []
    for group in optimizer.param_groups:
        start = head_warmup_epochs * steps_per_epoch if group["name"].startswith("backbone") else 0
        factors.append(WarmupCosine(start, warmup, total))
    return LambdaLR(optimizer, factors)
