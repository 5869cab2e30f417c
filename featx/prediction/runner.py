"""``featx.predict``: class predictions for new images from a probe or fine-tuning result."""

from __future__ import annotations

import logging
import os
from collections.abc import Iterable
from pathlib import Path

from .._resultdir import PROBE
from ..errors import DataError, UsageError
from .folder import resolve_result_folder
from .inputs import collect_images
from .table import PredictionTable

log = logging.getLogger(__name__)


def predict(
    results_dir: str | os.PathLike,
    images: str | os.PathLike | Iterable[str | os.PathLike],
    *,
    top_k: int = 5,
    out: str | os.PathLike | None = None,
    device: str = "auto",
    precision: str | None = None,
    batch_size: int | None = None,
    workers: int | None = None,
    checkpoint: str | os.PathLike | None = None,
    progress: bool = True,
) -> PredictionTable:
    """Predict the classes of ``images`` with the result in ``results_dir``.

    ``results_dir``: a probe result (``featx probe``/``featx run``; its best head, on the features
    of its best layer computed exactly as its cache entry computed them), a fine-tuning run
    (``featx finetune``; the network and its classifier), a comparison (its leader's probe) or a
    sweep (the run it chose). ``images``: image files, folders (searched recursively), CSV files
    with a path column, or a list of them. ``top_k``: classes listed per image (at most the number
    of classes). ``out``: also write the table as a CSV file, atomically.

    ``precision``: default, the precision the probe's features were computed in (``auto`` for a
    fine-tuned network). ``checkpoint``: the weights file, when the probe's model was loaded
    from one. Unreadable images get a row with the reason, not an exception; a
    :class:`~featx.errors.DataError` is raised only when no image could be read (nothing is written).
    """
    if isinstance(top_k, bool) or not isinstance(top_k, int) or top_k < 1:
        raise UsageError(f"--top-k must be a positive integer, got {top_k!r}.")
    if batch_size is not None and (isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1):
        raise UsageError(f"--batch-size must be a positive integer, got {batch_size!r}.")
    if workers is not None and (isinstance(workers, bool) or not isinstance(workers, int) or workers < 0):
        raise UsageError(f"--workers must be a non-negative integer, got {workers!r}.")
    if out is not None and Path(out).is_dir():
        raise UsageError(f"--out {out} is a folder; give the CSV file to write, e.g. {Path(out) / 'predictions.csv'}.")
    folder = resolve_result_folder(results_dir)
    image_list = collect_images(images)  # both checked before any model is loaded

    from .network import RunOptions  # torch: only once the folder and the images are known to be valid
    from .scorers import FinetunedScorer, ProbeScorer

    if folder.kind == PROBE:
        scorer = ProbeScorer(folder, checkpoint=checkpoint, device=device, precision=precision)
    else:
        if checkpoint is not None:
            raise UsageError("--checkpoint applies to probe results whose model was loaded from a checkpoint; a "
                             "fine-tuning run holds its own weights (model.pt).")
        scorer = FinetunedScorer(folder, device=device, precision=precision)
    from ..extraction.plan import default_batch_size

    dev = scorer.device
    options = RunOptions(dev, batch_size or default_batch_size(dev, scorer.pre.crop_size), workers, progress)
    log.info("predicting %d image(s) with %s", len(image_list), _describe(scorer.description, folder))
    scores = scorer.score(image_list, options)
    table = PredictionTable(
        ids=list(image_list.ids), paths=[str(p) for p in image_list.paths], classes=scores.classes,
        scores=scores.scores, predicted=[scores.classes[c] if c >= 0 else None for c in scores.predicted],
        errors=scores.errors, score_kind=scores.kind, top_k=min(top_k, len(scores.classes)),
        source={**scorer.description, "results": str(folder.path), "via": folder.via,
                "device": str(dev.torch_device), "precision": dev.precision},
    )
    if table.n_ok == 0:
        shown = "; ".join(f"{p}: {e}" for p, e in table.failed[:5])
        raise DataError(f"None of the {len(table)} image(s) could be read, so nothing was predicted ({shown}"
                        f"{' ...' if len(table) > 5 else ''}).")
    if out is not None:
        table.to_csv(out)
        table.out = Path(out)
    return table


def _describe(description: dict, folder) -> str:
    if description["kind"] == "probe":
        what = f"the probe's {description['head']} head on {description['layer']} of {description['model']}"
    else:
        what = f"the network fine-tuned after {description['layer']} ({description['model']})"
    return f"{what}, from {folder.via or folder.path}"
