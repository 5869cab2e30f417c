"""The ``featx finetune`` command line for a probe result, as advice prints it; torch-free, so the
report can import it."""

from __future__ import annotations

import os
import shlex

from ..errors import UsageError


def command_for(results_dir: str | os.PathLike, freeze_below: str | None = None, *, full: bool = True) -> str:
    """The shell command that fine-tunes from the probe result in ``results_dir``.

    ``full=True``: the whole network, every block below ``freeze_below`` frozen (left out: the
    probe's best layer, the command's default). ``full=False``: the network cut after the
    probe's best layer, frozen below ``freeze_below`` when given. Each part is quoted for a
    POSIX shell, so the text runs as printed.
    """
    parts = ["featx", "finetune", os.fspath(results_dir)]
    if full:
        parts.append("--full")
    if freeze_below is not None:
        layer = str(freeze_below).strip()
        if not layer:
            raise UsageError("freeze_below must name a layer (or be None for the probe's best layer).")
        parts += ["--freeze-below", layer]
    return shlex.join(parts)
