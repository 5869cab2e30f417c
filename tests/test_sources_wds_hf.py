"""WebDataset shards (wds:) and Hugging Face datasets saved to disk (hf-disk:) read as folders are:
same images give the same features, labels, classes and splits come through, fingerprints follow
the files, and bad samples are recorded, never fatal unless --strict."""

from __future__ import annotations

import io
import logging
import os
import pickle
import shutil
import sys
import tarfile

import numpy as np
import pytest

import featx
from featx.cache.key import config_key
from featx.data import open_dataset
from featx.data.hf_disk import offline_environment
from featx.data.images import ImageDecodeError
from featx.data.optional import require
from featx.errors import BadImageError, UnknownDatasetError, UsageError

from .conftest import TINY, synthetic_image

webdataset = pytest.importorskip("webdataset")
datasets = pytest.importorskip("datasets")

CLASSES = ("cat", "dog", "owl")
N_PER_CLASS, N_TRAIN = 8, 5  # images 0-4 of a class are train, 5-7 test
LAYERS = "layer2,pre_logits"
EXTRACT = {**TINY, "layers": LAYERS, "dtype": "float32"}


def _images():
    """(split, class index, i, extension, encoded bytes) of 3 classes x 8 images, PNG and JPEG."""
    out = []
    for label in range(len(CLASSES)):
        for i in range(N_PER_CLASS):
            ext = "png" if i % 2 == 0 else "jpg"
            buffer = io.BytesIO()
            synthetic_image(label, i, size=24).save(buffer, "PNG" if ext == "png" else "JPEG", quality=90)
            out.append(("train" if i < N_TRAIN else "test", label, i, ext, buffer.getvalue()))
    return out


def _write_folder(root, images):
    for split, label, i, ext, data in images:
        d = root / split / CLASSES[label]
        d.mkdir(parents=True, exist_ok=True)
        (d / f"img{i:03d}.{ext}").write_bytes(data)
    return root


def _write_shard(path, images, extra=()):
    with webdataset.TarWriter(str(path)) as sink:
        for _, label, i, ext, data in images:
            sink.write({"__key__": f"{CLASSES[label]}{i:03d}", ext: data, "cls": label})
        for sample in extra:
            sink.write(sample)


def _write_shards(root, images, corrupt: bool = False, class_file: bool = True):
    """train-000.tar and test-000.tar written by webdataset's own writer; ``corrupt`` adds a sample with
    undecodable bytes, one without an image and one with a label that is not a class index."""
    root.mkdir(parents=True, exist_ok=True)
    for split in ("train", "test"):
        bad = [{"__key__": "garbled", "png": b"\x89PNG not really", "cls": 0},
               {"__key__": "noimage", "cls": 1, "json": b"{}"},
               {"__key__": "badlabel", "png": images[0][4], "cls": b"cat"}] if corrupt and split == "train" else []
        _write_shard(root / f"{split}-000.tar", [im for im in images if im[0] == split], bad)
    if class_file:
        (root / "classnames.txt").write_text("\n".join(CLASSES) + "\n")
    return root


def _write_hf(root, images, corrupt: bool = False):
    features = datasets.Features({"image": datasets.Image(), "label": datasets.ClassLabel(names=list(CLASSES)),
                                  "index": datasets.Value("int64")})
    parts = {}
    for split in ("train", "test"):
        rows = [(label, i, data) for s, label, i, _, data in images if s == split]
        image = [{"bytes": data, "path": None} for _, _, data in rows]
        label = [lab for lab, _, _ in rows]
        if corrupt and split == "train":
            image += [{"bytes": b"not an image at all", "path": None}, None]
            label += [0, 1]
        parts[split] = datasets.Dataset.from_dict({"image": image, "label": label,
                                                   "index": list(range(len(label)))}, features=features)
    datasets.DatasetDict(parts).save_to_disk(str(root))
    return root


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    base = tmp_path_factory.mktemp("sources")
    images = _images()
    return {"images": images, "folder": _write_folder(base / "folder", images),
            "shards": _write_shards(base / "shards", images), "hf": _write_hf(base / "hf", images)}


