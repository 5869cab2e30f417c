"""``featx.finetune``: resolve the problem, train (or resume), test once, write the outputs.

An output directory belongs to one configuration, identified by the fingerprint of
everything that determines the result. Rerunning the same call resumes an interrupted run
from its last complete epoch, or returns a finished one from disk; a directory holding
another configuration's run is never resumed and never overwritten, and a folder holding
anything but fine-tuning runs (user files, a probe result) is refused untouched. Every option
is checked before anything is written.

Under ``torchrun`` every rank trains a replica (:mod:`.distributed`) and rank 0 alone reads and
writes the output folder; its checkpoint resumes all ranks. The number of processes is not part
of the configuration, since they compute the single-process run (to float rounding).

Outputs (each written atomically; ``finetune.json`` last, so it marks a complete run):
``model.pt`` + ``model.json`` (the network, rebuildable as ``finetuned:DIR``), ``curves.png``,
``finetune.json`` (configuration, per-epoch history, test metrics with a 95% bootstrap
interval, comparison with the probe at the same layer).
"""

from __future__ import annotations

import json
import logging
import os
import time
from pathlib import Path

from .. import __version__
from .._distributed import on_main
from .._fileio import write_json
from .._resultdir import FINETUNE, SWEEP, check_target, claim
from .._runtime import Device, cpu_settings, default_workers, resolve_device
from .._text import slug
from ..cache.key import canonical_json
from ..data.sources import ImageSource
from ..errors import UsageError
from .augment import Augmentation
from .checkpoint import CHECKPOINT_FILE, check_same_run, fingerprint, load_checkpoint, save_checkpoint
from .distributed import DistributedTrainer, TrainingGroup, training_group
from .export import MODEL_FILE, SPEC_FILE, model_description, save_finetuned
from .freeze import parameter_summary, resolve_freeze_below
from .full import describe_network, full_network_options
from .metrics import score_logits
from .options import TrainOptions
from .plan import RESULTS_FILE, Plan, plan_explicit, plan_from_results, refuse_layer_with_full
from .plots import plot_curves
from .result import VERSION, FinetuneResult
from .sweep import best_row, format_table, grid_points, parse_sweep, point_label
from .train import Trainer, default_batch_size, resolve_options

log = logging.getLogger(__name__)

RESULT_FILE = "finetune.json"
CURVES_FILE = "curves.png"
SWEEP_FILE = "sweep.json"
CONFIG_FORMAT = 1
DEFAULT_ROOT = Path("featx-results") / "finetune"
_OUTPUTS = (RESULT_FILE, MODEL_FILE, SPEC_FILE, CURVES_FILE)


# ------------------------------------------------------------------------------ one run


def run_config(plan: Plan, opts: TrainOptions, device: Device, batch_size: int, freeze_below: str | None) -> dict:
    """Everything that determines a run's result; its fingerprint names the output directory."""
    training = opts.to_dict()
    training.update(freeze_below=freeze_below, batch_size=batch_size,
                    augmentation=Augmentation.default_for(plan.pre.crop_size).to_dict() if opts.augment else None)
    return {
        "format": CONFIG_FORMAT,
        "problem": plan.describe(opts.head_init),
        "training": training,
        "device": {"type": device.torch_device.type, "precision": device.precision},
    }


def default_out_dir(plan: Plan, head_init: str, key: str, kind: str = "finetune",
                    freeze_below: str | None = None) -> Path:
    """``finetune/`` beside the probe's result folder (never inside it: a new probe replaces that
    folder whole), or ``featx-results/finetune/`` for explicit runs; named by the fingerprint."""
    prefix = "" if kind == "finetune" else f"{kind}-"
    shape = slug(plan.layer.name)
    if plan.full:
        shape = f"full-from-{slug(freeze_below)}" if freeze_below else "full"
    cut = f"{shape}-{head_init}-{key[:10]}"
    if plan.probe is not None:
        return plan.probe.directory.parent / "finetune" / f"{prefix}{plan.probe.directory.name}-{cut}"
    return DEFAULT_ROOT / f"{prefix}{slug(plan.dataset['source'])}-{slug(plan.model_name)}-{cut}"


