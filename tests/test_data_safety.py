"""Datasets are read as the user meant or refused: splits, fingerprints, parsing, split sizes."""

import json
import logging
import os
import shutil

import numpy as np
import pytest

import featx
from featx.cache.key import config_key
from featx.cli import main
from featx.data import open_dataset
from featx.errors import UnknownLayerError, UsageError
from featx.probing import assign_splits

from .conftest import TINY, make_folder, noisy_copy

TINY_ARGS = ["--model", "timm:resnet18", "--weights", "none", "--image-size", "32", "--no-progress"]


def cli(capsys, *args):
    """The console entry point in this process; its log handler is removed afterwards."""
    try:
        with pytest.raises(SystemExit) as exited:
            main(list(args))
    finally:
        logger = logging.getLogger("featx")
        logger.handlers.clear()
        logger.propagate = True
    captured = capsys.readouterr()
    return exited.value.code, captured.out, " ".join(captured.err.split())


# ----------------------------------------------------------------------------- validation splits


@pytest.fixture(scope="module")
def val_entry(tmp_path_factory):
    root = make_folder(tmp_path_factory.mktemp("val") / "imgs", n_per_class=8, classes=("a", "b", "c"),
                       splits=("train", "val", "test"))
    return featx.extract(f"folder:{root}", layers="layer3,pre_logits", dtype="float32",
                         cache_dir=tmp_path_factory.mktemp("val-cache"), **TINY)


def test_val_split_selects_and_is_never_trained_on(val_entry, tmp_path, monkeypatch):
    base = featx.probe(val_entry, heads="logreg,knn", out_dir=tmp_path / "out", progress=False, jobs=1)
    protocol = json.loads((tmp_path / "out" / "results.json").read_text())["protocol"]
    assert protocol["roles"] == {"train": {"splits": ["train"], "n": 24},
                                 "selection": {"splits": ["val"], "n": 24},
                                 "test": {"splits": ["test"], "n": 24}}
    assert "validation split" in protocol["selection"]
    assert all(r["n_train"] == 24 for r in base.rows)  # train only: the val rows are not merged in

    s = val_entry.samples()
    rng = np.random.default_rng(3)

    def tampered(split):
        return noisy_copy(val_entry, s["split"] == split, tmp_path / f"tampered-{split}", rng)

    no_test = featx.probe(tampered("test"), heads="logreg,knn", out_dir=False, progress=False, jobs=1)
    for a, b in zip(base.rows, no_test.rows):  # the test rows never influence selection
        assert a["grid"] == b["grid"] and a["params"] == b["params"]
    assert [r["test_top1"] for r in base.rows] != [r["test_top1"] for r in no_test.rows]  # they were read

    no_val = featx.probe(tampered("val"), heads="logreg,knn", out_dir=False, progress=False, jobs=1)
    assert [r["grid"] for r in base.rows] != [r["grid"] for r in no_val.rows]  # selection reads val
    labels = s["label"].copy()
    val = s["split"] == "val"
    labels[val] = (labels[val] + 1) % 3  # wrong val labels change nothing but selection scores
    monkeypatch.setattr(type(val_entry), "samples", lambda self: {**s, "label": labels})
    shifted = featx.probe(val_entry, heads="knn", out_dir=False, progress=False, jobs=1)
    assert all(r["val_top1"] < 0.5 for r in shifted.rows)


@pytest.mark.parametrize("name", ["valid", "validation", "Val"])
def test_validation_folder_names_become_val(tmp_path, name):
    root = make_folder(tmp_path / "f", n_per_class=2, splits=("train", name, "test"))
    assert set(open_dataset(f"folder:{root}").splits) == {"train", "val", "test"}


