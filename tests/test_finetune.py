"""Fine-tuning: LP-FT step 0 equals the probe, freezing is exact, resume is bit-identical,
sweeps tabulate, fine-tuned models extract again, and bad input is refused before any write.

Tiny random-init ResNet-18 at 32 px on a few dozen synthetic images; the probe result is
produced the way ``featx probe`` writes it (results.json + linear_head.npz).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from sklearn.linear_model import LogisticRegression
from sklearn.pipeline import Pipeline
from sklearn.preprocessing import StandardScaler

import featx
from featx._runtime import resolve_device
from featx.backbones.registry import build_model, describe_model, parse_model
from featx.cache.key import file_digest
from featx.errors import UnknownLayerError, UsageError, WeightsMismatchError
from featx.finetuning import finetune, format_table, parse_sweep
from featx.finetuning.data import LabelledImages
from featx.finetuning.freeze import FreezeSchedule, block_groups
from featx.finetuning.options import TrainOptions
from featx.finetuning.plan import plan_explicit, plan_from_results
from featx.finetuning.train import Trainer, build_network, predict
from featx.probing.linear_head import LinearHead
from featx.probing.protocol import assign_splits

from .conftest import REPO, TINY_MODEL, make_folder

CLASSES = ("cat", "dog", "owl")
TINY_FT = {"model": TINY_MODEL, "weights": "none", "image_size": 32, "progress": False, "workers": 0,
           "batch_size": 16}
CPU = resolve_device("cpu")


# ------------------------------------------------------------------------------ fixtures


def write_probe_result(directory: Path, entry, layer: str, seed: int = 0, with_head: bool = True) -> Path:
    """A probe result as ``featx probe`` writes it: logistic regression on the train rows of one
    layer (scaler fitted on training rows only), test once, results.json + linear_head.npz."""
    directory.mkdir(parents=True, exist_ok=True)
    f = entry.load(layer)
    splits = assign_splits(f.y, f.split, seed)
    pipe = Pipeline([("scaler", StandardScaler()), ("clf", LogisticRegression(C=1.0, max_iter=5000))])
    pipe.fit(f.X[splits.train], f.y[splits.train])
    test_pred = pipe.predict(f.X[splits.test])
    top1 = float((test_pred == f.y[splits.test]).mean())
    if with_head:
        meta = {"entry_key": entry.key, "test_ids": [str(i) for i in f.ids[splits.test]],
                "test_pred": [int(p) for p in test_pred]}
        LinearHead.from_pipeline(pipe, layer, len(entry.classes), meta=meta).save(directory)
    results = {
        "entry": {"key": entry.key, "path": str(entry.path), "model": entry.model, "dataset": entry.dataset,
                  "config": entry.config},
        "protocol": {"seed": seed, "splits": splits.describe()},
        "best": {"layer": layer, "head": "logreg", "test_top1": top1},
        "rows": [{"layer": layer, "head": "logreg", "test_top1": top1}],
    }
    (directory / "results.json").write_text(json.dumps(results))
    return directory


@pytest.fixture(scope="module")
def images(tmp_path_factory) -> Path:
    return make_folder(tmp_path_factory.mktemp("ft") / "images", n_per_class=16, classes=CLASSES)


@pytest.fixture(scope="module")
def probe(tmp_path_factory, images):
    """(results dir, float32 cache entry, layer) of a logistic probe on layer3."""
    root = tmp_path_factory.mktemp("probe")
    entry = featx.extract(f"folder:{images}", model=TINY_MODEL, weights="none", image_size=32, layers="layer3",
                          dtype="float32", progress=False, cache_dir=root / "cache")
    return write_probe_result(root / "results", entry, "layer3"), entry, "layer3"


@pytest.fixture(scope="module")
def frozen_run(tmp_path_factory, images):
    """One epoch of explicit fine-tuning with everything below layer2 frozen; random weights, so
    the trained blocks' batch norms learn the new statistics (``bn_stats="auto"`` -> update)."""
    out = tmp_path_factory.mktemp("frozen") / "run"
    result = finetune(f"folder:{images}", layer="layer3", freeze_below="layer2", epochs=1, out_dir=out, **TINY_FT)
    return result, out


def snapshot(directory: Path) -> dict[str, bytes]:
    return {str(p.relative_to(directory)): p.read_bytes() for p in sorted(directory.rglob("*")) if p.is_file()}


def random_init_resnet18() -> dict[str, torch.Tensor]:
    return build_model(describe_model(parse_model(TINY_MODEL, weights="none")), image_size=32).state_dict()


