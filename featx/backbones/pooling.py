"""Reduce one layer's activations to one vector per image, on the device.

Feature maps (N,C,H,W, or N,H,W,C for Swin-style models) use a spatial rule; token
sequences (N,T,C) use a token rule that knows which leading tokens are class, register or
distillation tokens; vectors pass through. Which rule applies to a layer, and the width it
gives, are torch-free and live in ``featx.layer``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ..layer import SPATIAL_POOLS, TOKEN_POOLS, check_pool, layer_rule, pooled_width

__all__ = ["SPATIAL_POOLS", "TOKEN_POOLS", "check_pool", "layer_rule", "pooled_width", "pool"]


def pool(x: torch.Tensor, kind: str, rule: str, prefix_tokens: int = 0) -> torch.Tensor:
    """(N, ...) activations -> (N, D) float32 on the same device."""
    x = x.float()
    n = x.shape[0]
    if rule in ("identity", "none"):
        return x.reshape(n, -1)
    if kind == "tokens":
        cls = x[:, 0]
        patches = x[:, prefix_tokens:]
        if rule == "cls":
            return cls
        if rule == "mean":
            return patches.mean(dim=1)
        return torch.cat([cls, patches.mean(dim=1)], dim=1)
    if kind == "map_nhwc":
        x = x.permute(0, 3, 1, 2)
    if rule == "avg":
        return x.mean(dim=(2, 3))
    if rule == "max":
        return x.amax(dim=(2, 3))
    if rule == "avgmax":
        return torch.cat([x.mean(dim=(2, 3)), x.amax(dim=(2, 3))], dim=1)
    k = {"grid2": 2, "grid3": 3}[rule]
    return F.adaptive_avg_pool2d(x, k).reshape(n, -1)
