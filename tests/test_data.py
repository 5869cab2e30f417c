"""Data sources: folders, CSV, built-ins, stratified limits and every kind of bad image."""

import gzip
import struct
import zlib

import numpy as np
import pytest
from PIL import Image

from featx.data import ImageDataset, Preprocessing, open_dataset, stratified_limit
from featx.data.images import ImageDecodeError, decode_image
from featx.errors import DatasetNotFoundError, UnknownDatasetError, UsageError

from .conftest import make_folder, synthetic_image

PRE = Preprocessing(16, 16, "bilinear", (0.5, 0.5, 0.5), (0.5, 0.5, 0.5))


def test_folder_with_splits(tmp_path):
    root = make_folder(tmp_path / "f", n_per_class=3)
    src = open_dataset(f"folder:{root}")
    assert src.classes == ["cat", "dog", "owl"]
    assert len(src) == 18
    assert set(src.splits) == {"train", "test"}
    assert src.ids[0] == "test/cat/img000.png"  # relative path: stable across machines
    assert list(np.bincount(src.labels)) == [6, 6, 6]


def test_folder_without_splits_and_numeric_classes(tmp_path):
    root = make_folder(tmp_path / "f", n_per_class=2, classes=("10", "2", "1"), splits=None)
    src = open_dataset(f"folder:{root}")
    assert src.classes == ["1", "2", "10"]  # natural order for numeric class names
    assert set(src.splits) == {""}


def test_csv_source_with_relative_paths_splits_and_unlabeled(tmp_path):
    make_folder(tmp_path / "imgs", n_per_class=2, splits=None)
    rows = ["path,label,split", "imgs/cat/img000.png,cat,train", "imgs/dog/img000.png,dog,test",
            "imgs/owl/img001.png,,train"]
    (tmp_path / "list.csv").write_text("\n".join(rows) + "\n")
    src = open_dataset(f"csv:{tmp_path / 'list.csv'}")
    assert src.classes == ["cat", "dog"]
    assert list(src.labels) == [0, 1, -1]
    assert list(src.splits) == ["train", "test", "train"]
    assert src.image(0).size == (24, 24)


def test_csv_without_label_column_is_a_usage_error(tmp_path):
    (tmp_path / "bad.csv").write_text("path,kind\na.png,x\n")
    with pytest.raises(UsageError, match="path,label"):
        open_dataset(f"csv:{tmp_path / 'bad.csv'}")


def test_digits_builtin():
    src = open_dataset("digits")
    assert len(src) == 1797 and src.classes == [str(i) for i in range(10)]
    assert src.image(0).mode == "RGB"


def test_fashion_mnist_from_a_directory(tmp_path, monkeypatch):
    """The IDX reader on a tiny hand-made copy; FEATX_DATA is searched first."""
    d = tmp_path / "data" / "fashion-mnist"
    d.mkdir(parents=True)
    for stem, n in (("train", 5), ("t10k", 3)):
        images = np.arange(n * 28 * 28, dtype=np.uint8).reshape(n, 28, 28)
        with gzip.open(d / f"{stem}-images-idx3-ubyte.gz", "wb") as fh:
            fh.write(struct.pack(">BBBBIII", 0, 0, 8, 3, n, 28, 28) + images.tobytes())
        with gzip.open(d / f"{stem}-labels-idx1-ubyte.gz", "wb") as fh:
            fh.write(struct.pack(">BBBBI", 0, 0, 8, 1, n) + bytes(range(n)))
    monkeypatch.setenv("FEATX_DATA", str(tmp_path / "data"))
    src = open_dataset("fashion-mnist")
    assert len(src) == 8 and list(src.splits) == ["train"] * 5 + ["test"] * 3
    assert src.ids[5] == "test/00000" and src.classes[0] == "T-shirt/top"


def test_missing_fashion_mnist_says_how_to_get_it(tmp_path, monkeypatch):
    monkeypatch.setenv("FEATX_DATA", str(tmp_path / "empty"))
    monkeypatch.setattr("featx.data.sources.DEBIAN_FASHION_MNIST", tmp_path / "nowhere")
    with pytest.raises(DatasetNotFoundError, match="apt-get install dataset-fashion-mnist"):
        open_dataset("fashion-mnist", download=False)


