"""featx: measure transfer learning on images, cheaply.

Three stages, each usable alone: ``extract`` cached features of many layers of a
pretrained backbone, ``probe`` them with scikit-learn heads, ``finetune`` from the best layer.
Heavy libraries (torch, timm) are imported on first use, so ``featx --help`` is quick.
"""

from __future__ import annotations

import importlib

__version__ = "0.1.0"

_API = {
    "extract": ".api",
    "load_features": ".api",
    "layers": ".api",
    "models": ".api",
    "open_entry": ".api",
    "probe": ".api",
    "run": ".api",
    "finetune": ".api",
}

__all__ = ["__version__", "errors", *_API]


def __getattr__(name: str):
    if name in _API:
        value = getattr(importlib.import_module(_API[name], __name__), name)
        globals()[name] = value
        return value
    if name == "errors":
        return importlib.import_module(".errors", __name__)
    raise AttributeError(f"module 'featx' has no attribute {name!r}")


def __dir__():
    return sorted(__all__)