# ------------------------------------------------------------------------------ LP-FT


def test_lpft_step_zero_reproduces_the_probes_test_predictions(probe):
    results, entry, layer = probe
    plan = plan_from_results(results, head_init="lpft")
    net = build_network(plan, TrainOptions(head_init="lpft").with_defaults())
    images = LabelledImages(plan.source, plan.pre)
    logits, labels, ok = predict(net, images, plan.test, 16, CPU, plan.pre.normalizer(CPU.torch_device))

    head = LinearHead.load(results)
    features = entry.load(layer)
    row = {sample_id: i for i, sample_id in enumerate(features.ids)}
    test_rows = [row[sample_id] for sample_id in plan.source.ids[plan.test]]
    assert ok.all() and len(logits) == len(head.meta["test_ids"]) > 0
    assert sorted(plan.source.ids[plan.test]) == sorted(head.meta["test_ids"])
    # the probe's own logits on the cached features, computed in float64 with the scaler unfolded
    standardised = (features.X[test_rows] - head.mean) / head.scale
    probe_logits = np.full((len(test_rows), head.n_classes), -1e4)
    probe_logits[:, head.labels] = standardised @ head.coef.T + head.intercept
    np.testing.assert_allclose(logits, probe_logits, rtol=1e-4, atol=1e-3)
    predicted = dict(zip(head.meta["test_ids"], head.meta["test_pred"]))
    assert logits.argmax(1).tolist() == [predicted[i] for i in plan.source.ids[plan.test]]

    # in training mode too, with batch norm statistics frozen (the default for pretrained weights)
    FreezeSchedule(tuple(block_groups(net, plan.ladder)), bn_stats="frozen").apply(net, epoch=0)
    assert net.training
    x = plan.pre.normalizer(CPU.torch_device)(torch.stack([images[(int(i), 0)][0] for i in plan.test]))
    with torch.no_grad():
        np.testing.assert_allclose(net(x).numpy(), probe_logits, rtol=1e-4, atol=1e-3)


def test_lpft_run_starts_from_the_probe_and_compares_with_it(probe, tmp_path):
    results, entry, layer = probe
    r = finetune(results, epochs=1, out_dir=tmp_path / "lpft", progress=False, workers=0, batch_size=16,
                 bn_stats="frozen")  # a probe result as the first argument, as featx finetune RESULTS_DIR
    assert r.head_init == "lpft" and r.layer == layer
    # epoch 0 = the probe's head on the validation rows of the cached features
    head = LinearHead.load(results)
    f = entry.load(layer)
    plan = plan_from_results(results)
    rows = {sample_id: i for i, sample_id in enumerate(f.ids)}
    val = [rows[i] for i in plan.source.ids[plan.val]]
    expected = float((head.logits(f.X[val]).argmax(1) == f.y[val]).mean())
    assert r.history[0]["epoch"] == 0 and r.history[0]["val_top1"] == pytest.approx(expected)
    saved = json.loads((tmp_path / "lpft" / "finetune.json").read_text())
    probe_top1 = json.loads((results / "results.json").read_text())["best"]["test_top1"]
    assert saved["probe"]["logreg_test_top1"] == probe_top1
    assert saved["probe"]["delta_top1_vs_logreg"] == pytest.approx(saved["test"]["test_top1"] - probe_top1)
    lo, hi = saved["test"]["test_top1_ci"]
    assert lo <= saved["test"]["test_top1"] <= hi
    assert {"curves.png", "model.pt", "model.json", "finetune.json"} <= set(os.listdir(tmp_path / "lpft"))
    assert not (tmp_path / "lpft" / "checkpoint.pt").exists()
    # batch norm keeps its running statistics (the default for pretrained weights): training sees
    # the features the probe saw
    before, after = random_init_resnet18(), torch.load(tmp_path / "lpft" / "model.pt", weights_only=True)
    stats = [k for k in after if k.endswith(("running_mean", "running_var", "num_batches_tracked"))]
    assert stats and all(torch.equal(after[k], before[k.removeprefix("backbone.")]) for k in stats)
    assert not torch.equal(after["backbone.layer3.1.conv2.weight"], before["layer3.1.conv2.weight"])


# ------------------------------------------------------------------------------ freezing