def test_unknown_split_names_are_refused(tmp_path):
    root = make_folder(tmp_path / "f", n_per_class=2, splits=("train", "test", "extra"))
    with pytest.raises(UsageError, match="extra"):
        open_dataset(f"folder:{root}")
    make_folder(tmp_path / "imgs", n_per_class=1, splits=None)
    (tmp_path / "l.csv").write_text("path,label,split\nimgs/cat/img000.png,cat,train\nimgs/dog/img000.png,dog,"
                                    "extra\nimgs/owl/img000.png,owl,dev\n")
    with pytest.raises(UsageError, match="extra.*row 3|row 3.*extra"):
        open_dataset(f"csv:{tmp_path / 'l.csv'}")
    y = np.array([0, 1, 0, 1, 0, 1])
    with pytest.raises(UsageError, match="'extra'"):
        assign_splits(y, np.array(["train", "train", "extra", "extra", "test", "test"]))


def test_val_split_rows_are_not_training_rows():
    y = np.tile([0, 1], 6)
    s = assign_splits(y, np.array(["train"] * 4 + ["val"] * 4 + ["test"] * 4))
    assert list(s.train) == [0, 1, 2, 3] and list(s.val) == [4, 5, 6, 7] and list(s.test) == [8, 9, 10, 11]


def test_val_and_test_without_train_is_refused():
    y = np.tile([0, 1], 4)
    with pytest.raises(UsageError, match="no train split"):
        assign_splits(y, np.array(["val"] * 4 + ["test"] * 4))


def test_csv_split_spellings_and_rows_without_a_split(tmp_path):
    make_folder(tmp_path / "imgs", n_per_class=2, splits=None)
    (tmp_path / "l.csv").write_text("path,label,split\nimgs/cat/img000.png,cat,Train\nimgs/dog/img000.png,dog,"
                                    "valid\nimgs/owl/img000.png,owl,Testing\n")
    assert list(open_dataset(f"csv:{tmp_path / 'l.csv'}").splits) == ["train", "val", "test"]
    (tmp_path / "m.csv").write_text("path,label,split\nimgs/cat/img000.png,cat,train\nimgs/dog/img000.png,dog,"
                                    "\nimgs/owl/img000.png,owl,test\n")
    with pytest.raises(UsageError, match="rows 3 have no split"):
        open_dataset(f"csv:{tmp_path / 'm.csv'}")


# ----------------------------------------------------------------------------- fingerprints


def _key(spec, **kw):
    """The cache key as far as the dataset decides it."""
    return config_key({"dataset": open_dataset(spec, **kw).fingerprint()})


def test_same_size_edit_with_reset_mtime_changes_the_fingerprint(tmp_path):
    root = make_folder(tmp_path / "f", n_per_class=2, splits=None)
    target = root / "cat" / "img000.png"
    before = _key(f"folder:{root}")
    st = target.stat()
    data = bytearray(target.read_bytes())
    data[-20] ^= 0xFF  # same size, different bytes
    target.write_bytes(bytes(data))
    os.utime(target, ns=(st.st_atime_ns, st.st_mtime_ns))  # what cp -p, rsync -a and tar x do
    assert target.stat().st_size == st.st_size and target.stat().st_mtime_ns == st.st_mtime_ns
    assert _key(f"folder:{root}") != before


def test_moved_folder_keeps_its_key_and_hits_the_cache(tmp_path):
    root = make_folder(tmp_path / "a" / "imgs", n_per_class=2)
    first = featx.extract(f"folder:{root}", layers="layer1", **TINY)
    moved = tmp_path / "b" / "imgs"
    moved.parent.mkdir()
    shutil.move(str(root), str(moved))
    again = featx.extract(f"folder:{moved}", layers="layer1", **TINY)
    assert again.key == first.key and not again.last_run.forward_pass


def test_moved_csv_keeps_its_key(tmp_path):
    make_folder(tmp_path / "a" / "imgs", n_per_class=2, splits=None)
    (tmp_path / "a" / "l.csv").write_text("path,label\nimgs/cat/img000.png,cat\nimgs/dog/img001.png,dog\n")
    before = _key(f"csv:{tmp_path / 'a' / 'l.csv'}")
    (tmp_path / "a").rename(tmp_path / "b")
    assert _key(f"csv:{tmp_path / 'b' / 'l.csv'}") == before


