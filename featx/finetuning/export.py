"""The fine-tuned model on disk, and loading it back as ``finetuned:PATH``.

``model.pt`` is a plain ``state_dict`` (tensors only, readable with ``weights_only=True``).
``model.json`` says how to rebuild the network around it: the base architecture and its
identity, the cut layer, the pooling rule, dropout, the preprocessing and the classes. The
base is rebuilt randomly initialised (nothing to download) and then receives the fine-tuned
tensors, checked by name and shape.

As a model for ``featx extract``, its identity holds the sha256 of ``model.pt`` and the base
model's identity, so a new fine-tune never reuses an old cache entry.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from torch import nn

from .._fileio import atomic_write_bytes
from .._resultdir import FINETUNE, claim
from ..backbones.ladder import Layer
from ..backbones.weights import check_and_load, read_state_dict
from ..cache.key import file_digest
from ..data.transforms import Preprocessing
from ..errors import UsageError, WeightsMismatchError
from .model import FinetuneNet, prune_after

MODEL_FILE = "model.pt"
SPEC_FILE = "model.json"
ENCODING_TYPE = "featx-finetuned"
ENCODING_VERSION = "1"


def model_description(base_name: str, base_source: str, base_arch: str, base_identity: dict, image_size: int,
                      layer: Layer, pooling: dict, dropout: float, pre: Preprocessing,
                      classes: list[str]) -> dict:
    """Everything ``build_finetuned`` needs besides the tensors."""
    return {
        "encoding-type": ENCODING_TYPE,
        "encoding-version": ENCODING_VERSION,
        "base": {"name": base_name, "source": base_source, "arch": base_arch, "identity": base_identity,
                 "image_size": int(image_size)},
        "layer": layer.to_dict(),
        "pooling": dict(pooling),
        "dropout": float(dropout),
        "preprocessing": pre.to_dict(),
        "classes": list(classes),
    }


def save_finetuned(directory: Path, net: FinetuneNet, description: dict) -> dict[str, Path]:
    """Write ``model.pt`` then ``model.json`` (which records the weights' digest), both atomically,
    into a missing, empty or fine-tuning folder (never into a folder of other files)."""
    directory = claim(directory, FINETUNE)
    weights = directory / MODEL_FILE
    state = {k: v.detach().cpu().contiguous() for k, v in net.state_dict().items()}
    atomic_write_bytes(weights, lambda fh: torch.save(state, fh))
    spec = {**description, "weights": {"file": MODEL_FILE, "digest": file_digest(weights)}}
    spec_path = directory / SPEC_FILE
    atomic_write_bytes(spec_path, lambda fh: fh.write(json.dumps(spec, indent=2).encode()))
    return {"model": weights, "model_json": spec_path}


def read_description(path: str | Path) -> tuple[dict, Path]:
    """(model.json contents, directory) of a fine-tuning output directory or its model.json."""
    path = Path(path)
    directory = path.parent if path.name == SPEC_FILE else path
    spec_path = directory / SPEC_FILE
    hint = ("finetuned:PATH takes the output directory of featx finetune (holding model.json and model.pt)")
    if not spec_path.is_file():
        raise UsageError(f"{spec_path} does not exist; {hint}.")
    try:
        spec = json.loads(spec_path.read_text())
    except (OSError, ValueError) as exc:
        raise UsageError(f"{spec_path} is not readable JSON ({exc}); {hint}.") from None
    if not isinstance(spec, dict) or spec.get("encoding-type") != ENCODING_TYPE:
        raise UsageError(f"{spec_path} is not a featx fine-tuned model description; {hint}.")
    if str(spec.get("encoding-version")) != ENCODING_VERSION:
        raise UsageError(f"{spec_path} has format version {spec.get('encoding-version')}; this featx reads "
                         f"{ENCODING_VERSION}.")
    weights = directory / spec["weights"]["file"]
    if not weights.is_file():
        raise UsageError(f"{weights} is missing; {hint}.")
    return spec, directory


def describe_finetuned(spec):
    """ModelInfo of ``finetuned:PATH``: identity = base identity + cut + digest of the weights."""
    from ..backbones.registry import ModelInfo

    description, directory = read_description(spec.arch)
    weights = directory / description["weights"]["file"]
    digest = file_digest(weights)
    if digest != description["weights"]["digest"]:
        raise WeightsMismatchError(
            f"{weights} does not match the digest recorded in {directory / SPEC_FILE} "
            f"({digest[:19]} vs {description['weights']['digest'][:19]}); it was changed after fine-tuning."
        )
    identity = {
        "source": "finetuned",
        "base": {"name": description["base"]["name"], **description["base"]["identity"]},
        "image_size": description["base"]["image_size"],
        "layer": description["layer"]["name"],
        "pooling": description["pooling"],
        "classes": description["classes"],
        "weights": {"kind": "finetuned", "digest": digest},
    }
    pre = Preprocessing.from_dict(description["preprocessing"])
    return ModelInfo(spec, identity, pre, weights, extra={"description": description, "directory": directory})


def build_description(description: dict) -> FinetuneNet:
    """A FinetuneNet with the architecture of ``description`` and untrained weights."""
    from ..backbones.registry import ModelSpec, build_model, describe_model

    base = description["base"]
    base_info = describe_model(ModelSpec(base["source"], base["arch"], "none"))
    backbone = build_model(base_info, image_size=base["image_size"])
    layer = Layer.from_dict(description["layer"])
    rule = description["pooling"]["rule"]
    prune_after(backbone, layer, rule, base["image_size"])
    return FinetuneNet(backbone, layer, rule, len(description["classes"]), description["dropout"])


def build_finetuned(info) -> nn.Module:
    """The fine-tuned network in eval mode, weights checked tensor by tensor."""
    description = info.extra.get("description") or read_description(info.spec.arch)[0]
    net = build_description(description)
    check_and_load(net, read_state_dict(info.weights_file), str(info.weights_file))
    return net.eval()
