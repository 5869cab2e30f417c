"""The ``featx`` command line: a thin layer over the Python API.

This is the only module that prints and chooses exit codes: 0 ok, 1 runtime or data
error, 2 usage error. User mistakes get a message, never a traceback (``--debug`` shows it).
"""

from __future__ import annotations

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
from .errors import FeatxError
from .report.text import human_bytes

app = typer.Typer(
    name="featx",
    help="Transfer learning on images, measured: extract cached features, probe every layer, fine-tune.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
cache_app = typer.Typer(help="Show and manage feature cache entries.", no_args_is_help=True)
app.add_typer(cache_app, name="cache")

# piped output gets wide lines instead of rich's 80-column default, so nothing is cut off
out = Console(highlight=False, width=None if sys.stdout.isatty() else 200)
err = Console(stderr=True, highlight=False, width=None if sys.stderr.isatty() else 200)
STATE = {"cache_dir": None, "debug": False}


# ------------------------------------------------------------------ shared option types

Model = Annotated[str, typer.Option("--model", "-m", help="efficientnet_lite0 (bundled), torchvision:NAME, "
                                    "timm:NAME[.tag], file:PATH (with --arch) or finetuned:PATH.")]
Layers = Annotated[str, typer.Option("--layers", "-l", help="auto, all, names, globs ('layer*'), indices (-1) "
                                     "or slices (0:4), comma-separated. See: featx layers MODEL")]
Pool = Annotated[str, typer.Option(help="Spatial pooling of feature maps: avg, max, avgmax, grid2, grid3, none.")]
TokenPool = Annotated[str, typer.Option(help="Pooling of transformer tokens: auto, cls, mean (patch tokens "
                                        "only), cls+mean.")]
Dtype = Annotated[str, typer.Option(help="Storage dtype of features: float16 or float32.")]
Weights = Annotated[Optional[str], typer.Option(help="Pretrained weights: DEFAULT, a torchvision enum name, "
                                                "'pretrained' or 'none' (random init).")]
Checkpoint = Annotated[Optional[Path], typer.Option(help="Load the model's weights from this file "
                                                    "(state_dict, .pt/.pth/.safetensors).")]
Arch = Annotated[Optional[str], typer.Option(help="Architecture for --model file:PATH, e.g. timm:resnet18.")]
ImageSize = Annotated[Optional[int], typer.Option(help="Input size (crop) in pixels; default: the model's.")]
CropPct = Annotated[Optional[float], typer.Option(help="Crop size / resize size; default: the model's, or 1.0 "
                                                  "when images are upscaled.")]
Interp = Annotated[Optional[str], typer.Option(help="Resize interpolation: nearest, bilinear, bicubic.")]
DataRoot = Annotated[Optional[Path], typer.Option(help="Where datasets are looked for and downloaded.")]
Download = Annotated[bool, typer.Option("--download/--no-download", help="Download missing datasets.")]
Limit = Annotated[Optional[int], typer.Option(help="Use a stratified, seeded subset of N images.")]
Seed = Annotated[int, typer.Option(help="Seed for --limit and every random choice.")]
BatchSize = Annotated[Optional[int], typer.Option(help="Images per forward pass; default chosen per device.")]
Workers = Annotated[Optional[int], typer.Option(help="DataLoader processes decoding images; default per device.")]
DeviceOpt = Annotated[str, typer.Option(help="Where the forward pass and the probe heads run: auto, cpu, cuda or "
                                              "cuda:N.")]
Precision = Annotated[str, typer.Option(help="Compute precision: auto (bf16/fp16 on CUDA), float32, bfloat16.")]
Strict = Annotated[bool, typer.Option(help="Stop at the first unreadable image instead of recording it.")]
Force = Annotated[bool, typer.Option(help="Allow --pool none above the size budget.")]
Progress = Annotated[bool, typer.Option("--progress/--no-progress", help="Show a progress bar.")]
HashContent = Annotated[bool, typer.Option("--hash-content", help="Fingerprint image files by the sha256 of "
                                           "their bytes (stable across copies and machines) instead of their "
                                           "size, times and inode.")]


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
    cache_dir: Annotated[Optional[Path], typer.Option(envvar="FEATX_CACHE_DIR",
                                                      help="Feature cache root (default ./cache).")] = None,
    verbose: Annotated[int, typer.Option("--verbose", "-v", count=True, help="More log output.")] = 0,
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="Only warnings and errors.")] = False,
    debug: Annotated[bool, typer.Option(help="Show tracebacks of errors.")] = False,
    version: Annotated[bool, typer.Option("--version", callback=_version, is_eager=True,
                                          help="Show the version and exit.")] = False,
) -> None:
    STATE["cache_dir"], STATE["debug"] = cache_dir, debug
    _configure_logging(verbose, quiet)


