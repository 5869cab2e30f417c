"""Attributes that import their module on first use (PEP 562), so that light commands such as
``featx --help`` or a cache hit do not pay for torch, scikit-learn or the training code."""

from __future__ import annotations

import importlib


def lazy_getattr(namespace: dict, attributes: dict[str, str]):
    """A module ``__getattr__`` serving ``attributes`` ({name: relative module}) from ``namespace``'s package."""
    package = namespace["__package__"]

    def __getattr__(name: str):
        if name not in attributes:
            raise AttributeError(f"module {namespace['__name__']!r} has no attribute {name!r}")
        value = getattr(importlib.import_module(attributes[name], package), name)
        namespace[name] = value  # later lookups skip this function
        return value

    return __getattr__
