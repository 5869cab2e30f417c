"""``featx.extract``: one forward pass over a dataset, many layers, into the cache.

The entry's identity is computed from names and files before anything heavy happens; when
the entry already holds the requested layers, no model is built and no image is read.
Otherwise only the missing layers are extracted, the forward pass stops after the deepest
of them, and shards of features stream to disk while the next batches are computed.
"""

from __future__ import annotations

import contextlib
import logging
import os
import platform
import queue
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from .. import __version__
from .._progress import progress_bar
from .._runtime import (
    Device,
    available_cores,
    configure_threads,
    plan_cpu_threads,
    resolve_device,
    tune_malloc,
)
from ..backbones.ladder import Layer, trace_ladder
from ..backbones.pooling import check_pool, layer_rule, pooled_width
from ..backbones.registry import DEFAULT_MODEL, ModelInfo, build_model, describe_model, parse_model
from ..backbones.taps import LayerTaps
from ..cache.entry import FeatureEntry, LayerRecord
from ..cache.key import FORMAT_VERSION, config_key
from ..cache.store import CacheStore
from ..data import ImageDataset, open_dataset, stratified_limit
from ..data.sources import ImageSource
from ..errors import BadImageError, CacheCorruptError, FeatureOverflowError, UnknownLayerError, UsageError
from ..report.text import human_bytes
from .distributed import ProcessGroup, current_group

log = logging.getLogger(__name__)

DTYPES = ("float16", "float32")
FLOAT16_MAX = float(np.finfo(np.float16).max)
#: ``--pool none`` is refused when the new layers would exceed this many bytes (unless forced)
NONE_POOL_BUDGET = 2 * 1024**3
SHARD_BYTES = 32 * 1024**2


@dataclass
class RunStats:
    """What the last ``extract`` call did; attached to the returned entry as ``last_run``."""

    forward_pass: bool
    layers_added: list[str]
    images: int = 0
    seconds: float = 0.0
    resumed_rows: int = 0
    estimated_bytes: int = 0

    @property
    def images_per_second(self) -> float:
        return self.images / self.seconds if self.seconds > 0 else 0.0


def default_batch_size(device: Device, image_size: int) -> int:
    """Measured on 2 CPU cores (benchmarks/): small batches keep activations in cache."""
    if device.is_cuda:
        return 256 if image_size <= 128 else 128 if image_size <= 256 else 64
    return 32 if image_size <= 128 else 16 if image_size <= 256 else 8