def test_frozen_blocks_and_their_batchnorm_statistics_stay_bit_identical(frozen_run):
    result, out = frozen_run
    before = random_init_resnet18()
    after = {k.removeprefix("backbone."): v for k, v in torch.load(out / "model.pt", weights_only=True).items()
             if k.startswith("backbone.")}
    frozen = ("conv1.", "bn1.", "layer1.", "layer2.0.")  # every block below layer2 (= layer2.1)
    trained = ("layer2.1.", "layer3.")
    assert not any(k.startswith(("layer4.", "fc.")) for k in after)  # cut: deeper blocks are dropped
    for name, value in after.items():
        if name.startswith(frozen):
            assert torch.equal(value, before[name]), f"{name} changed although frozen"
    for prefix in trained:
        assert any(not torch.equal(after[k], before[k]) for k in after if k.startswith(prefix) and "weight" in k)
        stats = [k for k in after if k.startswith(prefix) and k.endswith("running_mean")]
        assert stats and all(not torch.equal(after[k], before[k]) for k in stats), f"{prefix} BN stats unchanged"
    assert result.history[1]["trainable_blocks"] == ["layer2", "layer3.0", "layer3"]
    assert result.config["training"]["bn_stats"] == "update"  # auto, for random weights


def test_gradual_unfreezing_opens_one_block_per_epoch_from_the_top(images):
    plan = plan_explicit(f"folder:{images}", model=TINY_MODEL, weights="none", image_size=32, layer="layer2")
    opts = TrainOptions(epochs=3, head_warmup_epochs=1, unfreeze="gradual", head_init="random",
                        patience=None).with_defaults()
    trainer = Trainer(plan, opts, CPU, batch_size=16, workers=0, progress=False)
    assert [g.name for g in trainer.groups] == ["conv1", "bn1", "layer1.0", "layer1", "layer2.0", "layer2"]

    def backbone():
        return {k: v.clone() for k, v in trainer.net.state_dict().items() if k.startswith("backbone.")}

    def block(key):  # backbone.layer2.1.conv1.weight -> layer2.1; backbone.bn1.running_mean -> bn1
        parts = key.split(".")[1:]
        return ".".join(parts[:2]) if parts[0].startswith("layer") else parts[0]

    def changed(a, b):
        return {block(k) for k in a if not torch.equal(a[k], b[k])}

    start = backbone()
    head = trainer.net.head.weight.detach().clone()
    trainer.run_epoch()  # head only: the whole backbone, BN statistics included, stays as it was
    after_1 = backbone()
    assert changed(start, after_1) == set() and not torch.equal(head, trainer.net.head.weight)
    trainer.run_epoch()  # + the top block (layer2 = layer2.1)
    after_2 = backbone()
    assert changed(after_1, after_2) == {"layer2.1"}
    trainer.run_epoch()  # + the next one down (layer2.0); conv1, bn1, layer1 never train
    assert changed(after_2, backbone()) == {"layer2.0", "layer2.1"}
    assert [h["trainable_blocks"] for h in trainer.history] == [[], ["layer2"], ["layer2.0", "layer2"]]


# ------------------------------------------------------------------------------ resume

_RUN = """
import logging, sys
logging.basicConfig(level=logging.DEBUG, stream=sys.stderr, format="%(name)s %(message)s")
from featx.finetuning import finetune
finetune("folder:{images}", out_dir="{out}", layer="layer3", epochs=4, patience=None, model="timm:resnet18",
         weights="none", image_size=32, progress=False, workers=0, batch_size=16)
"""


@pytest.mark.slow
@pytest.mark.subprocess
def test_a_killed_run_resumes_to_bit_identical_weights(images, tmp_path):
    options = dict(layer="layer3", epochs=4, patience=None, **TINY_FT)
    killed = tmp_path / "killed"
    proc = subprocess.Popen([sys.executable, "-c", _RUN.format(images=images, out=killed)], cwd=REPO,
                            stderr=subprocess.PIPE, text=True, env={**os.environ, "PYTHONPATH": str(REPO)})
    try:
        deadline = time.time() + 300
        for line in proc.stderr:
            if "checkpoint written after epoch 1" in line:
                proc.send_signal(signal.SIGKILL)  # somewhere in epoch 2 (or just after it)
                break
            assert time.time() < deadline, "the run never wrote its first checkpoint"
    finally:
        proc.kill()
        proc.wait()
    assert (killed / "checkpoint.pt").is_file() and not (killed / "finetune.json").exists()

    before = snapshot(killed)
    with pytest.raises(UsageError, match=r"cannot resume.*lr"):
        finetune(f"folder:{images}", out_dir=killed, resume=True, lr=0.05, **options)
    assert snapshot(killed) == before  # a checkpoint of another configuration is left alone

    resumed = finetune(f"folder:{images}", out_dir=killed, resume=True, **options)
    assert resumed.resumed_at_epoch >= 1
    straight = finetune(f"folder:{images}", out_dir=tmp_path / "straight", **options)
    a = torch.load(killed / "model.pt", weights_only=True)
    b = torch.load(tmp_path / "straight" / "model.pt", weights_only=True)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    metrics = ("train_loss", "train_top1", "val_loss", "val_top1", "lr_head", "lr_backbone")
    assert [[h.get(m) for m in metrics] for h in resumed.history] == \
           [[h.get(m) for m in metrics] for h in straight.history]
    assert resumed.test == straight.test and resumed.fingerprint == straight.fingerprint

    again = finetune(f"folder:{images}", out_dir=killed, **options)  # the same command once more: nothing to do
    assert again.reused and again.test == resumed.test


