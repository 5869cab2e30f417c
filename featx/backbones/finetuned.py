"""The ``finetuned:PATH`` model source: a fine-tuning output folder read back as a backbone.

``model.json`` says how to rebuild the network around ``model.pt``: the base architecture and
its identity, the cut layer, the pooling rule, dropout, the preprocessing and the classes. The
base is rebuilt randomly initialised (nothing to download) and then receives the fine-tuned
tensors, checked by name and shape. Its identity holds the sha256 of ``model.pt`` and the base
model's identity, so a new fine-tune never reuses an old cache entry.

The registry asks this module what it needs and builds the base network itself, so the
dependency runs one way (registry -> finetuned); writing the folder is fine-tuning's job
(``featx.finetuning.export``).
"""

from __future__ import annotations

import json
from pathlib import Path

from torch import nn

from .._digest import file_digest
from ..data.transforms import Preprocessing
from ..errors import UsageError, WeightsMismatchError
from ..layer import Layer
from .weights import check_and_load, read_state_dict

MODEL_FILE = "model.pt"
SPEC_FILE = "model.json"
ENCODING_TYPE = "featx-finetuned"
ENCODING_VERSION = "1"


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


def describe_finetuned(path: str | Path) -> tuple[dict, Preprocessing, Path, dict]:
    """(identity, preprocessing, weights file, extra) of ``finetuned:PATH``.

    The identity is the base identity + cut + digest of the weights; weights changed after
    fine-tuning are refused.
    """
    description, directory = read_description(path)
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
    return identity, pre, weights, {"description": description, "directory": directory}


def base_of(description: dict) -> tuple[str, str, int]:
    """(source, arch, image size) of the network a fine-tune started from."""
    base = description["base"]
    return base["source"], base["arch"], int(base["image_size"])


def assemble(description: dict, backbone: nn.Module) -> nn.Module:
    """The fine-tuned architecture around ``backbone`` (the base, randomly initialised), untrained."""
    from ..finetuning.model import FinetuneNet, prune_after  # the training-side network class

    image_size = int(description["base"]["image_size"])
    layer = Layer.from_dict(description["layer"])
    rule = description["pooling"]["rule"]
    prune_after(backbone, layer, rule, image_size)
    return FinetuneNet(backbone, layer, rule, len(description["classes"]), description["dropout"])


def load_finetuned(net: nn.Module, weights_file: Path) -> nn.Module:
    """``net`` with the fine-tuned tensors, checked tensor by tensor, in eval mode."""
    check_and_load(net, read_state_dict(weights_file), str(weights_file))
    return net.eval()
