"""The layer ladder: which activations of a network can be tapped, shallow to deep.

The ladder is found by running the network once on a random image with hooks on every
module, so it always matches what the forward pass really produces (shapes, order, which
modules run). Blocks are the children of the network's sequential containers (and of the
``blocks``/``layers``/``stages`` sequences that stage modules wrap); a container whose
output is its last block's output is named instead of that block (``layer1`` rather than
``layer1.2``). ``pre_logits`` is the input of the classifier.

Relative depth is the share of the network's leaf modules that have run when the layer's
output exists: 1.0 for ``pre_logits``, comparable across families.

The records (:class:`~featx.layer.Layer`, :class:`~featx.layer.Ladder`) and the selection
grammar live in the torch-free ``featx.layer``; this module only traces.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, replace

import numpy as np
import torch
from torch import nn

from ..errors import UsageError
from ..layer import PRE_LOGITS, Ladder, Layer

__all__ = ["LADDER_ROOTS", "PRE_LOGITS", "Ladder", "Layer", "block_names", "find_classifier", "trace_ladder"]

_SEQUENCE_ATTRS = ("blocks", "layers", "stages")
_SKIP_TYPES = (nn.Identity, nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.Dropout3d, nn.AlphaDropout, nn.Flatten)
_AUTO_TOKEN_BLOCKS = 6
_HEAD_NAMES = ("classifier", "head", "heads", "fc")
#: a wrapper module lists here the children that are whole networks (a fine-tuned model's
#: ``backbone``): their blocks join the ladder as if they were the wrapper's own
LADDER_ROOTS = "featx_ladder_roots"
#: what a network says when an input is too small or of a size it was not built for
_SIZE_COMPLAINT = re.compile(
    r"size|shape|dimension|mat1 and mat2|height|width|kernel|padding|doesn't match|does not match",
    re.IGNORECASE,
)


# ------------------------------------------------------------------------------ tracing


def _is_pure_container(m: nn.Module) -> bool:
    return isinstance(m, (nn.Sequential, nn.ModuleList, nn.ModuleDict)) and type(m).forward in (
        nn.Sequential.forward, nn.Module.forward,
    )


def _wraps_sequence(m: nn.Module) -> bool:
    """A stage module holding a homogeneous run of blocks (``blocks``, ``layers``, ``stages``)."""
    for attr in _SEQUENCE_ATTRS:
        child = m._modules.get(attr)
        if child is None or not _is_pure_container(child) or len(child) < 2:
            continue
        members = list(child.children())
        if len({type(x) for x in members}) == 1 and _has_parametrised_children(members[0]):
            return True
    return False


def block_names(model: nn.Module) -> list[str]:
    """Candidate block names in definition order (execution order is taken from the trace)."""
    out: list[str] = []

    def visit(module: nn.Module, prefix: str):
        roots = getattr(module, LADDER_ROOTS, ())
        for name, child in module.named_children():
            full = f"{prefix}.{name}" if prefix else name
            if _is_pure_container(child) or _wraps_sequence(child) or name in roots:
                visit(child, full)
            else:
                out.append(full)

    visit(model, "")
    return out


def find_classifier(model: nn.Module, linear_order: list[str], output_id: int | None,
                    outputs: dict[str, int]) -> str | None:
    """Module name of the final classifier, whose input is the pre-logits embedding.

    timm models name it (``get_classifier``); otherwise it is the last Linear layer, if that
    layer's output is the network's output.
    """
    names = {id(m): n for n, m in model.named_modules()}
    get = getattr(model, "get_classifier", None)
    if callable(get):
        try:
            head = get()
        except Exception:  # some timm models raise when the head was removed
            head = None
        if isinstance(head, (tuple, list)) and head:  # distilled models: (head, head_dist)
            head = head[0]
        if isinstance(head, nn.Module) and id(head) in names:
            return None if isinstance(head, nn.Identity) else names[id(head)]
    if linear_order and outputs.get(linear_order[-1]) == output_id:
        return linear_order[-1]
    return None


def _num_prefix_tokens(model: nn.Module) -> tuple[int, bool]:
    prefix = getattr(model, "num_prefix_tokens", None)
    cls_token = getattr(model, "cls_token", None)
    if prefix is not None:
        return int(prefix), cls_token is not None
    if isinstance(getattr(model, "class_token", None), torch.Tensor):  # torchvision ViT
        return 1, True
    return 0, False


def _kind(shape: tuple[int, ...]) -> str | None:
    """Layout of a per-image activation shape."""
    if len(shape) == 1:
        return "vector"
    if len(shape) == 2:
        return "tokens"
    if len(shape) == 3:
        return "map_nhwc" if shape[0] == shape[1] and shape[1] != shape[2] else "map"
    return None


def _fingerprint(t: torch.Tensor) -> tuple[float, float]:
    t = t.detach().double()
    return float(t.sum()), float(t.abs().sum())


@dataclass
class _Call:
    order: int
    leaves: int
    obj: int
    shape: tuple[int, ...]
    fp: tuple[float, float]
    in_shape: tuple[int, ...] | None = None
    ref: object = None  # keeps the tensor alive so that its id() is not reused during the trace
    means: tuple = ()  # a 4-d output's global averages over dims (2, 3) and (1, 2), taken before
    # any in-place op changes it (DenseNet's F.relu(inplace=True) after norm5)


class _Recorder:
    """Forward hooks on every module: call order, leaf count, output identity and shape."""

    def __init__(self, model: nn.Module):
        self.model = model
        self.calls: dict[str, list[_Call | None]] = {}
        self.linear_order: list[str] = []
        self.pre: _Call | None = None
        self.output: torch.Tensor | None = None
        self.order = self.leaves = 0

    def _record(self, tensor, in_shape=None) -> _Call | None:
        if isinstance(tensor, torch.Tensor) and tensor.dim() >= 2 and tensor.shape[0] == 1:
            means = ()
            if tensor.dim() == 4:
                t = tensor.detach().double()
                means = (t.mean(dim=(2, 3)), t.mean(dim=(1, 2)))
            return _Call(self.order, self.leaves, id(tensor), tuple(tensor.shape), _fingerprint(tensor),
                         in_shape, tensor, means)
        return None

    def run(self, x: torch.Tensor, classifier: str | None) -> None:
        handles = []
        for name, module in self.model.named_modules():
            is_leaf = len(module._modules) == 0

            def hook(mod, args, output, _name=name, _leaf=is_leaf):
                self.leaves += _leaf
                self.order += 1
                if isinstance(mod, nn.Linear):
                    self.linear_order.append(_name)
                first = args[0] if args and isinstance(args[0], torch.Tensor) else None
                in_shape = tuple(first.shape) if first is not None else None
                self.calls.setdefault(_name, []).append(self._record(output, in_shape))

            handles.append(module.register_forward_hook(hook))
        if classifier is not None:
            def pre_hook(mod, args):
                if self.pre is None and args:
                    self.order += 1
                    self.pre = self._record(args[0])

            handles.append(self.model.get_submodule(classifier).register_forward_pre_hook(pre_hook))
        try:
            with torch.no_grad():
                self.output = self.model(x)
        finally:
            for h in handles:
                h.remove()

    def single(self, name: str, before: int | None) -> _Call | None:
        """The call of module ``name`` if it ran exactly once, before ``before``, with a usable output."""
        c = self.calls.get(name)
        if not c or len(c) != 1 or c[0] is None or _kind(c[0].shape[1:]) is None:
            return None
        if before is not None and c[0].order >= before:
            return None
        return c[0]


def trace_ladder(model: nn.Module, input_size: int, device: torch.device | str = "cpu") -> Ladder:
    """Run one random image through ``model`` and build its ladder."""
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(1, 3, input_size, input_size, generator=generator).to(device)
    was_training = model.training
    model.eval()
    try:
        probe = _Recorder(model)
        probe.run(x, None)  # learns which module classifies
        outputs = {n: c[-1].obj for n, c in probe.calls.items() if c and c[-1] is not None}
        classifier = find_classifier(model, probe.linear_order, id(probe.output), outputs)
        rec = _Recorder(model)
        rec.run(x, classifier)
    except Exception as exc:
        if not _rejects_input_size(exc):
            raise  # a bug or an exhausted device: keep its type and traceback
        raise UsageError(
            f"The model does not accept {input_size}x{input_size} inputs ({type(exc).__name__}: {exc}). "
            "Choose another --image-size."
        ) from exc
    finally:
        model.train(was_training)

    headless = classifier is None and _is_headless(model)
    pre = rec.pre
    if headless and isinstance(rec.output, torch.Tensor) and rec.output.dim() == 2:
        pre = rec.single("", None)  # the network's output is its embedding
    stop = pre.order if pre is not None and not headless else None
    total_leaves = max(pre.leaves if pre is not None else rec.leaves, 1)
    prefix, has_cls = _num_prefix_tokens(model)
    modules = dict(model.named_modules())
    max_tokens = max((c.shape[1] for cs in rec.calls.values() for c in cs if c is not None and len(c.shape) == 3),
                     default=0)

    def make_layer(name, call, module, hook="output", aliases=()):
        shape = call.shape[1:]
        kind = _kind(shape)
        tokens_prefix = prefix if kind == "tokens" and prefix and call.shape[1] == max_tokens else 0
        return Layer(
            name=name, index=-1, depth=round(min(call.leaves / total_leaves, 1.0), 4),
            raw_shape=tuple(int(s) for s in shape), kind=kind, module=module, hook=hook,
            order=call.order, prefix_tokens=tokens_prefix,
            has_cls=bool(has_cls and tokens_prefix > 0), aliases=tuple(aliases),
        )

    def canonical(name: str, call: _Call) -> tuple[str, list[str]]:
        """Climb to the outermost ancestor that returns this very tensor."""
        aliases, current = [], name
        while "." in current:
            parent = current.rsplit(".", 1)[0]
            pc = rec.single(parent, stop)
            if pc is None or pc.obj != call.obj or pc.fp != call.fp or not _is_stage(model, current, parent):
                break
            aliases.append(current)
            current = parent
        return current, aliases

    def skipped(name: str, call: _Call) -> bool:
        m = modules[name]
        if isinstance(m, _SKIP_TYPES):
            return True
        kind = type(m).__name__.lower()
        if "adaptive" in kind or ("pool" in kind and len(call.shape) == 4 and call.shape[-1] * call.shape[-2] == 1):
            return True  # head plumbing: global or to-fixed-size pools before a classifier
        if "pool" in kind and call.shape == call.in_shape:
            return True  # a pool that changes nothing
        if classifier is None and not headless and name.split(".")[0] in _HEAD_NAMES:
            return True  # a convolutional classifier (SqueezeNet): its maps are class scores
        return False

    found: dict[str, Layer] = {}
    composite: set[str] = set()
    by_tensor: dict[int, str] = {}
    for name in block_names(model):
        call = rec.single(name, stop)
        if call is None or skipped(name, call):
            continue
        canon, aliases = canonical(name, call)
        found[canon] = make_layer(canon, call, canon, aliases=aliases)
        by_tensor[call.obj] = canon
        if _has_parametrised_children(modules[name]):
            composite.add(canon)

    if pre is not None and _kind(pre.shape[1:]) == "vector":
        aliases = []
        same = by_tensor.get(pre.obj)
        if same is not None and same in found and found[same].order < pre.order:
            dup = found.pop(same)  # e.g. VGG's last ReLU, passed on unchanged by Dropout
            aliases = [same, *dup.aliases]
        if headless:
            found[PRE_LOGITS] = make_layer(PRE_LOGITS, pre, "", aliases=aliases)
        else:
            found[PRE_LOGITS] = make_layer(PRE_LOGITS, pre, classifier, hook="input", aliases=aliases)

    ordered = sorted(found.values(), key=lambda layer: layer.order)
    layers = [_with_index(layer, i) for i, layer in enumerate(ordered)]
    extra: dict[str, Layer] = {}
    for name in modules:
        call = rec.single(name, stop) if name and name not in found else None
        if call is not None:
            extra[name] = make_layer(name, call, name)
    averaged = _averaged_into(layers, rec, pre)
    return Ladder(layers, _auto(layers, composite, _library_stages(model, layers), averaged), input_size, extra)


def _averaged_into(layers: list[Layer], rec: _Recorder, pre: _Call | None) -> set[str]:
    """Maps whose global average is ``pre_logits`` (EfficientNet's ``bn2``, ResNet's ``layer4``).

    Checked on the traced values, not guessed from module types: the network's own pooling
    makes these maps and ``pre_logits`` the same features under ``avg``.
    """
    if pre is None or not isinstance(pre.ref, torch.Tensor) or pre.ref.dim() != 2:
        return set()
    target = pre.ref.detach().double()
    out = set()
    for layer in layers:
        call = rec.single(layer.module, None) if layer.kind in ("map", "map_nhwc") else None
        if call is None or not call.means:
            continue
        pooled = call.means[0] if layer.kind == "map" else call.means[1]
        if pooled.shape == target.shape and torch.allclose(pooled, target, rtol=1e-4, atol=1e-6):
            out.add(layer.name)
    return out


def _library_stages(model: nn.Module, layers: list[Layer]) -> list[str]:
    """The stage outputs the model's library names (timm's ``feature_info``), as ladder names.

    Empty for models that do not describe their stages (torchvision's, local architectures):
    their stages are found from the traced shapes alone.
    """
    try:
        modules = [str(info["module"]) for info in getattr(model, "feature_info", None) or ()]
    except (TypeError, KeyError):
        return []
    names = {alias: layer.name for layer in layers for alias in (layer.name, *layer.aliases)}
    return [names[m] for m in modules if m in names]


def _rejects_input_size(exc: Exception) -> bool:
    """Whether a failed forward pass says the input size is wrong (the user's choice), not that
    the model or the machine failed (out of memory, a bug), which must keep its own error."""
    if isinstance(exc, MemoryError) or "out of memory" in str(exc).lower():
        return False
    oom = getattr(torch, "OutOfMemoryError", None)
    if oom is not None and isinstance(exc, oom):
        return False
    return isinstance(exc, (RuntimeError, AssertionError, ValueError)) and bool(_SIZE_COMPLAINT.search(str(exc)))


def _is_stage(model: nn.Module, child: str, parent: str) -> bool:
    """Whether ``parent`` is one stage of the network, so it may name its last block's output.

    ``layer1`` names ``layer1.2`` and ``blocks.6`` names ``blocks.6.0``; but a list of stages
    (timm's ``blocks``) or the single block sequence of a ViT is not itself a stage.
    """
    p = model.get_submodule(parent)
    if _wraps_sequence(p) and p._modules.get(child.rsplit(".", 1)[-1]) is model.get_submodule(child):
        return True  # a stage module around its block list (timm ConvNeXtStage)
    if not _is_pure_container(p) or any(_is_pure_container(c) or _wraps_sequence(c) for c in p.children()):
        return False
    grand = model.get_submodule(parent.rsplit(".", 1)[0]) if "." in parent else model
    if _wraps_sequence(grand) and grand._modules.get(parent.rsplit(".", 1)[-1]) is p:
        return True  # the block list inside a stage module
    return any(_is_pure_container(s) and len(s) >= 2 for s in grand.children() if s is not p)


def _is_headless(model: nn.Module) -> bool:
    get = getattr(model, "get_classifier", None)
    try:
        return callable(get) and isinstance(get(), nn.Identity)
    except Exception:
        return False


def _with_index(layer: Layer, i: int) -> Layer:
    return replace(layer, index=i)


def _has_parametrised_children(m: nn.Module) -> bool:
    return any(any(True for _ in child.parameters()) for child in m.children())


def _auto(layers: list[Layer], composite: set[str], stages: list[str] = (), averaged: set[str] = frozenset()
          ) -> list[str]:
    """Stage outputs or a spread of token blocks, then ``pre_logits``.

    A stage output is the module the library names for that spatial size (``stages``, timm's
    ``feature_info``), else the last block (a module built of parametrised parts, not a lone
    norm, conv or activation) at each spatial size. The deepest size gives its very last map,
    unless that map is ``averaged`` into ``pre_logits`` by the network itself: under ``avg``
    pooling it would repeat ``pre_logits``, and under grid pooling it is the widest layer of all
    (EfficientNet-Lite0's ``bn2``: 4 x 1,280 features under grid2, 62% of the main job's probe
    time, never its best layer) and adds only the positions the network's own head averages
    away. That size then gives its stage module (``blocks.6``) or last block instead.
    """
    picked: list[str] = []

    def spatial(layer):
        return layer.raw_shape[1:] if layer.kind == "map" else layer.raw_shape[:2]

    maps = [layer for layer in layers
            if layer.kind in ("map", "map_nhwc") and layer.name.split(".")[0] not in _HEAD_NAMES]
    tokens = [layer for layer in layers if layer.kind == "tokens"]
    most = max((t.raw_shape[0] for t in tokens), default=0)
    token_blocks = [t for t in tokens if t.raw_shape[0] == most]

    if len(token_blocks) >= 2 and len(token_blocks) >= len(maps):
        k = min(_AUTO_TOKEN_BLOCKS, len(token_blocks))
        idx = np.unique(np.round(np.linspace(0, len(token_blocks) - 1, k + 1)[1:]).astype(int))
        picked += [maps[-1].name] if maps and maps[-1].name not in averaged else []
        picked += [token_blocks[i].name for i in idx]
    else:
        groups: list[list[Layer]] = []
        for layer in maps:
            if groups and spatial(groups[-1][-1]) == spatial(layer):
                groups[-1].append(layer)
            else:
                groups.append([layer])
        group_of = {layer.name: g for g, group in enumerate(groups) for layer in group}
        named = [name for name in stages if name in group_of]
        deepest = group_of[named[-1]] if named else len(groups)
        library = {group_of[name]: name for name in named}
        for g, group in enumerate(groups):
            if g < deepest and g in library:
                picked.append(library[g])
                continue
            group = [layer for layer in group if layer.name not in averaged]
            blocks = [layer for layer in group if layer.name in composite]
            if g in library and library[g] not in averaged and group and group[-1].name != groups[g][-1].name:
                picked.append(library[g])  # the deepest map is averaged away: the library's stage stands in
            elif group:
                last_group = g == len(groups) - 1 and group[-1].name == groups[g][-1].name
                picked.append(group[-1].name if last_group or not blocks else blocks[-1].name)
    if any(layer.name == PRE_LOGITS for layer in layers):
        picked.append(PRE_LOGITS)
    if not picked and layers:
        picked.append(layers[-1].name)
    order = {layer.name: layer.order for layer in layers}
    return sorted(dict.fromkeys(picked), key=order.get)
