"""Batch norm folded into convolutions for extraction: the same features, fewer passes.

Checked on real architectures (timm's EfficientNet-Lite with its BatchNormAct2d and
same-padding convolutions, torchvision's ResNet with plain BatchNorm2d) with random
running statistics, so that every fold does real arithmetic, against the unfolded network's
tapped layers; and on the cases where folding would change an answer, which must keep the
original network.
"""

from __future__ import annotations

import logging

import numpy as np
import pytest
import timm
import torch
import torchvision
from torch import nn

import featx
from featx.backbones.fold import fold_batchnorm
from featx.backbones.taps import LayerTaps
from featx.layer import Layer

from .conftest import TINY, make_folder


def _with_random_statistics(net: nn.Module, seed: int = 0) -> nn.Module:
    g = torch.Generator().manual_seed(seed)
    for m in net.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.copy_(torch.randn(m.num_features, generator=g) * 0.5)
            m.running_var.copy_(torch.rand(m.num_features, generator=g) * 2 + 0.1)
            m.weight.data.copy_(torch.randn(m.num_features, generator=g))
            m.bias.data.copy_(torch.randn(m.num_features, generator=g) * 0.2)
    return net.eval()


def _norms(net: nn.Module) -> int:
    return sum(isinstance(m, nn.BatchNorm2d) for m in net.modules())


def _taps(net, modules):
    layers = [Layer(name=m, index=i, depth=0.0, raw_shape=(), kind="map", module=m, order=i)
              for i, m in enumerate(modules)]
    return LayerTaps(net, layers, {m: "avg" for m in modules})


@pytest.mark.parametrize("arch, modules", [
    (lambda: timm.create_model("tf_efficientnet_lite0", pretrained=False), ["blocks.1", "blocks.4", "conv_head"]),
    (lambda: torchvision.models.resnet18(weights=None), ["layer1", "layer3", "layer4"]),
])
def test_folded_network_gives_the_tapped_features_of_the_original(arch, modules):
    torch.manual_seed(0)
    net = _with_random_statistics(arch())
    x = torch.randn(4, 3, 64, 64)
    folded = fold_batchnorm(net, x[:2], keep=modules)
    assert folded is not net and _norms(net) > 0
    assert _norms(folded) < _norms(net)  # plain or timm norms, each after the convolution it reads
    with torch.inference_mode():
        want, got = _taps(net, modules)(x), _taps(folded, modules)(x)
    for name in modules:
        scale = want[name].abs().max()
        assert (want[name] - got[name]).abs().max() <= 1e-4 * scale, name
    if "conv_head" in modules:  # a tapped convolution keeps its own output: its norm is not folded into it
        assert torch.equal(folded.conv_head.weight, net.conv_head.weight)
        assert isinstance(folded.bn2, nn.BatchNorm2d)


class _ReadTwice(nn.Module):
    """The convolution's output goes to the norm and, through a functional op, past it."""

    def __init__(self):
        super().__init__()
        self.conv, self.bn = nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4)

    def forward(self, x):
        y = self.conv(x)
        return self.bn(y) + y


def test_a_fold_that_would_change_the_output_keeps_the_original_network():
    net = _with_random_statistics(_ReadTwice())
    assert fold_batchnorm(net, torch.randn(2, 3, 8, 8)) is net
    training = _with_random_statistics(torchvision.models.resnet18(weights=None)).train()
    assert fold_batchnorm(training, torch.randn(2, 3, 32, 32)) is training  # batch statistics: nothing to fold
    assert fold_batchnorm(net.eval(), torch.randn(2, 5, 8, 8)) is net  # an input the trace cannot feed
    plain = nn.Sequential(nn.Conv2d(3, 4, 3), nn.LayerNorm([4, 6, 6])).eval()
    assert fold_batchnorm(plain, torch.randn(2, 3, 8, 8)) is plain  # no batch norm: nothing to trace


def test_extraction_folds_and_stores_the_unfolded_features(tmp_path, monkeypatch, caplog):
    """The real extract path against the same network run unfolded (folding switched off)."""
    root = make_folder(tmp_path / "images")
    kwargs = {**TINY, "layers": "layer1,layer4", "pool": "avg", "dtype": "float32"}
    with caplog.at_level(logging.DEBUG, logger="featx.backbones.fold"):
        folded = featx.extract(f"folder:{root}", cache_dir=tmp_path / "a", **kwargs)
    assert any(r.getMessage().startswith("folded ") for r in caplog.records)
    monkeypatch.setattr("featx.extraction.runner.fold_batchnorm", lambda net, *args, **kw: net)
    plain = featx.extract(f"folder:{root}", cache_dir=tmp_path / "b", **kwargs)
    for layer in ("layer1", "layer4"):
        a, b = folded.load(layer).X, plain.load(layer).X
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5 * np.abs(b).max())
