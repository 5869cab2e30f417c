"""The extraction loop: one pass for many layers, early stop, bad images, dtype safety."""

import numpy as np
import pytest
import torch

import featx
from featx.backbones.registry import build_model, describe_model, parse_model
from featx.backbones.taps import LayerTaps
from featx.errors import BadImageError, FeatureOverflowError, UsageError

from .conftest import TINY, make_folder
from .test_data import REASONS, write_bad_images


def test_one_pass_equals_separate_single_layer_runs(image_folder, tmp_path):
    src = f"folder:{image_folder}"
    names = ["bn1", "layer1", "layer3.0", "pre_logits"]
    together = featx.extract(src, layers=",".join(names), dtype="float32", **TINY)
    assert together.layer_names == names
    for i, name in enumerate(names):
        alone = featx.extract(src, layers=name, dtype="float32", cache_dir=tmp_path / f"solo{i}", **TINY)
        assert alone.layer_names == [name]
        np.testing.assert_array_equal(together.load(name).X, alone.load(name).X)


def test_forward_pass_stops_after_the_deepest_requested_layer():
    info = describe_model(parse_model("timm:resnet18", weights="none"))
    net = build_model(info)
    ladder = featx.layers("timm:resnet18", image_size=32)
    ran = []
    for name in ("layer3", "layer4", "fc"):
        net.get_submodule(name).register_forward_hook(lambda m, a, o, n=name: ran.append(n))
    layer2 = [layer for layer in ladder.layers if layer.name == "layer2"]
    with LayerTaps(net, layer2, {"layer2": "avg"}) as taps, torch.no_grad():
        out = taps(torch.randn(2, 3, 32, 32))
    assert out["layer2"].shape == (2, 128) and ran == []
    pre = [layer for layer in ladder.layers if layer.name == "pre_logits"]
    with LayerTaps(net, pre, {"pre_logits": "identity"}) as taps, torch.no_grad():
        taps(torch.randn(2, 3, 32, 32))
    assert ran == ["layer3", "layer4"]  # the classifier itself never runs


def test_bad_images_are_recorded_never_substituted(tmp_path):
    root = make_folder(tmp_path / "f", n_per_class=3, splits=None)
    write_bad_images(root / "cat")
    e = featx.extract(f"folder:{root}", dtype="float32", **TINY)
    s = e.samples()
    bad = dict(e.errors())
    assert {k.split("/")[-1] for k in bad} == set(REASONS)
    for sample_id, reason in bad.items():
        assert REASONS[sample_id.split("/")[-1]] in reason
    full = e.load("pre_logits", include_bad=True)
    assert np.all(full.X[~s["ok"]] == 0)
    kept = e.load("pre_logits")
    assert len(kept.X) == int(s["ok"].sum()) == 9 and set(kept.ids) == set(s["id"][s["ok"]])


def test_strict_stops_at_the_first_bad_image_and_names_it(tmp_path):
    root = make_folder(tmp_path / "f", n_per_class=3, splits=None)
    (root / "dog" / "broken.png").write_bytes(b"\x89PNG not really")
    with pytest.raises(BadImageError, match=r"dog/broken\.png.*(not a recognised|cannot decode)"):
        featx.extract(f"folder:{root}", strict=True, **TINY)
    assert not list((tmp_path / "cache").glob("*.h5"))


def test_float16_overflow_is_refused_not_written_as_inf(tmp_path):
    """A checkpoint whose stem scales activations far beyond float16's range."""
    info = describe_model(parse_model("timm:resnet18", weights="none"))
    net = build_model(info)
    state = net.state_dict()
    state["bn1.weight"] = torch.full_like(state["bn1.weight"], 1e6)
    torch.save(state, tmp_path / "huge.pt")
    root = make_folder(tmp_path / "f", n_per_class=2, splits=None)
    with pytest.raises(FeatureOverflowError, match="float16.*--dtype float32"):
        featx.extract(f"folder:{root}", model="timm:resnet18", checkpoint=tmp_path / "huge.pt", layers="bn1",
                      image_size=32, progress=False)
    e = featx.extract(f"folder:{root}", model="timm:resnet18", checkpoint=tmp_path / "huge.pt", layers="bn1",
                      image_size=32, dtype="float32", progress=False)
    assert np.isfinite(e.load("bn1").X).all() and np.abs(e.load("bn1").X).max() > 65504


@pytest.mark.parametrize("pool, width", [("avg", 256), ("max", 256), ("avgmax", 512), ("grid2", 1024),
                                         ("grid3", 2304), ("none", 256 * 2 * 2)])
def test_pooling_modes_through_extract(image_folder, pool, width):
    e = featx.extract(f"folder:{image_folder}", layers="layer3,pre_logits", pool=pool, **TINY)
    assert e.layer("layer3").width == width and e.layer("layer3").pool == pool
    assert e.layer("pre_logits").pool == "identity"
    assert e.load("layer3").X.shape == (36, width)


def test_pool_none_is_refused_above_the_budget(image_folder, monkeypatch):
    monkeypatch.setattr("featx.extraction.runner.NONE_POOL_BUDGET", 1000)
    with pytest.raises(UsageError, match="--force"):
        featx.extract(f"folder:{image_folder}", layers="layer1", pool="none", **TINY)
    e = featx.extract(f"folder:{image_folder}", layers="layer1", pool="none", force=True, **TINY)
    assert e.layer("layer1").width == 64 * 8 * 8


def test_transformer_tokens_through_extract(image_folder):
    e = featx.extract(f"folder:{image_folder}", model="timm:vit_small_patch14_reg4_dinov2", weights="none",
                      image_size=28, layers="patch_embed,blocks.3", token_pool="cls+mean", progress=False)
    assert e.layer("blocks.3").pool == "cls+mean" and e.layer("blocks.3").width == 768
    assert e.layer("patch_embed").pool == "mean"  # no class token before the first block


def test_device_that_does_not_exist_is_a_usage_error(image_folder):
    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    with pytest.raises(UsageError, match="CUDA is not available"):
        featx.extract(f"folder:{image_folder}", device="cuda", **TINY)
