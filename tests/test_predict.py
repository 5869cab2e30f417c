"""featx predict: new image files get the probe's own predictions and scores (the preprocessing, the
cut, the pooling and the float16 storage all reproduced), fine-tuned folders predict through their
classifier, CSV and folder inputs, top-k, unreadable images as rows, and bad input refused.

Tiny random-init ResNet-18 at 32 px on synthetic image files, features stored as float16 (the default).
"""

from __future__ import annotations

import csv
import io
import json
import logging
import shutil

import joblib
import numpy as np
import pytest
import torch
from typer.testing import CliRunner

import featx
from featx.cli import app, main
from featx.errors import DataError, UsageError

from .conftest import TINY, make_folder

CLASSES = ("cat", "dog", "owl")
FAST = {"progress": False, "workers": 0}


@pytest.fixture(scope="module")
def probed(tmp_path_factory):
    """(image root, float16 entry, probe results, results folder) of a logreg + k-NN probe on image files."""
    root = tmp_path_factory.mktemp("predict")
    images = make_folder(root / "images", n_per_class=8, classes=CLASSES)
    entry = featx.extract(f"folder:{images}", layers="layer2,pre_logits", cache_dir=root / "cache", workers=0,
                          **TINY)
    results = featx.probe(entry, heads="logreg,knn", out_dir=root / "probe", cache_dir=root / "cache", plots=False,
                          progress=False, jobs=1)
    return images, entry, results, root / "probe"


def cached_rows(entry, layer: str, ids) -> np.ndarray:
    """float32 features of the cache entry (what the probe trained on), in the order of ``ids``."""
    f = entry.load(layer)
    row = {str(i): k for k, i in enumerate(f.ids)}
    return f.X[[row[i] for i in ids]]


def invoke(args: list[str]):
    """``featx ARGS`` in this process; featx's logger is restored afterwards (the CLI points it at the
    runner's captured stderr, which closes)."""
    logger = logging.getLogger("featx")
    saved = (list(logger.handlers), logger.level, logger.propagate)
    try:
        return CliRunner().invoke(app, args)
    finally:
        logger.handlers[:], logger.level, logger.propagate = saved


# ------------------------------------------------------------------------------ the probe's own answers


def test_a_held_back_test_file_gets_the_probes_test_prediction_and_scores(probed):
    images, entry, results, folder = probed
    assert entry.config["dtype"] == "float16"
    pred = results.predictions
    probe_test = {str(i): entry.classes[int(p)] for i, p in zip(pred.ids[pred.test], pred.test_pred(results.best))}
    one = "test/dog/img003.png"
    table = featx.predict(folder, images / one, **FAST)
    assert table.ids == [str(images / one)] and table.errors == [""]
    assert table.predicted == [probe_test[one]]

    table = featx.predict(folder, images / "test", **FAST)  # every held-back image, by folder
    ids = [f"test/{i}" for i in table.ids]
    assert sorted(ids) == sorted(probe_test) and len(ids) == 24
    assert table.predicted == [probe_test[i] for i in ids]
    head = joblib.load(folder / "best_head.joblib")
    X = cached_rows(entry, results.best["layer"], ids)
    assert table.score_kind == "probability" and table.classes == [entry.classes[c] for c in head.classes_]
    np.testing.assert_allclose(table.scores, head.predict_proba(X), rtol=0, atol=1e-6)
    assert table.source["layer"] == results.best["layer"] and table.source["head"] == results.best["head"]


def test_in_memory_datasets_are_resized_as_their_tensor_engine_did(tmp_path):
    """Digits are resized in batches as tensors, not by PIL; saved as PNG files, they get the cached features
    (PIL's resize would differ by a grey level, here about 1e-5 in probability)."""
    from PIL import Image

    from featx.data.sources import load_digits_source

    entry = featx.extract("digits", layers="layer1", limit=200, workers=0, **TINY)
    assert entry.config["preprocessing"]["resize_engine"] == "tensor"
    featx.probe(entry, heads="logreg", out_dir=tmp_path / "probe", plots=False, progress=False, jobs=1)
    f = entry.load("layer1")
    pixels = load_digits_source().images
    files = []
    for sample_id in f.ids[:5]:
        files.append(tmp_path / f"{sample_id}.png")
        Image.fromarray(pixels[int(sample_id)]).save(files[-1])
    table = featx.predict(tmp_path / "probe", files, **FAST)
    head = joblib.load(tmp_path / "probe" / "best_head.joblib")
    np.testing.assert_allclose(table.scores, head.predict_proba(f.X[:5]), rtol=0, atol=1e-7)