def test_hash_content_survives_copies_and_sees_changed_bytes(tmp_path):
    root = make_folder(tmp_path / "f", n_per_class=2, splits=None)
    before = _key(f"folder:{root}", hash_content=True)
    assert open_dataset(f"folder:{root}", hash_content=True).fingerprint()["content_mode"] == "sha256"
    assert open_dataset(f"folder:{root}").fingerprint()["content_mode"] == "stat"
    copy = tmp_path / "copy"  # another name, too: renaming is moving
    shutil.copytree(root, copy, copy_function=shutil.copyfile)  # new mtimes, inodes, ctimes
    assert _key(f"folder:{copy}", hash_content=True) == before
    assert _key(f"folder:{copy}") != _key(f"folder:{root}")
    target = copy / "dog" / "img001.png"
    data = bytearray(target.read_bytes())
    data[-20] ^= 0xFF
    target.write_bytes(bytes(data))
    assert _key(f"folder:{copy}", hash_content=True) != before


def test_hash_content_from_the_api_and_the_cli(tmp_path, capsys):
    root = make_folder(tmp_path / "f", n_per_class=2)
    plain = featx.extract(f"folder:{root}", layers="layer1", **TINY)
    hashed = featx.extract(f"folder:{root}", layers="layer1", hash_content=True, **TINY)
    assert hashed.key != plain.key and hashed.config["dataset"]["content_mode"] == "sha256"
    status, out, err = cli(capsys, "extract", f"folder:{root}", *TINY_ARGS, "--layers", "layer1", "--hash-content")
    assert status in (0, None), err
    assert "cache hit" in out


# ----------------------------------------------------------------------------- parsing


def test_junk_and_hidden_folders_are_skipped_with_a_warning(tmp_path, caplog):
    root = make_folder(tmp_path / "f", n_per_class=2)
    make_folder(root / "__MACOSX", n_per_class=1)  # the archive's resource forks, mirroring the tree
    make_folder(root / "train" / "cat" / ".thumbs", n_per_class=1, splits=None, classes=("x",))
    make_folder(root / "train" / "dog" / "@eaDir", n_per_class=1, splits=None, classes=("y",))
    make_folder(root / "test" / ".hidden", n_per_class=1, splits=None, classes=("z",))
    (root / ".DS_Store").write_bytes(b"\0")
    (root / "train" / "Thumbs.db").write_bytes(b"\0")
    with caplog.at_level(logging.WARNING, logger="featx"):
        src = open_dataset(f"folder:{root}")
    assert set(src.splits) == {"train", "test"} and src.classes == ["cat", "dog", "owl"]
    assert len(src) == 12 and not any("@eaDir" in i or "/." in i for i in src.ids)
    assert "__MACOSX" in caplog.text and "@eaDir" in caplog.text


def test_class_names_that_are_the_same_number_are_refused(tmp_path):
    root = make_folder(tmp_path / "f", n_per_class=1, classes=("1", "01", "2"), splits=None)
    with pytest.raises(UsageError, match="'01'.*'1'|'1'.*'01'"):
        open_dataset(f"folder:{root}")
    make_folder(tmp_path / "imgs", n_per_class=2, splits=None)
    (tmp_path / "l.csv").write_text("path,label\nimgs/cat/img000.png,1\nimgs/dog/img000.png,01\n"
                                    "imgs/owl/img000.png, 2\nimgs/owl/img001.png,2\n")
    with pytest.raises(UsageError, match=r"l\.csv.*row 3"):
        open_dataset(f"csv:{tmp_path / 'l.csv'}")


