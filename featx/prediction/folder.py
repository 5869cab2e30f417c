"""Which result a folder holds, and what prediction reads from it.

featx writes four kinds of result folders (``featx._resultdir``). Two of them can predict: a
probe's (``featx probe`` / ``featx run``: the best cell's head, ``best_head.joblib``, applied to
features computed as its cache entry computed them) and a fine-tuning run's (``model.json`` +
``model.pt``: a network with its own classifier). The other two lead to one of those: a
comparison predicts with its leader's probe (``models/NAME``), a sweep with the run its
validation accuracy chose. Torch-free: folders are checked before any model is loaded.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path

from .._resultdir import COMPARE, FINETUNE, PROBE, SWEEP, found_kind
from ..errors import UsageError

log = logging.getLogger(__name__)

RESULTS_FILE = "results.json"
HEAD_FILE = "best_head.joblib"
HEAD_INFO_FILE = "best_head.json"
MODEL_SPEC_FILE = "model.json"
VALID = ("Valid: the output folder of featx probe or featx run (results.json + best_head.joblib), of featx "
         "finetune (model.json + model.pt), of featx compare (its leader's models/NAME is used) or of a "
         "featx finetune --sweep (the run it chose is used).")


@dataclass(frozen=True)
class ResultFolder:
    """A folder that can predict: ``kind`` is ``probe`` or ``finetune``; ``via`` says how it was reached
    from the folder the user named (a comparison's leader, a sweep's chosen run), else ''."""

    kind: str
    path: Path
    results: dict | None = None  # results.json of a probe
    via: str = ""


def read_results(folder: Path) -> dict:
    """A probe's results.json, checked for what prediction needs (the one place that reads it)."""
    from ..results import load_results

    data = load_results(folder, kind=PROBE).raw  # format and schema version checked there
    try:
        for keys in (("entry", "config"), ("entry", "key"), ("entry", "classes"), ("best", "layer"),
                     ("best", "head")):
            node = data
            for k in keys:
                node = node[k]
    except (KeyError, TypeError) as exc:
        raise UsageError(f"{Path(folder) / RESULTS_FILE} lacks what prediction needs ({type(exc).__name__}: {exc}). "
                         "Run the probe again to rewrite it.") from None
    return data


def resolve_result_folder(path) -> ResultFolder:
    """The probe or fine-tuning result that ``path`` (a result folder, or a file in one) predicts with."""
    path = Path(path).expanduser()
    if path.is_file() and path.name in (RESULTS_FILE, MODEL_SPEC_FILE, "finetune.json", "comparison.json",
                                        "sweep.json"):
        path = path.parent
    if not path.exists():
        raise UsageError(f"Results folder {str(path)!r} does not exist. {VALID}")
    if not path.is_dir():
        raise UsageError(f"{str(path)!r} is not a results folder. {VALID}")
    kind = found_kind(path)
    if kind == COMPARE:
        return _leader(path)
    if kind == SWEEP:
        return _chosen_run(path)
    if kind == PROBE:
        if not (path / HEAD_FILE).is_file():
            raise UsageError(f"{path} holds a probe result without its head ({HEAD_FILE} is missing), so it cannot "
                             "predict. Run the probe again with an output folder (featx probe ... --out DIR).")
        return ResultFolder(PROBE, path.resolve(), read_results(path))
    if kind == FINETUNE:
        if not (path / MODEL_SPEC_FILE).is_file():
            raise UsageError(f"{path} holds an unfinished fine-tuning run (no {MODEL_SPEC_FILE} yet), so it cannot "
                             "predict. Finish it by running the same featx finetune command again.")
        return ResultFolder(FINETUNE, path.resolve())
    names = sorted(p.name for p in path.iterdir())[:8]
    found = f"found {', '.join(names)}" if names else "it is empty"
    raise UsageError(f"{path} holds no featx result ({found}). {VALID}")


def _leader(path: Path) -> ResultFolder:
    try:
        leader = json.loads((path / "comparison.json").read_text())["leader"]
        sub = path / leader["results"]
    except (OSError, ValueError, KeyError, TypeError):
        raise UsageError(f"{path} holds a featx comparison whose comparison.json does not name its leader's "
                         f"results; predict with one of its probe results instead: {path / 'models'}/NAME.") from None
    if not (sub / HEAD_FILE).is_file():
        raise UsageError(f"{path} holds a featx comparison whose leader's probe result ({sub}) is missing or has no "
                         f"{HEAD_FILE}; predict with one of its probe results instead: {path / 'models'}/NAME.")
    log.info("comparison %s: predicting with its leader, %s (%s)", path, leader.get("model", sub.name), sub)
    return ResultFolder(PROBE, sub.resolve(), read_results(sub), via=f"leader {leader.get('model', sub.name)} of "
                                                                     f"comparison {path}")


def _chosen_run(path: Path) -> ResultFolder:
    try:
        chosen = Path(json.loads((path / "sweep.json").read_text())["chosen"]["out_dir"])
    except (OSError, ValueError, KeyError, TypeError):
        raise UsageError(f"{path} holds a fine-tuning sweep without a finished sweep.json; predict with one of its "
                         f"runs instead: {path / 'sweep'}/RUN.") from None
    run = chosen if (chosen / MODEL_SPEC_FILE).is_file() else path / "sweep" / chosen.name  # the sweep was moved
    if not (run / MODEL_SPEC_FILE).is_file():
        raise UsageError(f"{path} holds a fine-tuning sweep whose chosen run ({chosen.name}) has no "
                         f"{MODEL_SPEC_FILE}; predict with one of its runs instead: {path / 'sweep'}/RUN.")
    log.info("sweep %s: predicting with the run chosen by validation accuracy, %s", path, run)
    return ResultFolder(FINETUNE, run.resolve(), via=f"run chosen by sweep {path}")