@pytest.fixture(scope="module")
def folder_features(data, tmp_path_factory):
    entry = featx.extract(f"folder:{data['folder']}", cache_dir=tmp_path_factory.mktemp("cache"), workers=0,
                          **EXTRACT)
    return {layer: entry.load(layer) for layer in LAYERS.split(",")}


def _name_of_folder_id(sample_id: str) -> str:
    split, cls, file = sample_id.split("/")
    return f"{split}/{cls}{int(file[3:6]):03d}"


def _assert_same_features(entry, folder_features, name_of):
    """Every sample's features equal the folder's for the same image (batches differ in order, so up to
    float32 rounding)."""
    for layer, expected in folder_features.items():
        got = entry.load(layer)
        assert len(got.ids) == len(expected.ids) == len(CLASSES) * N_PER_CLASS
        rows = {_name_of_folder_id(i): k for k, i in enumerate(expected.ids)}
        order = [rows[name_of(i)] for i in got.ids]
        np.testing.assert_array_equal(got.y, expected.y[order])
        np.testing.assert_array_equal(got.split, expected.split[order])
        np.testing.assert_allclose(got.X, expected.X[order], rtol=1e-5, atol=1e-5)


def _wds_name(sample_id):  # train-000.tar/dog003
    shard, key = sample_id.split("/")
    return f"{shard.split('-')[0]}/{key}"


def _hf_name(images):
    order = {split: [f"{split}/{CLASSES[label]}{i:03d}" for sp, label, i, _, _ in images if sp == split]
             for split in ("train", "test")}

    def name_of(sample_id):  # train/000007: the row order written
        split, row = sample_id.split("/")
        return order[split][int(row)]

    return name_of


# ----------------------------------------------------------------------------- end to end


def test_wds_extract_and_probe_match_the_folder(data, folder_features, cache_dir):
    entry = featx.extract(f"wds:{data['shards']}/{{train,test}}-000.tar", cache_dir=cache_dir, workers=0, **EXTRACT)
    assert entry.classes == list(CLASSES)
    s = entry.samples()
    assert s["ok"].all()
    assert sorted(set(s["split"])) == ["test", "train"]
    assert (s["split"] == "train").sum() == N_TRAIN * len(CLASSES)

    _assert_same_features(entry, folder_features, _wds_name)
    results = featx.probe(entry, heads="logreg", out_dir=False, progress=False, jobs=1)
    roles = results.protocol["roles"]
    assert roles["train"] == {"splits": ["train"], "n": 15} and roles["test"] == {"splits": ["test"], "n": 9}
    assert len(results.rows) == 2


def test_hf_disk_extract_and_probe_match_the_folder(data, folder_features, cache_dir):
    entry = featx.extract(f"hf-disk:{data['hf']}", cache_dir=cache_dir, workers=0, **EXTRACT)
    assert entry.classes == list(CLASSES)
    s = entry.samples()
    assert s["ok"].all() and sorted(set(s["split"])) == ["test", "train"]
    _assert_same_features(entry, folder_features, _hf_name(data["images"]))
    results = featx.probe(entry, heads="logreg", out_dir=False, progress=False, jobs=1)
    assert results.protocol["roles"]["test"] == {"splits": ["test"], "n": 9}


def test_wds_samples_are_those_webdataset_reads(data):
    """The index groups members as webdataset's own reader does: same keys, same order, same labels."""
    src = open_dataset(f"wds:{data['shards']}/*.tar")
    urls = [str(data["shards"] / "test-000.tar"), str(data["shards"] / "train-000.tar")]
    read = [(f"{os.path.basename(s['__url__'])}/{s['__key__']}", int(s["cls"]))
            for s in webdataset.WebDataset(urls, shardshuffle=False)]
    assert list(src.ids) == [sample_id for sample_id, _ in read]
    assert list(src.labels) == [label for _, label in read]


