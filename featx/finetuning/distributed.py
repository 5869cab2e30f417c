"""Fine-tuning across the processes ``torchrun`` starts: DistributedDataParallel that computes the
single-process run on the same data.

- Batches. ``--batch-size`` is the global batch, as in one process: every epoch has the
  single-process batches (same seeded order, same per-image augmentation) and each rank loads
  a contiguous share of each batch (shares differ by at most one image). Every rank has as many
  batches as one process, so the learning-rate schedule counts the same steps.
- Gradients. DDP averages them over the W ranks; a rank's loss is its share's summed
  cross-entropy times W / (readable images in the whole batch), so the average is the gradient
  of the batch mean whatever the shares' sizes (a share may even be empty). Only the
  parameters that train in an epoch are handed to DDP, and the wrapper is rebuilt when that set
  changes (head warm-up, gradual unfreezing): frozen blocks never take part, and
  ``find_unused_parameters`` is set only when a trainable parameter has no part in the forward
  pass (checked once per set with a two-image pass), since it costs a graph walk every step.
- Batch norm. Layers in eval mode (frozen blocks; all of them with ``bn_stats="frozen"``) keep
  their statistics, identical on every rank, so buffers are never broadcast. With
  ``bn_stats="update"`` every batch norm is synchronised (:mod:`.syncbn`): the statistics of the
  whole batch, as one process computes them.
- Evaluation. Each rank predicts every W-th evaluation batch (the single-process batches); the
  logits are gathered in order, so every rank holds what one process would, and rank 0's
  validation numbers are broadcast, so the best epoch and early stopping are decided alike.

What differs from one process: sums are reduced in another order (weights agree within float
tolerance, not bit for bit), and with ``--dropout`` each rank draws its own masks.
"""

from __future__ import annotations

import gc
import inspect
import logging
from collections.abc import Iterator
from typing import ClassVar

import numpy as np
import torch
from torch import nn

from .._distributed import ProcessGroup, current_group
from .._runtime import Device
from ..layer import Layer
from .data import epoch_batches, make_loader
from .options import TrainOptions
from .plan import Plan
from .syncbn import synchronise_batchnorm
from .train import Trainer, _to_device, eval_batches, predict_batches

log = logging.getLogger(__name__)

#: buffers (batch norm statistics) are equal on every rank by construction: no broadcast before each forward
_DDP_PARAMETERS = inspect.signature(nn.parallel.DistributedDataParallel).parameters
_NO_BUFFER_SYNC = {"forward_sync_buffers" if "forward_sync_buffers" in _DDP_PARAMETERS else "broadcast_buffers": False}


class TrainingGroup(ProcessGroup):
    failure_note: ClassVar[str] = "rank 0's last checkpoint, if any, is kept: the same command resumes from it."


def training_group(device: Device) -> TrainingGroup | None:
    """The torchrun group of this process (None without torchrun): nccl for CUDA training, else gloo."""
    return current_group(TrainingGroup, device)


