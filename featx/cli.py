"""The ``featx`` command line: a thin layer over the Python API.

This is the only module that prints and chooses exit codes: 0 ok, 1 runtime or data
error, 2 usage error. User mistakes get a message, never a traceback (``--debug`` shows it).
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import os
import sys
from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.console import Console
from rich.table import Table

from . import __version__
from ._cli_options import (
    EXTRACT_OPTIONS,
    GLOBAL_OPTIONS,
    PROBE_OPTIONS,
    RUN_HEADS,
    Arch,
    AsJson,
    BatchSize,
    CacheDir,
    Checkpoint,
    DataRoot,
    Debug,
    DeviceOpt,
    ImageSize,
    Limit,
    ModelList,
    Pool,
    Precision,
    Progress,
    Quiet,
    Seed,
    TokenPool,
    Verbose,
    Weights,
    Workers,
    shared_options,
)
from .errors import FeatxError
from .report.text import human_bytes

app = typer.Typer(
    name="featx",
    help="Transfer learning on images, measured: extract cached features, probe every layer, fine-tune.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    context_settings={"help_option_names": ["-h", "--help"]},
)
cache_app = typer.Typer(help="Show and manage feature cache entries.", no_args_is_help=True)
app.add_typer(cache_app, name="cache")

# piped output gets wide lines instead of rich's 80-column default, so nothing is cut off
out = Console(highlight=False, width=None if sys.stdout.isatty() else 200)
err = Console(stderr=True, highlight=False, width=None if sys.stderr.isatty() else 200)
STATE = {"cache_dir": None, "debug": False, "verbose": 0, "quiet": False}


# ------------------------------------------------------------------ shared options

def command(group: typer.Typer = app, name: str | None = None, *, extract: bool = False, probe: bool = False,
            **overrides):
    """Register a command with the global options and, for commands that extract or probe, every
    option of those stages, from their one definition in :mod:`featx._cli_options`."""
    def register(function):
        groups = ((EXTRACT_OPTIONS,) if extract else ()) + ((PROBE_OPTIONS,) if probe else ())
        if groups:
            function = shared_options(*groups, into="options", **overrides)(function)
        return group.command(name)(shared_options(GLOBAL_OPTIONS, apply=_apply_global_options)(function))

    return register


#: defaults of ``featx run`` and ``featx compare``, chosen so the main job finishes in minutes on a 2-core CPU
RUN_IMAGE_SIZE = 96
RUN_POOL = "grid2"  # coarse layout matters for small images: +2 points over avg on Fashion-MNIST (README)
Dataset = Annotated[str, typer.Argument(help="digits, fashion-mnist, cifar10, ..., folder:PATH, csv:FILE, "
                                             "wds:GLOB or hf-disk:PATH.")]
ProbeModel = Annotated[Optional[str], typer.Option("--model", "-m", help="Model to extract with when TARGET is a "
                                                   "dataset (default efficientnet_lite0).")]
ProbeLayers = Annotated[Optional[str], typer.Option("--layers", "-l", help="Layers to probe (default: all in the "
                                                    "entry); for a dataset, also the layers extracted.")]
CompareOutDir = Annotated[Optional[Path], typer.Option("--out", help="Results folder (default "
                                                       "featx-results/compare-<dataset>).")]


# ------------------------------------------------------------------ plumbing


def _configure_logging(verbose: int, quiet: bool) -> None:
    level = logging.WARNING if quiet else logging.DEBUG if verbose else logging.INFO
    logger = logging.getLogger("featx")
    logger.handlers.clear()
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("%(message)s" if not verbose else "%(levelname)s %(name)s: %(message)s"))
    logger.addHandler(handler)
    logger.setLevel(level)
    logger.propagate = False


def _version(value: bool) -> None:
    if value:
        out.print(f"featx {__version__}")
        raise typer.Exit()


@app.callback()
def main_options(
    cache_dir: CacheDir = None,
    verbose: Verbose = 0,
    quiet: Quiet = False,
    debug: Debug = False,
    version: Annotated[bool, typer.Option("--version", callback=_version, is_eager=True,
                                          help="Show the version and exit.")] = False,
) -> None:
    STATE["cache_dir"], STATE["debug"], STATE["verbose"], STATE["quiet"] = cache_dir, debug, verbose, quiet
    _configure_logging(verbose, quiet)


def _apply_global_options(values: dict) -> None:
    """The global options given after the command's name win over those given before it."""
    if values["cache_dir"] is not None:
        STATE["cache_dir"] = values["cache_dir"]
    STATE["debug"] = STATE["debug"] or values["debug"]
    if values["verbose"] or values["quiet"]:
        _configure_logging(values["verbose"] or STATE["verbose"], values["quiet"] or STATE["quiet"])


@contextlib.contextmanager
def _output(as_json: bool):
    """With --json, stdout carries only the JSON document: tables and messages are held back."""
    out.quiet = as_json
    try:
        yield
    finally:
        out.quiet = False


