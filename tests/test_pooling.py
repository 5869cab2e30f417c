"""Every pooling mode and token rule against an independent numpy computation."""

import numpy as np
import pytest
import torch

from featx.backbones.pooling import SPATIAL_POOLS, check_pool, layer_rule, pool, pooled_width
from featx.errors import UsageError

rng = np.random.default_rng(0)
MAP = rng.normal(size=(3, 5, 6, 6)).astype(np.float32)  # N, C, H, W


def _grid(x: np.ndarray, k: int) -> np.ndarray:
    n, c, h, w = x.shape
    out = np.zeros((n, c, k, k), dtype=np.float64)
    for i in range(k):
        for j in range(k):
            rs, re_ = (i * h) // k, -(-((i + 1) * h) // k)
            cs, ce = (j * w) // k, -(-((j + 1) * w) // k)
            out[:, :, i, j] = x[:, :, rs:re_, cs:ce].mean(axis=(2, 3))
    return out.reshape(n, -1)


EXPECTED = {
    "avg": lambda x: x.mean(axis=(2, 3)),
    "max": lambda x: x.max(axis=(2, 3)),
    "avgmax": lambda x: np.concatenate([x.mean(axis=(2, 3)), x.max(axis=(2, 3))], axis=1),
    "grid2": lambda x: _grid(x, 2),
    "grid3": lambda x: _grid(x, 3),
    "none": lambda x: x.reshape(len(x), -1),
}


@pytest.mark.parametrize("mode", SPATIAL_POOLS)
def test_spatial_modes_match_numpy(mode):
    got = pool(torch.from_numpy(MAP), "map", mode).numpy()
    np.testing.assert_allclose(got, EXPECTED[mode](MAP), rtol=1e-5, atol=1e-6)
    assert got.shape[1] == pooled_width(MAP.shape[1:], "map", mode)
    assert got.dtype == np.float32


@pytest.mark.parametrize("mode", ["avg", "max", "avgmax", "grid2", "grid3"])
def test_channels_last_maps_pool_like_channels_first(mode):
    nhwc = torch.from_numpy(MAP).permute(0, 2, 3, 1).contiguous()
    got = pool(nhwc, "map_nhwc", mode).numpy()
    np.testing.assert_allclose(got, EXPECTED[mode](MAP), rtol=1e-5, atol=1e-6)
    assert got.shape[1] == pooled_width(tuple(nhwc.shape[1:]), "map_nhwc", mode)


TOKENS = rng.normal(size=(2, 1 + 4 + 9, 7)).astype(np.float32)  # cls, 4 registers, 9 patches


@pytest.mark.parametrize(
    "rule, expected",
    [
        ("cls", lambda t: t[:, 0]),
        ("mean", lambda t: t[:, 5:].mean(axis=1)),  # registers and cls excluded
        ("cls+mean", lambda t: np.concatenate([t[:, 0], t[:, 5:].mean(axis=1)], axis=1)),
    ],
)
def test_token_rules_exclude_prefix_tokens(rule, expected):
    got = pool(torch.from_numpy(TOKENS), "tokens", rule, prefix_tokens=5).numpy()
    np.testing.assert_allclose(got, expected(TOKENS), rtol=1e-5, atol=1e-6)
    assert got.shape[1] == pooled_width(TOKENS.shape[1:], "tokens", rule)


def test_mean_without_prefix_tokens_uses_every_token():
    got = pool(torch.from_numpy(TOKENS), "tokens", "mean", prefix_tokens=0).numpy()
    np.testing.assert_allclose(got, TOKENS.mean(axis=1), rtol=1e-5)


def test_layer_rules():
    assert layer_rule("vector", False, "grid3", "auto") == "identity"
    assert layer_rule("map", False, "grid2", "cls") == "grid2"
    assert layer_rule("tokens", True, "avg", "auto") == "cls"
    assert layer_rule("tokens", False, "avg", "auto") == "mean"
    assert layer_rule("tokens", False, "avg", "cls+mean") == "mean"  # no class token in this layer
    assert layer_rule("tokens", True, "none", "cls") == "none"


def test_half_precision_activations_pool_in_float32():
    x = torch.from_numpy(MAP).half()
    got = pool(x, "map", "avg")
    assert got.dtype == torch.float32
    np.testing.assert_allclose(got.numpy(), MAP.astype(np.float16).astype(np.float32).mean(axis=(2, 3)), rtol=1e-3)


@pytest.mark.parametrize("pool_mode, token_mode", [("mean", "auto"), ("avg", "first")])
def test_unknown_modes_are_usage_errors(pool_mode, token_mode):
    with pytest.raises(UsageError, match="Valid"):
        check_pool(pool_mode, token_mode)
