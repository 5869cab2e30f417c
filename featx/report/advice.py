"""Plain-words advice from the accuracy-vs-depth curve.

It follows the classic transfer-learning guidance (Yosinski et al. 2014; the CS231n notes):
features from the top of the network suit data similar to the pretraining set, especially
when it is small; when accuracy peaks early and the top layers lose ground, the data
differs, and fine-tuning from the peak layer on (with the layers below frozen) is the next
step; the more data per class, the more of the network can be fine-tuned without overfitting.
"""

from __future__ import annotations

from ..evaluation import val_score

SIGNIFICANT_DROP = 0.005  # half a point of validation accuracy


def recommend(rows: list[dict], best: dict, n_train: int, n_classes: int) -> str:
    head = best["head"]
    curve = sorted((r for r in rows if r["head"] == head), key=lambda r: r["order"])
    deepest = curve[-1]
    lo, hi = best["test_top1_ci"]
    lines = [
        f"Best: {head} on {best['layer']} (relative depth {best['depth']:.2f}), chosen on validation data; "
        f"test top-1 {best['test_top1']:.3f} (95% CI {lo:.3f}-{hi:.3f})."
    ]
    drop = val_score(best) - val_score(deepest)
    if best["layer"] == deepest["layer"] or drop < SIGNIFICANT_DROP:
        lines.append(
            "Accuracy keeps rising to the top of the network: the pretrained features suit these images. "
            f"Use the {best['layer']} features with a {head} head; fine-tuning would mainly adapt the last blocks."
        )
    else:
        lines.append(
            f"Accuracy peaks at {best['layer']} and the deepest layer ({deepest['layer']}) loses "
            f"{100 * drop:.1f} points (validation): the top of the network is specialised to its pretraining "
            "classes, a sign that these images differ from them. "
            f"Fine-tune from {best['layer']} on (featx finetune RESULTS_DIR), keeping the layers below it "
            "frozen, or use its features directly."
        )
    per_class = n_train / max(1, n_classes)
    if per_class < 100:
        lines.append(
            f"With about {per_class:.0f} training images per class, prefer frozen features and a simple head; "
            "fine-tuning many layers on so little data tends to overfit."
        )
    elif per_class >= 1000:
        lines.append(
            f"With about {per_class:.0f} training images per class there is enough data to fine-tune "
            "the network end to end from the chosen layer."
        )
    linear = next((r for r in rows if r["layer"] == best["layer"] and r["head"] == "logreg"), None)
    if linear is not None and head != "logreg":
        gain = best["test_top1"] - linear["test_top1"]
        if gain >= 0.01:
            lines.append(
                f"A non-linear head gains {100 * gain:.1f} points over logistic regression at this layer: the classes "
                "are not linearly separable there, which fine-tuning usually fixes."
            )
    others = [r for r in rows if r["layer"] != best["layer"] and r["head"] == head]
    close = [r["layer"] for r in others if r["test_top1_ci"][1] >= lo]
    if close:
        lines.append(
            "Within the test set's 95% interval of the best: " + ", ".join(close)
            + " (not clearly worse; prefer the shallower or cheaper one if it matters)."
        )
    return " ".join(lines)