def _print_json(document) -> None:
    sys.stdout.write(json.dumps(document, indent=2, default=str) + "\n")


def _run_json(entry) -> dict | None:
    run = getattr(entry, "last_run", None)
    if run is None:
        return None
    return {**dataclasses.asdict(run), "images_per_second": run.images_per_second}


def _print_entry(entry, title: str | None = None) -> None:
    table = Table(title=title, show_header=True, header_style="bold")
    for col in ("index", "layer", "depth", "raw shape", "pool", "width", "dtype"):
        table.add_column(col, justify="right" if col in ("index", "depth", "width") else "left")
    for r in entry.layers:
        table.add_row(str(r.index), r.name, f"{r.depth:.2f}", "x".join(map(str, r.raw_shape)), r.pool,
                      str(r.width), r.dtype)
    out.print(table)


# ------------------------------------------------------------------ commands


@command(extract=True)
def extract(
    dataset: Dataset,
    as_json: AsJson = False,
    *,
    options: dict,
) -> None:
    """Run a backbone once over a dataset and cache the pooled activations of many layers."""
    from .api import extract as run_extract

    with _output(as_json):
        _announce("extract", dataset, options)
        entry = run_extract(dataset, cache_dir=STATE["cache_dir"], **options)
        _report_extract(entry)
    if as_json:
        _print_json({**entry.info(), "run": _run_json(entry)})


def _report_extract(entry) -> None:
    if os.environ.get("RANK", "0") != "0":  # under torchrun, rank 0 speaks for all
        return
    run = getattr(entry, "last_run", None)
    _print_entry(entry, title=f"{entry.dataset} × {entry.model}  ({entry.n_samples} images)")
    out.print(f"entry  {entry.key[:16]}  {entry.path}  ({human_bytes(entry.size_bytes)})")
    if run is not None and not run.forward_pass:
        out.print("cache hit: no forward pass was needed")
    elif run is not None:
        resumed = f", resumed after {run.resumed_rows} images" if run.resumed_rows else ""
        world = int(os.environ.get("WORLD_SIZE", "1"))
        share = f" on rank 0 of {world} processes" if world > 1 else ""
        out.print(f"extracted {', '.join(run.layers_added)}: {run.images} images{share} in {run.seconds:.1f} s "
                  f"({run.images_per_second:.0f} img/s{resumed})")
    bad = entry.errors()
    if bad:
        err.print(f"[yellow]{len(bad)} image(s) could not be read and are excluded (ok=False):[/yellow]")
        for sample_id, reason in bad[:10]:
            err.print(f"  {sample_id}: {reason}")
        if len(bad) > 10:
            err.print(f"  ... see: featx cache info {entry.key[:12]} --errors")


def _split(options: dict, group) -> tuple[dict, dict]:
    """The values of ``group``'s options, and the others."""
    names = {o.name for o in group}
    return ({k: v for k, v in options.items() if k in names}, {k: v for k, v in options.items() if k not in names})


def _announce(command_name: str, dataset: str, options: dict) -> None:
    """Print the effective settings first: run/compare and extract/probe differ in their defaults."""
    shown = ("model", "image_size", "pool", "layers", "heads", "limit", "device", "selection_rows")
    parts = [f"{name}={options[name]}" for name in shown if options.get(name) is not None]
    if "image_size" in options and options["image_size"] is None:
        parts.insert(1, "image_size=the model's")
    logging.getLogger("featx").info("featx %s %s: %s", command_name, dataset, ", ".join(parts))


def _looks_like_entry(target: str) -> bool:
    import re

    from .cache.store import CacheStore

    if target.endswith(".h5") or re.fullmatch(r"[0-9a-f]{6,64}", target):
        return True
    root = CacheStore(STATE["cache_dir"]).root
    return (root / target).is_file() or (root / f"{target}.h5").is_file()


