"""Packages that only some dataset formats need, imported when such a dataset is opened."""

from __future__ import annotations

import importlib
from types import ModuleType

from ..errors import UsageError

#: pip extra of featx that installs each optional package
EXTRAS = {"webdataset": "webdataset", "datasets": "hf"}


def require(module: str, needed_for: str, extra: str | None = None) -> ModuleType:
    """``module`` imported, or a UsageError that says which extra installs it.

    Only a missing top-level package becomes that error: an ImportError raised from inside an
    installed package (a broken install, a missing compiled library) keeps its own message.
    """
    top = module.split(".")[0]
    try:
        return importlib.import_module(module)
    except ModuleNotFoundError as exc:
        if exc.name != top:  # the package is there; something it needs is not
            raise
        extra = extra or EXTRAS.get(top, top)
        raise UsageError(
            f"{needed_for} needs the Python package {top!r}, which is not installed. "
            f"Install it with: pip install 'featx[{extra}]' (or pip install {top})."
        ) from None
