"""Per-epoch checkpoints that make an interrupted run finish exactly like an uninterrupted one.

``checkpoint.pt`` is rewritten atomically after every epoch: model, optimiser and scheduler
states, the best weights so far, the history and early-stopping counters, and the run's
configuration with its fingerprint. There is no random-number state to restore: every epoch
seeds its own generators from (seed, epoch). A checkpoint of another configuration is never
resumed and never overwritten.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import torch

from .._fileio import atomic_write_bytes
from .._resultdir import FINETUNE, claim
from ..cache.key import canonical_json, config_key
from ..errors import FeatxError, UsageError

log = logging.getLogger(__name__)

CHECKPOINT_FILE = "checkpoint.pt"
CHECKPOINT_FORMAT = 1


def fingerprint(config: dict) -> str:
    """sha256 of the canonical JSON of everything that determines the result."""
    return config_key(config)


def save_checkpoint(directory: Path, state: dict) -> Path:
    """Atomically rewrite the checkpoint of a fine-tuning folder (refusing any other folder)."""
    path = claim(directory, FINETUNE) / CHECKPOINT_FILE
    atomic_write_bytes(path, lambda fh: torch.save({"format": CHECKPOINT_FORMAT, **state}, fh))
    return path


def load_checkpoint(directory: Path) -> dict | None:
    """The checkpoint of ``directory``, or None when there is none."""
    path = Path(directory) / CHECKPOINT_FILE
    if not path.is_file():
        return None
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # zip or unpickling errors
        raise FeatxError(
            f"Checkpoint {path} cannot be read ({type(exc).__name__}: {exc}). Checkpoints are written "
            "atomically, so it was damaged afterwards; delete it to start the run again."
        ) from None
    if not isinstance(state, dict) or state.get("format") != CHECKPOINT_FORMAT or "config" not in state:
        raise FeatxError(f"{path} is not a featx fine-tuning checkpoint (format {CHECKPOINT_FORMAT}).")
    return state


def _flatten(obj, prefix: str = "") -> dict:
    if isinstance(obj, dict):
        out = {}
        for k, v in obj.items():
            out.update(_flatten(v, f"{prefix}.{k}" if prefix else str(k)))
        return out
    return {prefix: obj}


def differences(old: dict, new: dict, limit: int = 6) -> list[str]:
    """Human-readable ``key: old -> new`` lines between two configurations."""
    a, b = _flatten(old), _flatten(new)
    lines = []
    for key in sorted(set(a) | set(b)):
        if a.get(key, "<absent>") != b.get(key, "<absent>"):
            lines.append(f"{key}: {_short(a.get(key, '<absent>'))} -> {_short(b.get(key, '<absent>'))}")
    if len(lines) > limit:
        lines = lines[:limit] + [f"... and {len(lines) - limit} more"]
    return lines


def _short(value) -> str:
    text = json.dumps(value) if not isinstance(value, str) else value
    return text if len(text) <= 40 else text[:18] + "..." + text[-18:]


def check_same_run(stored_config: dict | str, config: dict, where: Path, resume: bool) -> None:
    """Refuse to resume or overwrite a run of another configuration."""
    stored = json.loads(stored_config) if isinstance(stored_config, str) else stored_config
    if canonical_json(stored) == canonical_json(config):
        return
    diff = "; ".join(differences(stored, config))
    verb = "cannot resume" if resume else "will not overwrite"
    raise UsageError(
        f"{where} holds a fine-tuning run of another configuration, so featx {verb} it ({diff}). "
        "Repeat the original options to resume it, or choose another output directory (--out)."
    )
