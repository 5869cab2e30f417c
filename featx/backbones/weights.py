"""Loading weights explicitly: name maps checked tensor by tensor, never a silent partial load."""

from __future__ import annotations

import re
from collections.abc import Mapping
from pathlib import Path

import torch
from torch import nn

from ..errors import WeightsMismatchError

_CONTAINER_KEYS = ("state_dict", "model_state_dict", "model", "module", "net", "weights")


def read_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """Tensors of a checkpoint file (.safetensors, or a torch file read with weights_only=True)."""
    path = Path(path)
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        return dict(load_file(str(path), device="cpu"))
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # pickle errors, zip errors, refused globals
        raise WeightsMismatchError(
            f"Cannot read checkpoint {path}: {exc}. featx loads tensors only (weights_only=True); "
            "save the model with torch.save(model.state_dict(), path)."
        ) from None
    return unwrap_state_dict(obj, str(path))


def unwrap_state_dict(obj, where: str) -> dict[str, torch.Tensor]:
    """The tensor dict inside a training checkpoint, with DataParallel prefixes removed."""
    for _ in range(3):
        if isinstance(obj, Mapping) and not any(isinstance(v, torch.Tensor) for v in obj.values()):
            inner = next((obj[k] for k in _CONTAINER_KEYS if k in obj and isinstance(obj[k], Mapping)), None)
            if inner is None:
                break
            obj = inner
    if not isinstance(obj, Mapping) or not obj:
        raise WeightsMismatchError(f"{where} holds no state_dict (a mapping of names to tensors).")
    tensors = {k: v for k, v in obj.items() if isinstance(v, torch.Tensor)}
    if not tensors:
        raise WeightsMismatchError(f"{where} holds no tensors.")
    for prefix in ("module.", "_orig_mod.", "model."):
        if all(k.startswith(prefix) for k in tensors):
            tensors = {k[len(prefix):]: v for k, v in tensors.items()}
    return tensors


def check_and_load(model: nn.Module, state: Mapping[str, torch.Tensor], where: str) -> None:
    """Load ``state`` into ``model`` only if every name and shape matches exactly."""
    target = model.state_dict()
    missing = [k for k in target if k not in state]
    unexpected = [k for k in state if k not in target]
    misshapen = [
        f"{k}: file {tuple(state[k].shape)} vs model {tuple(target[k].shape)}"
        for k in target
        if k in state and tuple(state[k].shape) != tuple(target[k].shape)
    ]
    if missing or unexpected or misshapen:
        parts = []
        for label, items in (("missing", missing), ("unexpected", unexpected), ("wrong shape", misshapen)):
            if items:
                more = f" (+{len(items) - 8} more)" if len(items) > 8 else ""
                parts.append(f"{len(items)} {label}: " + ", ".join(items[:8]) + more)
        raise WeightsMismatchError(f"Weights from {where} do not fit the model; " + "; ".join(parts) + ".")
    model.load_state_dict(state, strict=True)


# ----------------------------------------------------------- lukemelas EfficientNet -> timm

_BLOCK_PARTS_EXPANDED = {
    "_expand_conv": "conv_pw", "_bn0": "bn1",
    "_depthwise_conv": "conv_dw", "_bn1": "bn2",
    "_project_conv": "conv_pwl", "_bn2": "bn3",
}
_BLOCK_PARTS_DEPTHWISE = {
    "_depthwise_conv": "conv_dw", "_bn1": "bn1",
    "_project_conv": "conv_pw", "_bn2": "bn2",
}
_STEM_HEAD = {"_conv_stem": "conv_stem", "_bn0": "bn1", "_conv_head": "conv_head", "_bn1": "bn2", "_fc": "classifier"}
_BLOCK_KEY = re.compile(r"^_blocks\.(\d+)\.(_[a-z0-9_]+)\.(.+)$")
_TOP_KEY = re.compile(r"^(_[a-z0-9_]+)\.(.+)$")


def lukemelas_to_timm(state: Mapping[str, torch.Tensor], model: nn.Module) -> dict[str, torch.Tensor]:
    """Rename an EfficientNet(-Lite) state_dict from lukemelas' layout to timm's.

    lukemelas numbers blocks flatly (``_blocks.7``), timm nests them by stage
    (``blocks.2.1``); the flat order is the execution order of timm's stages. Inside a block,
    the batch-norm names shift depending on whether the block has an expansion conv.
    """
    flat_blocks = [f"blocks.{s}.{b}" for s, stage in enumerate(model.blocks) for b in range(len(stage))]
    expanded = {int(m.group(1)) for k in state if (m := _BLOCK_KEY.match(k)) and m.group(2) == "_expand_conv"}
    out: dict[str, torch.Tensor] = {}
    problems = []
    for key, tensor in state.items():
        if m := _BLOCK_KEY.match(key):
            i, part, rest = int(m.group(1)), m.group(2), m.group(3)
            table = _BLOCK_PARTS_EXPANDED if i in expanded else _BLOCK_PARTS_DEPTHWISE
            if i >= len(flat_blocks) or part not in table:
                problems.append(key)
                continue
            new = f"{flat_blocks[i]}.{table[part]}.{rest}"
        elif (m := _TOP_KEY.match(key)) and m.group(1) in _STEM_HEAD:
            new = f"{_STEM_HEAD[m.group(1)]}.{m.group(2)}"
        else:
            problems.append(key)
            continue
        if new in out:
            problems.append(f"{key} (maps onto {new} twice)")
            continue
        out[new] = tensor
    if problems:
        raise WeightsMismatchError(
            "EfficientNet weights with names featx cannot map to timm: " + ", ".join(problems[:8])
        )
    return out