# ------------------------------------------------------------------------------ sweep


def test_sweep_runs_the_grid_and_tabulates_validation_and_test(images, tmp_path):
    r = finetune(f"folder:{images}", layer="layer2", sweep="lr=1e-2,1e-3 epochs=1,2", patience=None,
                 out_dir=tmp_path / "sweep", **TINY_FT)
    assert [(row["lr"], row["epochs"]) for row in r.sweep] == [(0.01, 1), (0.01, 2), (0.001, 1), (0.001, 2)]
    for row in r.sweep:
        run = json.loads((Path(row["out_dir"]) / "finetune.json").read_text())
        assert len(run["history"]) == row["epochs"] + 1
        assert run["config"]["training"]["lr"] == row["lr"]
        vals = [h["val_top1"] for h in run["history"][1:]]
        assert row["best_epoch"] == 1 + vals.index(max(vals)) and row["val_top1"] == max(vals)
        assert row["test_top1"] == run["test"]["test_top1"]
    best = max(r.sweep, key=lambda row: row["val_top1"])
    assert r.best_val_top1 == best["val_top1"] and str(r.out_dir) == best["out_dir"]
    lines = r.sweep_table.splitlines()
    assert lines[0].split() == ["lr", "\\", "epochs", "epochs=1", "epochs=2"]
    assert [line.split()[0] for line in lines[2:4]] == ["lr=0.01", "lr=0.001"]
    cell = f"{r.sweep[3]['val_top1']:.4f} / {r.sweep[3]['test_top1']:.4f}"
    assert cell in lines[3]
    assert sum(line.count("*") for line in lines[2:4]) == 1
    assert json.loads((tmp_path / "sweep" / "sweep.json").read_text())["table"] == r.sweep_table


def test_sweep_specs_are_parsed_with_clear_errors():
    assert parse_sweep("lr=1e-2,1e-3 epochs=1,3,5") == {"lr": [0.01, 0.001], "epochs": [1, 3, 5]}
    assert parse_sweep({"backbone-lr-ratio": [0.1, 1]}) == {"backbone_lr_ratio": [0.1, 1.0]}
    for spec, message in [("lrr=1e-3", "Did you mean 'lr'"), ("lr=abc", "takes numbers"),
                          ("epochs=1.5", "whole numbers"), ("lr", "KEY=V1,V2"), ("lr=1 lr=2", "twice"),
                          ("seed=1,2", "cannot vary"), ("   ", "empty")]:
        with pytest.raises(UsageError, match=message):
            parse_sweep(spec)
    table = format_table([{"lr": 0.1, "val_top1": 0.5, "test_top1": 0.25}], {"lr": [0.1]})
    assert "0.5000 / 0.2500 *" in table


# ------------------------------------------------------------------------------ export


