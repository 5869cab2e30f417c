"""Plain-words advice: which features to use, and whether and how to fine-tune.

It follows the classic transfer-learning guidance (Yosinski et al. 2014; the CS231n notes),
which turns on two questions:

- **How much labelled data?** Few images per class (below ``SMALL_PER_CLASS``) cannot train
  many weights without overfitting: keep the backbone frozen. Many can: fine-tune.
- **How similar are the images to the pretraining data?** Two signals answer it. The depth
  curve: when accuracy peaks below the top and the deepest layer is significantly worse on the
  validation rows, the top blocks are specialised to the pretraining classes. The pretrained
  against random-init gap (``featx compare --baseline``): when pretrained features barely beat
  random ones, little of the pretraining transfers.

That gives four scenarios: small & similar (a linear head on the top features), large &
similar (fine-tune the top blocks), small & different (a head on the best, earlier layer's
features), large & different (fine-tune most of the network from an early layer). Every
comparison of layers or backbones is a paired test on the validation rows (exact McNemar on
the same rows), never a comparison of overlapping test intervals, and every recommendation
names the command that carries it out.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..evaluation import val_score

SMALL_PER_CLASS = 200  # training images per class below which fine-tuning overfits more than it adapts
ALPHA = 0.05
#: pretrained features must beat random ones by this much (validation accuracy) to count as transferring
TRANSFER_GAP = 0.05


@dataclass(frozen=True)
class Scenario:
    """Where the data sits in the size x similarity grid, and why."""

    small: bool
    similar: bool
    reasons: tuple[str, ...]

    @property
    def name(self) -> str:
        return f"{'small' if self.small else 'large'} and {'similar' if self.similar else 'different'}"


def val_paired(predictions, a: dict, b: dict, seed: int = 0):
    """Paired test of two cells on the validation rows both were scored on, or None without them."""
    from ..comparison.stats import paired_comparison

    if predictions is None:
        return None
    ca, cb = predictions.cells.get((a["layer"], a["head"])), predictions.cells.get((b["layer"], b["head"]))
    if not ca or not cb or ca.get("val_pred") is None or cb.get("val_pred") is None:
        return None
    if len(ca["val_rows"]) == 0 or not np.array_equal(ca["val_rows"], cb["val_rows"]):
        return None
    truth = predictions.y[ca["val_rows"]]
    return paired_comparison(truth, ca["val_pred"], cb["val_pred"], seed=seed)


def scenario(rows: list[dict], best: dict, n_train: int, n_classes: int, predictions=None,
             baseline_gap: dict | None = None) -> Scenario:
    """The data's scenario from its size, the depth curve and (when measured) the random-init gap.

    ``baseline_gap``: ``{"gap": pretrained minus random validation accuracy, "significant": bool,
    "random_model": name}`` from ``featx compare --baseline``.
    """
    per_class = n_train / max(1, n_classes)
    reasons = [f"about {per_class:.0f} training images per class"]
    deepest = _curve(rows, best["head"])[-1]
    similar = True
    if deepest["layer"] != best["layer"]:
        test = val_paired(predictions, best, deepest)
        drop = val_score(best) - val_score(deepest)
        if test is not None and test.p_value < ALPHA:
            similar = False
            reasons.append(f"the deepest layer ({deepest['layer']}) is {100 * drop:.1f} points worse than "
                           f"{best['layer']} on the validation rows (paired McNemar p={test.p_value:.2g}): the top "
                           "blocks are specialised to the pretraining classes")
        elif test is None and drop >= 0.01:
            similar = False
            reasons.append(f"the deepest layer ({deepest['layer']}) is {100 * drop:.1f} points worse than "
                           f"{best['layer']} on validation data")
        else:
            reasons.append(f"the deepest layer is not significantly worse than {best['layer']} on the validation "
                           "rows")
    else:
        reasons.append("accuracy keeps rising to the top of the network")
    if baseline_gap is not None:
        gap = baseline_gap["gap"]
        if gap < TRANSFER_GAP or not baseline_gap.get("significant", True):
            similar = False
            reasons.append(f"pretrained features beat random ones ({baseline_gap['random_model']}) by only "
                           f"{100 * gap:.1f} points on validation data: little of the pretraining transfers")
        else:
            reasons.append(f"pretrained features beat random ones by {100 * gap:.1f} points on validation data")
    return Scenario(per_class < SMALL_PER_CLASS, similar, tuple(reasons))


def finetune_command(results_dir, *, full: bool, freeze_below: str | None = None) -> str:
    """The ``featx finetune`` command line that carries out a recommendation."""
    from ..finetuning.command import command_for

    return command_for(results_dir if results_dir is not None else "RESULTS_DIR", freeze_below, full=full)


def recommend(rows: list[dict], best: dict, n_train: int, n_classes: int, *, predictions=None,
              results_dir=None, baseline_gap: dict | None = None) -> str:
    """The best cell and what to do next, in plain words, with the command that does it."""
    lo, hi = best["test_top1_ci"]
    first = (f"Best: {best['head']} on {best['layer']} (relative depth {best['depth']:.2f}), chosen on validation "
             f"data; test top-1 {best['test_top1']:.3f} (95% CI {lo:.3f}-{hi:.3f}).")
    return " ".join([first, *next_steps(rows, best, n_train, n_classes, predictions=predictions,
                                        results_dir=results_dir, baseline_gap=baseline_gap)])


def next_steps(rows: list[dict], best: dict, n_train: int, n_classes: int, *, predictions=None,
               results_dir=None, baseline_gap: dict | None = None) -> list[str]:
    """The scenario, the recommendation with its command, and the layers that tie with the best."""
    head = best["head"]
    s = scenario(rows, best, n_train, n_classes, predictions, baseline_gap)
    lines = [f"Scenario: {s.name} data ({'; '.join(s.reasons)})."]
    curve = _curve(rows, head)
    if s.small and s.similar:
        lines.append(f"Keep the backbone frozen: use the {best['layer']} features with the {head} head "
                     "(best_head.joblib). With so few images per class, fine-tuning many weights tends to overfit.")
    elif s.small:
        lines.append(f"Keep the backbone frozen: use the {best['layer']} features, from below the specialised top "
                     f"blocks, with the {head} head (best_head.joblib). To adapt anything, cut after {best['layer']} "
                     "and train only its last block and the head: "
                     f"`{finetune_command(results_dir, full=False, freeze_below=best['layer'])}`.")
    elif s.similar:
        start = _freeze_point(curve, best)
        lines.append(f"There is enough data to adapt the network: fine-tune the full network with the general "
                     f"blocks below {start} frozen: `{finetune_command(results_dir, full=True, freeze_below=start)}`.")
    else:
        start = curve[0]["layer"]
        lines.append(f"There is enough data, and the images differ from the pretraining data: fine-tune most of the "
                     f"network, from {start} on: `{finetune_command(results_dir, full=True, freeze_below=start)}`. "
                     f"Or keep only what transfers, cutting after {best['layer']} (the blocks above it are "
                     f"dropped): `{finetune_command(results_dir, full=False)}`.")
    if head != "logreg":
        linear = next((r for r in rows if r["layer"] == best["layer"] and r["head"] == "logreg"), None)
        test = val_paired(predictions, best, linear) if linear is not None else None
        if test is not None and test.verdict == "a":
            lines.append(f"The {head} head beats logistic regression at this layer on the validation rows "
                         f"(+{100 * test.difference:.1f} points, p={test.p_value:.2g}): the classes are not linearly "
                         "separable there, which fine-tuning usually fixes.")
    close = _ties(rows, best, predictions)
    if close:
        lines.append("Not significantly worse than the best on the validation rows (paired McNemar, p >= 0.05): "
                     + ", ".join(close) + "; prefer the shallower or cheaper one if it matters.")
    return lines


def _freeze_point(curve: list[dict], best: dict) -> str:
    """Where fine-tuning of similar data starts: the best layer, or the middle of the network when
    the best is at the top (lower blocks hold general features, upper ones adapt)."""
    middle = next((r for r in curve if r["depth"] >= 0.5), curve[-1])
    return min(middle, best, key=lambda r: r["order"])["layer"]


def _curve(rows: list[dict], head: str) -> list[dict]:
    return sorted((r for r in rows if r["head"] == head), key=lambda r: r["order"])


def _ties(rows: list[dict], best: dict, predictions) -> list[str]:
    out = []
    for r in _curve(rows, best["head"]):
        if r["layer"] == best["layer"]:
            continue
        test = val_paired(predictions, best, r)
        if test is not None and test.p_value >= ALPHA:
            out.append(r["layer"])
    return out


def compare_advice(board: list[dict], probes: dict, root=None, seed: int = 0) -> str:
    """Which backbone to use: ranked on validation data, told apart by paired validation tests,
    with the random-init baselines as the measure of how much pretraining is worth.

    ``root``: the comparison folder, whose ``models/NAME`` result folders the commands name."""
    pretrained = [r for r in board if not r.get("baseline_of")]
    if not pretrained:
        return "Only random-init baselines were compared: nothing pretrained to recommend."
    lead = pretrained[0]
    res = probes[lead["model"]]
    lines = [f"Use {lead['model']}: {lead['head']} on {lead['layer']} has the best validation accuracy "
             f"({lead['val_top1']:.3f}; test top-1 {lead['test_top1']:.3f})."]
    same = [other for other in pretrained[1:]
            if (t := backbone_val_test(res, probes[other["model"]], seed)) is not None and t.p_value >= ALPHA]
    if same:
        cheapest = min([lead, *same], key=lambda r: (r.get("parameters") or 0, -(r.get("images_per_second") or 0)))
        lines.append("Not significantly different from it on the validation rows (paired McNemar): "
                     + ", ".join(r["model"] for r in same)
                     + (f"; {cheapest['model']} is the cheapest of these." if cheapest is not lead else "."))
    gap = None
    base = next((r for r in board if r.get("baseline_of") == lead["model"]), None)
    if base is not None:
        test = backbone_val_test(res, probes[base["model"]], seed)
        gap = {"gap": lead["val_top1"] - base["val_top1"], "significant": test is None or test.p_value < ALPHA,
               "random_model": base["model"]}
    folder = lead["results"] if root is None else str(Path(root) / lead["results"])
    n_train = len(res.predictions.train) if res.predictions is not None else res.protocol["splits"]["train"]
    lines += next_steps(res.rows, res.best, n_train, len(res.entry["classes"]), predictions=res.predictions,
                        results_dir=folder, baseline_gap=gap)
    return " ".join(lines)


def backbone_val_test(a, b, seed: int = 0):
    """Two backbones' best cells on the validation rows both were scored on (same protocol, same rows)."""
    from ..comparison.stats import paired_comparison

    pa, pb = a.predictions, b.predictions
    if pa is None or pb is None:
        return None
    ca, cb = pa.cells[(a.best["layer"], a.best["head"])], pb.cells[(b.best["layer"], b.best["head"])]
    if ca["val_pred"] is None or cb["val_pred"] is None or not np.array_equal(ca["val_rows"], cb["val_rows"]) \
            or not np.array_equal(pa.y, pb.y) or len(ca["val_rows"]) == 0:
        return None
    return paired_comparison(pa.y[ca["val_rows"]], ca["val_pred"], cb["val_pred"], seed=seed)