@pytest.mark.slow
@pytest.mark.subprocess
def test_dataloader_workers_decode_the_same_images(data, folder_features, cache_dir):
    sources = ((f"wds:{data['shards']}/*.tar", _wds_name), (f"hf-disk:{data['hf']}", _hf_name(data["images"])))
    for spec, name_of in sources:
        entry = featx.extract(spec, cache_dir=cache_dir, workers=2, batch_size=8, **EXTRACT)
        _assert_same_features(entry, folder_features, name_of)


def test_sources_survive_pickling_to_workers(data):
    for spec in (f"wds:{data['shards']}/*.tar", f"hf-disk:{data['hf']}"):
        src = open_dataset(spec)
        src.image(0)  # opens tables / files in this process first
        copy = pickle.loads(pickle.dumps(src))
        assert np.array_equal(np.asarray(copy.image(5)), np.asarray(src.image(5)))
        assert copy.fingerprint() == src.fingerprint()


# ----------------------------------------------------------------------------- fingerprints


def _key(spec, **kwargs):
    return config_key({"dataset": open_dataset(spec, **kwargs).fingerprint()})


def test_wds_fingerprint_follows_the_shards(data, tmp_path):
    shards = shutil.copytree(data["shards"], tmp_path / "shards")
    spec = f"wds:{shards}/train-{{000..000}}.tar::{shards}/test-000.tar"
    first = _key(spec)
    assert _key(spec) == first  # reopened
    assert _key(f"wds:{shards}/*.tar") == first  # the same shards named another way
    moved = shutil.copytree(shards, tmp_path / "moved", copy_function=shutil.copy2)
    hashed = _key(spec, hash_content=True)
    assert _key(f"wds:{moved}/*.tar", hash_content=True) == hashed  # same bytes elsewhere

    target = shards / "test-000.tar"
    data_bytes = target.read_bytes()
    target.unlink()
    target.write_bytes(data_bytes)  # rewritten with the same bytes: a new file to the stat fingerprint
    assert _key(spec) != first
    assert _key(spec, hash_content=True) == hashed

    with tarfile.open(target, "a") as tar:  # one more sample
        info = tarfile.TarInfo("extra.png")
        png = data["images"][0][4]
        info.size = len(png)
        tar.addfile(info, io.BytesIO(png))
    assert _key(spec, hash_content=True) != hashed


def test_hf_fingerprint_follows_the_arrow_files(data, tmp_path):
    hf = shutil.copytree(data["hf"], tmp_path / "hf")
    first, hashed = _key(f"hf-disk:{hf}"), _key(f"hf-disk:{hf}", hash_content=True)
    assert _key(f"hf-disk:{hf}") == first
    assert _key(f"hf-disk:{hf}?label=label&image=image") == first  # naming the columns found changes nothing
    _write_hf(tmp_path / "again", data["images"])
    shutil.rmtree(hf)
    shutil.move(tmp_path / "again", hf)  # saved again: same rows, new files
    assert _key(f"hf-disk:{hf}") != first
    assert _key(f"hf-disk:{hf}", hash_content=True) == hashed


# ----------------------------------------------------------------------------- bad samples


def test_wds_bad_samples_are_recorded_and_strict_stops(data, tmp_path, cache_dir, caplog):
    shards = _write_shards(tmp_path / "bad", data["images"], corrupt=True)
    with caplog.at_level(logging.WARNING, logger="featx"):
        entry = featx.extract(f"wds:{shards}/*.tar", cache_dir=cache_dir, workers=0, **EXTRACT)
    assert "2 sample(s) have no image or an invalid .cls label" in caplog.text  # the garbled one shows when decoded
    errors = dict(entry.errors())
    assert set(errors) == {"train-000.tar/garbled", "train-000.tar/noimage", "train-000.tar/badlabel"}
    assert errors["train-000.tar/garbled"] == "not a recognised image format"
    assert errors["train-000.tar/noimage"].startswith("no image in the sample (keys: .cls, .json")
    assert errors["train-000.tar/badlabel"].startswith("invalid label: .cls holds b'cat'")
    assert int(entry.samples()["ok"].sum()) == len(CLASSES) * N_PER_CLASS
    with pytest.raises(BadImageError, match=r"train-000\.tar:garbled\.png: not a recognised image format"):
        featx.extract(f"wds:{shards}/*.tar", cache_dir=tmp_path / "strict", workers=0, strict=True, **EXTRACT)