def _print_entry(entry, title: str | None = None) -> None:
    table = Table(title=title, show_header=True, header_style="bold")
    for col in ("index", "layer", "depth", "raw shape", "pool", "width", "dtype"):
        table.add_column(col, justify="right" if col in ("index", "depth", "width") else "left")
    for r in entry.layers:
        table.add_row(str(r.index), r.name, f"{r.depth:.2f}", "x".join(map(str, r.raw_shape)), r.pool,
                      str(r.width), r.dtype)
    out.print(table)


# ------------------------------------------------------------------ commands


@app.command()
def extract(
    dataset: Annotated[str, typer.Argument(help="digits, fashion-mnist, cifar10, ..., folder:PATH or csv:FILE.")],
    model: Model = "efficientnet_lite0",
    layers: Layers = "auto",
    pool: Pool = "avg",
    token_pool: TokenPool = "auto",
    dtype: Dtype = "float16",
    weights: Weights = None,
    checkpoint: Checkpoint = None,
    arch: Arch = None,
    image_size: ImageSize = None,
    crop_pct: CropPct = None,
    interpolation: Interp = None,
    data_root: DataRoot = None,
    download: Download = True,
    limit: Limit = None,
    seed: Seed = 0,
    batch_size: BatchSize = None,
    workers: Workers = None,
    device: DeviceOpt = "auto",
    precision: Precision = "auto",
    strict: Strict = False,
    force: Force = False,
    progress: Progress = True,
    hash_content: HashContent = False,
) -> None:
    """Run a backbone once over a dataset and cache the pooled activations of many layers."""
    from .api import extract as run_extract

    entry = run_extract(
        dataset, model, layers=layers, pool=pool, token_pool=token_pool, dtype=dtype, weights=weights,
        checkpoint=checkpoint, arch=arch, image_size=image_size, crop_pct=crop_pct,
        interpolation=interpolation, data_root=data_root, download=download, limit=limit, seed=seed,
        batch_size=batch_size, workers=workers, device=device, precision=precision,
        cache_dir=STATE["cache_dir"], strict=strict, force=force, progress=progress, hash_content=hash_content,
    )
    _report_extract(entry)


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


Heads = Annotated[str, typer.Option(help="Comma-separated heads: logreg, linsvm, svm, mlp, knn.")]
CV = Annotated[Optional[int], typer.Option(help="Choose hyper-parameters by K-fold CV (default: a 20% hold-out).")]
Jobs = Annotated[Optional[int], typer.Option(help="Parallel (layer, head) fits; default: the number of cores.")]
Backend = Annotated[str, typer.Option(help="joblib backend: loky (processes), threading, or dask.")]
Scheduler = Annotated[Optional[str], typer.Option(help="Dask scheduler address for --backend dask "
                                                  "(default: a local cluster).")]
OutDir = Annotated[Optional[Path], typer.Option("--out", help="Results folder (default featx-results/<entry>).")]
Plots = Annotated[bool, typer.Option("--plots/--no-plots", help="Write layers.png and confusion.png.")]
#: defaults of ``featx run``, chosen so the main job finishes in minutes on a 2-core CPU (README)
RUN_HEADS = "logreg,knn,mlp"
#: probing.protocol.SELECTION_ROWS, written out so that ``featx --help`` imports no scikit-learn
SELECTION_ROWS = 10_000
SelectionRows = Annotated[int, typer.Option(help="Choose hyper-parameters on at most this many training rows per "
                                            "fold (a stratified sample; half as many validation rows), then refit "
                                            "on all of them. 0 = select on every row.")]
RUN_IMAGE_SIZE = 96
RUN_POOL = "grid2"  # coarse layout matters for small images: +2 points over avg on Fashion-MNIST (README)


def _looks_like_entry(target: str) -> bool:
    import re

    from .cache.store import CacheStore

    if target.endswith(".h5") or re.fullmatch(r"[0-9a-f]{6,64}", target):
        return True
    return (CacheStore(STATE["cache_dir"]).root / target).is_file()


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


