"""The training loop: epochs of fine-tuning, validation after each, the best weights kept.

Each epoch seeds torch's generator from (seed, epoch) and draws its sample order and
augmentations from generators seeded the same way, so an epoch computes the same thing
whether it follows the previous one in the same process or a checkpoint written by another.
The network runs channels_last (on 2 CPU cores it trains EfficientNet-Lite0 about twice as
fast as NCHW); on CUDA under bf16/fp16 autocast (fp16 with a gradient scaler) with pinned host
memory, on CPU in float32 with the thread and allocator settings measured for extraction.
"""

from __future__ import annotations

import copy
import json
import logging
import math
import time
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from .._progress import progress_bar
from .._runtime import Device
from ..layer import Layer
from .augment import Augmentation
from .data import LabelledImages, epoch_batches, make_loader
from .freeze import FreezeSchedule, block_groups, first_trainable_group
from .model import FinetuneNet, init_head_from_probe, prune_after, seeded_head
from .optim import build_optimizer, build_scheduler, parameter_groups
from .options import TrainOptions
from .plan import Plan

log = logging.getLogger(__name__)


def default_batch_size(device: Device, image_size: int) -> int:
    """On 2 CPU cores 32 and 64 images train equally fast at 96 px (measured); 32 keeps memory
    low while batch norm still sees enough images."""
    if device.is_cuda:
        return 128 if image_size <= 128 else 64
    return 32 if image_size <= 128 else 16


def epoch_seed(seed: int, epoch: int) -> int:
    return int(np.random.SeedSequence([seed, epoch, 2]).generate_state(1, dtype=np.uint64)[0] >> 1)


def resolve_options(plan: Plan, opts: TrainOptions) -> TrainOptions:
    """Optimiser defaults filled in, and ``bn_stats="auto"`` decided: the running statistics of
    randomly initialised weights carry no information, so only those are updated."""
    opts = opts.with_defaults()
    if opts.bn_stats == "auto":
        random_init = plan.info.identity.get("weights", {}).get("kind") == "random-init"
        opts = opts.replace(bn_stats="update" if random_init else "frozen")
    return opts


def build_network(plan: Plan, opts: TrainOptions) -> FinetuneNet:
    """The base model cut after the plan's layer, with a head from the probe (LP-FT) or seeded random."""
    backbone = plan.build_backbone()
    prune_after(backbone, plan.layer, plan.pooling["rule"], plan.pre.crop_size)
    net = FinetuneNet(backbone, plan.layer, plan.pooling["rule"], len(plan.classes), opts.dropout)
    if opts.head_init == "lpft":
        init_head_from_probe(net, plan.head)
    else:
        seeded_head(net, opts.seed)
    return net


def _to_device(images: torch.Tensor, normalise, device: Device) -> torch.Tensor:
    return normalise(images).contiguous(memory_format=torch.channels_last)