def _print_probe(results) -> None:
    rows = results.rows
    heads = list(dict.fromkeys(r["head"] for r in rows))
    best_per_head = results.best_per_head()
    table = Table(title=f"{results.entry['dataset']} × {results.entry['model']}: test top-1 (95% CI) "
                        "— * best layer per head (validation), bold: best overall", header_style="bold")
    for col in ("layer", "depth", "width"):
        table.add_column(col, justify="left" if col == "layer" else "right")
    for head in heads:
        table.add_column(head, justify="right")
    layers = list(dict.fromkeys(r["layer"] for r in rows))
    by_cell = {(r["layer"], r["head"]): r for r in rows}
    for layer in layers:
        first = next(r for r in rows if r["layer"] == layer)
        cells = []
        for head in heads:
            r = by_cell.get((layer, head))
            if r is None:
                cells.append("-")
                continue
            lo, hi = r["test_top1_ci"]
            text = f"{r['test_top1']:.3f} ({lo:.3f}-{hi:.3f})"
            if best_per_head[head] is r:
                text += " *"
            if r is results.best:
                text = f"[bold green]{text}[/bold green]"
            cells.append(text)
        table.add_row(layer, f"{first['depth']:.2f}", str(first["width"]), *cells)
    out.print(table)
    b = results.best
    extra = f", top-5 {b['test_top5']:.3f}" if b.get("test_top5") is not None else ""
    out.print(f"best: {b['head']} on {b['layer']} ({json.dumps(b['params'])}): test top-1 {b['test_top1']:.4f}"
              f"{extra}, balanced accuracy {b['balanced_accuracy']:.4f}, macro-F1 {b['macro_f1']:.4f}")
    split = results.protocol["splits"]
    chosen_on = (f" ({split['val']} images), refit on the training split ({split['train']} images)"
                 if split.get("val") else f" on the training split ({split['train']} images)")
    out.print(f"protocol: {results.protocol['selection']}{chosen_on}{_subsample_text(results.protocol)}, "
              f"test split ({split['test']} images, {split['test_source']}) evaluated once per cell; "
              f"{_engines_text(results.protocol)}")
    out.print(f"\n[bold]advice[/bold]: {results.recommendation}\n")
    if results.out_dir is not None:
        out.print(f"wrote {results.out_dir}/: " + ", ".join(results.files.values()))
    out.print(f"probe time {results.seconds:.1f} s")


def _subsample_text(protocol: dict) -> str:
    rows = protocol.get("selection_rows") or {}
    if not rows or rows.get("fit") == rows.get("fit_available") and rows.get("val") == rows.get("val_available"):
        return ""
    return (f"; parameters chosen on {rows['fit'][0]} fitting and {rows['val'][0]} validation rows "
            f"(a stratified sample), then refit on all")


def _engines_text(protocol: dict) -> str:
    engines = ", ".join(f"{head} {engine}" for head, engine in (protocol.get("engines") or {}).items())
    return f"heads on {protocol.get('device', 'cpu')}: {engines}" if engines else ""


@command(extract=True, probe=True, model=(ProbeModel, None), layers=(ProbeLayers, None))
def probe(
    target: Annotated[str, typer.Argument(help="A cache entry (key prefix, file name, path) or a dataset "
                                          "(then it is extracted first, through the cache).")],
    as_json: AsJson = False,
    *,
    options: dict,
) -> None:
    """Compare scikit-learn heads on every cached layer: where are the classes best decodable?"""
    from ._resultdir import PROBE, check_target
    from .api import probe as run_probe
    from .probing.heads import resolve_heads
    from .probing.runner import check_options

    probing, extracting = _split(options, PROBE_OPTIONS)
    resolve_heads(probing["heads"])  # refused before extracting, not after it
    check_options(backend=probing["backend"], head_precision=probing["head_precision"])
    if probing["out_dir"] is not None:
        check_target(probing["out_dir"], PROBE)  # before extracting: a folder featx may not replace is refused
    seed, device, progress = extracting["seed"], extracting["device"], extracting["progress"]
    layers = extracting.pop("layers")
    entry = target
    with _output(as_json):
        if extracting["model"] is not None or not _looks_like_entry(target):
            from .api import check_probe_data
            from .api import extract as run_extract

            extracting["model"] = extracting["model"] or "efficientnet_lite0"
            _announce("probe", target, {**extracting, **probing, "layers": layers or "auto"})
            source = check_probe_data(target, limit=extracting["limit"], seed=seed, cv=probing["cv"],
                                      data_root=extracting["data_root"], download=extracting["download"],
                                      hash_content=extracting["hash_content"])  # a short split: refused now
            entry = run_extract(source, layers=layers or "auto", cache_dir=STATE["cache_dir"], **extracting)
            _report_extract(entry)
        results = run_probe(entry, layers=layers, seed=seed, cache_dir=STATE["cache_dir"], progress=progress,
                            device=device, **probing)
        _print_probe(results)
    if as_json:
        _print_json(results.to_dict())


Baseline = Annotated[bool, typer.Option("--baseline", help="Add each model with random weights (--weights none) as "
                                        "a reference row: how much the pretraining is worth on this data.")]
Shots = Annotated[Optional[str], typer.Option(help="Learning curves: labelled images per class, e.g. "
                                              "'1,5,10,50,all' (several seeds), at each backbone's best layer.")]
RunImageSize = Annotated[Optional[int], typer.Option(help=f"Input size in pixels (default {RUN_IMAGE_SIZE}: quick "
                                                     "on a CPU; 0 = the model's own).")]
#: what ``featx run`` and ``featx compare`` choose differently from extract and probe, and why (README)
QUICK_DEFAULTS = dict(model=(ModelList, ["efficientnet_lite0"]), image_size=(RunImageSize, RUN_IMAGE_SIZE),
                      pool=RUN_POOL, heads=RUN_HEADS)


