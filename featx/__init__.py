"""featx: measure transfer learning on images, cheaply.

Three stages, each usable alone: ``extract`` cached features of many layers of a
pretrained backbone, ``probe`` them with scikit-learn heads, ``finetune`` from the best layer.
Heavy libraries (torch, timm) are imported on first use, so ``featx --help`` is quick.
"""

from __future__ import annotations

import os

# scikit-learn fits probe heads on torch tensors (a GPU) through its array API, which needs
# SciPy's switch set before SciPy is first imported; a user's own setting is kept
os.environ.setdefault("SCIPY_ARRAY_API", "1")

from . import errors  # noqa: E402
from ._lazy import lazy_getattr

__version__ = "0.1.0"

_API = {
    "extract": ".api",
    "load_features": ".api",
    "layers": ".api",
    "models": ".api",
    "open_entry": ".api",
    "cache_gc": ".api",
    "probe": ".api",
    "run": ".api",
    "compare": ".api",
    "finetune": ".api",
    "load_results": ".results",  # JSON only: no h5py or scikit-learn
    "export_features": ".api",
    "predict": ".api",
}

__all__ = ["__version__", "errors", *_API]

__getattr__ = lazy_getattr(globals(), _API)


def __dir__():
    return sorted(__all__)