def default_workers(device: Device, source: ImageSource, cores: int | None = None) -> int:
    """Decoding processes. In-memory images cost ~0.1 ms each: decoding them inline beats a
    worker that competes with the compute threads for the same cores (benchmarks/)."""
    cores = cores or available_cores()
    if device.is_cuda:
        return max(1, min(8, cores - 1))
    if source.in_memory or cores < 2:
        return 0
    return 1 if cores <= 4 else min(4, cores // 4)


def library_versions() -> dict:
    import h5py
    import timm
    import torchvision

    return {
        "featx": __version__, "python": platform.python_version(), "torch": torch.__version__,
        "torchvision": torchvision.__version__, "timm": timm.__version__, "h5py": h5py.__version__,
        "numpy": np.__version__,
    }


def _check_options(dtype, batch_size, workers, shard_rows):
    if dtype not in DTYPES:
        raise UsageError(f"Unknown dtype {dtype!r}. Valid: {', '.join(DTYPES)}.")
    for name, value in (("--batch-size", batch_size), ("--workers", workers), ("shard_rows", shard_rows)):
        if value is not None and (not isinstance(value, int) or value < (0 if name == "--workers" else 1)):
            raise UsageError(f"{name} must be a {'non-negative' if name == '--workers' else 'positive'} "
                             f"integer, got {value!r}.")


def device_numerics(device: Device) -> dict:
    """What about the device changes float32 results: its type (cpu, cuda, mps; never its index,
    so ranks on different GPUs of one kind share an entry) and the switches that let it trade
    precision for speed (TF32 convolutions and matmuls on CUDA, the matmul precision setting)."""
    numerics = {"type": device.torch_device.type,
                "float32_matmul_precision": torch.get_float32_matmul_precision()}
    if device.is_cuda:
        numerics["tf32"] = {"matmul": bool(torch.backends.cuda.matmul.allow_tf32),
                            "cudnn": bool(torch.backends.cudnn.allow_tf32)}
    return numerics


def code_versions() -> dict:
    """Versions of the code that defines the numbers, part of the key.

    featx (pooling, layer taps), timm and torchvision (architectures, their preprocessing
    defaults and the resize used on every image) define what is computed; torch defines how:
    its kernels (oneDNN/cuDNN algorithms, summation order) change float results between
    releases, and a stale entry silently mixed with new features is worse than one re-extraction
    after an upgrade. Pillow decodes and resizes every image, so its version is included too.
    numpy, h5py and python only store the results and are left out.
    """
    import PIL
    import timm
    import torchvision

    return {"featx": __version__, "timm": timm.__version__, "torchvision": torchvision.__version__,
            "torch": torch.__version__, "pillow": PIL.__version__}


def entry_config(info: ModelInfo, pre, pool: str, token_pool: str, dtype: str, device: Device,
                 source: ImageSource, limit: int | None, seed: int) -> dict:
    """The full description that the cache key hashes; every default is spelled out."""
    dataset = source.fingerprint()
    dataset["limit"] = {"n": limit, "seed": seed} if limit is not None else None
    return {
        "format": FORMAT_VERSION,
        "model": {"name": info.spec.name, **info.identity},
        "preprocessing": pre.to_dict(),
        "pooling": {"pool": pool, "token_pool": token_pool},
        "dtype": dtype,
        "precision": device.precision,
        "device": device_numerics(device),
        "code": code_versions(),
        "dataset": dataset,
    }


def extract(
    dataset: str | ImageSource,
    model: str = DEFAULT_MODEL,
    *,
    layers: str | list[str] | None = "auto",
    pool: str = "avg",
    token_pool: str = "auto",
    dtype: str = "float16",
    weights: str | None = None,
    checkpoint: str | os.PathLike | None = None,
    arch: str | None = None,
    image_size: int | None = None,
    crop_pct: float | None = None,
    interpolation: str | None = None,
    data_root: str | os.PathLike | None = None,
    download: bool = True,
    limit: int | None = None,
    seed: int = 0,
    batch_size: int | None = None,
    workers: int | None = None,
    device: str = "auto",
    precision: str = "auto",
    cache_dir: str | os.PathLike | None = None,
    strict: bool = False,
    force: bool = False,
    progress: bool = True,
    shard_rows: int | None = None,
    hash_content: bool = False,
) -> FeatureEntry:
    """Extract pooled activations of ``layers`` of ``model`` over ``dataset`` into the cache.

    Returns the cache entry (a :class:`~featx.cache.entry.FeatureEntry`); ``entry.last_run``
    says whether a forward pass ran. Re-running with the same arguments returns at once.
    """
    check_pool(pool, token_pool)
    _check_options(dtype, batch_size, workers, shard_rows)
    source = dataset if isinstance(dataset, ImageSource) else open_dataset(dataset, data_root, download,
                                                                            hash_content=hash_content)
    source = stratified_limit(source, limit, seed)
    if len(source) == 0:
        raise UsageError("The dataset has no samples.")
    spec = parse_model(model, weights=weights, checkpoint=checkpoint, arch=arch)
    info = describe_model(spec)
    pre = info.preprocessing.override(image_size, crop_pct, interpolation)
    dev = resolve_device(device, precision)
    group = current_group()  # launched by torchrun: every rank computes a share of the shards
    if group is not None:
        dev = group.place(dev)
    config = entry_config(info, pre, pool, token_pool, dtype, dev, source, limit, seed)
    key = config_key(config)
    store = CacheStore(cache_dir)
    work = (source, info, pre, layers, pool, token_pool, dtype, dev, batch_size, workers, strict, force, progress,
            shard_rows)
    if group is not None:
        return _extract_in_group(group, store, key, config, layers, spec.name, work)

    hit = _cached(store, key, layers, spec.name)
    if hit is not None:
        return hit
    with store.lock(key):
        hit = _cached(store, key, layers, spec.name)  # built by another process while we waited
        if hit is not None:
            return hit
        base = _verified(store, store.find(key))
        return _build(store, key, config, base, *work)


def _extract_in_group(group: ProcessGroup, store: CacheStore, key: str, config: dict, layers, model_name: str,
                      work: tuple) -> FeatureEntry:
    """Rank 0 decides under the entry's lock (hit, or which entry to extend); every rank computes.

    First every rank checks that all agree on the key and share the cache directory: a rank
    with another key would write shards of another entry, found out only at assembly."""
    group.agree("cache key", key, config)
    group.check_shared_dir(store.root)
    try:
        return _decide_and_build(group, store, key, config, layers, model_name, work)
    finally:
        group.close_session()


def _decide_and_build(group: ProcessGroup, store: CacheStore, key: str, config: dict, layers, model_name: str,
                      work: tuple) -> FeatureEntry:
    with contextlib.ExitStack() as held:
        if group.is_main:
            with group.beating():  # another process may hold the lock for a while
                held.enter_context(store.lock(key))

        def decide():
            hit = _cached(store, key, layers, model_name)
            if hit is not None:
                return "hit", str(hit.path)
            base = _verified(store, store.find(key))
            return "build", str(base.path) if base is not None else None

        verdict, path = group.on_main(decide)
        if verdict == "hit":
            entry = FeatureEntry(Path(path))
            entry.last_run = RunStats(forward_pass=False, layers_added=[])
            return entry
        base = FeatureEntry(Path(path)) if path is not None else None
        return _build(store, key, config, base, *work, group=group)


def _verified(store: CacheStore, entry: FeatureEntry | None) -> FeatureEntry | None:
    """The entry if every checksum holds; otherwise it is quarantined (and rebuilt by the caller)."""
    if entry is None:
        return None
    try:
        entry.verify()
    except CacheCorruptError as exc:
        store.quarantine(entry.path, str(exc))
        return None
    return entry


def _cached(store: CacheStore, key: str, layers, model_name: str) -> FeatureEntry | None:
    entry = store.find(key)
    if entry is None:
        return None
    try:
        wanted = entry.ladder.select(layers, model_name)
    except UnknownLayerError:
        return None  # maybe a module outside the ladder: the model will tell
    if not all(layer.name in entry.layer_names for layer in wanted) or _verified(store, entry) is None:
        return None
    entry.last_run = RunStats(forward_pass=False, layers_added=[])
    log.info("cache hit: %s holds %s", entry.path, ", ".join(layer.name for layer in wanted))
    return entry


def _build(store, key, config, base, source, info, pre, layers, pool, token_pool, dtype, dev,
           batch_size, workers, strict, force, progress, shard_rows, group: ProcessGroup | None = None
           ) -> FeatureEntry:
    net = build_model(info, image_size=pre.crop_size)
    ladder = trace_ladder(net, pre.crop_size)
    wanted = ladder.select(layers, info.spec.name)
    have = set(base.layer_names) if base is not None else set()
    todo = [layer for layer in wanted if layer.name not in have]
    if not todo:  # only possible when names resolved differently from the stored ladder
        base.last_run = RunStats(forward_pass=False, layers_added=[])
        return base

    rules = {layer.name: layer_rule(layer.kind, layer.has_cls, pool, token_pool) for layer in todo}
    itemsize = np.dtype(dtype).itemsize
    widths = {layer.name: pooled_width(layer.raw_shape, layer.kind, rules[layer.name]) for layer in todo}
    n = len(source)
    estimate = n * sum(widths.values()) * itemsize
    log.info(
        "extracting %d layer(s) of %s from %d images at %dpx: about %s on disk (%s)",
        len(todo), info.spec.name, n, pre.crop_size, human_bytes(estimate), dtype,
    )
    if pool == "none" and estimate > NONE_POOL_BUDGET and not force:
        raise UsageError(
            f"--pool none would write {human_bytes(estimate)} (budget {human_bytes(NONE_POOL_BUDGET)}). "
            "Pick fewer layers, a pooling such as grid3, or pass --force."
        )

    bs = batch_size or default_batch_size(dev, pre.crop_size)
    row_bytes = max(1, sum(widths.values()) * itemsize)
    rows = shard_rows or max(bs, min(64 * bs, (SHARD_BYTES // row_bytes) // bs * bs))
    plan = {
        "key": key, "n": n, "batch_size": bs, "shard_rows": rows, "dtype": dtype,
        "layers": [layer.name for layer in todo], "rules": rules,
    }
    if group is None:
        run = store.partial(key, plan)
        done = set(run.done())
    else:  # rank 0 opens the partial run first (it may discard one of another plan); then the others
        group.agree("extraction plan", plan, plan)
        done = set(group.on_main(lambda: store.partial(key, plan).done()))
        run = store.partial(key, plan)
    stats = RunStats(forward_pass=True, layers_added=[layer.name for layer in todo], estimated_bytes=estimate)
    stats.resumed_rows = sum(run.rows(s)[1] - run.rows(s)[0] for s in done)
    if done:
        log.info("resuming: %d of %d images already extracted", stats.resumed_rows, n)

    pending = [s for s in range(run.n_shards) if s not in done]
    mine = pending if group is None else pending[group.rank::group.world]
    total = sum(run.rows(s)[1] - run.rows(s)[0] for s in mine)
    t0 = time.perf_counter()
    error = None
    try:
        if mine:
            alone = group is None
            _forward_pass(net, todo, rules, source, pre, dev, run, mine, bs, workers, dtype, strict,
                          progress=progress and (alone or group.is_main), total=n if alone else total,
                          initial=stats.resumed_rows if alone else 0, cores=None if alone else group.cpu_cores(),
                          beat=None if alone else group.beat)
    except BaseException as exc:
        if group is None:
            raise
        error = exc
    if group is not None:
        group.wait_for_peers()  # bounded: a hung peer ends the wait with an error
        group.raise_any(error)  # every rank stops when one failed; the shards written are kept
    stats.seconds = time.perf_counter() - t0
    stats.images = total

    records = [
        LayerRecord(layer.name, layer.module, layer.index, layer.depth, layer.raw_shape, layer.kind,
                    rules[layer.name], widths[layer.name], dtype, layer.order)
        for layer in todo
    ]
    samples = {"id": source.ids, "label": source.labels, "split": source.splits}

    def assemble() -> FeatureEntry:
        entry = store.commit(
            key, config, base=base, samples=samples, classes=source.classes, ladder=ladder.to_dict(),
            versions=library_versions(), run=run, records=records, featx_version=__version__,
        )
        run.remove()
        return entry

    if group is None:
        entry = assemble()
    else:  # rank 0 writes the file; the others open what it wrote
        entry = FeatureEntry(Path(group.on_main(lambda: str(assemble().path))))
    entry.last_run = stats
    return entry


def _batches(run, shards: list[int], batch_size: int) -> list[list[int]]:
    out = []
    for shard in shards:
        start, stop = run.rows(shard)
        out += [list(range(i, min(i + batch_size, stop))) for i in range(start, stop, batch_size)]
    return out


class _ShardWriter:
    """Writes finished shards on a background thread so disk I/O overlaps the forward pass."""

    def __init__(self, run):
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


def _forward_pass(net, layers: list[Layer], rules, source, pre, dev: Device, run, shards, bs, workers,
                  dtype, strict, progress, total, initial, cores=None, beat=None):
    """Decode, run and pool every batch of ``shards``; ``beat()`` after each batch tells waiting
    ranks that this one is alive. A file that cannot be read (ImageReadError) stops the pass."""

    n_workers = default_workers(dev, source, cores) if workers is None else workers
    previous_threads = torch.get_num_threads()
    if not dev.is_cuda:
        tune_malloc()
        configure_threads(plan_cpu_threads(n_workers, cores))
    loader = torch.utils.data.DataLoader(
        ImageDataset(source, pre),
        batch_sampler=_batches(run, shards, bs),
        num_workers=n_workers,
        pin_memory=dev.is_cuda,
        prefetch_factor=4 if n_workers else None,
    )
    net = net.to(dev.torch_device).to(memory_format=torch.channels_last).eval()
    normalise = pre.normalizer(dev.torch_device)
    names = [layer.name for layer in layers]
    out_dtype = np.dtype(dtype)
    writer = _ShardWriter(run)
    shard_iter = iter(shards)
    current = next(shard_iter)
    start, stop = run.rows(current)
    buffers: dict[str, list[np.ndarray]] = {name: [] for name in names}
    oks: list[np.ndarray] = []
    errs: list[str] = []
    filled = 0
    bar = progress_bar(total=total, initial=initial, unit="img", desc="extract", disable=not progress,
                       smoothing=0.1)
    taps = LayerTaps(net, layers, rules)
    try:
        with torch.inference_mode():
            for images, reasons in loader:
                rows = images.shape[0]
                ok = np.array([r == "" for r in reasons], dtype=bool)
                if strict and not ok.all():
                    first = int(np.flatnonzero(~ok)[0])
                    raise BadImageError(f"Unreadable image {source.location(start + filled + first)}: {reasons[first]}")
                x = normalise(images).contiguous(memory_format=torch.channels_last)
                if dev.autocast_dtype is not None:
                    with torch.autocast(dev.torch_device.type, dtype=dev.autocast_dtype):
                        pooled = taps(x)
                else:
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
                if beat is not None:
                    beat()
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
        if not dev.is_cuda:
            configure_threads(previous_threads)


def _check_finite(block: np.ndarray, ok: np.ndarray, name: str, out_dtype, source, first_row: int) -> None:
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