def predict(net: nn.Module, dataset: LabelledImages, indices: np.ndarray, batch_size: int, device: Device,
            normalise, workers: int = 0, desc: str | None = None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(float32 logits, labels, readable) of ``indices`` in eval mode, in the order given;
    a transient progress bar when ``desc`` is given."""
    return predict_batches(net, dataset, eval_batches(indices, batch_size), device, normalise, workers, desc)


def eval_batches(indices: np.ndarray, batch_size: int) -> list[list]:
    return epoch_batches(indices, batch_size, 0, 0, shuffle=False)


def predict_batches(net: nn.Module, dataset: LabelledImages, batches: list[list], device: Device, normalise,
                    workers: int = 0, desc: str | None = None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``predict`` over batches of ``(index, epoch)`` pairs, concatenated in their order."""
    was_training = net.training
    net.eval()
    logits, labels, oks = [], [], []
    loader = make_loader(dataset, batches, workers, device)
    bar = progress_bar(total=sum(map(len, batches)), desc=desc, unit="img", disable=desc is None, leave=False)
    try:
        with torch.inference_mode(), device.autocast():
            for images, y, ok in loader:
                logits.append(net(_to_device(images, normalise, device)).float().cpu())
                labels.append(y)
                oks.append(ok)
                bar.update(len(y))
    finally:
        bar.close()
        net.train(was_training)
    if not logits:
        n_classes = net.head.out_features if hasattr(net, "head") else 0
        return np.zeros((0, n_classes), np.float32), np.zeros(0, np.int64), np.zeros(0, bool)
    return torch.cat(logits).numpy(), torch.cat(labels).numpy(), torch.cat(oks).numpy().astype(bool)


def loss_and_accuracy(logits: np.ndarray, labels: np.ndarray, ok: np.ndarray) -> tuple[float, float]:
    """Plain cross-entropy and top-1 over the readable images."""
    if not ok.any():
        return float("nan"), float("nan")
    z = torch.from_numpy(logits[ok]).double()
    y = torch.from_numpy(labels[ok])
    loss = float(nn.functional.cross_entropy(z, y))
    return loss, float((z.argmax(1) == y).double().mean())


@dataclass
class Best:
    """The weights with the best validation accuracy so far (epoch 0: none yet)."""

    epoch: int = 0
    val_top1: float = -1.0
    state: dict | None = None


class Trainer:
    """One fine-tuning run: network, optimiser, schedule and the state a checkpoint captures.

    What several processes change (``featx.finetuning.distributed``) is kept in a few methods: the
    batches this process loads, the images a step counts, the network a step runs, the loss it
    back-propagates, validation, and agreeing on what validation decides.
    """

    def __init__(self, plan: Plan, opts: TrainOptions, device: Device, batch_size: int, workers: int,
                 freeze_below: Layer | None = None, progress: bool = True):
        opts = resolve_options(plan, opts)
        self.plan, self.opts, self.device = plan, opts, device
        self.batch_size, self.workers, self.progress = batch_size, workers, progress
        self.net = build_network(plan, opts)
        self.groups = block_groups(self.net, plan.ladder)
        self.schedule = FreezeSchedule(tuple(self.groups), first_trainable_group(self.groups, freeze_below),
                                       opts.unfreeze == "gradual", opts.head_warmup_epochs, opts.bn_stats)
        self.net.to(device.torch_device, memory_format=torch.channels_last)
        self.optimizer = build_optimizer(
            opts.optimizer, parameter_groups(self.net, opts.lr, opts.lr * opts.backbone_lr_ratio, opts.weight_decay),
            opts.momentum,
        )
        self.steps_per_epoch = len(epoch_batches(plan.fit, batch_size, 0, opts.seed, shuffle=True))
        self.scheduler = build_scheduler(self.optimizer, self.steps_per_epoch, opts.epochs, opts.warmup_epochs,
                                         opts.head_warmup_epochs)
        fp16 = device.is_cuda and device.autocast_dtype == torch.float16
        self.scaler = torch.amp.GradScaler("cuda") if fp16 else None
        self.criterion = nn.CrossEntropyLoss(label_smoothing=opts.label_smoothing)
        self.normalise = plan.pre.normalizer(device.torch_device)
        augmentation = Augmentation.default_for(plan.pre.crop_size) if opts.augment else None
        self.train_images = LabelledImages(plan.source, plan.pre, augmentation, opts.seed)
        self.eval_images = LabelledImages(plan.source, plan.pre)
        self.history: list[dict] = []
        self.best = Best()
        self.epoch = 0  # epochs completed
        self.stale = 0  # epochs since the best validation accuracy
        self.stopped_early = False

    def processes(self) -> dict:
        """How many processes trained the run, talking through which backend (``finetune.json``)."""
        return {"world_size": 1, "backend": None}

    # ------------------------------------------------------------------ evaluation

    def evaluate(self, indices: np.ndarray, desc: str = "validate") -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        return predict(self.net, self.eval_images, indices, self.batch_size * 2, self.device, self.normalise,
                       self.workers, desc if self.progress else None)

    def validate_start(self) -> None:
        """Validation before any training step, recorded as epoch 0 (for LP-FT: the probe's head).

        It is not a candidate for the best checkpoint: the probe's head was refit on all training
        rows, these validation rows included, so its validation accuracy is optimistic.
        """
        loss, top1 = self._agreed(loss_and_accuracy(*self.evaluate(self.plan.val)))
        self.history.append({"epoch": 0, "val_loss": loss, "val_top1": top1})
        log.info("step 0: val loss %.4f, val accuracy %.4f", loss, top1)

    # ------------------------------------------------------------------ training

    @property
    def done(self) -> bool:
        return self.stopped_early or self.epoch >= self.opts.epochs

    def run_epoch(self) -> dict:
        """Train one epoch, validate, update the best weights and early stopping; returns its record."""
        epoch, opts = self.epoch, self.opts
        torch.manual_seed(self._dropout_seed(epoch))
        self.schedule.apply(self.net, epoch)
        loss, top1, seen, seconds = self._train_batches(epoch)
        val_loss, val_top1 = self._agreed(loss_and_accuracy(*self.evaluate(self.plan.val)))
        lrs = {g["name"]: g["lr"] for g in self.optimizer.param_groups}
        record = {
            "epoch": epoch + 1,
            "train_loss": loss,
            "train_top1": top1,
            "val_loss": val_loss,
            "val_top1": val_top1,
            "lr_head": lrs.get("head", lrs.get("head-no-decay")),  # after the epoch's last step
            "lr_backbone": lrs.get("backbone", lrs.get("backbone-no-decay")),
            "trainable_blocks": self.schedule.trainable_names(epoch),
            "train_seconds": seconds,
            "images_per_second": seen / seconds if seconds > 0 else 0.0,
        }
        self.history.append(record)
        self.epoch += 1
        self._keep_if_best(val_top1)
        log.info("epoch %d/%d: train loss %.4f acc %.4f | val loss %.4f acc %.4f | %.0f img/s",
                 epoch + 1, opts.epochs, loss, top1, val_loss, val_top1, record["images_per_second"])
        return record

    def _train_batches(self, epoch: int) -> tuple[float, float, int, float]:
        """One pass over the fit split: (mean loss, accuracy, images, seconds), with a progress bar."""
        loader, images_here = self._epoch_loader(epoch)
        bar = progress_bar(total=images_here, desc=f"epoch {epoch + 1}/{self.opts.epochs}", unit="img",
                           disable=not self.progress)
        loss_sum, correct, seen = 0.0, 0, 0
        start = time.perf_counter()
        try:
            for images, labels, ok in loader:
                bar.update(len(labels))
                n = self._readable(ok)
                if n >= 2:  # unreadable images are left out; batch norm needs two images
                    loss, hits = self._step(images[ok], labels[ok], n)
                    loss_sum, correct, seen = loss_sum + loss * n, correct + hits, seen + n
                self.scheduler.step()  # one step per batch, even a skipped one: the schedule stays aligned
                elapsed = time.perf_counter() - start
                bar.set_postfix(loss=f"{loss_sum / max(seen, 1):.4f}", acc=f"{correct / max(seen, 1):.4f}",
                                img_s=f"{seen / max(elapsed, 1e-9):.0f}", refresh=False)
        finally:
            bar.close()
        nan = float("nan")
        return (loss_sum / seen if seen else nan, correct / seen if seen else nan, seen,
                time.perf_counter() - start)

    def _epoch_loader(self, epoch: int):
        """(batches of (images, labels, readable) this process trains on in ``epoch``, their image count)."""
        batches = epoch_batches(self.plan.fit, self.batch_size, epoch, self.opts.seed, shuffle=True)
        return make_loader(self.train_images, batches, self.workers, self.device), len(self.plan.fit)

    def _readable(self, ok: torch.Tensor) -> int:
        """The readable images of this step's batch."""
        return int(ok.sum())

    def _dropout_seed(self, epoch: int) -> int:
        return epoch_seed(self.opts.seed, epoch)

    def _agreed(self, values):
        """What validation decides, as every process must see it."""
        return values

    def _keep_if_best(self, val_top1: float) -> None:
        """Keep a copy of the weights when validation accuracy improves; count epochs when not."""
        score = val_top1 if not math.isnan(val_top1) else -1.0
        if score > self.best.val_top1:
            state = {k: v.detach().cpu().clone() for k, v in self.net.state_dict().items()}
            self.best, self.stale = Best(self.epoch, score, state), 0
            return
        self.stale += 1
        if self.opts.patience is not None and self.stale >= self.opts.patience and not self.done:
            self.stopped_early = True
            log.info("early stop: no better validation accuracy for %d epochs", self.stale)

    def _step(self, images: torch.Tensor, labels: torch.Tensor, n: int) -> tuple[float, int]:
        """One optimiser step on a batch of ``n`` readable images: (mean loss, correct predictions)."""
        dev = self.device.torch_device
        x = _to_device(images, self.normalise, self.device)
        y = labels.to(dev, non_blocking=True)
        self.optimizer.zero_grad(set_to_none=True)
        with self.device.autocast():
            logits = self._training_net()(x)
            loss = self._loss(logits.float(), y, n)
        if self.scaler is not None:
            self.scaler.scale(loss).backward()
            self.scaler.step(self.optimizer)
            self.scaler.update()
        else:
            loss.backward()
            self.optimizer.step()
        return float(loss.detach()), int((logits.detach().argmax(1) == y).sum())

    def _training_net(self) -> nn.Module:
        return self.net

    def _loss(self, logits: torch.Tensor, y: torch.Tensor, n: int) -> torch.Tensor:
        return self.criterion(logits, y)

    def use_best(self) -> None:
        """Load the best weights (by validation accuracy) into the network."""
        if self.best.state is not None:
            self.net.load_state_dict(self.best.state)

    # ------------------------------------------------------------------ checkpoint state

    def state_dict(self) -> dict:
        return {
            "epoch": self.epoch,
            "model": {k: v.detach().cpu() for k, v in self.net.state_dict().items()},
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "scaler": self.scaler.state_dict() if self.scaler is not None else {},
            "history": json.dumps(self.history),
            "best_epoch": self.best.epoch,
            "best_val_top1": self.best.val_top1,
            "best_state": self.best.state if self.best.state is not None else {},
            "stale": self.stale,
            "stopped_early": self.stopped_early,
        }

    def load_state_dict(self, state: dict) -> None:
        self.net.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        if self.scaler is not None and state["scaler"]:
            self.scaler.load_state_dict(state["scaler"])
        self.history = json.loads(state["history"])
        self.best = Best(int(state["best_epoch"]), float(state["best_val_top1"]),
                         copy.copy(state["best_state"]) or None)
        self.epoch, self.stale = int(state["epoch"]), int(state["stale"])
        self.stopped_early = bool(state["stopped_early"])
