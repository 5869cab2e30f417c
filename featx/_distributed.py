"""Processes started by ``torchrun``: joining their group, and the few collectives featx needs.

Extraction and fine-tuning both run under ``torchrun`` (``WORLD_SIZE`` > 1); what they share
lives here: which backend (gloo, or nccl when the work itself runs on CUDA), rank 0's
decisions and errors reaching every rank, and the check that all ranks agree before any of
them computes. No rank waits for a peer for ever: collectives time out after
``FEATX_DIST_TIMEOUT`` seconds. torch is imported on first use.
"""

from __future__ import annotations

import datetime
import os
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, ClassVar, TypeVar

from ._runtime import Device, available_cores
from .errors import FeatxError, UsageError

if TYPE_CHECKING:
    import torch

#: seconds a rank waits for a peer that shows no sign of life (``FEATX_DIST_TIMEOUT``)
DEFAULT_TIMEOUT = 300.0

T = TypeVar("T")


def dist_timeout() -> float:
    """``FEATX_DIST_TIMEOUT`` in seconds (default 300): how long a hung peer may keep the others waiting."""
    text = os.environ.get("FEATX_DIST_TIMEOUT", "")
    if not text.strip():
        return DEFAULT_TIMEOUT
    try:
        value = float(text)
    except ValueError:
        value = -1.0
    if not value > 0:
        raise UsageError(f"FEATX_DIST_TIMEOUT must be a positive number of seconds, got {text!r}.")
    return value


def launched_world_size() -> int:
    """How many processes ``torchrun`` started for this job (1 without it)."""
    return int(os.environ.get("WORLD_SIZE", "1"))


def is_main_process() -> bool:
    """True outside ``torchrun`` and on its rank 0: the one process that reports."""
    return os.environ.get("RANK", "0") == "0"


def config_differences(a, b, prefix: str = "") -> list[str]:
    """Dotted names of the fields where two configs differ (``dataset.content``, ``code.torch``)."""
    if isinstance(a, dict) and isinstance(b, dict):
        out = []
        for k in sorted(set(a) | set(b)):
            out += config_differences(a.get(k), b.get(k), f"{prefix}{k}.")
        return out
    return [] if a == b else [prefix.rstrip(".") or "(whole value)"]


@dataclass
class ProcessGroup:
    """This process's place among the ``torchrun`` ranks, and the collectives built on it."""

    rank: int
    world: int
    local_rank: int
    local_world: int
    timeout: float = DEFAULT_TIMEOUT
    backend: str = "gloo"
    #: what the other ranks are told survives when one rank fails
    failure_note: ClassVar[str] = "nothing was written."

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def broadcast(self, obj: T) -> T:
        """Rank 0's ``obj`` on every rank."""
        import torch

        box = [obj]
        torch.distributed.broadcast_object_list(box, src=0)
        return box[0]

    def gather(self, obj) -> list:
        """Every rank's ``obj``, in rank order, on every rank."""
        import torch

        out = [None] * self.world
        torch.distributed.all_gather_object(out, obj)
        return out

    def all_sum(self, values) -> list[float]:
        """Element-wise sums over the ranks (float64: exact for counts)."""
        import torch

        tensor = torch.tensor([float(v) for v in values], dtype=torch.float64, device=self.tensor_device)
        torch.distributed.all_reduce(tensor)
        return tensor.cpu().tolist()

    @property
    def tensor_device(self) -> torch.device:
        """Where tensors for collectives live: the rank's GPU under nccl, else the CPU."""
        import torch

        return torch.device("cuda", torch.cuda.current_device()) if self.backend == "nccl" else torch.device("cpu")

    def on_main(self, fn: Callable[[], T]) -> T:
        """Collective: ``fn()`` runs on rank 0 only; its result (or its error) reaches every rank,
        and no rank goes on before rank 0 is done."""
        result, error = None, None
        if self.is_main:
            try:
                result = fn()
            except BaseException as exc:  # re-raised below, after the others heard of it
                error = exc
        self.raise_any(error)
        return self.broadcast(result)

    def raise_any(self, error: BaseException | None) -> None:
        """Collective: re-raise on every rank when any rank failed (nobody waits forever); a
        user's mistake found on one rank stays a usage error on all of them."""
        mine = None if error is None else (isinstance(error, UsageError), f"{type(error).__name__}: {error}")
        failures = [(rank, report) for rank, report in enumerate(self.gather(mine)) if report]
        if error is not None:
            raise error
        if failures:
            rank, (usage, msg) = failures[0]
            raise (UsageError if usage else FeatxError)(f"Stopped because rank {rank} failed ({msg}); "
                                                        f"{self.failure_note}")

    def agree(self, what: str, value, config: dict | None = None) -> None:
        """Collective: raise on every rank unless all ranks hold rank 0's ``value``.

        ``config`` (the description ``value`` is derived from) names the differing fields."""
        everyone = self.gather((value, config))
        differ = [r for r, (v, _) in enumerate(everyone) if v != everyone[0][0]]
        if not differ:
            return
        lines = []
        for r in differ:
            a, b = everyone[0][1], everyone[r][1]
            fields = config_differences(a, b) if isinstance(a, dict) and isinstance(b, dict) else []
            lines.append(f"rank {r} differs from rank 0 in {', '.join(fields) or what}")
        raise FeatxError(
            f"The ranks disagree on the {what}; nothing was computed. " + "; ".join(lines) + ". Every rank must "
            "see the same dataset (same files, sizes and modification times: copy node-local datasets with "
            "`rsync -t` or `cp -p`, or use one shared copy), the same model, options and library versions."
        )

    def cpu_cores(self) -> int:
        """This rank's share of the node's cores: ranks on one node must not oversubscribe it."""
        return max(1, available_cores() // self.local_world)

    def place(self, device: Device) -> Device:
        """One GPU per local rank unless the user named one."""
        import torch

        if device.is_cuda and device.torch_device.index is None:
            return Device(torch.device("cuda", self.local_rank % torch.cuda.device_count()), device.autocast_dtype)
        return device


G = TypeVar("G", bound=ProcessGroup)


def current_group(group_class: type[G] = ProcessGroup, device: Device | None = None) -> G | None:
    """The torchrun process group this process belongs to (None without torchrun), initialised on
    first use: nccl when ``device`` (where the work runs) is CUDA, else gloo. A group already
    initialised (by an earlier stage in this process) is used as it is."""
    if launched_world_size() <= 1:
        return None
    import torch
    import torch.distributed as dist

    if not dist.is_available():  # pragma: no cover - torch built without distributed
        raise RuntimeError("WORLD_SIZE > 1 but this torch build has no torch.distributed support.")
    timeout = dist_timeout()
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if not dist.is_initialized():
        backend = "gloo"
        if device is not None and device.is_cuda and dist.is_nccl_available():
            backend = "nccl"
            torch.cuda.set_device(local_rank % torch.cuda.device_count())
        dist.init_process_group(backend=backend, timeout=datetime.timedelta(seconds=timeout))
    return group_class(
        rank=dist.get_rank(), world=dist.get_world_size(), local_rank=local_rank,
        local_world=int(os.environ.get("LOCAL_WORLD_SIZE", str(dist.get_world_size()))),
        timeout=timeout, backend=str(dist.get_backend()),
    )


def on_main(group: ProcessGroup | None, fn: Callable[[], T]) -> T:
    """``fn()`` in a single process; under torchrun on rank 0 only, its result on every rank."""
    return fn() if group is None else group.on_main(fn)
