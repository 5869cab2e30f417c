"""Process-level performance settings: device, CPU threads, allocator.

Measured on a 2-core machine (see ``benchmarks/``): intra-op threads must never exceed
the cores left over by DataLoader workers and BLAS pools (oversubscribed OpenMP threads
spin-wait and collapse 10-30x), and glibc's habit of returning freed activation buffers to
the kernel and faulting them back in costs about half of a CPU forward pass. Users get the
fast settings without having to know about them; ``FEATX_MALLOC_TUNING=0`` opts out.
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import logging
import os
import sys
from dataclasses import dataclass
from typing import TYPE_CHECKING

from .errors import UsageError

if TYPE_CHECKING:  # torch is imported on first use, so that probe workers never load it
    import torch

log = logging.getLogger(__name__)

_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3
_MALLOC_LIMIT = 2**31 - 1  # mallopt() takes an int
_GLIBC_DEFAULT_THRESHOLD = 128 * 1024
_malloc_tuned = False


def available_cores() -> int:
    """CPU cores this process may run on (respects taskset/cgroup affinity)."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # pragma: no cover - not Linux
        return max(1, os.cpu_count() or 1)


def tune_malloc() -> bool:
    """Keep freed buffers in the heap instead of unmapping them (glibc only).

    Equivalent to starting the process with ``MALLOC_MMAP_THRESHOLD_`` and
    ``MALLOC_TRIM_THRESHOLD_`` set large. Returns True when the settings are active.
    """
    global _malloc_tuned
    if _malloc_tuned:
        return True
    if os.environ.get("FEATX_MALLOC_TUNING", "1") == "0" or not sys.platform.startswith("linux"):
        return False
    name = ctypes.util.find_library("c")
    if not name:
        return False
    try:
        libc = ctypes.CDLL(name)
        ok = libc.mallopt(_M_TRIM_THRESHOLD, _MALLOC_LIMIT) == 1
        ok = libc.mallopt(_M_MMAP_THRESHOLD, _MALLOC_LIMIT) == 1 and ok
    except (OSError, AttributeError):  # musl and others have no mallopt
        return False
    _malloc_tuned = ok
    log.debug("glibc malloc tuning %s", "active" if ok else "refused")
    return ok


def restore_malloc() -> None:
    """Undo ``tune_malloc`` and hand the heap's free pages back to the kernel: the kept buffers
    speed up forward passes, but a process that goes on to probe (``featx run``) would hold
    them, about a GB, for the rest of its life."""
    global _malloc_tuned
    if not _malloc_tuned:
        return
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c"))
        libc.mallopt(_M_TRIM_THRESHOLD, _GLIBC_DEFAULT_THRESHOLD)
        libc.mallopt(_M_MMAP_THRESHOLD, _GLIBC_DEFAULT_THRESHOLD)
        libc.malloc_trim(0)
    except (OSError, AttributeError):
        return
    _malloc_tuned = False


@dataclass(frozen=True)
class Device:
    """Where the forward pass runs and how."""

    torch_device: torch.device
    autocast_dtype: torch.dtype | None  # None: full float32

    @property
    def is_cuda(self) -> bool:
        return self.torch_device.type == "cuda"

    @property
    def precision(self) -> str:
        """Name of the compute precision; part of the cache key because it changes features."""
        if self.autocast_dtype is None:
            return "float32"
        import torch

        return {torch.bfloat16: "bfloat16", torch.float16: "float16"}[self.autocast_dtype]

    def autocast(self):
        """The mixed-precision context of this device, or none for full float32."""
        import contextlib

        import torch

        if self.autocast_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.torch_device.type, dtype=self.autocast_dtype)


def resolve_device(spec: str = "auto", precision: str = "auto") -> Device:
    """Turn ``auto|cpu|cuda|cuda:N`` and ``auto|float32|bfloat16|float16`` into a Device."""
    import torch

    spec = (spec or "auto").strip().lower()
    if spec == "auto":
        spec = "cuda" if torch.cuda.is_available() else "cpu"
    if spec != "cpu" and not spec.startswith("cuda"):
        raise UsageError(f"Unknown device {spec!r}. Valid devices: auto, cpu, cuda, cuda:N.")
    if spec.startswith("cuda"):
        if not torch.cuda.is_available():
            raise UsageError(
                f"Device {spec!r} was requested but CUDA is not available on this machine; "
                "use --device cpu (or auto)."
            )
        try:
            dev = torch.device(spec)
        except RuntimeError as exc:
            raise UsageError(f"Invalid CUDA device {spec!r}: {exc}") from None
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise UsageError(
                f"Device {spec!r} does not exist: this machine has "
                f"{torch.cuda.device_count()} CUDA device(s)."
            )
    else:
        dev = torch.device("cpu")

    precision = (precision or "auto").lower()
    valid = ("auto", "float32", "bfloat16", "float16")
    if precision not in valid:
        raise UsageError(f"Unknown precision {precision!r}. Valid: {', '.join(valid)}.")
    if precision == "auto":
        if dev.type == "cuda":
            precision = "bfloat16" if torch.cuda.is_bf16_supported() else "float16"
        else:
            precision = "float32"
    if dev.type == "cpu" and precision == "float16":
        raise UsageError("float16 autocast is only supported on CUDA; use float32 or bfloat16 on CPU.")
    amp = {"float32": None, "bfloat16": torch.bfloat16, "float16": torch.float16}[precision]
    return Device(dev, amp)


def plan_cpu_threads(workers: int, cores: int | None = None) -> int:
    """Intra-op threads for the main process given ``workers`` DataLoader processes."""
    cores = cores or available_cores()
    return max(1, cores - max(0, workers - 1)) if workers else cores


def configure_threads(threads: int) -> None:
    """Set torch's intra-op pool; inter-op work is not used by a plain forward pass."""
    import torch

    if torch.get_num_threads() != threads:
        torch.set_num_threads(threads)
    try:
        torch.set_num_interop_threads(1)
    except RuntimeError:  # already initialised by an earlier parallel call
        pass


# ------------------------------------------------------------------ CPU settings shared by extraction and fine-tuning


def default_workers(device: Device, in_memory: bool, cores: int | None = None) -> int:
    """DataLoader decoding processes. In-memory images cost ~0.1 ms each: decoding them inline
    beats a worker that competes with the compute threads for the same cores (benchmarks/)."""
    cores = cores or available_cores()
    if device.is_cuda:
        return max(1, min(8, cores - 1))
    if in_memory or cores < 2:
        return 0
    return 1 if cores <= 4 else min(4, cores // 4)


@contextlib.contextmanager
def cpu_settings(device: Device, workers: int, cores: int | None = None):
    """On CPU: intra-op threads that fit beside ``workers`` loader processes on ``cores``, and
    glibc's allocator tuned; both are restored afterwards. CUDA: untouched."""
    if device.is_cuda:
        yield
        return
    import torch

    previous = torch.get_num_threads()
    tuned_here = not _malloc_tuned and tune_malloc()
    configure_threads(plan_cpu_threads(workers, cores))
    try:
        yield
    finally:
        configure_threads(previous)
        if tuned_here:
            restore_malloc()
