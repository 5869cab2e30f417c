"""The fine-tuned model on disk: ``model.pt`` and ``model.json``.

``model.pt`` is a plain ``state_dict`` (tensors only, readable with ``weights_only=True``).
``model.json`` says how to rebuild the network around it: the base architecture and its
identity, the cut layer, the pooling rule, dropout, the preprocessing and the classes.
Reading it back as the model ``finetuned:PATH`` is a model source like any other and lives
with them, in ``featx.backbones.finetuned``.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from .._digest import file_digest
from .._fileio import atomic_write_bytes
from .._resultdir import FINETUNE, claim
from ..backbones.finetuned import ENCODING_TYPE, ENCODING_VERSION, MODEL_FILE, SPEC_FILE
from ..data.transforms import Preprocessing
from ..layer import Layer
from .model import FinetuneNet

__all__ = ["MODEL_FILE", "SPEC_FILE", "ENCODING_TYPE", "ENCODING_VERSION", "model_description", "save_finetuned"]


def model_description(base_name: str, base_source: str, base_arch: str, base_identity: dict, image_size: int,
                      layer: Layer, pooling: dict, dropout: float, pre: Preprocessing,
                      classes: list[str]) -> dict:
    """Everything ``finetuned:PATH`` needs besides the tensors (see ``featx.backbones.finetuned``)."""
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
