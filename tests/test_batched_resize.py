"""The tensor resize engine: in-memory uint8 images resized and cropped in whole batches on the device.

Its pixels stay within a couple of grey levels of the PIL path, its features close to PIL's,
the cache key tells the two apart, and shards still make a resumed run bit-identical.
"""

from __future__ import annotations

import errno

import numpy as np
import pytest
import torch

import featx
from featx.cache.partial import PartialRun
from featx.data import open_dataset, stratified_limit
from featx.data.dataset import ArrayBatches
from featx.data.sources import ArraySource
from featx.data.transforms import Preprocessing
from featx.errors import UsageError
from featx.extraction.plan import choose_resize_engine

from .conftest import TINY, make_folder

MEAN = STD = (0.5, 0.5, 0.5)
#: what two resizers of the same filter may disagree by: PIL rounds to uint8 between its two passes
LEVELS = 2


def _smooth_images(n: int, height: int, width: int, channels: int | None = None, seed: int = 0) -> np.ndarray:
    """Blobs and edges on noise, like small photos: resizing has work to do everywhere."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:height, 0:width]
    out = []
    for _ in range(n):
        cx, cy, r = rng.uniform(0, width), rng.uniform(0, height), rng.uniform(3, max(height, width) / 2)
        planes = []
        for _ in range(channels or 1):
            blob = 200.0 * (((xx - cx) ** 2 + (yy - cy) ** 2) < r**2)
            planes.append(blob + rng.uniform(0, 55, size=(height, width)))
        img = np.stack(planes, axis=-1) if channels else planes[0]
        out.append(np.clip(img, 0, 255).astype(np.uint8))
    return np.stack(out)


def _source(images: np.ndarray, spec: str = "arrays") -> ArraySource:
    n = len(images)
    labels = np.arange(n) % 3
    return ArraySource(spec, images, labels, [""] * n, [f"{i:04d}" for i in range(n)], ["a", "b", "c"])


def _both_paths(source, pre: Preprocessing) -> tuple[torch.Tensor, torch.Tensor]:
    rows = list(range(len(source)))
    pil = torch.stack([pre.pil_to_uint8(source.image(i)) for i in rows])
    (batched, reasons), = list(ArrayBatches(source, pre, [rows], torch.device("cpu")))
    assert reasons == [""] * len(rows)
    return pil, batched


# ----------------------------------------------------------------------------- pixels


@pytest.mark.parametrize("shape", [(28, 28), (20, 33), (33, 20), (28, 28, 3), (20, 33, 3)])
@pytest.mark.parametrize("crop_mode", ["center", "squash"])
@pytest.mark.parametrize("interpolation", ["bicubic", "bilinear"])
def test_batched_pixels_are_within_two_grey_levels_of_pil(shape, crop_mode, interpolation):
    images = _smooth_images(6, shape[0], shape[1], shape[2] if len(shape) == 3 else None)
    pre = Preprocessing(40, 45, interpolation, MEAN, STD, crop_mode)
    pil, batched = _both_paths(_source(images), pre)
    assert batched.dtype == torch.uint8 and batched.shape == pil.shape == (6, 3, 40, 40)
    diff = (batched.int() - pil.int()).abs()
    assert diff.max() <= LEVELS and (diff > 0).float().mean() < 0.05


def test_downscaling_is_antialiased_like_pil():
    images = _smooth_images(4, 90, 120)
    pre = Preprocessing(24, 27, "bicubic", MEAN, STD)
    pil, batched = _both_paths(_source(images), pre)
    assert (batched.int() - pil.int()).abs().max() <= LEVELS


def test_grey_arrays_give_the_pixels_of_the_same_images_stored_as_rgb():
    grey = _smooth_images(5, 28, 28)
    pre = Preprocessing(32, 36, "bicubic", MEAN, STD)
    _, from_grey = _both_paths(_source(grey), pre)
    _, from_rgb = _both_paths(_source(np.repeat(grey[..., None], 3, axis=-1)), pre)
    assert torch.equal(from_grey, from_rgb)
    assert torch.equal(from_grey[:, 0], from_grey[:, 2])


def test_a_batch_cut_into_chunks_gives_the_same_pixels(monkeypatch):
    source = _source(_smooth_images(7, 28, 28))
    pre = Preprocessing(32, 36, "bicubic", MEAN, STD)
    whole = next(iter(ArrayBatches(source, pre, [list(range(7))], torch.device("cpu"))))[0]
    monkeypatch.setattr("featx.data.dataset.MAX_RESIZED_PIXELS", 2 * 36 * 36)
    chunked = ArrayBatches(source, pre, [list(range(7))], torch.device("cpu"))
    assert chunked.chunk == 2
    assert torch.equal(next(iter(chunked))[0], whole)


def test_a_subset_reads_the_pixels_of_its_own_rows():
    digits = open_dataset("digits")
    subset = stratified_limit(digits, 50, seed=3)
    assert subset.pixel_shape() == (8, 8)
    np.testing.assert_array_equal(subset.pixels([0, 7]), digits.images[subset.indices[[0, 7]]])


# ----------------------------------------------------------------------------- which engine


def test_the_engine_is_tensor_only_where_it_reproduces_pil(tmp_path):
    pre = Preprocessing(32, 36, "bicubic", MEAN, STD)
    grey = _source(_smooth_images(2, 28, 28))
    assert choose_resize_engine(grey, pre) == "tensor"
    assert choose_resize_engine(grey, pre, "pil") == "pil"
    assert choose_resize_engine(_source(_smooth_images(2, 8, 8, 3)), pre) == "tensor"
    not_batchable = {
        "rgba": (_source(np.zeros((2, 8, 8, 4), np.uint8)), pre),
        "float": (_source(np.zeros((2, 8, 8), np.float32)), pre),
        "border": (grey, Preprocessing(32, 36, "bicubic", MEAN, STD, "border")),
        "nearest": (grey, Preprocessing(32, 36, "nearest", MEAN, STD)),
        "absurd": (_source(np.zeros((2, 1, 300), np.uint8)), pre),  # check_dimensions refuses 300:1
        "files": (open_dataset(f"folder:{make_folder(tmp_path / 'f', n_per_class=1, splits=None)}"), pre),
    }
    for name, (source, preprocessing) in not_batchable.items():
        assert choose_resize_engine(source, preprocessing) == "pil", name
        with pytest.raises(UsageError, match="tensor resize engine needs"):
            choose_resize_engine(source, preprocessing, "tensor")
    with pytest.raises(UsageError, match="Unknown resize engine 'gpu'"):
        featx.extract("digits", resize_engine="gpu", **TINY)


def test_absurd_arrays_stay_bad_images_on_the_pil_path():
    source = _source(np.full((3, 1, 300), 128, np.uint8))
    entry = featx.extract(source, layers="pre_logits", **TINY)
    assert "resize_engine" not in entry.config["preprocessing"]
    assert not entry.samples()["ok"].any()
    assert all("aspect ratio" in reason for reason in dict(entry.errors()).values())


def test_the_key_names_the_tensor_engine_and_file_keys_are_unchanged(image_folder):
    source = _source(_smooth_images(12, 28, 28))
    tensor = featx.extract(source, layers="pre_logits", dtype="float32", **TINY)
    pil = featx.extract(source, layers="pre_logits", dtype="float32", resize_engine="pil", **TINY)
    assert tensor.last_run.forward_pass and pil.last_run.forward_pass  # two entries, not one reused
    assert tensor.key != pil.key
    assert tensor.config["preprocessing"]["resize_engine"] == "tensor"
    assert "resize_engine" not in pil.config["preprocessing"]
    assert {k: v for k, v in tensor.config["preprocessing"].items() if k != "resize_engine"} == \
        pil.config["preprocessing"]
    files = featx.extract(f"folder:{image_folder}", layers="pre_logits", **TINY)
    forced = featx.extract(f"folder:{image_folder}", layers="pre_logits", resize_engine="pil", **TINY)
    assert "resize_engine" not in files.config["preprocessing"]
    assert forced.key == files.key and not forced.last_run.forward_pass
    assert Preprocessing.from_dict(tensor.config["preprocessing"]) == Preprocessing.from_dict(
        pil.config["preprocessing"])


# ----------------------------------------------------------------------------- features


def _close(a: np.ndarray, b: np.ndarray, rtol: float) -> None:
    a, b = a.astype(np.float64), b.astype(np.float64)
    relative = np.linalg.norm(a - b, axis=1) / np.maximum(np.linalg.norm(b, axis=1), 1e-12)
    assert relative.max() < rtol, relative.max()


@pytest.mark.parametrize("shape", [(28, 28), (24, 30, 3)])
def test_features_of_both_engines_are_close(shape):
    source = _source(_smooth_images(16, shape[0], shape[1], shape[2] if len(shape) == 3 else None))
    options = {"layers": "layer1,layer3,pre_logits", "dtype": "float32", **TINY}
    tensor = featx.extract(source, **options)
    pil = featx.extract(source, resize_engine="pil", **options)
    for name in tensor.layer_names:
        _close(tensor.load(name).X, pil.load(name).X, rtol=0.02)


def test_an_interrupted_tensor_run_resumes_bit_identical(tmp_path, monkeypatch):
    source = _source(_smooth_images(40, 28, 28))
    options = {"layers": "layer2,pre_logits", "dtype": "float32", "batch_size": 4, "shard_rows": 8, **TINY}
    real_write = PartialRun.write

    def disk_full_at_shard_3(self, shard, *args):
        if shard == 3:
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_write(self, shard, *args)

    with monkeypatch.context() as fault:
        fault.setattr(PartialRun, "write", disk_full_at_shard_3)
        with pytest.raises(OSError, match="No space left"):
            featx.extract(source, cache_dir=tmp_path / "resumed", **options)
    resumed = featx.extract(source, cache_dir=tmp_path / "resumed", **options)
    assert resumed.last_run.resumed_rows == 24
    clean = featx.extract(source, cache_dir=tmp_path / "clean", **options)
    assert clean.key == resumed.key and clean.config["preprocessing"]["resize_engine"] == "tensor"
    for name in clean.layer_names:
        np.testing.assert_array_equal(resumed.load(name).X, clean.load(name).X)


def test_digits_end_to_end():
    """By name, through --limit's stratified subset (whose pixels come from the full array)."""
    options = {"layers": "layer2,pre_logits", "limit": 150, **TINY}
    entry = featx.extract("digits", **options)
    assert entry.config["preprocessing"]["resize_engine"] == "tensor"
    assert entry.config["dataset"]["source"] == "digits" and entry.samples()["ok"].all()
    X = entry.load("pre_logits").X
    assert X.shape == (150, 512) and np.isfinite(X).all() and X.std(axis=0).max() > 0
    assert not featx.extract("digits", **options).last_run.forward_pass


@pytest.mark.slow
def test_pretrained_features_of_both_engines_agree_on_digits():
    """The default model at featx run's size: each sample's features point the same way."""
    options = {"layers": "auto", "pool": "grid2", "image_size": 96, "limit": 200, "dtype": "float32",
               "progress": False}
    tensor = featx.extract("digits", **options)
    pil = featx.extract("digits", resize_engine="pil", **options)
    for name in tensor.layer_names:
        a, b = tensor.load(name).X.astype(np.float64), pil.load(name).X.astype(np.float64)
        cosine = (a * b).sum(axis=1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1))
        assert cosine.min() > 0.999, (name, cosine.min())
