"""Reduce one layer's activations to one vector per image, on the device.

Feature maps (N,C,H,W, or N,H,W,C for Swin-style models) use a spatial rule; token
sequences (N,T,C) use a token rule that knows which leading tokens are class, register or
distillation tokens; vectors pass through.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ..errors import UsageError

SPATIAL_POOLS = ("avg", "max", "avgmax", "grid2", "grid3", "none")
TOKEN_POOLS = ("auto", "cls", "mean", "cls+mean")


def check_pool(pool: str, token_pool: str) -> None:
    if pool not in SPATIAL_POOLS:
        raise UsageError(f"Unknown pooling {pool!r}. Valid: {', '.join(SPATIAL_POOLS)}.")
    if token_pool not in TOKEN_POOLS:
        raise UsageError(f"Unknown token pooling {token_pool!r}. Valid: {', '.join(TOKEN_POOLS)}.")


def layer_rule(kind: str, has_cls: bool, pool: str, token_pool: str) -> str:
    """The rule actually applied to a layer of ``kind``; recorded with the layer in the cache."""
    if kind == "vector":
        return "identity"
    if pool == "none":
        return "none"
    if kind == "tokens":
        rule = token_pool
        if rule == "auto":
            rule = "cls" if has_cls else "mean"
        if "cls" in rule and not has_cls:
            rule = "mean"  # this layer carries no class token (e.g. the patch embedding)
        return rule
    return pool


def pooled_width(raw_shape: tuple[int, ...], kind: str, rule: str) -> int:
    """Width of the pooled vector for a per-sample shape ``raw_shape``."""
    if rule in ("identity", "none"):
        n = 1
        for s in raw_shape:
            n *= int(s)
        return n
    channels = raw_shape[-1] if kind in ("tokens", "map_nhwc") else raw_shape[0]
    return {
        "avg": channels, "max": channels, "avgmax": 2 * channels,
        "grid2": 4 * channels, "grid3": 9 * channels,
        "cls": channels, "mean": channels, "cls+mean": 2 * channels,
    }[rule]


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
