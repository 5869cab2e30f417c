"""Batch normalisation folded into the convolution before it, for inference.

In eval mode a BatchNorm2d after a convolution is a per-channel affine map, which the
convolution's weights and bias can absorb: the same features without a pass over every
activation map (on a 2-core CPU, batch_norm was 15% of EfficientNet-Lite0's forward pass at
96 px). Only pairs seen in a traced forward pass are folded: a normalisation whose input is
exactly the output of a convolution that no other module reads, neither of them a layer one
could tap (so that a layer's features never depend on which others a run extracts).
The folded network is checked against the original on the trace batch; if its output moved
by more than float rounding (a convolution output also read by a functional op, say), the
original is kept.
"""

from __future__ import annotations

import copy
import functools
import logging
from collections.abc import Collection

import torch
from torch import nn

log = logging.getLogger(__name__)

#: the folded network's output may differ from the original's by float32 rounding, no more
TOLERANCE = 1e-4


@functools.cache
def _norm_types() -> tuple[type, ...]:
    """Normalisations whose eval forward is ``act(drop(batch_norm(x)))`` with running statistics."""
    types: list[type] = [nn.BatchNorm2d]
    try:
        from timm.layers import BatchNormAct2d

        types.append(BatchNormAct2d)
    except ImportError:  # timm is a dependency; an older layout only loses the timm pairs
        pass
    return tuple(types)


def _after_norm(norm: nn.Module) -> nn.Module:
    """What is left of ``norm`` once its affine map is in the convolution: timm's activation, or nothing."""
    if type(norm) is nn.BatchNorm2d:
        return nn.Identity()
    return nn.Sequential(norm.drop, norm.act)


def _foldable(norm: nn.Module) -> bool:
    return (type(norm) in _norm_types() and not norm.training and norm.running_mean is not None
            and norm.running_var is not None)


def _pairs(net: nn.Module, example: torch.Tensor, keep: Collection[str]) -> list[tuple[str, str]]:
    """(convolution, normalisation) module names where the normalisation reads only that convolution's output."""
    names = {module: name for name, module in net.named_modules()}
    produced: dict[int, str] = {}  # id of a convolution's output -> its name
    readers: dict[int, int] = {}  # id of a tensor -> how many leaf modules read it
    norm_input: dict[str, int] = {}
    alive = []  # every tensor seen stays alive until the end, so that no id is reused

    def pre_hook(module, args):
        for arg in args:
            if isinstance(arg, torch.Tensor):
                alive.append(arg)
                readers[id(arg)] = readers.get(id(arg), 0) + 1
        if _foldable(module) and args and isinstance(args[0], torch.Tensor):
            norm_input[names[module]] = id(args[0])

    def conv_hook(module, args, output):
        alive.append(output)
        produced[id(output)] = names[module]

    handles = []
    for module in net.modules():
        if not list(module.children()) or _foldable(module):
            handles.append(module.register_forward_pre_hook(pre_hook))
        if isinstance(module, nn.Conv2d):
            handles.append(module.register_forward_hook(conv_hook))
    try:
        with torch.inference_mode():
            net(example)
    except Exception as exc:  # noqa: BLE001 - an input this trace cannot feed: the network stays as it is
        log.debug("batch norm folding skipped, the trace failed: %s", exc)
        return []
    finally:
        for handle in handles:
            handle.remove()
    pairs = []
    for norm_name, tensor in norm_input.items():
        conv_name = produced.get(tensor)
        if conv_name is None or readers.get(tensor, 0) != 1 or {conv_name, norm_name} & set(keep):
            continue
        pairs.append((conv_name, norm_name))
    return pairs


@torch.no_grad()
def _fold_pair(net: nn.Module, conv_name: str, norm_name: str) -> None:
    conv, norm = net.get_submodule(conv_name), net.get_submodule(norm_name)
    weight = conv.weight.double()
    scale = norm.running_var.double().add(norm.eps).rsqrt()
    if norm.weight is not None:
        scale = scale * norm.weight.double()
    bias = conv.bias.double() if conv.bias is not None else torch.zeros_like(scale)
    bias = (bias - norm.running_mean.double()) * scale
    if norm.bias is not None:
        bias = bias + norm.bias.double()
    conv.weight.copy_((weight * scale.view(-1, *([1] * (weight.dim() - 1)))).to(conv.weight.dtype))
    conv.bias = nn.Parameter(bias.to(conv.weight.dtype), requires_grad=False)
    parent_name, _, child = norm_name.rpartition(".")
    setattr(net.get_submodule(parent_name), child, _after_norm(norm))


def fold_batchnorm(net: nn.Module, example: torch.Tensor, keep: Collection[str] = ()) -> nn.Module:
    """``net`` (in eval mode) with each foldable normalisation folded into its convolution.

    ``keep``: module names whose own output must stay as it is (the tapped layers).
    Returns a folded copy, or ``net`` itself when nothing folds or the check fails.
    """
    if net.training or not any(_foldable(module) for module in net.modules()):
        return net  # nothing to fold: no trace (transformers have no batch norm)
    pairs = _pairs(net, example, keep)
    if not pairs:
        return net
    folded = copy.deepcopy(net)
    for conv_name, norm_name in pairs:
        _fold_pair(folded, conv_name, norm_name)
    with torch.inference_mode():
        want, got = _flat(net(example)), _flat(folded(example))
    scale = max(float(want.abs().max()), 1e-6)
    if want.shape != got.shape or float((want - got).abs().max()) > TOLERANCE * scale:
        log.debug("batch norm folding changed the output: kept the original network")
        return net
    log.debug("folded %d batch norms into their convolutions", len(pairs))
    return folded


def _flat(output) -> torch.Tensor:
    """A network's output as one float tensor (models may return tuples or dicts of tensors)."""
    if isinstance(output, torch.Tensor):
        return output.detach().float().flatten()
    if isinstance(output, dict):
        output = list(output.values())
    return torch.cat([_flat(o) for o in output if isinstance(o, (torch.Tensor, tuple, list, dict))])
