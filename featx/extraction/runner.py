"""``featx.extract``: one forward pass over a dataset, many layers, into the cache.

The entry's identity is computed from names and files before anything heavy happens; when
the entry already holds the requested layers, no model is built and no image is read.
Otherwise only the missing layers are extracted, the forward pass stops after the deepest
of them, and shards of features stream to disk while the next batches are computed.

This module decides (cache hit, which entry to extend, under the entry's lock) and
orchestrates: :mod:`.plan` says what will be computed, :mod:`.loop` computes it, and
:mod:`.distributed` shares the work between torchrun ranks.
"""

from __future__ import annotations

import logging
import os
import time
from dataclasses import dataclass
from pathlib import Path

from .. import __version__
from .._runtime import resolve_device
from ..backbones import DEFAULT_MODEL
from ..backbones.fold import fold_batchnorm
from ..backbones.ladder import trace_ladder
from ..backbones.registry import build_model, describe_model, parse_model
from ..cache.entry import FeatureEntry
from ..cache.key import config_key
from ..cache.partial import PartialRun
from ..cache.store import CacheStore
from ..data import open_dataset, stratified_limit
from ..data.crop_rule import dataset_preprocessing
from ..data.sources import ImageSource
from ..errors import CacheCorruptError, UnknownLayerError, UsageError
from ..layer import check_pool
from ..report.text import human_bytes
from .distributed import (
    ProcessGroup,
    assemble_on_main,
    compute_together,
    current_group,
    extract_in_group,
    open_shared_run,
)
from .loop import Share, _forward_pass
from .plan import (
    ExtractionRequest,
    ShardPlan,
    check_options,
    check_resize_engine,
    choose_resize_engine,
    library_versions,
    plan_shards,
)

__all__ = ["extract", "RunStats"]

log = logging.getLogger(__name__)

#: ``--pool none`` is refused when the new layers would exceed this many bytes (unless forced)
NONE_POOL_BUDGET = 2 * 1024**3


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
    resize_engine: str = "auto",
) -> FeatureEntry:
    """Extract pooled activations of ``layers`` of ``model`` over ``dataset`` into the cache.

    Returns the cache entry (a :class:`~featx.cache.entry.FeatureEntry`); ``entry.last_run``
    says whether a forward pass ran. Re-running with the same arguments returns at once.

    ``crop_pct``: the model's, or 1.0 when the dataset's images are smaller than the input (they are
    upscaled, and the centre crop would cut away their content); see :mod:`featx.data.crop_rule`.

    ``resize_engine``: ``auto`` resizes datasets held in memory as uint8 arrays (digits,
    Fashion-MNIST) in whole batches on the device, other datasets image by image with PIL;
    ``pil`` always uses PIL (the features, and cache entries, of featx before the choice
    existed); ``tensor`` insists on batches. The two differ by a grey level or two, so the
    cache key names the tensor engine.
    """
    check_pool(pool, token_pool)  # cheap checks first: before a dataset is opened or a model named
    check_options(dtype, batch_size, workers, shard_rows)
    check_resize_engine(resize_engine)
    source = dataset if isinstance(dataset, ImageSource) else open_dataset(dataset, data_root, download,
                                                                            hash_content=hash_content)
    source = stratified_limit(source, limit, seed)
    if len(source) == 0:
        raise UsageError("The dataset has no samples.")
    spec = parse_model(model, weights=weights, checkpoint=checkpoint, arch=arch)
    info = describe_model(spec)
    pre = dataset_preprocessing(info.preprocessing, source, image_size, crop_pct, interpolation)
    dev = resolve_device(device, precision)
    group = current_group()  # launched by torchrun: every rank computes a share of the shards
    if group is not None:
        dev = group.place(dev)
    request = ExtractionRequest(
        source=source, info=info, pre=pre, layers=layers, pool=pool, token_pool=token_pool, dtype=dtype,
        device=dev, batch_size=batch_size, workers=workers, strict=strict, force=force, progress=progress,
        shard_rows=shard_rows, limit=limit, seed=seed, hash_content=hash_content,
        resize_engine=choose_resize_engine(source, pre, resize_engine),
    )
    config = request.config()
    key = config_key(config)
    store = CacheStore(cache_dir)
    if group is not None:
        return extract_in_group(
            group, store, key, config,
            cached=lambda: _cached(store, key, request), base=lambda: _verified(store, store.find(key)),
            opened=_opened_hit, build=lambda base: _build(store, key, config, base, request, group),
        )

    hit = _cached(store, key, request)
    if hit is not None:
        return hit
    with store.lock(key):
        hit = _cached(store, key, request)  # built by another process while we waited
        if hit is not None:
            return hit
        base = _verified(store, store.find(key))
        return _build(store, key, config, base, request)


# ------------------------------------------------------------------------------- the cache decision


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


