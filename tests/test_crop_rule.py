"""The crop rule: images smaller than the input are upscaled without the model's centre crop, the rule is
named in the cache key, an explicit crop_pct wins (and keeps the key it always had), and every path that
builds preprocessing for a dataset (extract, fine-tuning, a fine-tune of a probe result) agrees."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import featx
from featx.backbones.registry import describe_model, parse_model
from featx.data import open_dataset, stratified_limit
from featx.data.crop_rule import EXPLICIT, MODEL, UPSCALED, dataset_preprocessing
from featx.data.sources import ArraySource, TorchvisionSource
from featx.data.transforms import Preprocessing
from featx.finetuning.plan import plan_explicit, plan_from_results

from .conftest import TINY, TINY_MODEL, make_folder

#: the preprocessing keys of every entry made before the rule (and of every explicit --crop-pct since)
PRE_RULE_KEYS = {"crop_size", "resize_size", "interpolation", "mean", "std"}


def _model_pre() -> Preprocessing:
    return describe_model(parse_model(TINY_MODEL, weights="none")).preprocessing


def _arrays(height: int, width: int, n: int = 12) -> ArraySource:
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, size=(n, height, width), dtype=np.uint8)
    return ArraySource("arrays", images, np.arange(n) % 3, [""] * n, [f"{i:03d}" for i in range(n)], ["a", "b", "c"])


def _large_folder(root: Path, size: int = 256) -> Path:
    rng = np.random.default_rng(1)
    for label in ("a", "b"):
        (root / label).mkdir(parents=True)
        for i in range(3):
            Image.fromarray(rng.integers(0, 256, size=(size, size, 3), dtype=np.uint8)).save(root / label / f"{i}.png")
    return root


def _extract(dataset, **options):
    return featx.extract(dataset, layers="pre_logits", **{**TINY, **options})


def test_small_in_memory_images_are_upscaled_without_a_crop():
    for source in (open_dataset("digits"), _arrays(28, 28)):  # 8x8 and Fashion-MNIST-like 28x28
        pre = dataset_preprocessing(_model_pre(), source, image_size=32)
        assert (pre.crop_size, pre.resize_size, pre.crop_rule) == (32, 32, UPSCALED)
    entry = _extract(_arrays(28, 28))
    config = entry.config["preprocessing"]
    assert config["crop_rule"] == "upscaled: no crop" and config["crop_pct"] == 1.0
    assert config["resize_size"] == config["crop_size"] == 32


def _model_resize() -> int:
    resize = _model_pre().override(image_size=32).resize_size
    assert resize > 32  # the model crops (resnet18's weights: 0.95)
    return resize


def test_images_as_large_as_the_input_keep_the_models_crop():
    for source in (_arrays(32, 32), _arrays(20, 40)):  # not smaller on both sides
        pre = dataset_preprocessing(_model_pre(), source, image_size=32)
        assert (pre.resize_size, pre.crop_rule) == (_model_resize(), MODEL)


def test_a_folder_of_large_images_keeps_the_models_crop(tmp_path):
    entry = _extract(f"folder:{_large_folder(tmp_path / 'large')}")
    config = entry.config["preprocessing"]
    assert config["crop_rule"] == "model" and (config["crop_size"], config["resize_size"]) == (32, _model_resize())
    assert config["crop_pct"] == round(32 / _model_resize(), 4)


def test_a_folder_of_small_images_is_not_cropped(tmp_path):
    entry = _extract(f"folder:{make_folder(tmp_path / 'small', n_per_class=2)}")  # 24 px at 32
    config = entry.config["preprocessing"]
    assert (config["crop_rule"], config["crop_pct"], config["resize_size"]) == ("upscaled: no crop", 1.0, 32)


def test_one_large_image_in_the_sample_keeps_the_crop_and_undecodable_ones_are_skipped(tmp_path):
    root = make_folder(tmp_path / "mixed", n_per_class=2, splits=None)
    (root / "cat" / "broken.png").write_bytes(b"not an image")
    source = open_dataset(f"folder:{root}")
    assert (24, 24) in source.sample_sizes() and len(source.sample_sizes()) == len(source) - 1
    assert dataset_preprocessing(_model_pre(), source, image_size=32).crop_rule == UPSCALED
    Image.new("RGB", (64, 48)).save(root / "cat" / "a_large.png")  # sorts first: inside the sample
    assert dataset_preprocessing(_model_pre(), open_dataset(f"folder:{root}"), image_size=32).crop_rule == MODEL


def test_an_explicit_crop_pct_wins_and_keeps_the_key_it_had_before_the_rule(tmp_path):
    small = f"folder:{make_folder(tmp_path / 'small', n_per_class=2)}"
    entry = _extract(small, crop_pct=0.875)
    assert set(entry.config["preprocessing"]) == PRE_RULE_KEYS  # exactly what such an entry always held
    assert entry.config["preprocessing"]["resize_size"] == 36
    pre = dataset_preprocessing(_model_pre(), open_dataset(small), image_size=32, crop_pct=0.875)
    assert pre.crop_rule == EXPLICIT and pre.to_dict() == _model_pre().override(32, 0.875).to_dict()


def test_entries_made_under_different_rules_never_share_a_key(tmp_path):
    small = f"folder:{make_folder(tmp_path / 'small', n_per_class=2)}"
    upscaled, explicit_full = _extract(small), _extract(small, crop_pct=1.0)  # the same pixels, two rules
    assert upscaled.key != explicit_full.key and explicit_full.last_run.forward_pass
    np.testing.assert_array_equal(upscaled.load("pre_logits").X, explicit_full.load("pre_logits").X)
    large = f"folder:{_large_folder(tmp_path / 'large')}"
    model, explicit_model = _extract(large), _extract(large, crop_pct=32 / _model_resize())
    assert model.key != explicit_model.key and model.config["preprocessing"]["resize_size"] == _model_resize()
    assert explicit_model.config["preprocessing"]["resize_size"] == _model_resize()
    assert len({upscaled.key, explicit_full.key, model.key, explicit_model.key}) == 4


def test_a_limited_subset_is_preprocessed_as_its_dataset(tmp_path):
    source = open_dataset(f"folder:{make_folder(tmp_path / 'small', n_per_class=6)}")
    assert stratified_limit(source, 5).sample_sizes() == source.sample_sizes()


class _ArrayDataset:
    """A torchvision dataset that holds its pixels in ``data``, in one of torchvision's layouts."""

    def __init__(self, data):
        self.data = data

    def __len__(self) -> int:
        return len(self.data)


