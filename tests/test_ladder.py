"""Layer ladders of the model families featx promises, checked against real forward passes."""

import numpy as np
import pytest
import torch

import featx
from featx.backbones.ladder import PRE_LOGITS, trace_ladder
from featx.backbones.registry import build_model, describe_model, parse_model
from featx.backbones.taps import LayerTaps
from featx.errors import UnknownLayerError

FAMILIES = {
    # model: (image size, expected auto selection or None to check only the properties)
    # layer4, features.8 and bn2 are left out: their global average is pre_logits
    "torchvision:resnet18": (64, ["relu", "layer1", "layer2", "layer3", "layer4.0", "pre_logits"]),
    "torchvision:vgg11": (64, ["features.1", "features.4", "features.9", "features.14", "features.19",
                               "features", "pre_logits"]),
    "torchvision:mobilenet_v3_small": (64, ["features.0", "features.1", "features.3", "features.8",
                                            "features.12", "pre_logits"]),
    "torchvision:efficientnet_b0": (64, ["features.1", "features.2", "features.3", "features.5",
                                         "features.7", "pre_logits"]),
    "efficientnet_lite0": (64, ["blocks.0", "blocks.1", "blocks.2", "blocks.4", "blocks.6", "pre_logits"]),
    "torchvision:convnext_tiny": (64, ["features.1", "features.3", "features.5", "features.7", "pre_logits"]),
    "torchvision:densenet121": (64, ["features.relu0", "features.denseblock1", "features.denseblock2",
                                     "features.denseblock3", "features.norm5", "pre_logits"]),
    "timm:convnext_atto": (64, ["stages.0", "stages.1", "stages.2", "stages.3", "pre_logits"]),
    "torchvision:vit_b_16": (224, None),
    "timm:vit_small_patch14_reg4_dinov2": (56, None),
}


def _net(model, size):
    info = describe_model(parse_model(model, weights="none"))
    return build_model(info, image_size=size)


@pytest.fixture(scope="module")
def nets():
    """Each random-init network built once for the module: the tests only run it forward under no_grad,
    and taps remove their hooks on exit. Built lazily, so a test run alone builds only its models."""
    built = {}

    def net(model, size=64):
        if (model, size) not in built:
            built[model, size] = _net(model, size)
        return built[model, size]

    return net


@pytest.fixture(scope="module")
def ladders(nets):
    """Each family's ladder as ``featx.layers`` traces it (a random-init copy at the given size),
    traced on the module's shared network."""
    return {name: trace_ladder(nets(name, size), size) for name, (size, _) in FAMILIES.items()}


def test_the_api_traces_the_ladder_the_module_traces(ladders):
    for model in ("torchvision:resnet18", "timm:convnext_atto"):
        ours = featx.layers(model, image_size=FAMILIES[model][0])
        theirs = ladders[model]
        assert ours.auto == theirs.auto
        assert [(x.name, x.raw_shape, x.depth, x.kind) for x in ours.layers] == \
            [(x.name, x.raw_shape, x.depth, x.kind) for x in theirs.layers]


@pytest.mark.parametrize("model", list(FAMILIES))
def test_ladder_is_ordered_and_auto_is_a_subset(ladders, model):
    ladder = ladders[model]
    names = [layer.name for layer in ladder.layers]
    assert len(names) == len(set(names)) >= 5
    depths = [layer.depth for layer in ladder.layers]
    assert all(0 < d <= 1 for d in depths) and depths == sorted(depths)
    assert [layer.index for layer in ladder.layers] == list(range(len(names)))
    assert set(ladder.auto) <= set(names) and len(ladder.auto) >= 4
    assert ladder.layers[-1].name == PRE_LOGITS and ladder.layers[-1].depth == 1.0
    expected = FAMILIES[model][1]
    if expected is not None:
        assert ladder.auto == expected


@pytest.mark.parametrize("model", list(FAMILIES))
def test_ladder_shapes_match_the_forward_pass(ladders, nets, model):
    """Contract: what the ladder says each layer outputs is what a forward pass produces."""
    size = FAMILIES[model][0]
    ladder = ladders[model]
    net = nets(model, size)
    rules = {layer.name: "none" for layer in ladder.layers}
    x = torch.randn(2, 3, size, size)
    with LayerTaps(net, ladder.layers, rules) as taps, torch.no_grad():
        out = taps(x)
    for layer in ladder.layers:
        assert out[layer.name].shape == (2, int(np.prod(layer.raw_shape))), layer.name