def share(batch: list, rank: int, world: int) -> list:
    """Rank ``rank``'s contiguous part of ``batch`` (parts differ in size by at most one)."""
    n = len(batch)
    return batch[n * rank // world: n * (rank + 1) // world]


class RankBatches:
    """The distributed sampler of fine-tuning: this rank's share of each single-process batch of an epoch.

    Like ``torch.utils.data.DistributedSampler`` it is seeded and told the epoch (``set_epoch``);
    unlike it, it neither reshuffles with torch's generator nor pads with repeated images, so the
    ranks together see exactly the batches one process sees."""

    def __init__(self, indices: np.ndarray, batch_size: int, seed: int, rank: int, world: int):
        self.indices, self.batch_size, self.seed = indices, batch_size, seed
        self.rank, self.world, self.epoch = rank, world, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __iter__(self) -> Iterator[list]:
        for batch in epoch_batches(self.indices, self.batch_size, self.epoch, self.seed, shuffle=True):
            yield share(batch, self.rank, self.world)

    def __len__(self) -> int:
        return len(epoch_batches(self.indices, self.batch_size, self.epoch, self.seed, shuffle=True))


class DistributedTrainer(Trainer):
    """A :class:`Trainer` that is one of ``group.world`` replicas computing the same run."""

    def __init__(self, plan: Plan, opts: TrainOptions, device: Device, batch_size: int, workers: int,
                 freeze_below: Layer | None, progress: bool, group: ProcessGroup):
        super().__init__(plan, opts, device, batch_size, workers, freeze_below, progress and group.is_main)
        self.group = group
        self.synchronised_batchnorm = synchronise_batchnorm(self.net) if self.opts.bn_stats == "update" else 0
        # as many batches per rank as one process has: the schedule's steps_per_epoch holds as it is
        self.sampler = RankBatches(plan.fit, batch_size, self.opts.seed, group.rank, group.world)
        self.summed_loss = nn.CrossEntropyLoss(reduction="sum", label_smoothing=self.opts.label_smoothing)
        self._replica: nn.Module | None = None
        self._replica_of: tuple[str, ...] | None = None

    def processes(self) -> dict:
        return {"world_size": self.group.world, "backend": self.group.backend,
                "synchronised_batchnorm": bool(self.synchronised_batchnorm)}

    # ------------------------------------------------------------------ training

    def _train_batches(self, epoch: int):
        self._replicate()  # after the freeze schedule chose this epoch's trainable blocks
        return super()._train_batches(epoch)

    def _epoch_loader(self, epoch: int):
        self.sampler.set_epoch(epoch)
        shares = list(self.sampler)
        loader = make_loader(self.train_images, [s for s in shares if s], self.workers, self.device)
        return self._aligned(loader, shares), sum(map(len, shares))

    def _aligned(self, loader, shares: list[list]):
        """The loader's batches, with an empty batch where this rank's share is empty (a batch of
        fewer images than ranks): the rank still takes part in the step's collectives."""
        size = self.plan.pre.crop_size
        batches = iter(loader)
        for s in shares:
            if s:
                yield next(batches)
            else:
                yield (torch.zeros((0, 3, size, size), dtype=torch.uint8), torch.zeros(0, dtype=torch.int64),
                       torch.zeros(0, dtype=torch.bool))

    def _readable(self, ok: torch.Tensor) -> int:
        return int(self.group.all_sum([int(ok.sum())])[0])

    def _training_net(self) -> nn.Module:
        return self._replica

    def _loss(self, logits: torch.Tensor, y: torch.Tensor, n: int) -> torch.Tensor:
        return self.summed_loss(logits, y) * (self.group.world / n)

    def _step(self, images: torch.Tensor, labels: torch.Tensor, n: int) -> tuple[float, int]:
        loss, hits = super()._step(images, labels, n)
        loss, hits = self.group.all_sum([loss, hits])
        return loss / self.group.world, int(hits)

    def _dropout_seed(self, epoch: int) -> int:
        if self.group.is_main:
            return super()._dropout_seed(epoch)
        state = np.random.SeedSequence([self.opts.seed, epoch, 2, self.group.rank]).generate_state(1, np.uint64)
        return int(state[0] >> 1)

    def _replicate(self) -> None:
        """Wrap the network in DDP for the parameters that train now (rebuilt when they change)."""
        trainable = tuple(name for name, p in self.net.named_parameters() if p.requires_grad)
        if trainable == self._replica_of:
            return
        self._replica = None
        gc.collect()  # the old wrapper's gradient hooks go with it
        unused = self._unused_parameters()
        if unused:
            log.info("%d trainable parameters take no part in the forward pass (%s...): DDP looks for unused "
                     "parameters every step", len(unused), unused[0])
        dev = self.device.torch_device
        self._replica = nn.parallel.DistributedDataParallel(
            self.net, device_ids=[dev.index] if self.device.is_cuda else None, find_unused_parameters=bool(unused),
            **_NO_BUFFER_SYNC,
        )
        self._replica_of = trainable

    def _unused_parameters(self) -> list[str]:
        """Trainable parameters that receive no gradient from a forward pass (two blank images, eval mode)."""
        named = [(name, p) for name, p in self.net.named_parameters() if p.requires_grad]
        if not named:
            return []
        modes = {module: module.training for module in self.net.modules()}
        size = self.plan.pre.crop_size
        self.net.eval()
        try:
            x = _to_device(torch.zeros((2, 3, size, size), dtype=torch.uint8), self.normalise, self.device)
            with torch.enable_grad(), self.device.autocast():
                out = self.net(x).float().sum()
            grads = torch.autograd.grad(out, [p for _, p in named], allow_unused=True)
        finally:
            for module, mode in modes.items():
                module.training = mode
        return [name for (name, _), g in zip(named, grads) if g is None]

    # ------------------------------------------------------------------ evaluation

    def evaluate(self, indices: np.ndarray, desc: str = "validate") -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Every W-th evaluation batch here, the rest on the other ranks; all of it, in order, on every rank."""
        world = self.group.world
        batches = eval_batches(indices, self.batch_size * 2)
        mine = predict_batches(self.net, self.eval_images, batches[self.group.rank::world], self.device,
                               self.normalise, self.workers, desc if self.progress else None)
        per_rank = []
        for rank, arrays in enumerate(self.group.gather(mine)):
            bounds = np.cumsum([len(b) for b in batches[rank::world]])[:-1]
            per_rank.append(list(zip(*(np.split(a, bounds) for a in arrays))))
        ordered = [per_rank[b % world][b // world] for b in range(len(batches))]
        if not ordered:
            return mine
        return tuple(np.concatenate(parts) for parts in zip(*ordered))

    def _agreed(self, values):
        return self.group.broadcast(values)
