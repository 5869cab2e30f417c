"""Full-network fine-tuning (``--full``): the network is kept to its top layer, exactly the ladder
blocks from the freeze layer on train (the blocks below keep their weights and BatchNorm
statistics bit for bit), a probe result's best layer is the default freeze point, the command
``command_for`` prints runs as printed, and bad combinations are refused before anything is written.

Tiny random-init ResNet-18 at 32 px on a few dozen synthetic images; the probe results are real
(``featx.probe`` on a real cache entry).
"""

from __future__ import annotations

import json
import logging
import shlex
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

import featx
from featx._runtime import resolve_device
from featx.backbones.registry import build_model, describe_model, parse_model
from featx.cli import app
from featx.errors import UsageError
from featx.finetuning import command_for, finetune
from featx.finetuning.freeze import parameter_summary, resolve_freeze_below
from featx.finetuning.full import full_network_options
from featx.finetuning.options import TrainOptions
from featx.finetuning.plan import plan_explicit, plan_from_results, top_layer
from featx.finetuning.train import Trainer

from .conftest import TINY, TINY_MODEL, make_folder

TINY_FT = {"model": TINY_MODEL, "weights": "none", "image_size": 32, "progress": False, "workers": 0,
           "batch_size": 16}
CPU = resolve_device("cpu")


# ------------------------------------------------------------------------------ helpers and fixtures


def owner(parameter: str, ladder):
    """The innermost ladder block holding a backbone parameter (``backbone.layer3.1.conv1.weight``)."""
    module = parameter.removeprefix("backbone.")
    blocks = [layer for layer in ladder.layers if layer.module and layer.hook == "output"
              and (module == layer.module or module.startswith(layer.module + "."))]
    assert blocks, f"{parameter} belongs to no ladder block"
    return max(blocks, key=lambda layer: len(layer.module))


def random_init_resnet18() -> dict[str, torch.Tensor]:
    return build_model(describe_model(parse_model(TINY_MODEL, weights="none")), image_size=32).state_dict()


def backbone_tensors(run: Path) -> dict[str, torch.Tensor]:
    return {k.removeprefix("backbone."): v for k, v in torch.load(run / "model.pt", weights_only=True).items()
            if k.startswith("backbone.")}


def snapshot(directory: Path) -> dict[str, bytes]:
    return {str(p.relative_to(directory)): p.read_bytes() for p in sorted(directory.rglob("*")) if p.is_file()}


def invoke(args: list[str]):
    """``featx ARGS`` in this process; the featx logger is restored afterwards (the CLI points it at
    the runner's captured stderr, which closes)."""
    logger = logging.getLogger("featx")
    saved = (list(logger.handlers), logger.level, logger.propagate)
    try:
        return CliRunner().invoke(app, args)
    finally:
        logger.handlers[:], logger.level, logger.propagate = saved[0], saved[1], saved[2]


@pytest.fixture(scope="module")
def images(tmp_path_factory) -> Path:
    return make_folder(tmp_path_factory.mktemp("full") / "images", n_per_class=8)


@pytest.fixture(scope="module")
def probes(tmp_path_factory, images):
    """Two real probe results of one cache entry: on layer2 and layer3 (best below the top), and on
    pre_logits alone (best = the top layer)."""
    root = tmp_path_factory.mktemp("probes")
    entry = featx.extract(f"folder:{images}", layers="layer2,layer3,pre_logits", dtype="float32",
                          cache_dir=root / "cache", **TINY)
    options = {"heads": "logreg", "progress": False, "jobs": 1, "cache_dir": root / "cache", "plots": False}
    featx.probe(entry, layers="layer2,layer3", out_dir=root / "probe", **options)
    featx.probe(entry, layers="pre_logits", out_dir=root / "probe-top", **options)
    return root / "probe", root / "probe-top"


@pytest.fixture(scope="module")
def cli_run(probes):
    """``featx finetune RESULTS --full`` exactly as ``command_for`` prints it: (command, CLI result, run folder)."""
    results, _ = probes
    command = command_for(results)
    args = shlex.split(command)
    assert args[:2] == ["featx", "finetune"] and "--freeze-below" not in args
    invoked = invoke(args[1:])
    assert invoked.exit_code == 0, f"{command}\n{invoked.output}\n{invoked.exception!r}"
    runs = list((results.parent / "finetune").glob("*/finetune.json"))
    assert len(runs) == 1
    return command, invoked, runs[0].parent


# ------------------------------------------------------------------------------ (1) exactly these blocks train