@command(extract=True, probe=True, **QUICK_DEFAULTS)
def run(
    dataset: Annotated[str, typer.Argument(help="Dataset to run on (default: fashion-mnist).")] = "fashion-mnist",
    baseline: Baseline = False,
    shots: Shots = None,
    as_json: AsJson = False,
    *,
    options: dict,
) -> None:
    """The main job: extract features (through the cache), probe every layer, report and advise.

    With several models (or --baseline, or --shots) it runs featx compare."""
    from .comparison.runner import parse_models

    models = parse_models(options.pop("model"))
    options["image_size"] = options["image_size"] or None
    with _output(as_json):
        _announce("run", dataset, {"model": ",".join(models), **options})
        if len(models) > 1 or baseline or shots:
            from .comparison import compare as run_compare

            results = run_compare(dataset, models, baseline=baseline, shots=shots, cache_dir=STATE["cache_dir"],
                                  **options)
            _print_comparison(results)
        else:
            from .api import run as run_all

            probing, extracting = _split(options, PROBE_OPTIONS)
            results = run_all(dataset, models[0], probe_layers=extracting["layers"], cache_dir=STATE["cache_dir"],
                              **probing, **extracting)
            _print_probe(results)
    if as_json:
        _print_json(results.to_dict())


@command(extract=True, probe=True, **QUICK_DEFAULTS, out_dir=(CompareOutDir, None))
def compare(
    dataset: Dataset,
    baseline: Baseline = False,
    shots: Shots = None,
    as_json: AsJson = False,
    *,
    options: dict,
) -> None:
    """Put several backbones through the same probe on the same rows: leaderboard, paired tests, advice.

    Entries already in the cache are reused; only missing ones are extracted."""
    from .comparison import compare as run_compare

    models = options.pop("model")
    options["image_size"] = options["image_size"] or None
    with _output(as_json):
        _announce("compare", dataset, {"model": ",".join(models), **options})
        results = run_compare(dataset, models, baseline=baseline, shots=shots, cache_dir=STATE["cache_dir"],
                              **options)
        _print_comparison(results)
    if as_json:
        _print_json(results.to_dict())


def _print_comparison(results) -> None:
    from .comparison.leaderboard import leaderboard_rows

    table = Table(title=f"{results.dataset}: backbones ranked on validation data — test top-1 (95% CI), paired "
                        "tests against the leader on the same test rows", header_style="bold")
    columns = ("#", "backbone", "layer", "head", "val", "test top-1", "vs leader (95% CI)", "p (Holm)", "verdict",
               "params", "img/s", "width", "disk", "probe s")
    for col in columns:
        table.add_column(col, justify="left" if col in ("backbone", "layer", "head", "verdict") else "right")
    for row in leaderboard_rows(results):
        diff = row["difference_to_leader"]
        vs = "-" if diff is None else (f"{100 * diff:+.2f} ({100 * row['difference_ci_low']:+.2f} to "
                                       f"{100 * row['difference_ci_high']:+.2f}) pts")
        params = "-" if row["parameters"] is None else f"{row['parameters'] / 1e6:.1f}M"
        speed = "-" if row["images_per_second"] is None else f"{row['images_per_second']:.0f}"
        table.add_row(str(row["rank"]), row["model"], row["layer"], row["head"], f"{row['val_top1']:.3f}",
                      f"{row['test_top1']:.3f} ({row['test_top1_ci_low']:.3f}-{row['test_top1_ci_high']:.3f})",
                      vs, "-" if row["p_holm"] is None else f"{row['p_holm']:.3g}", row["verdict"], params, speed,
                      str(row["width"]), human_bytes(row["bytes_on_disk"]), f"{row['probe_seconds']:.0f}")
    out.print(table)
    for model, curve in results.shots.items():
        points = ", ".join(f"{p['shots']}: {p['mean']:.3f}" + (f"±{p['std']:.3f}" if len(p["test_top1"]) > 1 else "")
                           for p in curve["points"])
        out.print(f"labels per class → test top-1, {model} ({curve['head']} on {curve['layer']}): {points}")
    out.print(f"protocol: {results.protocol['selection']}; {results.protocol['paired_tests']}")
    out.print(f"\n[bold]advice[/bold]: {results.advice}\n")
    if results.out_dir is not None:
        out.print(f"wrote {results.out_dir}/: " + ", ".join(results.files.values()))
    out.print(f"time {results.seconds:.1f} s")


