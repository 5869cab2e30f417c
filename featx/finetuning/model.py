"""The network that is fine-tuned: the backbone cut after one layer, pooled, then a linear head.

The cut reuses the extraction machinery: a tap on the chosen layer pools its activation with
the same rule as the cache entry and stops the forward pass there. Modules that would only
run after the cut are removed (or replaced by ``nn.Identity``), so their parameters are
neither trained, nor stored, nor moved to the device.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

from ..backbones.ladder import LADDER_ROOTS
from ..backbones.taps import LayerTaps
from ..errors import DataError
from ..layer import Layer, pooled_width
from ..probing.linear_head import LinearHead


class FinetuneNet(nn.Module):
    """``backbone`` up to ``layer`` → pooling (``rule``) → optional dropout → ``head`` (one logit per class).

    The tap is attached for the duration of each forward call, after any hooks others have
    registered, so that tools tracing the network (featx's own layer ladder) still see the
    cut layer run before the pass stops. The ladder looks inside ``backbone``: re-extracting a
    fine-tuned model offers ``backbone.<block>`` layers and ``pre_logits`` (the head's input).
    """

    def __init__(self, backbone: nn.Module, layer: Layer, rule: str, n_classes: int, dropout: float = 0.0):
        super().__init__()
        setattr(self, LADDER_ROOTS, ("backbone",))
        self.backbone = backbone
        self.layer, self.rule = layer, rule
        self.width = pooled_width(layer.raw_shape, layer.kind, rule)
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.head = nn.Linear(self.width, n_classes)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """Pooled activations of the cut layer, (N, width) float32, differentiable."""
        with LayerTaps(self.backbone, [self.layer], {self.layer.name: self.rule}) as taps:
            return taps(x)[self.layer.name]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.dropout(self.features(x)))


def prune_after(net: nn.Module, layer: Layer, rule: str, input_size: int) -> list[str]:
    """Remove the modules that only run after the cut; returns their names.

    Runs one random image with the cut's tap installed first, recording which modules start
    and which finish. A module is dropped when neither it nor any module inside it started and
    its parent did not finish either (the parent is the network itself or a container the
    cut interrupted): unused modules inside finished blocks stay, since some blocks read
    attributes of children they never call (timm's attention reads ``attn_drop.p``). For
    ``pre_logits`` the classifier is dropped too: only its input is tapped. Trailing blocks of a
    plain ``nn.Sequential`` are deleted rather than replaced, so the block list stays uniform
    (and the layer ladder of the cut network still recognises it).
    """
    started: set[str] = set()
    finished: set[str] = set()
    handles = []
    was_training = net.training
    net.eval()
    taps = LayerTaps(net, [layer], {layer.name: rule})  # registered first: stops before the recorders fire
    try:
        for name, module in net.named_modules():
            handles.append(module.register_forward_pre_hook(lambda mod, args, _n=name: started.add(_n)))
            handles.append(module.register_forward_hook(lambda mod, args, out, _n=name: finished.add(_n),
                                                        prepend=True))  # before the tap's stop
        generator = torch.Generator().manual_seed(0)
        with torch.no_grad():
            taps(torch.randn(1, 3, input_size, input_size, generator=generator))
    finally:
        taps.remove()
        for h in handles:
            h.remove()
        net.train(was_training)

    needed = set()
    for name in started:
        parts = name.split(".") if name else []
        needed.update(".".join(parts[:i]) for i in range(len(parts) + 1))
    dropped = []
    for name, _ in list(net.named_modules()):
        parent_name, _, child = name.rpartition(".")
        if name in needed or parent_name in finished or any(name.startswith(d + ".") for d in dropped):
            continue
        parent = net.get_submodule(parent_name) if parent_name else net
        if type(parent).forward is nn.Sequential.forward:
            del parent._modules[child]  # the cut stopped this sequence: only its tail never started
        else:
            parent._modules[child] = nn.Identity()
        dropped.append(name)
    return dropped


def init_head_from_probe(net: FinetuneNet, head: LinearHead) -> None:
    """LP-FT: copy the probe's logistic regression, standardisation folded in, into the head."""
    W, b = head.folded()
    if W.shape != tuple(net.head.weight.shape):
        raise DataError(
            f"The probe's logistic head has shape {W.shape} (classes x features) but layer {net.layer.name} "
            f"pools to {net.width} features for {net.head.out_features} classes; the probe ran on other "
            "features (pooling or image size). Re-run the probe on this entry, or pass --head-init random."
        )
    with torch.no_grad():
        net.head.weight.copy_(torch.from_numpy(np.asarray(W, dtype=np.float32)))
        net.head.bias.copy_(torch.from_numpy(np.asarray(b, dtype=np.float32)))


def seeded_head(net: FinetuneNet, seed: int) -> None:
    """Plain fine-tuning: the head's default initialisation, drawn from a seeded generator."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        net.head.reset_parameters()