def _finished(out: Path, config: dict, resume: bool) -> FinetuneResult | None:
    """A complete run of this configuration in ``out``; refuses files of any other run."""
    done = out / RESULT_FILE
    if done.is_file():
        try:
            stored = json.loads(done.read_text())
        except (OSError, ValueError):
            raise UsageError(f"{done} is unreadable; featx will not overwrite it. Move it away or choose another "
                             "output directory (--out).") from None
        check_same_run(stored.get("config", {}), config, out, resume)
        _check_version(stored, done)
        result = FinetuneResult.from_json(stored)
        result.reused = True
        log.info("%s already holds this finished run; nothing to train", out)
        return result
    if not (out / CHECKPOINT_FILE).is_file():
        present = [name for name in _OUTPUTS if (out / name).exists()]
        if present:
            raise UsageError(f"{out} already holds {', '.join(present)} from another run, without the "
                             "checkpoint that would prove it is this configuration; featx will not overwrite "
                             "them. Choose another output directory (--out).")
    return None


def _check_version(stored: dict, path: Path) -> None:
    """A finished run written under another ``finetune.json`` schema is not returned as this one:
    its metrics have other keys and were computed by other code."""
    if stored.get("version") != VERSION:
        raise UsageError(f"{path} was written by an older featx (finetune.json schema version "
                         f"{stored.get('version', 1)}, now {VERSION}: other metric keys and definitions); featx "
                         "will not overwrite it. Move it away to train this configuration again, or choose "
                         "another output directory (--out).")


def run_one(plan: Plan, opts: TrainOptions, device: Device, *, out_dir=None, resume: bool = False,
            progress: bool = True, workers: int | None = None, group: TrainingGroup | None = None) -> FinetuneResult:
    """Train one configuration to the end (or return it from disk) and write its outputs.

    Under torchrun (``group``) every rank trains (:mod:`.distributed`); rank 0 alone reads and
    writes the output folder, and the others wait for it."""
    opts = resolve_options(plan, opts)
    batch_size = opts.batch_size or default_batch_size(device, plan.pre.crop_size)
    freeze_layer = resolve_freeze_below(opts.freeze_below, plan.ladder, plan.layer, plan.model_name)
    config = run_config(plan, opts, device, batch_size, freeze_layer.name if freeze_layer else None)
    key = fingerprint(config)
    freeze_name = freeze_layer.name if freeze_layer else None
    out = Path(out_dir) if out_dir is not None else default_out_dir(plan, opts.head_init, key,
                                                                    freeze_below=freeze_name)
    if group is not None:
        group.agree("fine-tuning configuration", key, config)
    finished, checkpoint = on_main(group, lambda: _start(out, config, resume))
    if finished is not None:
        return finished

    cores = group.cpu_cores() if group is not None else None
    n_workers = default_workers(device, plan.source.in_memory, cores) if workers is None else workers
    started = time.perf_counter()
    with cpu_settings(device, n_workers, cores):
        if group is None:
            trainer = Trainer(plan, opts, device, batch_size, n_workers, freeze_layer, progress)
        else:
            trainer = DistributedTrainer(plan, opts, device, batch_size, n_workers, freeze_layer, progress, group)
        resumed_at = _train(trainer, out, checkpoint, config, key, group)
        trainer.use_best()
        logits, labels, ok = trainer.evaluate(plan.test, desc="test")  # the only look at the test split

    def finish() -> FinetuneResult:
        test = score_logits(labels[ok], logits[ok], len(plan.classes), opts.seed)
        test["unreadable"] = int((~ok).sum())
        log.info("test top-1 %.4f (95%% CI %.4f-%.4f) with the weights of epoch %d", test["test_top1"],
                 *test["test_top1_ci"], trainer.best.epoch)
        result = FinetuneResult(
            out_dir=out, fingerprint=key, layer=plan.layer.name, head_init=opts.head_init, test=test,
            history=trainer.history, best_epoch=trainer.best.epoch, best_val_top1=trainer.best.val_top1,
            probe=_probe_comparison(plan, test), paths={}, config=config,
            train_seconds=sum(h.get("train_seconds", 0.0) for h in trainer.history),
            stopped_early=trainer.stopped_early, resumed_at_epoch=resumed_at,
            extra={"featx_version": __version__, "wall_seconds_this_call": time.perf_counter() - started,
                   "classes": plan.classes, "splits": {"fit": len(plan.fit), "val": len(plan.val),
                                                       "test": len(plan.test), "test_source": plan.test_source},
                   "distributed": trainer.processes()},
            network=describe_network(plan, opts, freeze_name,
                                     parameter_summary(trainer.net, trainer.schedule, opts.epochs)),
        )
        _write_outputs(plan, opts, trainer, result)
        return result

    return on_main(group, finish)