@command()
def finetune(
    target: Annotated[Optional[str], typer.Argument(help="A probe result folder, or a dataset when --model is "
                                                    "given.")] = None,
    model: Annotated[Optional[str], typer.Option("--model", "-m", help="Fine-tune this model explicitly, with "
                                                 "--layer and a dataset.")] = None,
    layer: Annotated[Optional[str], typer.Option("--layer", "-l", help="Layer to cut after: name, alias or "
                                                 "ladder index; default: the probe's best layer. Not with "
                                                 "--full (use --freeze-below).")] = None,
    full: Annotated[bool, typer.Option("--full", help="Keep the whole network up to its top layer (pre_logits) "
                                       "with the head there, instead of cutting after --layer; blocks below "
                                       "--freeze-below (default: the probe's best layer) stay frozen.")] = False,
    head_init: Annotated[str, typer.Option(help="lpft (start from the probe's logistic regression, "
                                           "standardisation folded in), random, or auto (lpft with a probe "
                                           "result; with --full only if the probe's head was fitted on the top "
                                           "layer, else a fresh head trained alone first).")] = "auto",
    epochs: Annotated[int, typer.Option(help="Training epochs.")] = 5,
    lr: Annotated[Optional[float], typer.Option(help="Head learning rate; default 1e-3 (AdamW), 1e-2 (SGD).")] = None,
    backbone_lr_ratio: Annotated[float, typer.Option(help="Backbone learning rate = lr x this.")] = 0.1,
    optimizer: Annotated[str, typer.Option(help="adamw or sgd (with momentum).")] = "adamw",
    weight_decay: Annotated[Optional[float], typer.Option(help="Default 0.01 (AdamW), 1e-4 (SGD); never on "
                                                          "biases or norms.")] = None,
    momentum: Annotated[float, typer.Option(help="SGD momentum.")] = 0.9,
    warmup_epochs: Annotated[float, typer.Option(help="Linear warm-up before the cosine decay (fractions "
                                                 "allowed).")] = 0.5,
    head_warmup_epochs: Annotated[Optional[int], typer.Option(help="Epochs that train only the head; default 0, "
                                                              "or 1 for a fresh head with --full.")] = None,
    freeze_below: Annotated[Optional[str], typer.Option(help="Blocks below this layer (name or index) stay "
                                                        "frozen, weights and BatchNorm statistics; with --full "
                                                        "the default is the probe's best layer.")] = None,
    unfreeze: Annotated[Optional[str], typer.Option(help="gradual: unfreeze one block per epoch from the "
                                                    "top.")] = None,
    bn_stats: Annotated[str, typer.Option(help="BatchNorm statistics: auto (frozen for pretrained weights), "
                                          "frozen, update.")] = "auto",
    label_smoothing: Annotated[float, typer.Option(help="Label smoothing of the loss.")] = 0.0,
    dropout: Annotated[float, typer.Option(help="Dropout before the head.")] = 0.0,
    augment: Annotated[bool, typer.Option("--augment/--no-augment", help="Random resized crop, flip and small "
                                          "rotation for training.")] = True,
    batch_size: BatchSize = None,
    val_fraction: Annotated[float, typer.Option(help="Validation share of the training split.")] = 0.2,
    patience: Annotated[int, typer.Option(help="Early stopping patience in epochs (0 = never stop "
                                          "early).")] = 3,
    seed: Seed = 0,
    sweep: Annotated[Optional[str], typer.Option(help="Grid, e.g. 'lr=1e-2,1e-3,1e-4 epochs=1,3,5': prints "
                                                 "validation and test accuracy per cell.")] = None,
    resume: Annotated[bool, typer.Option(help="Continue an interrupted run (rerunning the same command also "
                                         "resumes); another configuration is refused.")] = False,
    out_dir: Annotated[Optional[Path], typer.Option("--out", help="Output folder (default "
                                                    "featx-results/finetune/...).")] = None,
    weights: Weights = None,
    checkpoint: Checkpoint = None,
    arch: Arch = None,
    image_size: ImageSize = None,
    pool: Annotated[Optional[str], typer.Option(help="Pooling (explicit mode): avg, max, avgmax, grid2, "
                                                "grid3.")] = None,
    data_root: DataRoot = None,
    limit: Limit = None,
    device: DeviceOpt = "auto",
    precision: Precision = "auto",
    workers: Workers = None,
    progress: Progress = True,
    as_json: AsJson = False,
) -> None:
    """Fine-tune from a probe result: cut after its best layer and start from its head (LP-FT), or keep the
    full network with the blocks below the best layer frozen (--full)."""
    from ._distributed import is_main_process
    from .api import finetune as run_finetune

    explicit = {k: v for k, v in dict(weights=weights, checkpoint=checkpoint, arch=arch, image_size=image_size,
                                      pool=pool, data_root=data_root, limit=limit).items() if v is not None}
    with _output(as_json):
        result = run_finetune(
            target, model=model, layer=layer, full=full, head_init=head_init, epochs=epochs, lr=lr,
            backbone_lr_ratio=backbone_lr_ratio, optimizer=optimizer, weight_decay=weight_decay, momentum=momentum,
            warmup_epochs=warmup_epochs, head_warmup_epochs=head_warmup_epochs, freeze_below=freeze_below,
            unfreeze=unfreeze, bn_stats=bn_stats, label_smoothing=label_smoothing, dropout=dropout, augment=augment,
            batch_size=batch_size, val_fraction=val_fraction, patience=patience, seed=seed, sweep=sweep,
            resume=resume, out_dir=out_dir, device=device, precision=precision, workers=workers, progress=progress,
            cache_dir=STATE["cache_dir"], **explicit,
        )
        if is_main_process():  # under torchrun every rank holds the result; one reports it
            _print_finetune(result)
    if as_json and is_main_process():
        _print_json(result.to_json())


