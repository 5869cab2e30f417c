"""The command line's options, each defined once.

Every command that extracts takes every extract option, and every command takes the global
options (``--cache-dir``, ``-v``, ``-q``, ``--debug``) after its name as well as before it.
Commands declare which groups they take with :func:`shared_options`; a command changes a
default or a help text by name, so the options cannot drift apart between commands.
"""

from __future__ import annotations

import copy
import functools
import inspect
import typing
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, Optional

import typer

Model = Annotated[str, typer.Option("--model", "-m", help="efficientnet_lite0 (bundled), torchvision:NAME, "
                                    "timm:NAME[.tag], file:PATH (with --arch) or finetuned:PATH.")]
ModelList = Annotated[list[str], typer.Option("--model", "-m", help="Backbones, comma-separated or repeated: "
                                               "efficientnet_lite0 (bundled), torchvision:NAME, timm:NAME[.tag], "
                                               "file:PATH (with --arch). Two or more run featx compare.")]
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
AsJson = Annotated[bool, typer.Option("--json", help="Print one JSON document on stdout instead of tables "
                                      "(logs and progress stay on stderr).")]

Heads = Annotated[str, typer.Option(help="Comma-separated heads: logreg, linsvm, svm, mlp, knn.")]
CV = Annotated[Optional[int], typer.Option(help="Choose hyper-parameters by K-fold CV (default: a 20% hold-out).")]
Jobs = Annotated[Optional[int], typer.Option(help="Parallel (layer, head) fits; default: the number of cores.")]
Backend = Annotated[str, typer.Option(help="joblib backend: auto (threads for the built-in heads, processes for "
                                      "custom ones), loky (processes), threading, or dask.")]
HeadPrecision = Annotated[str, typer.Option(help="auto: the MLP head trains with bfloat16 products on CPUs that "
                                            "multiply bfloat16 natively (AVX512-BF16, AMX); float32: scikit-learn's "
                                            "MLP. The other heads always compute in full precision.")]
Scheduler = Annotated[Optional[str], typer.Option(help="Dask scheduler address for --backend dask "
                                                  "(default: a local cluster).")]
OutDir = Annotated[Optional[Path], typer.Option("--out", help="Results folder (default featx-results/<entry>).")]
Plots = Annotated[bool, typer.Option("--plots/--no-plots", help="Write the plots (layers, confusion matrix).")]
SelectionRows = Annotated[int, typer.Option(help="Choose hyper-parameters on at most this many training rows per "
                                            "fold (a stratified sample; half as many validation rows), then refit "
                                            "on all of them. 0 = select on every row.")]
#: probing.protocol.SELECTION_ROWS, written out so that ``featx --help`` imports no scikit-learn
SELECTION_ROWS = 10_000
#: the probe's heads (probing.heads.DEFAULT_HEADS), and the quicker three of ``featx run``
ALL_HEADS = "logreg,linsvm,knn,mlp,svm"
RUN_HEADS = "logreg,knn,mlp"

CacheDir = Annotated[Optional[Path], typer.Option(envvar="FEATX_CACHE_DIR", help="Feature cache root (default "
                                                  "./cache).")]
# after the command's name the environment is not read again: it would override a --cache-dir given before it
CacheDirAfter = Annotated[Optional[Path], typer.Option(help="Feature cache root (default ./cache, or "
                                                       "$FEATX_CACHE_DIR).")]
Verbose = Annotated[int, typer.Option("--verbose", "-v", count=True, help="More log output.")]
Quiet = Annotated[bool, typer.Option("--quiet", "-q", help="Only warnings and errors.")]
Debug = Annotated[bool, typer.Option(help="Show tracebacks of errors.")]


@dataclass(frozen=True)
class SharedOption:
    name: str
    annotation: Any
    default: Any


@dataclass(frozen=True)
class OptionGroup:
    """Options that travel together; ``--help`` shows them under ``panel``."""

    panel: str
    options: tuple[SharedOption, ...]

    def __iter__(self):
        return iter(self.options)

    def annotation(self, annotation):
        """``annotation`` with its typer option shown in this group's panel."""
        kind, *metadata = typing.get_args(annotation)
        shown = [copy.copy(m) for m in metadata]
        for m in shown:
            if isinstance(m, typer.models.OptionInfo):
                m.rich_help_panel = self.panel
        return Annotated[(kind, *shown)]