def test_full_network_trains_exactly_the_blocks_from_the_freeze_layer_on(images):
    plan = plan_explicit(f"folder:{images}", model=TINY_MODEL, weights="none", image_size=32, full=True)
    opts = full_network_options(plan, TrainOptions(epochs=2, patience=None, head_init="random"), "auto", None,
                                "layer3")
    assert (opts.head_init, opts.head_warmup_epochs, opts.freeze_below) == ("random", 1, "layer3")
    freeze = resolve_freeze_below(opts.freeze_below, plan.ladder, plan.layer, plan.model_name)
    trainer = Trainer(plan, opts, CPU, 16, 0, freeze, progress=False)
    net = trainer.net
    start = {k: v.clone() for k, v in net.state_dict().items()}

    trainer.run_epoch()  # the fresh head's warm-up: nothing else trains
    assert {n for n, p in net.named_parameters() if p.requires_grad} == {"head.weight", "head.bias"}
    assert all(torch.equal(v, start[k]) for k, v in net.state_dict().items() if k.startswith("backbone."))
    trainer.run_epoch()
    for name, param in net.named_parameters():
        expected = name.startswith("head.") or owner(name, plan.ladder).order >= freeze.order
        assert param.requires_grad == expected, f"{name}: requires_grad {param.requires_grad}"
    # the ladder's blocks, spelled out: layer3 is layer3.1 (featx layers names a stage by its last block)
    frozen_prefixes = ("backbone.conv1.", "backbone.bn1.", "backbone.layer1.", "backbone.layer2.", "backbone.layer3.0.")
    assert all(not p.requires_grad for n, p in net.named_parameters() if n.startswith(frozen_prefixes))
    assert all(p.requires_grad for n, p in net.named_parameters()
               if n.startswith(("backbone.layer3.1.", "backbone.layer4.", "head.")))
    assert [h["trainable_blocks"] for h in trainer.history] == [[], ["layer3", "layer4.0", "layer4"]]

    summary = parameter_summary(net, trainer.schedule, 2)
    assert summary["trainable"] == sum(p.numel() for p in net.parameters() if p.requires_grad)
    assert summary["total"] == sum(p.numel() for p in net.parameters()) > summary["trainable"]
    assert summary["trained_blocks"] == ["layer3", "layer4.0", "layer4"]

    after = {k.removeprefix("backbone."): v for k, v in net.state_dict().items() if k.startswith("backbone.")}
    before = {k.removeprefix("backbone."): v for k, v in start.items() if k.startswith("backbone.")}
    assert before.keys() == random_init_resnet18().keys() - {"fc.weight", "fc.bias"}  # nothing cut but the classifier
    frozen = [k for k in after if owner(k, plan.ladder).order < freeze.order]
    assert {k.split(".")[0] for k in frozen} == {"conv1", "bn1", "layer1", "layer2", "layer3"}
    for name in frozen:  # weights, BatchNorm running statistics and batch counters alike
        assert torch.equal(after[name], before[name]), f"{name} changed although frozen"
    assert any(k.endswith("running_var") for k in frozen)
    for block in ("layer3.1.", "layer4.0.", "layer4.1."):  # random weights: their batch norms learn (bn_stats auto)
        assert any(not torch.equal(after[k], before[k]) for k in after if k.startswith(block) and k.endswith("weight"))
        stats = [k for k in after if k.startswith(block) and k.endswith("running_mean")]
        assert stats and all(not torch.equal(after[k], before[k]) for k in stats), f"{block} BN stats unchanged"


# ------------------------------------------------------------------------------ (2) nothing is cut


def test_full_network_keeps_the_layers_above_the_freeze_point(cli_run):
    _, _, out = cli_run
    ladder = featx.layers(TINY_MODEL, image_size=32)
    top = top_layer(ladder)
    assert top.name == "pre_logits" and json.loads((out / "finetune.json").read_text())["layer"] == "pre_logits"
    assert any(k.startswith("layer4.") for k in backbone_tensors(out))  # a cut at layer2 or layer3 drops layer4
    model = build_model(describe_model(parse_model(f"finetuned:{out}")))
    with torch.no_grad():
        features = model.features(torch.randn(2, 3, 32, 32))
    assert features.shape == (2, top.raw_shape[0]) == (2, 512)  # layer3 would give 256, layer2 128
    assert model.head.in_features == 512


# ------------------------------------------------------------------------------ (3) from a probe result