@pytest.mark.parametrize("model", ["torchvision:resnet18", "torchvision:efficientnet_b0", "efficientnet_lite0",
                                   "torchvision:densenet121", "timm:resnet18"])
def test_auto_never_holds_two_layers_with_the_same_average(ladders, nets, model):
    """Under ``avg`` pooling no two auto layers give the same features (the map the network
    averages into ``pre_logits`` is left out, whatever its weights: timm's random-init ResNet
    zeroes each block's last norm, so there ``layer4.0`` is that map too)."""
    from featx.layer import layer_rule

    size = 64
    net = nets(model, size)
    ladder = ladders[model] if model in ladders else trace_ladder(net, size)
    picked = [layer for layer in ladder.layers if layer.name in ladder.auto]
    rules = {layer.name: layer_rule(layer.kind, layer.has_cls, "avg", "cls") for layer in picked}
    with LayerTaps(net, picked, rules) as taps, torch.no_grad():
        out = taps(torch.randn(4, 3, size, size))
    for i, a in enumerate(picked):
        for b in picked[i + 1:]:
            same = out[a.name].shape == out[b.name].shape and torch.allclose(out[a.name], out[b.name], atol=1e-6)
            assert not same, f"{a.name} and {b.name} give the same average-pooled features"


def test_vit_tokens_know_their_class_and_register_tokens(ladders):
    tv = {layer.name: layer for layer in ladders["torchvision:vit_b_16"].layers}
    block = tv["encoder.layers.encoder_layer_3"]
    assert block.kind == "tokens" and block.raw_shape == (197, 768)
    assert block.prefix_tokens == 1 and block.has_cls
    reg = {layer.name: layer for layer in ladders["timm:vit_small_patch14_reg4_dinov2"].layers}
    assert reg["blocks.5"].prefix_tokens == 5 and reg["blocks.5"].has_cls  # 1 class + 4 register tokens
    assert reg["patch_embed"].prefix_tokens == 0  # no class token yet
    assert sum(layer.kind == "tokens" for layer in ladders["timm:vit_small_patch14_reg4_dinov2"].layers) >= 12


def test_pre_logits_equals_timm_forward_head(ladders, nets):
    """An independent computation of the embedding: timm's own pre-logits path."""
    net = nets("timm:convnext_atto", 64)
    ladder = ladders["timm:convnext_atto"]
    x = torch.randn(3, 3, 64, 64)
    with LayerTaps(net, [ladder.layers[-1]], {PRE_LOGITS: "identity"}) as taps, torch.no_grad():
        ours = taps(x)[PRE_LOGITS]
    with torch.no_grad():
        theirs = net.forward_head(net.forward_features(x), pre_logits=True)
    torch.testing.assert_close(ours, theirs)


def test_stage_output_equals_torchvision_layer_output(ladders, nets):
    net = nets("torchvision:resnet18", 64)
    ladder = ladders["torchvision:resnet18"]
    layer2 = next(layer for layer in ladder.layers if layer.name == "layer2")
    x = torch.randn(2, 3, 64, 64)
    with LayerTaps(net, [layer2], {"layer2": "none"}) as taps, torch.no_grad():
        ours = taps(x)["layer2"]
    with torch.no_grad():
        h = net.maxpool(net.relu(net.bn1(net.conv1(x))))
        theirs = net.layer2(net.layer1(h)).flatten(1)
    torch.testing.assert_close(ours, theirs)


def test_selection_grammar(ladders):
    ladder = ladders["torchvision:resnet18"]
    names = [layer.name for layer in ladder.layers]
    pick = lambda spec: [layer.name for layer in ladder.select(spec, "torchvision:resnet18")]  # noqa: E731
    assert pick("auto") == ladder.auto
    assert pick("all") == names
    assert pick("layer*") == [n for n in names if n.startswith("layer")]
    assert pick("-1") == [PRE_LOGITS]
    assert pick("0:3") == names[:3]
    assert pick("layer1.1") == ["layer1"]  # an alias of the same tensor
    assert pick("pre_logits,layer2") == ["layer2", PRE_LOGITS]  # always shallow to deep
    with pytest.raises(UnknownLayerError, match=r"Did you mean 'layer3'.*featx layers torchvision:resnet18"):
        pick("layr3")
    with pytest.raises(UnknownLayerError, match="out of range"):
        pick("99")
    with pytest.raises(UnknownLayerError, match="matches no layer"):
        pick("head*")