def _start(out: Path, config: dict, resume: bool) -> tuple[FinetuneResult | None, dict | None]:
    """(the finished run in ``out``, or None; else the checkpoint to resume, or None), after
    refusing a folder or a run of another configuration."""
    check_target(out, FINETUNE, replace=False)
    finished = _finished(out, config, resume)
    if finished is not None:
        return finished, None
    checkpoint = load_checkpoint(out)
    if checkpoint is not None:
        check_same_run(checkpoint["config"], config, out, resume)
    elif resume:
        raise UsageError(f"--resume: {out} holds no checkpoint to resume. Run without --resume to start, or "
                         "point --out at the directory of the interrupted run.")
    return None, checkpoint


def _train(trainer: Trainer, out: Path, checkpoint: dict | None, config: dict, key: str,
           group: TrainingGroup | None = None) -> int:
    """Run the remaining epochs, writing a checkpoint after each; returns the epoch resumed at.

    Under torchrun every rank loads rank 0's checkpoint (it was read there and sent to all), and
    rank 0 writes the new ones while the others wait: the ranks hold the same state."""
    if checkpoint is not None:
        trainer.load_state_dict(checkpoint)
        log.info("resuming %s after epoch %d of %d", out, trainer.epoch, trainer.opts.epochs)
    else:
        on_main(group, lambda: claim(out, FINETUNE))  # checked again and marked before the first file is written
        trainer.validate_start()
    resumed_at = trainer.epoch
    while not trainer.done:
        trainer.run_epoch()
        on_main(group, lambda: save_checkpoint(
            out, {**trainer.state_dict(), "config": canonical_json(config), "fingerprint": key}))
        log.debug("checkpoint written after epoch %d", trainer.epoch)
    return resumed_at


def _probe_comparison(plan: Plan, test: dict) -> dict | None:
    """The probe's test accuracy at the same layer (a full network: at the probe's best layer), and
    how far fine-tuning moved it.

    Both are ``test_top1`` from ``featx.evaluation`` on the probe's test split; the difference
    is left out (None) when the two were not scored on the same number of test images (images
    unreadable in one stage only), since it would then compare different test sets.
    """
    if plan.probe is None:
        return None
    layer = plan.probe.best_layer if plan.full else plan.layer.name
    probe = plan.probe.accuracy_at(layer)
    ref = probe["logreg_test_top1"]
    logreg = next((r for r in plan.probe.data.get("rows", [])
                   if r.get("layer") == layer and r.get("head") == "logreg"), {})
    same_rows = logreg.get("n_test") in (None, test["n_test"])
    probe["delta_top1_vs_logreg"] = test["test_top1"] - ref if ref is not None and same_rows else None
    return probe


def _write_outputs(plan: Plan, opts: TrainOptions, trainer: Trainer, result: FinetuneResult) -> None:
    """model.pt + model.json, curves.png, then finetune.json (the mark of a complete run)."""
    out = claim(result.out_dir, FINETUNE)  # still ours at write time
    description = model_description(
        plan.model_name, plan.info.spec.source, plan.info.spec.arch, plan.info.identity, plan.pre.crop_size,
        plan.layer, plan.pooling, opts.dropout, plan.pre, plan.classes,
    )
    result.paths = save_finetuned(out, trainer.net.cpu(), description)
    network = result.network
    shape = f"cut at {plan.layer.name}" if network["mode"] == "cut" else "full network"
    if network["freeze_below"]:
        shape += f", frozen below {network['freeze_below']}"
    title = (f"{plan.dataset['source']} · {plan.model_name} {shape} · head {opts.head_init} · "
             f"test top-1 {result.test['test_top1']:.4f}")
    result.paths["curves"] = plot_curves(trainer.history, out / CURVES_FILE, title, trainer.best.epoch)
    result.paths["result"] = out / RESULT_FILE
    write_json(out / RESULT_FILE, result.to_json())
    (out / CHECKPOINT_FILE).unlink(missing_ok=True)


# ------------------------------------------------------------------------------ sweep