def test_unknown_dataset_suggests_close_names():
    with pytest.raises(UnknownDatasetError, match="Did you mean 'cifar10'"):
        open_dataset("cifar1O")
    with pytest.raises(UsageError, match="does not exist"):
        open_dataset("folder:/no/such/dir")


def test_stratified_limit_keeps_splits_and_classes_and_is_seeded(tmp_path):
    src = open_dataset(f"folder:{make_folder(tmp_path / 'f', n_per_class=10)}")
    a = stratified_limit(src, 30, seed=1)
    b = stratified_limit(src, 30, seed=1)
    c = stratified_limit(src, 30, seed=2)
    assert len(a) == 30 and list(a.ids) == list(b.ids) and list(a.ids) != list(c.ids)
    for split in ("train", "test"):
        assert list(np.bincount(a.labels[a.splits == split])) == [5, 5, 5]
    with pytest.raises(UsageError, match="positive"):
        stratified_limit(src, 0)


def test_grayscale_16bit_palette_and_alpha_images_become_rgb(tmp_path):
    synthetic_image(0, 0, mode="L").save(tmp_path / "gray.png")
    Image.fromarray((np.arange(64 * 64).reshape(64, 64) * 16).astype(np.uint16)).save(tmp_path / "deep.png")
    synthetic_image(1, 0, mode="P").save(tmp_path / "pal.png")
    synthetic_image(2, 0, mode="RGBA").save(tmp_path / "alpha.png")
    for name in ("gray", "deep", "pal", "alpha"):
        img = decode_image(tmp_path / f"{name}.png")
        assert img.mode == "RGB", name
    deep = np.asarray(decode_image(tmp_path / "deep.png"))
    assert deep.min() == 0 and deep.max() == 255  # rescaled, not clipped


def _bomb_png(path, side=100_000):
    """A PNG whose header claims side x side pixels (10 gigapixels) with almost no data."""
    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
    ihdr = struct.pack(">IIBBBBB", side, side, 8, 0, 0, 0, 0)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 16))
                     + chunk(b"IEND", b""))


def write_bad_images(directory):
    """Every kind of unreadable file, each named for what is wrong with it."""
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "empty.png").write_bytes(b"")
    (directory / "garbage.jpg").write_bytes(b"this is not an image at all" * 10)
    synthetic_image(0, 1, size=64).save(directory / "full.jpg", quality=90)
    data = (directory / "full.jpg").read_bytes()
    (directory / "truncated.jpg").write_bytes(data[: len(data) // 2])
    (directory / "full.jpg").unlink()
    synthetic_image(0, 2, size=64).save(directory / "full.png")
    data = (directory / "full.png").read_bytes()
    (directory / "truncated.png").write_bytes(data[: len(data) - 40])
    (directory / "full.png").unlink()
    _bomb_png(directory / "bomb.png")


REASONS = {
    "empty.png": "empty file",
    "garbage.jpg": "not a recognised image",
    "truncated.jpg": "truncated",
    "truncated.png": "truncated",
    "bomb.png": "decompression bomb",
}


@pytest.mark.parametrize("name", sorted(REASONS))
def test_each_bad_image_kind_is_reported_with_its_reason(tmp_path, name):
    write_bad_images(tmp_path)
    with pytest.raises(ImageDecodeError) as info:
        decode_image(tmp_path / name)
    assert REASONS[name] in info.value.reason


def test_dataset_item_reports_instead_of_substituting(tmp_path):
    root = make_folder(tmp_path / "f", n_per_class=2, splits=None)
    write_bad_images(root / "cat")
    src = open_dataset(f"folder:{root}")
    ds = ImageDataset(src, PRE)
    results = {src.ids[i]: ds[i] for i in range(len(src))}
    for name, reason in REASONS.items():
        x, why = results[f"cat/{name}"]
        assert reason in why and int(x.sum()) == 0
    good = results["dog/img000.png"]
    assert good[1] == "" and good[0].shape == (3, 16, 16) and int(good[0].sum()) > 0