def test_the_printed_command_freezes_below_the_probes_best_layer(probes, cli_run):
    results, _ = probes
    command, invoked, out = cli_run
    best = json.loads((results / "results.json").read_text())["best"]["layer"]
    assert best in ("layer2", "layer3")
    assert out.name.startswith(f"probe-full-from-{best}-random-")
    saved = json.loads((out / "finetune.json").read_text())
    network = saved["network"]
    assert network["mode"] == "full" and network["freeze_below"] == best and network["head_layer"] == "pre_logits"
    assert saved["config"]["training"]["freeze_below"] == best
    # the probe's logistic head was fitted on its best layer: never put on pre_logits; a fresh head warms up
    assert network["head"]["init"] == "random" and network["head"]["warmup_epochs"] == 1
    assert f"fitted on {best}, not on pre_logits" in network["head"]["start"]
    assert saved["history"][1]["trainable_blocks"] == []
    ladder = featx.layers(TINY_MODEL, image_size=32)
    first = ladder.select(best)[0]
    from_best = [layer.name for layer in ladder.layers if layer.order >= first.order and layer.hook == "output"]
    assert saved["history"][2]["trainable_blocks"] == network["trained_blocks"] == from_best
    assert from_best[0] == best and from_best[-1] == "layer4"
    model = build_model(describe_model(parse_model(f"finetuned:{out}")))
    trainable = sum(p.numel() for n, p in model.named_parameters()
                    if n.startswith("head.") or owner(n, ladder).order >= first.order)
    assert network["trainable_parameters"] == trainable
    assert network["total_parameters"] == sum(p.numel() for p in model.parameters()) > trainable
    assert saved["probe"]["layer"] == best  # compared with the probe where the probe was best
    text = " ".join(invoked.output.split())
    assert f"fine-tuned the full network, frozen below {best}" in text
    assert f"trainable parameters: {trainable:,} of {network['total_parameters']:,}" in text

    explicit = shlex.split(command_for(results, best))  # naming the default changes nothing: the same run
    assert explicit[-2:] == ["--freeze-below", best]
    again = invoke(explicit[1:])
    assert again.exit_code == 0 and "found finished on disk" in again.output


def test_command_text_is_quoted_for_the_shell():
    assert command_for("featx-results/my probe", "blocks.4") == \
        "featx finetune 'featx-results/my probe' --full --freeze-below blocks.4"
    assert command_for("r", full=False) == "featx finetune r"
    with pytest.raises(UsageError, match="must name a layer"):
        command_for("r", " ")


def test_a_probe_head_on_the_top_layer_starts_the_full_network(probes):
    _, top_results = probes
    plan = plan_from_results(top_results, head_init="auto", full=True)
    assert plan.head is not None and plan.head.layer == plan.layer.name == "pre_logits"
    opts = full_network_options(plan, TrainOptions(), "auto", None, "layer3")
    assert (opts.head_init, opts.head_warmup_epochs, opts.freeze_below) == ("lpft", 0, "layer3")


# ------------------------------------------------------------------------------ (4) bad combinations


@pytest.mark.parametrize("which, options, message", [
    ("probe", {"layer": "layer3"}, r"--layer layer3 chooses where to cut.*--full keeps all of it.*--freeze-below"),
    ("probe", {"head_init": "lpft"}, r"fitted on layer[23]; with --full the head sits on pre_logits.*never seen"),
    ("probe", {"epochs": 1}, r"trains alone for 1 epoch.*--epochs 1 leaves no epoch for the blocks"),
    ("top", {}, r"best layer, pre_logits, is the top of the network.*--freeze-below LAYER"),
    ("images", {"layer": "layer3", **TINY_FT}, r"--layer layer3 chooses where to cut"),
    ("images", {"head_init": "lpft", **TINY_FT}, r"LP-FT starts from a probe's logistic head"),
])
def test_bad_combinations_are_refused_before_anything_is_written(probes, images, which, options, message):
    results, top_results = probes
    target = {"probe": results, "top": top_results, "images": f"folder:{images}"}[which]
    before = snapshot(results.parent)
    with pytest.raises(UsageError, match=message) as info:
        finetune(target, full=True, **{"progress": False, "workers": 0, **options})
    assert info.value.exit_code == 2
    assert snapshot(results.parent) == before


def test_the_command_line_refuses_layer_with_full(probes):
    results, _ = probes
    before = snapshot(results.parent)
    invoked = invoke(["finetune", str(results), "--full", "--layer", "layer3"])
    assert isinstance(invoked.exception, UsageError) and "--freeze-below" in str(invoked.exception)
    assert snapshot(results.parent) == before
