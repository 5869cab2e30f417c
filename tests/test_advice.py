"""The advice: the four data-size x similarity scenarios, paired validation tests, exact commands."""

import numpy as np
import pytest

from featx.probing.runner import Predictions
from featx.report.advice import SMALL_PER_CLASS, finetune_command, recommend, scenario

N_VAL, N_CLASSES = 400, 4
LAYERS = [("stem", 0.1), ("middle", 0.5), ("top", 1.0)]


def _results(accuracies: dict[str, float], seed: int = 0):
    """Rows and predictions of one logreg head whose validation predictions hit ``accuracies``."""
    rng = np.random.default_rng(seed)
    y = rng.integers(0, N_CLASSES, N_VAL)
    rows, cells = [], {}
    for order, (name, depth) in enumerate(LAYERS):
        acc = accuracies[name]
        pred = y.copy()
        wrong = rng.permutation(N_VAL)[: round((1 - acc) * N_VAL)]
        pred[wrong] = (y[wrong] + 1) % N_CLASSES
        rows.append({"layer": name, "depth": depth, "order": order, "head": "logreg", "val_top1": acc,
                     "test_top1": acc, "test_top1_ci": [acc - 0.02, acc + 0.02]})
        cells[(name, "logreg")] = {"val_rows": np.arange(N_VAL), "val_pred": pred, "test_pred": pred}
    best = max(rows, key=lambda r: r["val_top1"])
    return rows, best, Predictions(np.arange(N_VAL).astype(str), y, np.arange(N_VAL), np.arange(N_VAL), cells)


RISING = {"stem": 0.6, "middle": 0.8, "top": 0.9}
PEAKED = {"stem": 0.6, "middle": 0.9, "top": 0.7}
SMALL, LARGE = 10 * N_CLASSES, 5000 * N_CLASSES


@pytest.mark.parametrize("curve, n_train, small, similar, command", [
    (RISING, SMALL, True, True, None),
    (PEAKED, SMALL, True, False, "featx finetune RES --freeze-below middle"),
    (RISING, LARGE, False, True, "featx finetune RES --full --freeze-below middle"),
    (PEAKED, LARGE, False, False, "featx finetune RES --full --freeze-below stem"),
])
def test_four_scenarios_and_their_commands(curve, n_train, small, similar, command):
    rows, best, pred = _results(curve)
    s = scenario(rows, best, n_train, N_CLASSES, pred)
    assert (s.small, s.similar) == (small, similar)
    text = recommend(rows, best, n_train, N_CLASSES, predictions=pred, results_dir="RES")
    assert f"Scenario: {s.name} data" in text
    if command is None:
        assert "featx finetune" not in text and "Keep the backbone frozen" in text
    else:
        assert command in text


def test_small_random_init_gap_means_different_data_even_when_accuracy_rises():
    rows, best, pred = _results(RISING)
    gap = {"gap": 0.01, "significant": False, "random_model": "m (random init)"}
    s = scenario(rows, best, LARGE, N_CLASSES, pred, baseline_gap=gap)
    assert not s.similar and "random" in " ".join(s.reasons)
    assert scenario(rows, best, LARGE, N_CLASSES, pred, baseline_gap={**gap, "gap": 0.3, "significant": True}).similar


def test_a_drop_the_validation_rows_cannot_resolve_is_no_evidence_of_different_data():
    rows, best, pred = _results({"stem": 0.6, "middle": 0.9, "top": 0.89})
    s = scenario(rows, best, LARGE, N_CLASSES, pred)
    assert s.similar and "not significantly worse" in " ".join(s.reasons)
    text = recommend(rows, best, LARGE, N_CLASSES, predictions=pred)
    assert "Not significantly worse than the best on the validation rows" in text and "top" in text


def test_size_threshold():
    rows, best, pred = _results(RISING)
    assert scenario(rows, best, (SMALL_PER_CLASS - 1) * N_CLASSES, N_CLASSES, pred).small
    assert not scenario(rows, best, SMALL_PER_CLASS * N_CLASSES, N_CLASSES, pred).small


def test_finetune_command_quotes_paths():
    assert finetune_command("my results/x", full=True, freeze_below="blocks.4") == \
        "featx finetune 'my results/x' --full --freeze-below blocks.4"


@pytest.mark.slow
def test_the_advised_command_runs_and_trains_what_the_text_says(tmp_path):
    """A real probe, advice for plenty of data: the printed command fine-tunes the full network
    with exactly the blocks from the named layer on trainable."""
    import json
    import logging
    import re
    import shlex

    from typer.testing import CliRunner

    import featx
    from featx.cli import app
    from featx.report.advice import next_steps

    from .conftest import TINY, make_folder

    images = make_folder(tmp_path / "imgs", n_per_class=8)
    entry = featx.extract(f"folder:{images}", layers="layer1,layer2,layer3,pre_logits", dtype="float32",
                          cache_dir=tmp_path / "cache", **TINY)
    res = featx.probe(entry, heads="logreg", out_dir=tmp_path / "probe", progress=False, jobs=1, plots=False,
                      cache_dir=tmp_path / "cache")
    text = " ".join(next_steps(res.rows, res.best, 10**6, len(entry.classes), predictions=res.predictions,
                               results_dir=tmp_path / "probe"))
    found = re.search(r"`(featx finetune \S+ --full --freeze-below ([^`]+))`", text)
    assert found, text
    command, layer = found.groups()
    logger = logging.getLogger("featx")
    saved = (list(logger.handlers), logger.level)
    try:
        run = CliRunner().invoke(app, shlex.split(command)[1:], env={"FEATX_CACHE_DIR": str(tmp_path / "cache")})
    finally:
        logger.handlers[:], logger.level = saved
    assert run.exit_code == 0, run.output
    (result,) = (tmp_path / "finetune").glob("*/finetune.json")
    network = json.loads(result.read_text())["network"]
    ladder = featx.layers(TINY["model"], image_size=32)
    start = ladder.select(layer)[0]
    blocks = [x.name for x in ladder.layers if x.hook == "output"]
    assert network["mode"] == "full" and network["freeze_below"] == layer
    assert network["trained_blocks"] == [b for b in blocks if ladder.select(b)[0].order >= start.order]
    assert network["trainable_parameters"] < network["total_parameters"]