def _cached(store: CacheStore, key: str, request: ExtractionRequest) -> FeatureEntry | None:
    """The entry when it holds every requested layer and verifies; None means extract."""
    entry = store.find(key)
    if entry is None:
        return None
    try:
        wanted = entry.ladder.select(request.layers, request.model_name)
    except UnknownLayerError:
        return None  # maybe a module outside the ladder: the model will tell
    if not all(layer.name in entry.layer_names for layer in wanted) or _verified(store, entry) is None:
        return None
    entry.last_run = RunStats(forward_pass=False, layers_added=[])
    log.info("cache hit: %s holds %s", entry.path, ", ".join(layer.name for layer in wanted))
    return entry


def _opened_hit(path: Path) -> FeatureEntry:
    """A hit that another rank found and verified."""
    entry = FeatureEntry(path)
    entry.last_run = RunStats(forward_pass=False, layers_added=[])
    return entry


# ------------------------------------------------------------------------------- building an entry


def _trace_batch(size: int):
    """Two seeded noise images at the network's input size, to trace it (the same on every run and rank)."""
    import torch

    return torch.randn(2, 3, size, size, generator=torch.Generator().manual_seed(0))


def _build(store: CacheStore, key: str, config: dict, base: FeatureEntry | None, request: ExtractionRequest,
           group: ProcessGroup | None = None) -> FeatureEntry:
    """Extract the requested layers ``base`` lacks and commit the entry that holds them all."""
    net = build_model(request.info, image_size=request.pre.crop_size)
    ladder = trace_ladder(net, request.pre.crop_size)
    wanted = ladder.select(request.layers, request.model_name)
    have = set(base.layer_names) if base is not None else set()
    todo = [layer for layer in wanted if layer.name not in have]
    if not todo:  # only possible when names resolved differently from the stored ladder
        base.last_run = RunStats(forward_pass=False, layers_added=[])
        return base
    # every ladder module keeps its own output, so a layer's features never depend on which others a run taps
    net = fold_batchnorm(net.eval(), _trace_batch(request.pre.crop_size),
                         keep={layer.module for layer in ladder.layers})

    plan = plan_shards(request, todo, key)
    _check_budget(request, plan)
    if group is None:
        run = store.partial(key, plan.to_dict())
        done = set(run.done())
    else:
        run, done = open_shared_run(group, store, key, plan.to_dict())
    stats = RunStats(forward_pass=True, layers_added=list(plan.layers), estimated_bytes=plan.estimated_bytes)
    stats.resumed_rows = _rows(run, done)
    if done:
        log.info("resuming: %d of %d images already extracted", stats.resumed_rows, plan.n)

    share = _share(request, run, [s for s in range(run.n_shards) if s not in done], stats.resumed_rows, group)
    t0 = time.perf_counter()

    def compute() -> None:
        if share.shards:
            _forward_pass(net, todo, request, plan, run, share)

    if group is None:
        compute()
    else:
        compute_together(group, compute)
    stats.seconds = time.perf_counter() - t0
    stats.images = _rows(run, share.shards)

    history = {"layers": list(plan.layers), "images": stats.images, "seconds": round(stats.seconds, 3),
               "resumed_rows": stats.resumed_rows, "device": str(request.device.torch_device),
               "world_size": 1 if group is None else group.world, "batch_size": plan.batch_size,
               "parameters": sum(p.numel() for p in net.parameters())}  # cost columns of featx compare

    def assemble() -> FeatureEntry:
        source = request.source
        entry = store.commit(
            key, config, base=base, samples={"id": source.ids, "label": source.labels, "split": source.splits},
            classes=source.classes, ladder=ladder.to_dict(), versions=library_versions(), run=run,
            records=plan.records(todo), featx_version=__version__, history=history,
        )
        run.remove()
        return entry

    entry = assemble() if group is None else assemble_on_main(group, assemble)
    entry.last_run = stats
    return entry


def _check_budget(request: ExtractionRequest, plan: ShardPlan) -> None:
    """Log what will be written; refuse ``--pool none`` beyond NONE_POOL_BUDGET unless forced."""
    estimate = plan.estimated_bytes
    log.info(
        "extracting %d layer(s) of %s from %d images at %dpx: about %s on disk (%s)",
        len(plan.layers), request.model_name, plan.n, request.pre.crop_size, human_bytes(estimate), plan.dtype,
    )
    if request.pool == "none" and estimate > NONE_POOL_BUDGET and not request.force:
        raise UsageError(
            f"--pool none would write {human_bytes(estimate)} (budget {human_bytes(NONE_POOL_BUDGET)}). "
            "Pick fewer layers, a pooling such as grid3, or pass --force."
        )


def _rows(run: PartialRun, shards) -> int:
    return sum(run.rows(s)[1] - run.rows(s)[0] for s in shards)


def _share(request: ExtractionRequest, run: PartialRun, pending: list[int], resumed_rows: int,
           group: ProcessGroup | None) -> Share:
    """Alone: every pending shard, with a bar over the whole dataset. In a group: every W-th
    pending shard, the bar on rank 0 only, this rank's share of the node's cores, heartbeats."""
    if group is None:
        return Share(tuple(pending), total=len(request.source), initial=resumed_rows, progress=request.progress)
    mine = tuple(pending[group.rank::group.world])
    return Share(mine, total=_rows(run, mine), initial=0, progress=request.progress and group.is_main,
                 cores=group.cpu_cores(), beat=group.beat)
