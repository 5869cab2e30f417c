"""featx cache export: npz and parquet files that read back equal to featx.load_features; safe writes."""

import json
import logging
import shutil
import sys

import h5py
import numpy as np
import pytest
from typer.testing import CliRunner

import featx
from featx import errors
from featx.cache import export as export_module
from featx.cli import app, main

from .conftest import TINY, make_folder

LAYERS = "layer1,layer3,pre_logits"


@pytest.fixture(scope="module")
def entry(tmp_path_factory):
    """A float16 entry of three layers with one unreadable image (recorded, not substituted)."""
    root = tmp_path_factory.mktemp("export")
    images = make_folder(root / "imgs", n_per_class=4, classes=("cat", "dog", "owl"))
    (images / "train" / "dog" / "broken.png").write_bytes(b"\x89PNG not really")
    e = featx.extract(f"folder:{images}", layers=LAYERS, cache_dir=root / "cache", **TINY)
    assert (~e.samples()["ok"]).sum() == 1 and e.layer("layer3").dtype == "float16"
    return e


@pytest.fixture
def pq():
    """pyarrow's parquet module (an optional dependency, in the dev extra); npz needs none."""
    return pytest.importorskip("pyarrow.parquet")


def invoke(args):
    """``featx ARGS`` in this process; the featx logger is restored afterwards."""
    logger = logging.getLogger("featx")
    saved = (list(logger.handlers), logger.level, logger.propagate)
    try:
        return CliRunner().invoke(app, [str(a) for a in args])
    finally:
        logger.handlers[:], logger.level, logger.propagate = saved


def _parquet_features(table, layer: str) -> np.ndarray:
    column = table.column(f"features/{layer}").combine_chunks()
    return column.flatten().to_numpy().reshape(len(table), column.type.list_size)


def _has_pyarrow() -> bool:
    import importlib.util

    return importlib.util.find_spec("pyarrow") is not None


def _leftovers(folder):
    return sorted(p.name for p in folder.iterdir() if p.name.endswith(".tmp"))


# ------------------------------------------------------------------------------ what is written


def test_npz_holds_every_layer_as_load_features_gives_it(entry, tmp_path):
    done = featx.export_features(entry, tmp_path / "f.npz")
    assert (done.format, done.layers, done.rows) == ("npz", entry.layer_names, 24)
    with np.load(tmp_path / "f.npz") as z:  # no pickles needed: allow_pickle stays False
        assert list(z["layers"]) == entry.layer_names == ["layer1", "layer3", "pre_logits"]
        for layer in entry.layer_names:
            f = featx.load_features(entry, layer)
            assert z[f"features/{layer}"].dtype == np.float32
            np.testing.assert_array_equal(z[f"features/{layer}"], f.X)
        np.testing.assert_array_equal(z["label"], f.y)
        assert list(z["id"]) == list(f.ids) and list(z["split"]) == list(f.split)
        assert list(z["classes"]) == f.classes == ["cat", "dog", "owl"]
        assert z["ok"].all() and not any(z["error"]) and "broken.png" not in " ".join(z["id"])
        meta = json.loads(z["metadata"].item())
    assert (meta["format"], meta["version"], meta["dtype"], meta["rows"]) == \
        ("featx-features-export", 1, "float32", 24)
    assert meta["entry"]["key"] == entry.key and meta["classes"] == entry.classes
    assert [(x["name"], x["width"], x["stored_dtype"]) for x in meta["layers"]] == \
        [(r.name, r.width, "float16") for r in entry.layers]


def test_include_bad_keeps_the_unreadable_rows_flagged(entry, tmp_path):
    featx.export_features(entry, tmp_path / "all.npz", layers="layer3", include_bad=True)
    full = featx.load_features(entry, "layer3", include_bad=True)
    with np.load(tmp_path / "all.npz") as z:
        assert list(z.keys()).count("features/layer3") == 1 and "features/layer1" not in z
        np.testing.assert_array_equal(z["features/layer3"], full.X)
        assert len(z["id"]) == entry.n_samples == 25
        (bad,) = np.flatnonzero(~z["ok"])
        assert z["id"][bad].endswith("broken.png") and z["error"][bad]
        assert json.loads(z["metadata"].item())["include_bad"] is True


def test_parquet_one_row_per_image_with_a_list_column_per_layer(entry, tmp_path, monkeypatch, pq):
    monkeypatch.setattr(export_module, "ROW_GROUP_BYTES", 4 * (256 + 512) * 5)  # 5 rows per group
    done = featx.export_features(entry, tmp_path / "f.parquet", layers=["pre_logits", "layer3"])
    assert done.layers == ["pre_logits", "layer3"] and done.format == "parquet"
    file = pq.ParquetFile(tmp_path / "f.parquet")
    assert file.metadata.num_row_groups == 5  # 24 rows
    table = file.read()
    assert table.column_names == ["id", "split", "label", "class_name", "ok", "error", "features/pre_logits",
                                  "features/layer3"]
    for layer in ("layer3", "pre_logits"):
        f = featx.load_features(entry, layer)
        assert table.schema.field(f"features/{layer}").type.list_size == f.X.shape[1]
        np.testing.assert_array_equal(_parquet_features(table, layer), f.X)
    assert table.column("id").to_pylist() == list(f.ids)
    assert table.column("label").to_pylist() == f.y.tolist()
    assert table.column("class_name").to_pylist() == [f.classes[i] for i in f.y]
    assert table.column("split").to_pylist() == list(f.split) and all(table.column("ok").to_pylist())
    meta = json.loads(table.schema.metadata[b"featx"])
    assert meta["entry"]["key"] == entry.key and [x["name"] for x in meta["layers"]] == done.layers
    frame = table.to_pandas()  # the usual way in: one array per cell
    np.testing.assert_array_equal(np.stack(frame["features/layer3"]), featx.load_features(entry, "layer3").X)