def test_finetuned_model_extracts_into_a_new_cache_entry(frozen_run, images, tmp_path):
    result, out = frozen_run
    base = featx.extract(f"folder:{images}", model=TINY_MODEL, weights="none", image_size=32, layers="layer3",
                         dtype="float32", progress=False)
    tuned = featx.extract(f"folder:{images}", model=f"finetuned:{out}", layers="auto", dtype="float32",
                          progress=False)
    assert tuned.key != base.key
    # backbone.layer3 is left out: the fine-tuned head averages it into pre_logits
    assert tuned.layer_names == ["backbone.act1", "backbone.layer1", "backbone.layer2", "backbone.layer3.0",
                                 "pre_logits"]
    identity = tuned.config["model"]
    assert identity["weights"] == {"kind": "finetuned", "digest": file_digest(out / "model.pt")}
    assert identity["base"] == base.config["model"] and identity["layer"] == "layer3"
    # pre_logits is the fine-tuned embedding: the saved head on it gives the saved model's predictions
    state = torch.load(out / "model.pt", weights_only=True)
    f = tuned.load("pre_logits")
    cached_logits = f.X @ state["head.weight"].numpy().T + state["head.bias"].numpy()
    model = build_model(describe_model(parse_model(f"finetuned:{out}")))
    plan = plan_explicit(f"folder:{images}", model=TINY_MODEL, weights="none", image_size=32, layer="layer3")
    logits, _, _ = predict(model, LabelledImages(plan.source, plan.pre), np.arange(len(plan.source)), 16, CPU,
                           plan.pre.normalizer(CPU.torch_device))
    np.testing.assert_allclose(cached_logits, logits, rtol=1e-4, atol=1e-4)
    assert not np.allclose(f.X, base.load("layer3").X)  # the backbone really changed

    tampered = tmp_path / "tampered"
    tampered.mkdir()
    for name in ("model.json", "model.pt"):
        (tampered / name).write_bytes((out / name).read_bytes())
    with open(tampered / "model.pt", "ab") as fh:
        fh.write(b"x")
    with pytest.raises(WeightsMismatchError, match="changed after fine-tuning"):
        describe_model(parse_model(f"finetuned:{tampered}"))


# ------------------------------------------------------------------------------ bad input


def test_lpft_without_a_logistic_head_is_refused(probe, tmp_path):
    results, entry, layer = probe
    bare = write_probe_result(tmp_path / "no-head", entry, layer, with_head=False)
    before = snapshot(bare)
    with pytest.raises(UsageError, match="no logistic-regression head.*--head-init random"):
        finetune(results=bare, epochs=1, progress=False)
    assert snapshot(bare) == before
    assert plan_from_results(bare, head_init="random").layer.name == layer  # plain fine-tuning still works
    with pytest.raises(UsageError, match="cannot be combined with a probe result"):
        finetune("digits", results=results, progress=False)
    with pytest.raises(UsageError, match="LP-FT starts from a probe"):
        finetune("digits", model=TINY_MODEL, layer="layer3", head_init="lpft", progress=False)


@pytest.mark.parametrize("options, error, message", [
    ({"layer": "layr3"}, UnknownLayerError, r"Did you mean 'layer3'.*featx layers timm:resnet18"),
    ({"lr": 0}, UsageError, r"--lr must be a positive number, got 0"),
    ({"lr": -1e-3}, UsageError, r"--lr must be a positive number"),
    ({"val_fraction": 0.0}, UsageError, r"validation split, which cannot be empty"),
    ({"val_fraction": 0.01}, UsageError, r"validation split would be empty: --val-fraction 0.01 of 48"),
    ({"freeze_below": "layer4"}, UsageError, r"deeper than the cut layer layer3"),
    ({"lr": 0.5}, UsageError, r"will not overwrite it \(training.lr: 0.001 -> 0.5\)"),
    ({"resume": True, "epochs": 2}, UsageError, r"cannot resume it \(training.epochs: 1 -> 2\)"),
    ({"sweep": "lr=1e-3,0"}, UsageError, r"--lr must be a positive number, got 0"),
])
def test_bad_input_gets_a_specific_message_and_overwrites_nothing(frozen_run, images, options, error, message):
    _, out = frozen_run
    before = snapshot(out)
    args = {"layer": "layer3", "freeze_below": "layer2", "bn_stats": "update", "epochs": 1, "out_dir": out, **TINY_FT,
            **options}
    with pytest.raises(error, match=message) as info:
        finetune(f"folder:{images}", **args)
    assert info.value.exit_code == 2
    assert snapshot(out) == before


def test_rerunning_a_finished_run_trains_nothing_and_changes_nothing(frozen_run, images):
    result, out = frozen_run
    before = snapshot(out)
    again = finetune(f"folder:{images}", layer="layer3", freeze_below="layer2", bn_stats="update", epochs=1,
                     out_dir=out, **TINY_FT)
    assert again.reused and again.test == result.test and again.fingerprint == result.fingerprint
    assert snapshot(out) == before
    with pytest.raises(UsageError, match="holds no checkpoint to resume"):
        finetune(f"folder:{images}", layer="layer3", epochs=1, out_dir=out.parent / "fresh", resume=True, **TINY_FT)