def run_sweep(plan: Plan, opts: TrainOptions, grid: dict, device: Device, *, out_dir=None, progress=True,
              workers=None, group: TrainingGroup | None = None) -> FinetuneResult:
    """Every point of ``grid`` as its own run under ``OUT/sweep/``; returns the best by validation."""
    points = grid_points(grid)
    base = resolve_options(plan, opts)
    key = fingerprint({"format": CONFIG_FORMAT, "problem": plan.describe(opts.head_init),
                       "training": base.to_dict(), "grid": grid,
                       "device": {"type": device.torch_device.type, "precision": device.precision}})
    freeze_layer = resolve_freeze_below(base.freeze_below, plan.ladder, plan.layer, plan.model_name)
    root = Path(out_dir) if out_dir is not None else default_out_dir(
        plan, opts.head_init, key, kind="sweep", freeze_below=freeze_layer.name if freeze_layer else None)
    on_main(group, lambda: claim(root, SWEEP))
    rows, results = [], []
    for point in points:
        result = run_one(plan, opts.replace(**point), device, out_dir=root / "sweep" / point_label(point),
                         progress=progress, workers=workers, group=group)
        results.append(result)
        rows.append({**point, "val_top1": result.best_val_top1, "best_epoch": result.best_epoch,
                     "test_top1": result.test["test_top1"], "test_top1_ci": result.test["test_top1_ci"],
                     "out_dir": str(result.out_dir)})
    table = format_table(rows, grid)
    chosen = rows.index(best_row(rows))

    def write() -> None:
        claim(root, SWEEP)
        write_json(root / SWEEP_FILE, {"format": "featx-finetune-sweep", "version": VERSION, "grid": grid,
                                        "rows": rows, "chosen": rows[chosen], "table": table})

    on_main(group, write)
    best = results[chosen]
    best.sweep, best.sweep_table = rows, table
    best.paths = {**best.paths, "sweep": root / SWEEP_FILE}
    return best


# ------------------------------------------------------------------------------ public API


def _is_probe_result(target) -> bool:
    if not isinstance(target, (str, os.PathLike)):
        return False
    path = Path(target).expanduser()
    return (path / RESULTS_FILE).is_file() or (path.name == RESULTS_FILE and path.is_file())