def test_layers_by_name_or_comma_list_each_once(entry, tmp_path):
    done = featx.export_features(entry, tmp_path / "x.npz", layers=["pre_logits,layer1", "pre_logits"])
    assert done.layers == ["pre_logits", "layer1"]


# ------------------------------------------------------------------------------ refused, nothing lost


def test_existing_file_is_kept_unless_force(entry, tmp_path):
    out = tmp_path / "f.npz"
    out.write_bytes(b"the user's own file")
    with pytest.raises(errors.UsageError, match="already exists.*--force"):
        featx.export_features(entry, out, layers="layer3")
    assert out.read_bytes() == b"the user's own file"
    featx.export_features(entry, out, layers="layer3", force=True)
    with np.load(out) as z:
        np.testing.assert_array_equal(z["features/layer3"], featx.load_features(entry, "layer3").X)
    assert _leftovers(tmp_path) == []
    with pytest.raises(errors.UsageError, match="is a folder"):
        featx.export_features(entry, tmp_path, force=True)


def test_mistyped_layer_gets_close_matches(entry, tmp_path):
    with pytest.raises(errors.UnknownLayerError, match="'layr3'.*Did you mean 'layer3'.*It holds: layer1, layer3"):
        featx.export_features(entry, tmp_path / "f.npz", layers="layer1,layr3")
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("out, fmt, message", [
    ("f.csv", None, "Cannot tell the export format from 'f.csv'"),
    ("f.npz", "parquet", "--format parquet does not match the file name 'f.npz'"),
    ("f.bin", "parket", "Unknown export format 'parket'.*Did you mean 'parquet'"),
])
def test_format_comes_from_the_option_or_the_suffix(entry, tmp_path, out, fmt, message):
    if fmt == "parquet":
        pytest.importorskip("pyarrow")
    with pytest.raises(errors.UsageError, match=message):
        featx.export_features(entry, tmp_path / out, format=fmt)
    assert list(tmp_path.iterdir()) == []


def test_suffix_free_name_with_format(entry, tmp_path):
    assert featx.export_features(entry, tmp_path / "features", format="npz", layers="layer1").format == "npz"
    assert (tmp_path / "features").is_file() and not (tmp_path / "features.npz").exists()


def test_parquet_without_pyarrow_names_the_install(entry, tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "pyarrow", None)
    monkeypatch.setitem(sys.modules, "pyarrow.parquet", None)
    with pytest.raises(errors.MissingDependencyError, match="pip install pyarrow.*featx\\[parquet\\]"):
        featx.export_features(entry, tmp_path / "f.parquet")
    assert list(tmp_path.iterdir()) == []


def test_damaged_entry_fails_without_leaving_a_file(entry, tmp_path):
    broken = tmp_path / "entry" / entry.path.name
    broken.parent.mkdir()
    shutil.copy(entry.path, broken)
    with h5py.File(broken) as f:
        chunk = f["layers"]["layer3"].id.get_chunk_info(0)
    with open(broken, "r+b") as fh:
        fh.seek(chunk.byte_offset + chunk.size // 2)
        fh.write(b"\xff" * 32)
    out = tmp_path / "out"
    out.mkdir()
    for name in ("f.npz", "f.parquet") if _has_pyarrow() else ("f.npz",):
        with pytest.raises(errors.CacheCorruptError, match="layer3 failed its checksum"):
            featx.export_features(broken, out / name)
    assert list(out.iterdir()) == []


# ------------------------------------------------------------------------------ the command line


def test_cli_exports_and_exit_codes(entry, tmp_path, capsys, pq):
    cache = entry.path.parent
    out = tmp_path / "f.parquet"
    done = invoke(["--cache-dir", cache, "cache", "export", entry.key[:12], "--layer", "layer3", "--layer",
                   "pre_logits", "--out", out])
    assert done.exit_code == 0, done.output
    assert "wrote" in done.output and "24 rows" in done.output and "layer3, pre_logits" in done.output
    np.testing.assert_array_equal(_parquet_features(pq.read_table(out), "layer3"),
                                  featx.load_features(entry, "layer3").X)

    again = invoke(["--cache-dir", cache, "cache", "export", entry.key[:12], "--out", out])
    assert isinstance(again.exception, errors.UsageError) and again.exception.exit_code == 2
    assert "already exists" in str(again.exception)
    forced = invoke(["--cache-dir", cache, "cache", "export", entry.key[:12], "--out", out, "--force",
                     "--format", "parquet"])
    assert forced.exit_code == 0 and "3 layer(s)" in forced.output

    typo = invoke(["--cache-dir", cache, "cache", "export", entry.key[:12], "-l", "pre_logit", "--out",
                   tmp_path / "g.npz"])
    assert isinstance(typo.exception, errors.UnknownLayerError) and "Did you mean 'pre_logits'" in str(typo.exception)

    with pytest.raises(SystemExit) as exited:  # the installed entry point: message, exit code, no traceback
        main(["--cache-dir", str(cache), "cache", "export", entry.key[:12], "--out", str(out)])
    stderr = capsys.readouterr().err
    assert exited.value.code == 2 and "already exists" in stderr and "Traceback" not in stderr
    assert not (tmp_path / "g.npz").exists() and _leftovers(tmp_path) == []