@app.command()
def probe(
    target: Annotated[str, typer.Argument(help="A cache entry (key prefix, file name, path) or a dataset "
                                          "(then it is extracted first, through the cache).")],
    heads: Heads = "logreg,linsvm,knn,mlp,svm",
    layers: Annotated[Optional[str], typer.Option("--layers", "-l", help="Layers to probe (default: all in the "
                                                  "entry); for a dataset, also the layers extracted.")] = None,
    cv: CV = None,
    seed: Seed = 0,
    jobs: Jobs = None,
    backend: Backend = "loky",
    scheduler: Scheduler = None,
    out_dir: OutDir = None,
    plots: Plots = True,
    model: Annotated[Optional[str], typer.Option("--model", "-m", help="Model to extract with when TARGET is "
                                                 "a dataset (default efficientnet_lite0).")] = None,
    pool: Pool = "avg",
    token_pool: TokenPool = "auto",
    dtype: Dtype = "float16",
    weights: Weights = None,
    image_size: ImageSize = None,
    data_root: DataRoot = None,
    limit: Limit = None,
    device: DeviceOpt = "auto",
    selection_rows: SelectionRows = SELECTION_ROWS,
    progress: Progress = True,
    hash_content: HashContent = False,
) -> None:
    """Compare scikit-learn heads on every cached layer: where are the classes best decodable?"""
    from ._resultdir import PROBE, check_target
    from .api import probe as run_probe

    if out_dir is not None:
        check_target(out_dir, PROBE)  # before extracting: a folder featx may not replace is refused at once
    entry = target
    if model is not None or not _looks_like_entry(target):
        from .api import check_probe_data
        from .api import extract as run_extract

        source = check_probe_data(target, limit=limit, seed=seed, cv=cv, data_root=data_root,
                                  hash_content=hash_content)  # a short split is refused before extracting
        entry = run_extract(source, model or "efficientnet_lite0", layers=layers or "auto", pool=pool,
                            token_pool=token_pool, dtype=dtype, weights=weights, image_size=image_size,
                            data_root=data_root, limit=limit, seed=seed, device=device,
                            cache_dir=STATE["cache_dir"], progress=progress, hash_content=hash_content)
        _report_extract(entry)
    results = run_probe(entry, heads=heads, layers=layers, cv=cv, seed=seed, jobs=jobs, backend=backend,
                        scheduler=scheduler, out_dir=out_dir, cache_dir=STATE["cache_dir"], plots=plots,
                        progress=progress, device=device, selection_rows=selection_rows)
    _print_probe(results)


ModelList = Annotated[list[str], typer.Option("--model", "-m", help="Backbones, comma-separated or repeated: "
                                               "efficientnet_lite0 (bundled), torchvision:NAME, timm:NAME[.tag]. "
                                               "Two or more run featx compare.")]
Baseline = Annotated[bool, typer.Option("--baseline", help="Add each model with random weights (--weights none) as "
                                        "a reference row: how much the pretraining is worth on this data.")]
Shots = Annotated[Optional[str], typer.Option(help="Learning curves: labelled images per class, e.g. "
                                              "'1,5,10,50,all' (several seeds), at each backbone's best layer.")]


@app.command()
def run(
    dataset: Annotated[str, typer.Argument(help="Dataset to run on (default: fashion-mnist).")] = "fashion-mnist",
    model: ModelList = ["efficientnet_lite0"],  # noqa: B006 (typer reads the default, never mutates it)
    heads: Heads = RUN_HEADS,
    layers: Layers = "auto",
    pool: Pool = RUN_POOL,
    image_size: Annotated[Optional[int], typer.Option(help=f"Input size in pixels (default {RUN_IMAGE_SIZE}: "
                                                      "quick on a CPU; 0 = the model's own).")] = RUN_IMAGE_SIZE,
    limit: Limit = None,
    cv: CV = None,
    seed: Seed = 0,
    jobs: Jobs = None,
    out_dir: OutDir = None,
    dtype: Dtype = "float16",
    weights: Weights = None,
    data_root: DataRoot = None,
    device: DeviceOpt = "auto",
    selection_rows: SelectionRows = SELECTION_ROWS,
    baseline: Baseline = False,
    shots: Shots = None,
    progress: Progress = True,
    hash_content: HashContent = False,
) -> None:
    """The main job: extract features (through the cache), probe every layer, report and advise.

    With several models (or --baseline, or --shots) it runs featx compare."""
    from .comparison.runner import parse_models

    options = dict(heads=heads, cv=cv, jobs=jobs, out_dir=out_dir, seed=seed, progress=progress,
                   selection_rows=selection_rows, layers=layers, pool=pool, image_size=image_size or None,
                   limit=limit, dtype=dtype, weights=weights, data_root=data_root, device=device,
                   cache_dir=STATE["cache_dir"], hash_content=hash_content)
    models = parse_models(model)
    if len(models) > 1 or baseline or shots:
        from .comparison import compare as run_compare

        _print_comparison(run_compare(dataset, models, baseline=baseline, shots=shots, **options))
        return
    from .api import run as run_all

    _print_probe(run_all(dataset, models[0], **options))