def test_hf_bad_rows_are_recorded_and_strict_stops(data, tmp_path, cache_dir):
    hf = _write_hf(tmp_path / "bad", data["images"], corrupt=True)
    entry = featx.extract(f"hf-disk:{hf}", cache_dir=cache_dir, workers=0, **EXTRACT)
    assert dict(entry.errors()) == {"train/000015": "not a recognised image format",
                                    "train/000016": "no image in the row (column 'image' is empty)"}
    src = open_dataset(f"hf-disk:{hf}")  # what --strict names when it stops (the loop is the one wds: goes through)
    assert src.location(15) == f"{hf}, split 'train', row 15"
    with pytest.raises(ImageDecodeError, match="not a recognised image format"):
        src.image(15)


# ----------------------------------------------------------------------------- names, splits, classes


def test_wds_shard_names_and_their_errors(data, tmp_path):
    with pytest.raises(UsageError, match=r"'.*/nothing-\*\.tar' matches no tar file"):
        open_dataset(f"wds:{tmp_path}/nothing-*.tar")
    with pytest.raises(UsageError, match=r"2 shard\(s\) do not exist: .*train-001\.tar, .*train-002\.tar"):
        open_dataset(f"wds:{data['shards']}/train-{{000..002}}.tar")
    with pytest.raises(UsageError, match="not a local file"):
        open_dataset("wds:https://example.org/shards/train-{000..003}.tar")
    gz = tmp_path / "gz"
    gz.mkdir()
    with tarfile.open(gz / "train-000.tar.gz", "w:gz") as tar:
        tar.add(data["shards"] / "classnames.txt", "a.cls")
    with pytest.raises(UsageError, match="gzip-compressed.*gunzip"):
        open_dataset(f"wds:{gz}/*.tar.gz")
    with pytest.raises(UnknownDatasetError, match=r"Unknown dataset prefix 'wsd:'.*Did you mean 'wds'"):
        open_dataset(f"wsd:{data['shards']}/*.tar")
    with pytest.raises(UnknownDatasetError, match="wds: needs a GLOB"):
        open_dataset("wds:")


def _tar(path, members):
    with tarfile.open(path, "w") as tar:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return path


def test_wds_structural_problems_are_refused_at_open_time(data, tmp_path):
    png = data["images"][0][4]
    scattered = _tar(tmp_path / "scattered.tar", [("a.png", png), ("b.png", png), ("a.cls", b"0")])
    with pytest.raises(UsageError, match="files of sample 'a' are not next to each other"):
        open_dataset(f"wds:{scattered}")
    two = _tar(tmp_path / "two.tar", [("a.png", png), ("a.jpg", png), ("a.cls", b"0")])
    with pytest.raises(UsageError, match=r"sample 'a' holds 2 images \(\.jpg, \.png\)"):
        open_dataset(f"wds:{two}")
    (tmp_path / "truncated.tar").write_bytes(scattered.read_bytes()[:700])
    with pytest.raises(UsageError, match="is not a readable tar file"):
        open_dataset(f"wds:{tmp_path / 'truncated.tar'}")


def test_wds_splits_from_folders_and_classes_from_cls_values(data, tmp_path):
    root = tmp_path / "ds"
    for split in ("train", "test"):  # train/0.tar, test/0.tar: the folder names the split
        (root / split).mkdir(parents=True)
        _write_shard(root / split / "0.tar", [im for im in data["images"] if im[0] == split])
    src = open_dataset(f"wds:{root}/*/*.tar")
    assert sorted(set(src.splits)) == ["test", "train"]
    assert src.classes == ["0", "1", "2"]  # no classnames.txt: the .cls values
    (root / "classnames.txt").write_text("a\nb\nc\n")
    assert open_dataset(f"wds:{root}/test/0.tar").classes == ["a", "b", "c"]  # beside the split folder

    flat = tmp_path / "flat"
    _write_shards(flat, data["images"])
    (flat / "train-000.tar").rename(flat / "part-000.tar")
    with pytest.raises(UsageError, match="have no split in their name"):
        open_dataset(f"wds:{flat}/*.tar")
    (flat / "test-000.tar").rename(flat / "part-001.tar")
    assert set(open_dataset(f"wds:{flat}/*.tar").splits) == {""}