def test_csv_header_with_other_names_is_refused(tmp_path):
    make_folder(tmp_path / "imgs", n_per_class=2, splits=None)
    (tmp_path / "l.csv").write_text("img,target\nimgs/cat/img000.png,cat\nimgs/dog/img000.png,dog\n")
    with pytest.raises(UsageError, match=r"l\.csv.*img,target.*path,label"):
        open_dataset(f"csv:{tmp_path / 'l.csv'}")
    (tmp_path / "ok.csv").write_text("label,path\ncat,imgs/cat/img000.png\ndog,imgs/dog/img000.png\n")
    assert open_dataset(f"csv:{tmp_path / 'ok.csv'}").classes == ["cat", "dog"]


def test_non_utf8_csv_names_the_file_and_the_byte(tmp_path):
    make_folder(tmp_path / "imgs", n_per_class=1, splits=None)
    (tmp_path / "l.csv").write_bytes("path,label\nimgs/cat/img000.png,caf\u00e9\n".encode("latin-1"))
    with pytest.raises(UsageError, match=r"l\.csv.*byte 34.*UTF-8"):
        open_dataset(f"csv:{tmp_path / 'l.csv'}")


@pytest.mark.parametrize("rows, message", [
    (["path,label", ",cat", "imgs/dog/img000.png,dog"], "row 2.*no path"),
    (["path,label", "imgs/cat/img000.png,cat", "imgs/cat/img000.png,dog"], "row 3.*imgs/cat/img000.png.*row 2"),
    (["path,label", "imgs/cat/img000.png,cat", "./imgs/cat/img000.png,cat"], "twice"),
])
def test_csv_rows_without_path_or_listed_twice_are_refused(tmp_path, rows, message):
    make_folder(tmp_path / "imgs", n_per_class=1, splits=None)
    (tmp_path / "l.csv").write_text("\n".join(rows) + "\n")
    with pytest.raises(UsageError, match=message):
        open_dataset(f"csv:{tmp_path / 'l.csv'}")


# ----------------------------------------------------------------------------- split sizes


def test_run_with_too_small_a_limit_exits_2_before_extracting(tmp_path, capsys):
    status, _, err = cli(capsys, "run", "digits", *TINY_ARGS, "--limit", "40", "--heads", "logreg")
    assert status == 2, err
    assert "Traceback" not in err and "test" in err and "--limit" in err
    assert not list((tmp_path / "cache").glob("*.h5"))  # nothing was extracted
    suggested = int(err.split("--limit ")[-1].split()[0].rstrip(".,"))
    from featx.api import check_probe_data

    check_probe_data("digits", limit=suggested)  # the suggestion works
    with pytest.raises(UsageError):
        check_probe_data("digits", limit=suggested - 1)


def test_probe_of_an_entry_with_too_few_samples_is_a_usage_error(tmp_path, capsys):
    root = make_folder(tmp_path / "f", n_per_class=2, splits=None)
    entry = featx.extract(f"folder:{root}", layers="layer1", **TINY)
    status, _, err = cli(capsys, "probe", entry.key[:12], "--heads", "logreg", "--jobs", "1")
    assert status == 2 and "Traceback" not in err and "class" in err, err


# ----------------------------------------------------------------------------- layer grammar


@pytest.mark.parametrize("spec", ["::0", "1:2:3:4", "a:b", "-:", ",", "0:4:0"])
def test_malformed_layer_specs_are_usage_errors(spec):
    ladder = featx.layers("timm:resnet18", image_size=32)
    with pytest.raises(UsageError, match="slice|layer"):
        ladder.select(spec, "timm:resnet18")


def test_zero_step_slice_through_the_cli(tmp_path, capsys):
    root = make_folder(tmp_path / "f", n_per_class=1)
    status, _, err = cli(capsys, "extract", f"folder:{root}", *TINY_ARGS, "--layers", "::0")
    assert status == 2 and "Traceback" not in err and "step" in err, err
    ladder = featx.layers("timm:resnet18", image_size=32)
    assert [x.name for x in ladder.select("::2")] == [x.name for x in ladder.layers[::2]]
    with pytest.raises(UnknownLayerError):
        ladder.select("100:200")