def finetune(
    source: str | ImageSource | None = None,
    *,
    results: str | os.PathLike | None = None,
    model: str | None = None,
    layer: str | int | None = None,
    full: bool = False,
    weights: str | None = None,
    checkpoint: str | os.PathLike | None = None,
    arch: str | None = None,
    image_size: int | None = None,
    crop_pct: float | None = None,
    interpolation: str | None = None,
    pool: str = "avg",
    token_pool: str = "auto",
    data_root: str | os.PathLike | None = None,
    download: bool = True,
    limit: int | None = None,
    head_init: str = "auto",
    epochs: int = 5,
    lr: float | None = None,
    backbone_lr_ratio: float = 0.1,
    optimizer: str = "adamw",
    weight_decay: float | None = None,
    momentum: float = 0.9,
    warmup_epochs: float = 0.5,
    head_warmup_epochs: int | None = None,
    freeze_below: str | int | None = None,
    unfreeze: str | None = None,
    label_smoothing: float = 0.0,
    dropout: float = 0.0,
    augment: bool = True,
    batch_size: int | None = None,
    val_fraction: float = 0.2,
    patience: int | None = 3,
    bn_stats: str = "auto",
    seed: int = 0,
    device: str = "auto",
    precision: str = "auto",
    workers: int | None = None,
    out_dir: str | os.PathLike | None = None,
    resume: bool = False,
    progress: bool = True,
    sweep: str | dict | None = None,
    cache_dir: str | os.PathLike | None = None,
) -> FinetuneResult:
    """Fine-tune a backbone cut after one layer, or the full network with its lower blocks frozen,
    from a probe result or explicitly.

    From a probe: ``finetune(results="featx-results/probe-...")`` (or that directory as the
    first argument, without ``model``) takes the probe's best layer,
    its data, model, preprocessing and pooling, cuts the network after that layer and starts
    the head from its logistic regression (``head_init="lpft"``, the default there). Explicitly:
    ``finetune("fashion-mnist", model="efficientnet_lite0", layer="blocks.5")`` with a random
    head. ``sweep="lr=1e-2,1e-3 epochs=1,3"`` runs the grid and returns the run with the best
    validation accuracy, with ``.sweep_table``.

    ``full=True`` keeps the network up to its top layer (the pre-logits embedding) and puts the
    head there; ``freeze_below`` (default with a probe result: its best layer) is the first
    block that trains, every block below it stays frozen. ``layer`` is refused with it. With
    ``head_init="auto"`` the head starts from the probe's logistic head only when that was
    fitted on the top layer; otherwise it starts fresh and trains alone for
    ``head_warmup_epochs`` (default 1) before the blocks join.

    Started by ``torchrun`` (``WORLD_SIZE`` > 1), every process calls this with the same
    arguments: they train as DistributedDataParallel replicas, rank 0 writes, and every rank
    returns the same result.
    """
    if results is None and model is None and _is_probe_result(source):
        results, source = source, None  # featx finetune RESULTS_DIR
    if results is None and model is None:
        where = ""
        if isinstance(source, (str, os.PathLike)) and not Path(source).exists():
            where = f"{str(source)!r} does not exist and is not a probe result directory. "
        elif source is not None:
            where = f"{str(source)!r} holds no probe result (results.json). "
        raise UsageError(where + "Give a probe result directory (featx finetune RESULTS_DIR), or --model M "
                         "--layer L and a dataset.")
    if results is not None:
        given = {"a dataset": source, "--model": model, "--weights": weights, "--arch": arch,
                 "--image-size": image_size, "--crop-pct": crop_pct, "--interpolation": interpolation,
                 "--limit": limit}
        clash = [name for name, value in given.items() if value is not None]
        if pool != "avg" or token_pool != "auto":
            clash.append("--pool/--token-pool")
        if clash:
            raise UsageError(
                f"{', '.join(clash)} cannot be combined with a probe result: the data, model, preprocessing and "
                "pooling come from the probe's cache entry so that fine-tuning sees what the probe saw. Use "
                "--model M --layer L DATASET to choose them yourself."
            )
    if full:
        refuse_layer_with_full(layer)
    requested_head_init = head_init
    if head_init == "auto" and not full:  # a full network decides once it knows its top layer
        head_init = "lpft" if results is not None else "random"
    if head_init == "lpft" and results is None:
        raise UsageError("LP-FT starts from a probe's logistic head: pass a probe result directory "
                         "(featx finetune RESULTS_DIR), or --head-init random to fine-tune from a random head.")
    opts = TrainOptions(
        epochs=epochs, lr=lr, backbone_lr_ratio=backbone_lr_ratio, optimizer=optimizer, weight_decay=weight_decay,
        momentum=momentum, warmup_epochs=warmup_epochs,
        head_warmup_epochs=head_warmup_epochs if head_warmup_epochs is not None else 0,
        freeze_below=freeze_below, unfreeze=unfreeze, label_smoothing=label_smoothing, dropout=dropout,
        augment=augment, batch_size=batch_size, val_fraction=val_fraction, patience=patience, seed=seed,
        head_init="random" if head_init == "auto" else head_init, bn_stats=bn_stats,
    )
    opts.check()
    grid = parse_sweep(sweep)
    if grid:
        if resume:
            raise UsageError("--resume applies to one run; a rerun of the same --sweep resumes each of its runs.")
        for point in grid_points(grid):
            opts.replace(**point).check()  # every grid point is valid before the first one trains
    if out_dir is not None:
        check_target(out_dir, SWEEP if grid else FINETUNE, replace=False)  # before loading data or models
    dev = resolve_device(device, precision)
    group = training_group(dev)  # started by torchrun: this process is one of several replicas
    if group is not None:
        dev = group.place(dev)
        progress = progress and group.is_main
    if results is not None:
        plan = plan_from_results(results, layer=layer, head_init=head_init, checkpoint=checkpoint,
                                 data_root=data_root, download=download, cache_dir=cache_dir, seed=seed,
                                 val_fraction=val_fraction, full=full)
    else:
        plan = plan_explicit(source, model=model, layer=layer, weights=weights, checkpoint=checkpoint, arch=arch,
                             image_size=image_size, crop_pct=crop_pct, interpolation=interpolation, pool=pool,
                             token_pool=token_pool, data_root=data_root, download=download, limit=limit,
                             seed=seed, val_fraction=val_fraction, full=full)
    if full:
        opts = full_network_options(plan, opts, requested_head_init, head_warmup_epochs, freeze_below)
        opts.check()
        for point in grid_points(grid) if grid else ():
            opts.replace(**point).check()
    if grid:
        return run_sweep(plan, opts, grid, dev, out_dir=out_dir, progress=progress, workers=workers, group=group)
    return run_one(plan, opts, dev, out_dir=out_dir, resume=resume, progress=progress, workers=workers,
                   group=group)