@app.command()
def compare(
    dataset: Annotated[str, typer.Argument(help="digits, fashion-mnist, cifar10, ..., folder:PATH or csv:FILE.")],
    model: ModelList,
    baseline: Baseline = False,
    shots: Shots = None,
    heads: Heads = RUN_HEADS,
    layers: Layers = "auto",
    pool: Pool = RUN_POOL,
    image_size: Annotated[Optional[int], typer.Option(help=f"Input size in pixels (default {RUN_IMAGE_SIZE}; "
                                                      "0 = each model's own).")] = RUN_IMAGE_SIZE,
    limit: Limit = None,
    cv: CV = None,
    seed: Seed = 0,
    jobs: Jobs = None,
    out_dir: Annotated[Optional[Path], typer.Option("--out", help="Results folder (default "
                                                    "featx-results/compare-<dataset>).")] = None,
    dtype: Dtype = "float16",
    weights: Annotated[Optional[str], typer.Option(help="Weights of every model: DEFAULT, a torchvision enum "
                                                   "name, 'pretrained' or 'none' (random init).")] = None,
    data_root: DataRoot = None,
    device: DeviceOpt = "auto",
    selection_rows: SelectionRows = SELECTION_ROWS,
    plots: Plots = True,
    progress: Progress = True,
    hash_content: HashContent = False,
) -> None:
    """Put several backbones through the same probe on the same rows: leaderboard, paired tests, advice.

    Entries already in the cache are reused; only missing ones are extracted."""
    from .comparison import compare as run_compare

    results = run_compare(
        dataset, model, baseline=baseline, shots=shots, heads=heads, cv=cv, jobs=jobs, out_dir=out_dir, seed=seed,
        plots=plots, progress=progress, selection_rows=selection_rows, layers=layers, pool=pool,
        image_size=image_size or None, limit=limit, dtype=dtype, weights=weights, data_root=data_root,
        device=device, cache_dir=STATE["cache_dir"], hash_content=hash_content,
    )
    _print_comparison(results)


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


@app.command()
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
) -> None:
    """Fine-tune from a probe result: cut after its best layer and start from its head (LP-FT), or keep the
    full network with the blocks below the best layer frozen (--full)."""
    from ._distributed import is_main_process
    from .api import finetune as run_finetune

    explicit = {k: v for k, v in dict(weights=weights, checkpoint=checkpoint, arch=arch, image_size=image_size,
                                      pool=pool, data_root=data_root, limit=limit).items() if v is not None}
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


@app.command("layers")
def layers_cmd(
    model: Annotated[str, typer.Argument(help="A model name, as for --model.")] = "efficientnet_lite0",
    image_size: ImageSize = None,
    pool: Pool = "avg",
    token_pool: TokenPool = "auto",
    arch: Arch = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON instead of a table.")] = False,
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


@app.command()
def models(
    pattern: Annotated[Optional[str], typer.Argument(help="Glob, e.g. 'timm:*convnext*' or '*resnet*'.")] = None,
) -> None:
    """List the models featx can load, and where their weights are."""
    from .api import models as list_models

    rows = list_models(pattern)
    if not rows:
        err.print(f"No model matches {pattern!r}. Try a wider pattern such as '*{(pattern or '').strip('*')[:5]}*'.")
        raise typer.Exit(1)
    table = Table(header_style="bold")
    table.add_column("model")
    table.add_column("weights")
    for r in rows:
        table.add_row(r.name, r.weights)
    out.print(table)
    if not pattern:
        out.print("timm's pretrained models are listed with a pattern, e.g.: featx models 'timm:*vit*'")


@cache_app.command("ls")
def cache_ls() -> None:
    """List the entries of the cache."""
    from .cache.store import CacheStore

    store = CacheStore(STATE["cache_dir"])
    entries = store.entries()
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


@cache_app.command("info")
def cache_info(
    entry: Annotated[str, typer.Argument(help="Key prefix, file name or path of an entry.")],
    verify: Annotated[bool, typer.Option(help="Read every byte and check the checksums.")] = False,
    errors: Annotated[bool, typer.Option("--errors", help="List every unreadable image.")] = False,
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON.")] = False,
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


@cache_app.command("rm")
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


@cache_app.command("gc")
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


# ------------------------------------------------------------------ entry point


def main(argv: list[str] | None = None) -> None:
    try:
        app(args=argv, prog_name="featx")
    except FeatxError as exc:
        if STATE["debug"]:
            raise
        err.print(f"[red]error:[/red] {exc}", soft_wrap=True)
        sys.exit(exc.exit_code)
