"""The fine-tuning stage: cut the backbone after the best layer, start the head from the probe
(LP-FT), train with frozen or gradually unfrozen blocks, evaluate the test split once, export.

Modules, one job each: ``plan`` (what to fine-tune, on which splits), ``model`` (the cut
network and its head), ``freeze`` (which blocks train when), ``augment`` and ``data``
(training images), ``optim`` (optimiser and schedule), ``train`` (the loop), ``checkpoint``
(atomic per-epoch resume points), ``metrics``, ``plots``, ``sweep``, ``export``
(``model.pt`` + ``model.json``, and ``finetuned:PATH`` for extraction), ``result``
(``finetune.json``), ``runner`` (the API).
"""

from __future__ import annotations

from .._lazy import lazy_getattr

_API = {
    "finetune": ".runner",
    "FinetuneResult": ".result",
    "parse_sweep": ".sweep",
    "format_table": ".sweep",
}

__all__ = list(_API)

__getattr__ = lazy_getattr(globals(), _API)
