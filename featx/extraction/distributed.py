"""Extraction across processes launched by ``torchrun``: every rank computes its share of shards.

The samples are cut into the same shards as a single-process run (see
:mod:`featx.cache.partial`); rank r takes every W-th pending shard and writes it to the
shared ``.partial`` directory, and rank 0, which holds the entry's lock, assembles the entry
once all ranks are done. Only decisions (hit or build, the plan, errors, the final path) go
through ``torch.distributed``; features go through the filesystem, so the cache directory must
be shared by all ranks (one node, or a network filesystem).
"""

from __future__ import annotations

import datetime
import os
from dataclasses import dataclass

import torch

from .._runtime import Device, available_cores
from ..errors import FeatxError

#: ranks wait for each other around a forward pass that can take hours
COLLECTIVE_TIMEOUT = datetime.timedelta(hours=24)


@dataclass(frozen=True)
class ProcessGroup:
    rank: int
    world: int
    local_rank: int
    local_world: int

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def broadcast(self, obj):
        """Rank 0's ``obj`` on every rank."""
        box = [obj]
        torch.distributed.broadcast_object_list(box, src=0)
        return box[0]

    def gather(self, obj) -> list:
        out = [None] * self.world
        torch.distributed.all_gather_object(out, obj)
        return out

    def on_main(self, fn):
        """Collective: ``fn()`` runs on rank 0 only; its result (or its error) reaches every rank."""
        result, error = None, None
        if self.is_main:
            try:
                result = fn()
            except BaseException as exc:  # re-raised below, after the others heard of it
                error = exc
        self.raise_any(error)
        return self.broadcast(result)

    def raise_any(self, error: BaseException | None) -> None:
        """Collective: re-raise on every rank when any rank failed (nobody waits forever)."""
        mine = None if error is None else f"{type(error).__name__}: {error}"
        failures = [(rank, msg) for rank, msg in enumerate(self.gather(mine)) if msg]
        if error is not None:
            raise error
        if failures:
            rank, msg = failures[0]
            raise FeatxError(f"Stopped because rank {rank} failed ({msg}); the shards already written are kept "
                             "and the next identical run resumes from them.")

    def cpu_cores(self) -> int:
        """This rank's share of the node's cores: ranks on one node must not oversubscribe it."""
        return max(1, available_cores() // self.local_world)

    def place(self, device: Device) -> Device:
        """One GPU per local rank unless the user named one."""
        if device.is_cuda and device.torch_device.index is None:
            return Device(torch.device("cuda", self.local_rank % torch.cuda.device_count()), device.autocast_dtype)
        return device


def current_group() -> ProcessGroup | None:
    """The torchrun process group this process belongs to, initialised on first use (gloo)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return None
    import torch.distributed as dist

    if not dist.is_available():  # pragma: no cover - torch built without distributed
        raise RuntimeError("WORLD_SIZE > 1 but this torch build has no torch.distributed support.")
    if not dist.is_initialized():
        # gloo carries the small decisions exchanged here on any machine; features go through disk
        dist.init_process_group(backend="gloo", timeout=COLLECTIVE_TIMEOUT)
    return ProcessGroup(
        rank=dist.get_rank(), world=dist.get_world_size(),
        local_rank=int(os.environ.get("LOCAL_RANK", "0")),
        local_world=int(os.environ.get("LOCAL_WORLD_SIZE", str(dist.get_world_size()))),
    )
