"""The full-network mode (``--full``): what it decides on top of a plan, and how a run records its network.

A full network ends at the top of the ladder, so fine-tuning it is the classic recipe "freeze
the first k blocks, train the rest": ``--freeze-below`` names the first block that trains,
by default the probe's best layer. The probe's logistic head was fitted on that best layer,
not on the top one where the head now sits, so unless the two coincide the head starts fresh
and first trains alone (linear probing, then fine-tuning: LP-FT reached by training instead of
by copying weights).
"""

from __future__ import annotations

from ..errors import UsageError
from .options import TrainOptions
from .plan import Plan, top_layer

#: epochs a fresh head trains alone before the blocks join, when ``--head-warmup-epochs`` is not given
FRESH_HEAD_WARMUP_EPOCHS = 1


def full_network_options(plan: Plan, opts: TrainOptions, head_init: str, head_warmup_epochs: int | None,
                         freeze_below: str | int | None) -> TrainOptions:
    """``opts`` with the head start, the head warm-up and the freeze point of a full-network run.

    ``head_init``, ``head_warmup_epochs`` and ``freeze_below`` are what the caller asked for
    (``auto``, None, None: decide).
    """
    fresh = plan.head is None
    warmup = head_warmup_epochs
    if warmup is None:
        warmup = FRESH_HEAD_WARMUP_EPOCHS if fresh and head_init == "auto" else 0
        if warmup >= opts.epochs:
            raise UsageError(
                f"With --full the head is {plan.head_note} and trains alone for {warmup} epoch before the "
                f"blocks (linear probing, then fine-tuning); --epochs {opts.epochs} leaves no epoch for the blocks. "
                "Use --epochs 2 or more, --head-warmup-epochs 0 to train head and blocks together from the start, "
                "or --head-init random (plain fine-tuning)."
            )
    freeze = freeze_below if freeze_below is not None else plan.freeze_default
    if freeze_below is None and freeze is not None:
        picked = plan.ladder.select(str(freeze), plan.model_name)
        if len(picked) == 1 and picked[0].order >= plan.layer.order:
            raise UsageError(
                f"The probe's best layer, {freeze}, is the top of the network: freezing the blocks below it would "
                "leave only the head to train, which the probe already did. Choose the first block to train with "
                f"--freeze-below LAYER (see: featx layers {plan.model_name}), or drop --full."
            )
    return opts.replace(head_init="random" if fresh else "lpft", head_warmup_epochs=warmup, freeze_below=freeze)


def describe_network(plan: Plan, opts: TrainOptions, freeze_below: str | None, parameters: dict) -> dict:
    """The ``network`` record of ``finetune.json``: full or cut, frozen below what, how much trains,
    and where the head started."""
    top = top_layer(plan.ladder)
    if opts.head_init == "lpft":
        start = plan.head_note or f"the probe's logistic head on {plan.layer.name} (LP-FT)"
    else:
        start = plan.head_note or "a fresh head"
    return {
        "mode": "full" if plan.layer.order >= top.order else "cut",
        "head_layer": plan.layer.name,  # the cut, or the top of the ladder
        "top_layer": top.name,
        "freeze_below": freeze_below,
        "trainable_parameters": parameters["trainable"],
        "total_parameters": parameters["total"],
        "trained_blocks": parameters["trained_blocks"],
        "frozen_blocks": parameters["frozen_blocks"],
        "head": {"init": opts.head_init, "warmup_epochs": opts.head_warmup_epochs, "start": start},
    }
