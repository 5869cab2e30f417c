"""The Python API: the same verbs as the command line.

The probe and fine-tune stages (scikit-learn, training code) load on first use, so that
``featx extract`` and a cache hit do not pay for importing them.
"""

from __future__ import annotations

import logging
import os
import sys
from typing import TYPE_CHECKING

from ._lazy import lazy_getattr
from .backbones import DEFAULT_MODEL
from .cache.entry import FeatureEntry, Features
from .cache.store import CacheStore
from .layer import Ladder
from .probing.protocol import SELECTION_ROWS

log = logging.getLogger(__name__)

if TYPE_CHECKING:  # imported on first use, see __getattr__
    from .backbones.registry import ModelListing
    from .cache.export import export_features
    from .comparison import compare
    from .extraction import extract
    from .finetuning import finetune
    from .prediction import predict
    from .probing import ProbeResults, probe
    from .results import load_results

__all__ = ["extract", "load_features", "cache_gc", "layers", "models", "open_entry", "probe", "run", "compare",
           "finetune", "load_results", "export_features", "predict"]

__getattr__ = lazy_getattr(globals(), {"probe": ".probing", "ProbeResults": ".probing",
                                      "finetune": ".finetuning", "extract": ".extraction",
                                      "compare": ".comparison", "load_results": ".results",
                                      "Results": ".results", "export_features": ".cache.export",
                                      "predict": ".prediction"})


def open_entry(entry, cache_dir: str | os.PathLike | None = None) -> FeatureEntry:
    """A cache entry from an entry object, a path, a file name or a key prefix."""
    return CacheStore(cache_dir).resolve(entry)


def load_features(entry, layer: str, *, cache_dir: str | os.PathLike | None = None,
                  include_bad: bool = False) -> Features:
    """float32 features X, labels y, ids and split of one cached layer (unreadable images dropped)."""
    return open_entry(entry, cache_dir).load(layer, include_bad=include_bad)


def cache_gc(cache_dir: str | os.PathLike | None = None, *, dry_run: bool = False, older_than_days: float = 0.0):
    """Remove what killed runs left in the cache (``.tmp`` files, abandoned ``.partial`` runs,
    quarantined files); ``dry_run`` only lists them. Returns the list of ``Leftover`` items."""
    return CacheStore(cache_dir).gc(dry_run=dry_run, older_than_days=older_than_days)


def layers(model: str = DEFAULT_MODEL, *, image_size: int | None = None, arch: str | None = None) -> Ladder:
    """The layer ladder of ``model``: every tappable block with its depth, shape and pooled width.

    The ladder depends on the architecture and input size only, so it is traced on a randomly
    initialised copy: nothing is downloaded.
    """
    from .backbones.ladder import trace_ladder
    from .backbones.registry import build_model, describe_model, parse_model

    spec = parse_model(model, arch=arch)
    if spec.source != "finetuned":
        spec = parse_model(model, weights="none", arch=arch) if not model.startswith("file:") else \
            parse_model(arch, weights="none")
    info = describe_model(spec)
    pre = info.preprocessing.override(image_size)
    return trace_ladder(build_model(info, image_size=pre.crop_size), pre.crop_size)


def models(pattern: str | None = None) -> list[ModelListing]:
    """Models featx can load, filtered by a glob such as ``'timm:*convnext*'``."""
    from .backbones.registry import list_models

    return list_models(pattern)


def check_probe_data(dataset, *, limit: int | None = None, seed: int = 0, cv: int | None = None,
                     data_root=None, download: bool = True, hash_content: bool = False):
    """The dataset, opened once, after checking from its labels and splits alone that the probe
    protocol can run on it: a short split is reported before any image is read, with the
    smallest ``--limit`` that would work."""
    from .data import ImageSource, open_dataset, smallest_working_limit, stratified_limit
    from .errors import UsageError
    from .probing.protocol import split_shortfall

    source = dataset if isinstance(dataset, ImageSource) else open_dataset(dataset, data_root, download,
                                                                            hash_content=hash_content)
    used = stratified_limit(source, limit, seed)

    def shortfall(s):
        return split_shortfall(s.labels, s.splits, cv, seed, class_names=s.classes)

    problem = shortfall(used)
    if problem is None:
        return source
    if limit is not None and limit < len(source):
        better = smallest_working_limit(source, lambda s: shortfall(s) is None, limit, seed)
        hint = (f"Use --limit {better} or more (the smallest seeded subset of {source.spec} that gives every class "
                "enough images in each split)." if better else f"Even all {len(source)} images are too few.")
    else:
        hint = "Add images to the short classes."
    shown = f"{len(used)} images (--limit {limit})" if limit is not None else f"{len(used)} images"
    raise UsageError(f"Too few images for the probe protocol with {shown}: {problem}. {hint}")


def _extract_for_probe(dataset, model, **options):
    """``extract`` in a child process when this one has not loaded torch (``featx run`` from the
    command line), so that the probe's process never holds a forward pass's heap (about 1 GB on
    the main job), nor torch unless a head computes with it; in this process otherwise (nothing to
    gain), under torchrun, or when an argument does not pickle (a Python object as dataset or model)."""
    from ._isolated import call_in_child, picklable

    distributed = int(os.environ.get("WORLD_SIZE", "1")) > 1
    if "torch" in sys.modules or distributed or not picklable(dataset, model, options):
        from .extraction import extract  # imports torch

        return extract(dataset, model, **options)
    log.debug("extracting in a child process (the probe's process keeps no forward pass's heap)")
    return call_in_child(_extract_entry_path, dataset, model, **options)


def _extract_entry_path(dataset, model, **options) -> str:
    from .extraction import extract

    return str(extract(dataset, model, **options).path)


def run(dataset: str = "fashion-mnist", model: str = DEFAULT_MODEL, *, heads=None, probe_layers=None,
        cv: int | None = None, jobs: int | None = None, backend: str = "auto", scheduler: str | None = None,
        out_dir=None, seed: int = 0, progress: bool = True, selection_rows: int | None = SELECTION_ROWS,
        plots: bool = True, head_precision: str = "auto", **extract_options) -> ProbeResults:
    """The main job: extract (through the cache) then probe every extracted layer and report.

    Returns the :class:`~featx.probing.ProbeResults` of the probe.
    """
    from ._resultdir import PROBE, check_target
    from .probing import probe
    from .probing.heads import resolve_heads
    from .probing.runner import check_options

    resolve_heads(heads)  # a mistyped head is refused before the extraction, not after it
    check_options(backend=backend, head_precision=head_precision)
    if out_dir:
        check_target(out_dir, PROBE)
    dataset = check_probe_data(dataset, limit=extract_options.get("limit"), seed=seed, cv=cv,
                               data_root=extract_options.get("data_root"),
                               download=extract_options.get("download", True),
                               hash_content=extract_options.get("hash_content", False))
    entry = _extract_for_probe(dataset, model, seed=seed, progress=progress, **extract_options)
    return probe(entry, heads=heads, layers=probe_layers, cv=cv, seed=seed, jobs=jobs, backend=backend,
                 scheduler=scheduler, out_dir=out_dir, cache_dir=extract_options.get("cache_dir"),
                 progress=progress, device=extract_options.get("device", "auto"), selection_rows=selection_rows,
                 plots=plots, head_precision=head_precision)
