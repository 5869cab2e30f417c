"""Capture several layers in one forward pass, pooled on the device, stopping early.

Each requested layer gets a hook on its module that pools the activation right away (so
in-place operations later in the network cannot change it, and full-size maps are freed
at once). The hook of the deepest requested layer raises ``_StopForward``: nothing after
it is computed.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from .ladder import Layer
from .pooling import pool


class _StopForward(Exception):
    """Raised by the deepest tap to end the forward pass."""


class LayerTaps:
    """Hooks that turn ``model(x)`` into ``{layer name: (N, D) float32 tensor}``."""

    def __init__(self, model: nn.Module, layers: Sequence[Layer], rules: dict[str, str],
                 stop_early: bool = True):
        if not layers:
            raise ValueError("LayerTaps needs at least one layer")
        self.model, self.layers, self.rules = model, list(layers), rules
        self.stop_early = stop_early
        self._deepest = max(self.layers, key=lambda layer: layer.order).name
        self._out: dict[str, torch.Tensor] = {}
        self._handles = []
        for layer in self.layers:
            module = model.get_submodule(layer.module) if layer.module else model
            if layer.hook == "input":
                self._handles.append(module.register_forward_pre_hook(self._make_pre_hook(layer)))
            else:
                self._handles.append(module.register_forward_hook(self._make_hook(layer)))

    def _store(self, layer: Layer, tensor: torch.Tensor) -> None:
        if layer.name in self._out:
            return  # a module called twice: the ladder only lists modules that run once
        self._out[layer.name] = pool(tensor, layer.kind, self.rules[layer.name], layer.prefix_tokens)
        if self.stop_early and layer.name == self._deepest:
            raise _StopForward

    def _make_hook(self, layer: Layer):
        def hook(module, args, output):
            self._store(layer, output)

        return hook

    def _make_pre_hook(self, layer: Layer):
        def hook(module, args):
            self._store(layer, args[0])

        return hook

    def __call__(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        self._out = {}
        try:
            self.model(x)
        except _StopForward:
            pass
        missing = [layer.name for layer in self.layers if layer.name not in self._out]
        if missing:
            raise RuntimeError(f"layers {missing} were not produced by the forward pass")
        out, self._out = self._out, {}
        return out

    def remove(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles = []

    def __enter__(self) -> LayerTaps:
        return self

    def __exit__(self, *exc) -> None:
        self.remove()
