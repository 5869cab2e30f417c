"""The batch loop: loader -> model -> layer taps -> pooled arrays -> shard files.

Shards are written on a background thread so disk I/O overlaps the next batches; a shard is
handed to the writer only once all its rows are computed.
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch

from .._progress import progress_bar
from .._runtime import cpu_settings, default_workers
from ..backbones.taps import LayerTaps
from ..cache.partial import PartialRun
from ..data.dataset import ArrayBatches, ImageDataset
from ..data.sources import ImageSource
from ..errors import BadImageError, FeatureOverflowError
from ..layer import Layer
from .plan import ExtractionRequest, ShardPlan

FLOAT16_MAX = float(np.finfo(np.float16).max)


@dataclass(frozen=True)
class Share:
    """The shards this process computes, and how it reports on them."""

    shards: tuple[int, ...]
    total: int  # the progress bar's length
    initial: int = 0  # rows already done when the bar starts
    progress: bool = True
    cores: int | None = None  # this process's share of the machine; None: all it may use
    beat: Callable[[], None] | None = None  # called after every batch to show the process is alive


def _batches(run: PartialRun, shards: tuple[int, ...] | list[int], batch_size: int) -> list[list[int]]:
    out = []
    for shard in shards:
        start, stop = run.rows(shard)
        out += [list(range(i, min(i + batch_size, stop))) for i in range(start, stop, batch_size)]
    return out


class _ShardWriter:
    """Writes finished shards on a background thread so disk I/O overlaps the forward pass."""

    def __init__(self, run: PartialRun):
        self.run = run
        self.queue: queue.Queue = queue.Queue(maxsize=2)
        self.error: BaseException | None = None
        self.thread = threading.Thread(target=self._loop, name="featx-shard-writer", daemon=True)
        self.thread.start()

    def _loop(self):
        while (item := self.queue.get()) is not None:
            if self.error is None:
                try:
                    self.run.write(*item)
                except BaseException as exc:  # surfaced in the main thread
                    self.error = exc

    def put(self, *item):
        self._raise()
        self.queue.put(item)

    def close(self):
        self.queue.put(None)
        self.thread.join()
        self._raise()

    def _raise(self):
        if self.error is not None:
            raise self.error


def _forward_pass(net: torch.nn.Module, layers: list[Layer], request: ExtractionRequest, plan: ShardPlan,
                  run: PartialRun, share: Share) -> None:
    """Decode, run and pool every batch of ``share.shards``; ``share.beat()`` after each batch tells
    waiting ranks that this one is alive. A file that cannot be read (ImageReadError) stops the pass.
    The tensor resize engine works in this process on the device, so it starts no workers."""
    source, dev = request.source, request.device
    batches = _batches(run, share.shards, plan.batch_size)
    if request.resize_engine == "tensor":
        n_workers = 0
    elif request.workers is None:
        n_workers = default_workers(dev, source.in_memory, share.cores)
    else:
        n_workers = request.workers
    with cpu_settings(dev, n_workers, share.cores):
        if request.resize_engine == "tensor":
            loader = ArrayBatches(source, request.pre, batches, dev.torch_device)
        else:
            loader = torch.utils.data.DataLoader(
                ImageDataset(source, request.pre),
                batch_sampler=batches,
                num_workers=n_workers,
                pin_memory=dev.is_cuda,
                prefetch_factor=4 if n_workers else None,
            )
        net = net.to(dev.torch_device).to(memory_format=torch.channels_last).eval()
        _run_batches(net, loader, layers, request, plan, run, share)


def _run_batches(net: torch.nn.Module, loader, layers: list[Layer], request: ExtractionRequest, plan: ShardPlan,
                 run: PartialRun, share: Share) -> None:
    source, dev = request.source, request.device
    normalise = request.pre.normalizer(dev.torch_device)
    names = [layer.name for layer in layers]
    out_dtype = np.dtype(plan.dtype)
    writer = _ShardWriter(run)
    shard_iter = iter(share.shards)
    current = next(shard_iter)
    start, stop = run.rows(current)
    buffers: dict[str, list[np.ndarray]] = {name: [] for name in names}
    oks: list[np.ndarray] = []
    errs: list[str] = []
    filled = 0
    bar = progress_bar(total=share.total, initial=share.initial, unit="img", desc="extract",
                       disable=not share.progress, smoothing=0.1)
    taps = LayerTaps(net, layers, dict(plan.rules))
    try:
        with torch.inference_mode():
            for images, reasons in loader:
                rows = images.shape[0]
                ok = np.array([r == "" for r in reasons], dtype=bool)
                if request.strict and not ok.all():
                    first = int(np.flatnonzero(~ok)[0])
                    raise BadImageError(f"Unreadable image {source.location(start + filled + first)}: {reasons[first]}")
                x = normalise(images).contiguous(memory_format=torch.channels_last)
                with dev.autocast():
                    pooled = taps(x)
                host = torch.cat([pooled[name] for name in names], dim=1).cpu().numpy()
                offset = 0
                for name in names:
                    width = pooled[name].shape[1]
                    block = host[:, offset:offset + width]
                    offset += width
                    _check_finite(block, ok, name, out_dtype, source, start + filled)
                    block = block.astype(out_dtype)
                    block[~ok] = 0
                    buffers[name].append(block)
                oks.append(ok)
                errs += list(reasons)
                filled += rows
                bar.update(rows)
                if share.beat is not None:
                    share.beat()
                if start + filled == stop:
                    writer.put(current, {k: np.concatenate(v) for k, v in buffers.items()},
                               np.concatenate(oks), errs)
                    buffers = {name: [] for name in names}
                    oks, errs, filled = [], [], 0
                    current = next(shard_iter, None)
                    if current is not None:
                        start, stop = run.rows(current)
        writer.close()
    finally:
        taps.remove()
        bar.close()
        if writer.thread.is_alive():
            writer.queue.put(None)
            writer.thread.join()


def _check_finite(block: np.ndarray, ok: np.ndarray, name: str, out_dtype: np.dtype, source: ImageSource,
                  first_row: int) -> None:
    """Refuse NaN/inf activations of readable images, and values float16 would store as inf."""
    good = block[ok]
    if not np.isfinite(good).all():
        bad = int(np.flatnonzero(~np.isfinite(block).all(axis=1) & ok)[0])
        raise FeatureOverflowError(
            f"Layer {name} produced NaN or infinite activations for {source.location(first_row + bad)}; "
            "the model or its weights are broken for this input."
        )
    if out_dtype == np.float16 and good.size and np.abs(good).max() > FLOAT16_MAX:
        raise FeatureOverflowError(
            f"Layer {name} has activations up to {np.abs(good).max():.3g}, beyond float16's "
            f"{FLOAT16_MAX:.0f}; storing them would write inf. Use --dtype float32."
        )