#: what ``featx extract`` takes, in the order ``--help`` lists it; featx.extract's keywords
EXTRACT_OPTIONS = OptionGroup("Extraction", (
    SharedOption("model", Model, "efficientnet_lite0"),
    SharedOption("layers", Layers, "auto"),
    SharedOption("pool", Pool, "avg"),
    SharedOption("token_pool", TokenPool, "auto"),
    SharedOption("dtype", Dtype, "float16"),
    SharedOption("weights", Weights, None),
    SharedOption("checkpoint", Checkpoint, None),
    SharedOption("arch", Arch, None),
    SharedOption("image_size", ImageSize, None),
    SharedOption("crop_pct", CropPct, None),
    SharedOption("interpolation", Interp, None),
    SharedOption("data_root", DataRoot, None),
    SharedOption("download", Download, True),
    SharedOption("limit", Limit, None),
    SharedOption("seed", Seed, 0),
    SharedOption("batch_size", BatchSize, None),
    SharedOption("workers", Workers, None),
    SharedOption("device", DeviceOpt, "auto"),
    SharedOption("precision", Precision, "auto"),
    SharedOption("strict", Strict, False),
    SharedOption("force", Force, False),
    SharedOption("progress", Progress, True),
    SharedOption("hash_content", HashContent, False),
))

#: what every command that probes takes (featx.probe's keywords)
PROBE_OPTIONS = OptionGroup("Probe", (
    SharedOption("heads", Heads, ALL_HEADS),
    SharedOption("cv", CV, None),
    SharedOption("jobs", Jobs, None),
    SharedOption("backend", Backend, "auto"),
    SharedOption("scheduler", Scheduler, None),
    SharedOption("selection_rows", SelectionRows, SELECTION_ROWS),
    SharedOption("head_precision", HeadPrecision, "auto"),
    SharedOption("out_dir", OutDir, None),
    SharedOption("plots", Plots, True),
))

#: accepted before the command's name (``featx --cache-dir X extract``) and after it
GLOBAL_OPTIONS = OptionGroup("Global (also before the command)", (
    SharedOption("cache_dir", CacheDirAfter, None),
    SharedOption("verbose", Verbose, 0),
    SharedOption("quiet", Quiet, False),
    SharedOption("debug", Debug, False),
))


def shared_options(*groups: OptionGroup, into: str | None = None,
                   apply: Callable[[dict], None] | None = None, **overrides) -> Callable:
    """Add the options of ``groups`` to a command and hand their values over as one dict.

    ``into``: the command's keyword that receives the dict (none: the command does not see them).
    ``apply``: called with the dict before the command runs (the global options set the cache
    root and logging this way).
    ``overrides``: ``name=default`` or ``name=(Annotated, default)`` for a command whose default or
    help text differs; the name stays the same, so the commands keep one set of option names.
    """
    options = [option for group in groups for option in group]
    panel_of = {option.name: group for group in groups for option in group}

    def decorate(command: Callable) -> Callable:
        signature = inspect.signature(command, eval_str=True)
        own = [p for p in signature.parameters.values() if p.name != into]
        clash = {p.name for p in own} & {o.name for o in options}
        if clash:
            raise TypeError(f"{command.__name__} declares shared options itself: {sorted(clash)}")
        added = []
        for option in options:
            annotation, default = option.annotation, option.default
            if option.name in overrides:
                value = overrides[option.name]
                annotation, default = value if isinstance(value, tuple) else (annotation, value)
            annotation = panel_of[option.name].annotation(annotation)
            added.append(inspect.Parameter(option.name, inspect.Parameter.KEYWORD_ONLY, annotation=annotation,
                                           default=default))

        @functools.wraps(command)
        def wrapper(*args, **kwargs):
            values = {option.name: kwargs.pop(option.name) for option in options if option.name in kwargs}
            if apply is not None:
                apply(values)
            return command(*args, **kwargs, **({into: values} if into else {}))

        parameters = own
        wrapper.__signature__ = signature.replace(parameters=parameters + added)
        wrapper.__annotations__ = {p.name: p.annotation for p in parameters + added}
        return wrapper

    return decorate
