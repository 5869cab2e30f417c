"""The fine-tuning stage: cut the backbone after the best layer (or keep it whole with the blocks
below that layer frozen), start the head from the probe (LP-FT), train with frozen or gradually
unfrozen blocks, evaluate the test split once, export.

Modules, one job each: ``plan`` (what to fine-tune, on which splits), ``model`` (the cut
network and its head), ``full`` (the full-network mode's head start and freeze point),
``freeze`` (which blocks train when), ``command`` (the command line advice prints), ``augment`` and ``data``
(training images), ``optim`` (optimiser and schedule), ``train`` (the loop), ``distributed``
(the loop as DDP replicas under torchrun) and ``syncbn`` (batch norm over all ranks), ``checkpoint``
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
    "command_for": ".command",
}

__all__ = list(_API)

__getattr__ = lazy_getattr(globals(), _API)