def _print_finetune(result) -> None:
    if result.sweep_table:
        out.print(result.sweep_table)
    t = result.test
    lo, hi = t["test_top1_ci"]
    status = "found finished on disk" if result.reused else f"{result.train_seconds:.0f} s of training"
    network = result.network or {}
    shape = "the full network" if network.get("mode") == "full" else f"after {result.layer}"
    if network.get("freeze_below"):
        shape += f", frozen below {network['freeze_below']}"
    out.print(f"fine-tuned {shape} ({result.head_init} head): test top-1 {t['test_top1']:.4f} "
              f"(95% CI {lo:.4f}-{hi:.4f}), best epoch {result.best_epoch} by validation "
              f"({result.best_val_top1:.4f}); {status}")
    if network:
        head = network["head"]
        warmup = f", trained alone for {head['warmup_epochs']} epoch(s) first" if head["warmup_epochs"] else ""
        out.print(f"trainable parameters: {network['trainable_parameters']:,} of {network['total_parameters']:,} "
                  f"(head on {network['head_layer']}); head: {head['start']}{warmup}")
    probe = result.probe or {}
    if probe.get("logreg_test_top1") is not None:
        delta = probe.get("delta_top1_vs_logreg")
        change = (f"fine-tuning changed it by {delta:+.4f}" if delta is not None
                  else "not compared: the two stages scored different numbers of test images")
        out.print(f"probe (logreg) at {probe.get('layer', 'the same layer')}: test top-1 "
                  f"{probe['logreg_test_top1']:.4f}; {change}")
    out.print(f"wrote {result.out_dir}/  (re-extract its layers with --model finetuned:{result.out_dir})")


@command()
def predict(
    results: Annotated[Path, typer.Argument(help="A result folder: featx probe/run (its best head), featx "
                                            "finetune (its network), featx compare (its leader) or a --sweep (its "
                                            "chosen run).")],
    images: Annotated[list[str], typer.Argument(help="Image files, folders (searched recursively) or CSV files with "
                                                "a path column; no labels needed.")],
    out_file: Annotated[Optional[str], typer.Option("--out", help="Write the predictions as CSV to this file "
                                                    "(atomically); '-' prints the CSV. Default: a table.")] = None,
    top_k: Annotated[int, typer.Option(help="Classes listed per image, best first, with their scores.")] = 5,
    device: DeviceOpt = "auto",
    precision: Annotated[Optional[str], typer.Option(help="float32, bfloat16 or float16; default: the precision "
                                                     "the probe's features were computed in.")] = None,
    batch_size: BatchSize = None,
    workers: Workers = None,
    checkpoint: Annotated[Optional[Path], typer.Option(help="The weights file, when the probe's model was loaded "
                                                       "from one (--checkpoint at extraction).")] = None,
    progress: Progress = True,
) -> None:
    """Predict the classes of new images with a probe's best head or a fine-tuned network, preprocessed exactly
    as its training images were."""
    from .prediction import predict as run_predict  # not through .api: a mistyped path is refused without scikit-learn

    table = run_predict(results, images, top_k=top_k, out=None if out_file in (None, "-") else out_file,
                        device=device, precision=precision, batch_size=batch_size, workers=workers,
                        checkpoint=checkpoint, progress=progress)
    if out_file == "-":
        sys.stdout.write(table.to_csv())
    elif out_file is None:
        _print_predictions(table)
    else:
        out.print(f"wrote {table.out}: {table.n_ok} of {len(table)} image(s) predicted "
                  f"(top-{table.top_k} {table.score_kind} scores)")
    failed = table.failed
    if failed:
        err.print(f"[yellow]{len(failed)} image(s) could not be read (rows with an error):[/yellow]")
        for path, reason in failed[:10]:
            err.print(f"  {path}: {reason}", soft_wrap=True)


def _print_predictions(table) -> None:
    s = table.source
    what = f"{s['head']} on {s['layer']}" if s["kind"] == "probe" else f"fine-tuned after {s['layer']}"
    grid = Table(title=f"{s['model']}: {what} — top-{table.top_k} classes ({table.score_kind})",
                 header_style="bold")
    for col in ("path", "prediction", "top classes"):
        grid.add_column(col)
    for i in range(len(table)):
        top = "  ".join(f"{name} {score:.3g}" for name, score in table.top(i))
        grid.add_row(table.paths[i], table.predicted[i] or "[red]unreadable[/red]", top or table.errors[i])
    out.print(grid)


