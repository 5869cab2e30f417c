"""What a fine-tuning run produced, as an object and as ``finetune.json`` (strict JSON)."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from pathlib import Path

from .._fileio import strict

#: ``finetune.json``'s schema; version 1 (unversioned files) had test keys top1/top1_ci95/top5/n
FORMAT = "featx-finetune-result"
VERSION = 2


@dataclass
class FinetuneResult:
    """What a fine-tuning run produced (also what ``finetune.json`` holds)."""

    out_dir: Path
    fingerprint: str
    layer: str
    head_init: str
    #: featx.evaluation.METRIC_KEYS (the probe's keys, the same code) + n_test, unreadable
    test: dict
    #: per epoch: train_loss/top1, val_loss/top1, lr_head/lr_backbone (after its last step),
    #: trainable_blocks, train_seconds, images_per_second; epoch 0 = validation before training
    history: list[dict]
    best_epoch: int
    best_val_top1: float
    probe: dict | None  # the probe's accuracy at this layer and the difference
    paths: dict[str, Path]
    config: dict
    train_seconds: float
    stopped_early: bool
    resumed_at_epoch: int = 0  # epochs taken from a checkpoint in this call
    reused: bool = False  # the finished run was found on disk; nothing was trained
    sweep: list[dict] | None = None
    sweep_table: str | None = None
    extra: dict = field(default_factory=dict)
    #: cut after a layer or full (kept to its top layer), frozen below which layer, trainable and
    #: total parameters, where the head started; empty in files written before it was recorded
    network: dict = field(default_factory=dict)

    @property
    def test_top1(self) -> float:
        return self.test["test_top1"]

    def to_json(self) -> dict:
        d = {"format": FORMAT, "version": VERSION, **asdict(self)}
        d["out_dir"] = str(self.out_dir)
        d["paths"] = {k: str(v) for k, v in self.paths.items()}
        return strict(d)

    @classmethod
    def from_json(cls, d: dict) -> FinetuneResult:
        d = dict(d)
        d["out_dir"] = Path(d["out_dir"])
        d["paths"] = {k: Path(v) for k, v in d["paths"].items()}
        known = set(cls.__dataclass_fields__)
        return cls(**{k: v for k, v in d.items() if k in known})