@pytest.mark.parametrize("data, size", [
    (np.zeros((3, 32, 32, 3), np.uint8), (32, 32)),  # CIFAR: (N, H, W, C)
    (np.zeros((3, 3, 96, 80), np.uint8), (80, 96)),  # SVHN, STL-10: (N, C, H, W)
    (torch.zeros(3, 28, 20, dtype=torch.uint8), (20, 28)),  # MNIST, KMNIST: (N, H, W) tensor
])
def test_torchvision_sets_declare_the_size_of_their_pixel_arrays(tmp_path, data, size):
    source = TorchvisionSource("cifar10", [("train", _ArrayDataset(data))], [0, 1, 2], ["a", "b", "c"], tmp_path)
    assert source.sample_sizes() == [size] * 3


def test_an_unknown_size_keeps_the_models_crop(tmp_path):
    from torchvision.datasets import FakeData  # images made on demand: no size without decoding

    source = TorchvisionSource("fake", [("", FakeData(4, (3, 8, 8)))], [0, 1, 0, 1], ["a", "b"], tmp_path)
    assert source.sample_sizes() == []
    assert dataset_preprocessing(_model_pre(), source, image_size=32).crop_rule == MODEL


def test_fine_tuning_applies_the_rule_and_a_probe_results_preprocessing_is_taken_as_recorded(tmp_path):
    small = f"folder:{make_folder(tmp_path / 'small', n_per_class=4)}"
    entry = featx.extract(small, layers="layer3", **TINY)
    results = tmp_path / "results"
    results.mkdir()
    (results / "results.json").write_text(json.dumps({
        "entry": {"key": entry.key, "path": str(entry.path), "config": entry.config},
        "protocol": {"seed": 0}, "best": {"layer": "layer3"},
    }))
    from_probe = plan_from_results(results, head_init="random")
    assert from_probe.pre == Preprocessing.from_dict(entry.config["preprocessing"])
    assert from_probe.pre.to_dict() == entry.config["preprocessing"]  # what the fine-tune's fingerprint records
    explicit = plan_explicit(small, model=TINY_MODEL, weights="none", image_size=32, layer="layer3")
    assert explicit.pre == from_probe.pre and explicit.pre.crop_rule == UPSCALED