@command(name="layers")
def layers_cmd(
    model: Annotated[str, typer.Argument(help="A model name, as for --model.")] = "efficientnet_lite0",
    image_size: ImageSize = None,
    pool: Pool = "avg",
    token_pool: TokenPool = "auto",
    arch: Arch = None,
    as_json: AsJson = False,
) -> None:
    """Print the layer ladder of MODEL: index, name, relative depth, raw shape, pooled width."""
    from .api import layers as get_layers
    from .layer import check_pool

    check_pool(pool, token_pool)
    ladder = get_layers(model, image_size=image_size, arch=arch)
    rows = [{**layer.pooled(pool, token_pool).to_dict(), "auto": layer.name in ladder.auto} for layer in ladder.layers]
    if as_json:
        out.print_json(json.dumps({"model": model, "input_size": ladder.input_size, "layers": rows}))
        return
    table = Table(title=f"{model} at {ladder.input_size}px ({len(rows)} layers; * = auto)", header_style="bold")
    for col in ("index", "", "layer", "depth", "raw shape", "kind", "pooled width"):
        table.add_column(col, justify="right" if col in ("index", "depth", "pooled width") else "left")
    for r in rows:
        table.add_row(str(r["index"]), "*" if r["auto"] else "", r["name"], f"{r['depth']:.2f}",
                      "x".join(map(str, r["raw_shape"])), r["kind"], f"{r['width']} ({r['pool']})")
    out.print(table)


@command()
def models(
    pattern: Annotated[Optional[str], typer.Argument(help="Glob, e.g. 'timm:*convnext*' or '*resnet*'.")] = None,
    as_json: AsJson = False,
) -> None:
    """List the models featx can load, and where their weights are."""
    from .api import models as list_models

    rows = list_models(pattern)
    if not rows:
        err.print(f"No model matches {pattern!r}. Try a wider pattern such as '*{(pattern or '').strip('*')[:5]}*'.")
        raise typer.Exit(1)
    if as_json:
        _print_json([{"model": r.name, "weights": r.weights} for r in rows])
        return
    table = Table(header_style="bold")
    table.add_column("model")
    table.add_column("weights")
    for r in rows:
        table.add_row(r.name, r.weights)
    out.print(table)
    if not pattern:
        out.print("timm's pretrained models are listed with a pattern, e.g.: featx models 'timm:*vit*'")


@command(cache_app, "ls")
def cache_ls(as_json: AsJson = False) -> None:
    """List the entries of the cache."""
    from .cache.store import CacheStore

    store = CacheStore(STATE["cache_dir"])
    entries = store.entries()
    if as_json:
        _print_json({"root": str(store.root),
                     "entries": [e.info() for e in entries if not isinstance(e, tuple)],
                     "unreadable": [{"path": str(e[0]), "error": e[1]} for e in entries if isinstance(e, tuple)],
                     "leftovers": [{"kind": i.kind, "path": str(i.path), "bytes": i.size} for i in store.leftovers()]})
        return
    if not entries:
        out.print(f"No entries in {store.root}.")
        _print_leftovers(store)
        return
    table = Table(title=str(store.root), header_style="bold")
    columns = ("key", "dataset", "model", "px", "pool", "dtype", "samples", "layers", "size", "updated")
    for col in columns:
        table.add_column(col, justify="right" if col in ("px", "samples", "layers", "size") else "left")
    for e in entries:
        if isinstance(e, tuple):
            table.add_row(e[0].name, f"[red]unreadable: {e[1]}[/red]", *[""] * (len(columns) - 2))
        else:
            c = e.config
            limit = c["dataset"].get("limit")
            dataset = e.dataset + (f" (limit {limit['n']})" if limit else "")
            table.add_row(e.key[:12], dataset, e.model, str(c["preprocessing"]["crop_size"]), c["pooling"]["pool"],
                          c["dtype"], str(e.n_samples), str(len(e.layers)), human_bytes(e.size_bytes), e.updated)
    out.print(table)
    _print_leftovers(store)


def _print_leftovers(store) -> None:
    """One line about what killed runs left behind, if anything."""
    items = store.leftovers()
    if not items:
        return
    names = {"tmp": "temporary file(s)", "partial": "interrupted run(s)",
             "dist": "torchrun heartbeat folder(s)", "quarantine": "quarantined file(s)"}
    parts = []
    for kind, label in names.items():
        mine = [i for i in items if i.kind == kind]
        if mine:
            parts.append(f"{len(mine)} {label} ({human_bytes(sum(i.size for i in mine))})")
    out.print(f"leftovers: {', '.join(parts)}; remove them with: featx cache gc (preview with --dry-run)",
              soft_wrap=True)