def test_heads_without_probabilities_report_decision_scores(probed, tmp_path):
    images, entry, results, _ = probed
    featx.probe(entry, heads="linsvm", layers="pre_logits", out_dir=tmp_path / "svm", plots=False, progress=False,
                jobs=1)
    table = featx.predict(tmp_path / "svm", images / "test" / "owl", top_k=2, **FAST)
    head = joblib.load(tmp_path / "svm" / "best_head.joblib")
    X = cached_rows(entry, "pre_logits", [f"test/owl/{i}" for i in table.ids])
    assert table.score_kind == "decision" and "top1_decision" in table.columns()
    np.testing.assert_allclose(table.scores, head.decision_function(X), rtol=1e-5, atol=1e-5)
    assert table.predicted == [entry.classes[c] for c in head.predict(X)]


def test_csv_and_folder_inputs_top_k_and_unreadable_rows(probed, tmp_path):
    images, entry, results, folder = probed
    flat = tmp_path / "flat"  # no class folders, no labels
    flat.mkdir()
    shutil.copy(images / "test" / "cat" / "img001.png", flat / "x.png")
    (flat / "broken.png").write_bytes(b"not an image")
    listing = tmp_path / "lists" / "new.csv"
    listing.parent.mkdir()
    listing.write_text(f"image\n{images / 'test' / 'owl' / 'img002.png'}\n../flat/x.png\nmissing.png\n")
    out = tmp_path / "preds" / "p.csv"

    run = invoke(["predict", str(folder), str(flat), f"csv:{listing}", "--out", str(out), "--top-k", "9",
                  "--workers", "0", "--no-progress"])
    assert run.exit_code == 0, run.output
    rows = list(csv.DictReader(io.StringIO(out.read_text())))
    assert [r["id"] for r in rows] == ["broken.png", "x.png", str(images / "test" / "owl" / "img002.png"),
                                       "../flat/x.png", "missing.png"]
    assert rows[3]["path"] == str(listing.parent / "../flat/x.png")
    assert rows[0]["error"].startswith("not a recognised image format") and rows[0]["prediction"] == ""
    assert rows[4]["error"] == "file not found"
    assert list(rows[1]) == ["id", "path", "prediction", "top1", "top1_probability", "top2", "top2_probability",
                             "top3", "top3_probability", "error"]  # top-9 capped at the 3 classes
    for r in (rows[1], rows[2], rows[3]):
        scores = [float(r[f"top{k}_probability"]) for k in (1, 2, 3)]
        assert scores == sorted(scores, reverse=True) and sum(scores) == pytest.approx(1, abs=1e-4)
        assert sorted(r[f"top{k}"] for k in (1, 2, 3)) == sorted(CLASSES) and r["top1"] == r["prediction"]
    assert rows[1]["top1_probability"] == rows[3]["top1_probability"]  # one file named twice
    assert "2 image(s) could not be read" in run.output

    printed = invoke(["predict", str(folder), str(flat / "x.png"), "--out", "-", "--top-k", "1", "--workers", "0",
                      "--no-progress"])
    assert printed.exit_code == 0 and printed.stdout.splitlines() == [
        "id,path,prediction,top1,top1_probability,error",
        f"{flat / 'x.png'},{flat / 'x.png'},{rows[1]['prediction']},{rows[1]['top1']},{rows[1]['top1_probability']},"]


def test_the_default_output_is_a_table(probed):
    images, _, _, folder = probed
    shown = invoke(["predict", str(folder), str(images / "test" / "dog" / "img000.png"), "--workers", "0",
                    "--no-progress"])
    assert shown.exit_code == 0, shown.output
    assert "img000.png" in shown.stdout and "top-3 classes (probability)" in shown.stdout


def test_a_comparison_predicts_with_its_leader(probed, tmp_path):
    images, entry, results, folder = probed
    compare = tmp_path / "compare"
    shutil.copytree(folder, compare / "models" / "tiny")
    (compare / ".featx-result.json").write_text(json.dumps({"kind": "comparison"}))
    (compare / "comparison.json").write_text(json.dumps({"leader": {"model": "tiny", "results": "models/tiny"}}))
    led = featx.predict(compare, images / "test" / "cat", **FAST)
    assert "leader tiny" in led.source["via"] and led.source["results"] == str(compare / "models" / "tiny")
    head = joblib.load(folder / "best_head.joblib")
    X = cached_rows(entry, results.best["layer"], [f"test/cat/{i}" for i in led.ids])
    np.testing.assert_allclose(led.scores, head.predict_proba(X), rtol=0, atol=1e-6)