def test_hf_columns_splits_and_plain_labels(data, tmp_path):
    png = data["images"][0][4]
    features = datasets.Features({"img": datasets.Image(), "fine": datasets.ClassLabel(names=["x", "y"]),
                                  "coarse": datasets.ClassLabel(names=["u", "v", "w"]), "n": datasets.Value("int64")})
    rows = {"img": [{"bytes": png, "path": None}] * 4, "fine": [0, 1, 0, 1], "coarse": [2, 2, 0, -1], "n": [7, 3, 7, 3]}
    ds = datasets.Dataset.from_dict(rows, features=features)
    ds.save_to_disk(str(tmp_path / "one"))
    with pytest.raises(UsageError, match=r"several ClassLabel columns \(fine, coarse\).*\?label=COL"):
        open_dataset(f"hf-disk:{tmp_path / 'one'}")
    src = open_dataset(f"hf-disk:{tmp_path / 'one'}?label=coarse")
    assert src.classes == ["u", "v", "w"] and list(src.labels) == [2, 2, 0, -1] and set(src.splits) == {""}
    plain = open_dataset(f"hf-disk:{tmp_path / 'one'}?label=n&image=img")
    assert plain.classes == ["3", "7"] and list(plain.labels) == [1, 0, 1, 0]
    with pytest.raises(UsageError, match="unknown option 'lable'. Did you mean 'label'"):
        open_dataset(f"hf-disk:{tmp_path / 'one'}?lable=n")

    datasets.DatasetDict({"train": ds, "validation": ds, "unsupervised": ds}).save_to_disk(str(tmp_path / "dd"))
    with pytest.raises(UsageError, match="split\\(s\\) 'unsupervised'"):
        open_dataset(f"hf-disk:{tmp_path / 'dd'}?label=fine")
    datasets.DatasetDict({"train": ds, "validation": ds}).save_to_disk(str(tmp_path / "dd2"))
    assert sorted(set(open_dataset(f"hf-disk:{tmp_path / 'dd2'}?label=fine").splits)) == ["train", "val"]
    with pytest.raises(UsageError, match="is not a directory"):
        open_dataset(f"hf-disk:{tmp_path / 'absent'}")


# ----------------------------------------------------------------------------- the environment


def test_missing_packages_name_the_extra(data, monkeypatch):
    with pytest.raises(UsageError, match=r"pip install 'featx\[webdataset\]'"):
        require("featx_absent_package", "wds:", extra="webdataset")
    monkeypatch.setitem(sys.modules, "webdataset", None)  # what `import webdataset` meets when it is not installed
    with pytest.raises(UsageError, match=r"wds: \(WebDataset shards\) needs .*pip install 'featx\[webdataset\]'"):
        open_dataset(f"wds:{data['shards']}/*.tar")
    monkeypatch.setitem(sys.modules, "datasets", None)
    with pytest.raises(UsageError, match=r"needs the Python package 'datasets'.*pip install 'featx\[hf\]'"):
        open_dataset(f"hf-disk:{data['hf']}")


def test_offline_environment_leaves_the_users_settings(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "0")
    monkeypatch.delenv("HF_DATASETS_OFFLINE", raising=False)
    with offline_environment():
        assert os.environ["HF_DATASETS_OFFLINE"] == "1" and os.environ["HF_HUB_OFFLINE"] == "0"
    assert "HF_DATASETS_OFFLINE" not in os.environ and os.environ["HF_HUB_OFFLINE"] == "0"