@command(cache_app, "info")
def cache_info(
    entry: Annotated[str, typer.Argument(help="Key prefix, file name or path of an entry.")],
    verify: Annotated[bool, typer.Option(help="Read every byte and check the checksums.")] = False,
    errors: Annotated[bool, typer.Option("--errors", help="List every unreadable image.")] = False,
    as_json: AsJson = False,
) -> None:
    """Show an entry: configuration, samples, layers, unreadable images."""
    from .cache.store import CacheStore

    store = CacheStore(STATE["cache_dir"])
    e = store.resolve(entry)
    if verify:
        from .errors import CacheCorruptError

        try:
            e.verify()
        except CacheCorruptError as exc:  # only proven damage; quarantine() leaves other files alone
            store.quarantine(e.path, str(exc))
            raise
    info = e.info()
    if as_json:
        info["errors"] = [{"id": i, "error": r} for i, r in e.errors()]
        out.print_json(json.dumps(info))
        return
    out.print(f"[bold]{info['key']}[/bold]\n{info['path']} ({human_bytes(info['size_bytes'])})")
    out.print(f"model    {info['model']}\ndataset  {info['dataset']}  samples {info['samples']}  "
              f"splits {info['splits']}  classes {len(info['classes'])}")
    out.print(f"config   {json.dumps({k: v for k, v in info['config'].items() if k != 'dataset'})}")
    out.print(f"created  {info['created_utc']}  updated {info['updated_utc']}")
    _print_entry(e)
    if verify:
        out.print("[green]all checksums verified[/green]")
    bad = e.errors()
    if bad:
        out.print(f"{len(bad)} unreadable image(s)")
        for sample_id, reason in bad if errors else bad[:5]:
            out.print(f"  {sample_id}: {reason}")


@command(cache_app, "rm")
def cache_rm(
    entries: Annotated[list[str], typer.Argument(help="Key prefixes, file names or paths of entries.")],
) -> None:
    """Delete entries (and any interrupted extraction of them)."""
    from .cache.store import CacheStore

    store = CacheStore(STATE["cache_dir"])
    resolved = [store.resolve(ref, owned=True) for ref in entries]  # resolve all before deleting any
    for e in resolved:
        store.remove(e)
        out.print(f"removed {e.key[:12]} ({e.path.name})")


@command(cache_app, "gc")
def cache_gc(
    dry_run: Annotated[bool, typer.Option("--dry-run", help="Only list what would be removed.")] = False,
    older_than: Annotated[float, typer.Option("--older-than", metavar="DAYS",
                                              help="Keep leftovers changed less than DAYS ago.")] = 0.0,
) -> None:
    """Remove what killed runs left behind: .tmp files, abandoned .partial runs, quarantined files."""
    from .cache.store import CacheStore

    store = CacheStore(STATE["cache_dir"])
    items = store.gc(dry_run=dry_run, older_than_days=older_than)
    verb = "would remove" if dry_run else "removed"
    for item in items:
        out.print(f"{verb} {item.kind:<10} {human_bytes(item.size):>9}  {item.path}", soft_wrap=True)
    if items:
        out.print(f"{verb} {len(items)} item(s), {human_bytes(sum(i.size for i in items))}")
    else:
        out.print(f"Nothing to remove in {store.root}.")


@command(cache_app, "export")
def cache_export(
    entry: Annotated[str, typer.Argument(help="Key prefix, file name or path of an entry.")],
    out_file: Annotated[Path, typer.Option("--out", "-o", help="The file to write (.npz or .parquet).")],
    layer: Annotated[Optional[list[str]], typer.Option(
        "--layer", "--layers", "-l", help="A layer to export (repeat, or comma-separate); default: every layer "
        "of the entry. See: featx cache info ENTRY")] = None,
    fmt: Annotated[Optional[str], typer.Option("--format", help="npz or parquet (needs pyarrow); default: from "
                                               "the --out suffix.")] = None,
    include_bad: Annotated[bool, typer.Option("--include-bad", help="Keep rows of unreadable images (ok=False), "
                                              "as featx.load_features(include_bad=True).")] = False,
    force: Annotated[bool, typer.Option("--force", help="Replace an existing --out file.")] = False,
) -> None:
    """Write an entry's features (float32), labels, ids, splits and class names to one file."""
    from .cache.export import export_features

    done = export_features(entry, out_file, layers=layer, format=fmt, include_bad=include_bad, force=force,
                           cache_dir=STATE["cache_dir"])
    out.print(f"wrote {done.path} ({done.format}, {human_bytes(done.size_bytes)}): {done.rows} rows, "
              f"{len(done.layers)} layer(s): {', '.join(done.layers)}", soft_wrap=True)


# ------------------------------------------------------------------ entry point


def main(argv: list[str] | None = None) -> None:
    try:
        app(args=argv, prog_name="featx")
    except FeatxError as exc:
        if STATE["debug"]:
            raise
        err.print(f"[red]error:[/red] {exc}", soft_wrap=True)
        sys.exit(exc.exit_code)