# ------------------------------------------------------------------------------ fine-tuned networks


def test_a_finetuned_folder_predicts_through_its_own_classifier(probed, tmp_path):
    images, _, _, folder = probed
    run = tmp_path / "ft"
    featx.finetune(folder, epochs=1, batch_size=16, augment=False, out_dir=run, **FAST)
    table = featx.predict(run, images / "test", top_k=3, **FAST)
    assert table.source["kind"] == "finetune" and table.score_kind == "probability" and table.n_ok == 24

    # independently: the fine-tuned network re-extracted at its head's input, then its linear head
    again = featx.extract(f"folder:{images}", model=f"finetuned:{run}", layers="pre_logits", dtype="float32",
                          cache_dir=tmp_path / "cache", workers=0, **{k: v for k, v in TINY.items() if k != "model"})
    X = cached_rows(again, "pre_logits", [f"test/{i}" for i in table.ids])
    state = torch.load(run / "model.pt", weights_only=True)
    logits = torch.from_numpy(X).double() @ state["head.weight"].double().T + state["head.bias"].double()
    np.testing.assert_allclose(table.scores, torch.softmax(logits, 1).numpy(), atol=1e-5)
    assert table.predicted == [table.classes[i] for i in logits.argmax(1).tolist()]

    sweep = tmp_path / "sweep"  # a sweep predicts with the run it chose (found by name when the sweep moved)
    shutil.copytree(run, sweep / "sweep" / "lr=0.001")
    (sweep / ".featx-result.json").write_text(json.dumps({"kind": "finetune-sweep"}))
    (sweep / "sweep.json").write_text(json.dumps({"chosen": {"out_dir": "/elsewhere/sweep/lr=0.001"}}))
    chosen = featx.predict(sweep, images / "test" / table.ids[0], **FAST)
    assert "chosen by sweep" in chosen.source["via"]
    np.testing.assert_allclose(chosen.scores[0], table.scores[0], rtol=0, atol=1e-6)  # batch of 1, not 16


# ------------------------------------------------------------------------------ bad input


def test_bad_input_is_refused_with_what_would_be_valid(probed, tmp_path):
    images, _, _, folder = probed
    one = images / "test" / "cat" / "img000.png"
    with pytest.raises(UsageError, match="does not exist. Valid: the output folder of featx probe"):
        featx.predict(tmp_path / "nope", one)
    (tmp_path / "notes").mkdir()
    (tmp_path / "notes" / "todo.txt").write_text("x")
    with pytest.raises(UsageError, match="holds no featx result"):
        featx.predict(tmp_path / "notes", one)
    headless = tmp_path / "headless"
    shutil.copytree(folder, headless)
    (headless / "best_head.joblib").unlink()
    with pytest.raises(UsageError, match="without its head"):
        featx.predict(headless, one)
    unfinished = tmp_path / "unfinished"
    unfinished.mkdir()
    (unfinished / ".featx-result.json").write_text(json.dumps({"kind": "finetune"}))
    with pytest.raises(UsageError, match="unfinished fine-tuning run"):
        featx.predict(unfinished, one)
    with pytest.raises(UsageError, match="Image path.* not found: 'nope.png'"):
        featx.predict(folder, [one, "nope.png"])
    (tmp_path / "empty").mkdir()
    with pytest.raises(UsageError, match="No images found"):
        featx.predict(folder, tmp_path / "empty")
    (tmp_path / "labels.csv").write_text("label,split\ncat,test\n")
    with pytest.raises(UsageError, match="header without a path column"):
        featx.predict(folder, tmp_path / "labels.csv")
    with pytest.raises(UsageError, match="--top-k must be a positive integer"):
        featx.predict(folder, one, top_k=0)
    with pytest.raises(UsageError, match="is a folder"):
        featx.predict(folder, one, out=tmp_path)

    (tmp_path / "bad.png").write_bytes(b"\x89PNG garbage")
    with pytest.raises(DataError, match="None of the 1 image"):
        featx.predict(folder, tmp_path / "bad.png", out=tmp_path / "p.csv", **FAST)
    assert not (tmp_path / "p.csv").exists()


def test_command_line_exit_codes(probed, capsys):
    _, _, _, folder = probed
    logger = logging.getLogger("featx")
    saved = (list(logger.handlers), logger.level, logger.propagate)
    try:
        with pytest.raises(SystemExit) as exited:
            main(["predict", str(folder), "missing.png"])
    finally:
        logger.handlers[:], logger.level, logger.propagate = saved
    assert exited.value.code == 2
    assert "Image path(s) not found: 'missing.png'" in capsys.readouterr().err
