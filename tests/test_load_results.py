"""featx.load_results: every kind of result folder featx writes, read back; bad folders refused by type."""

import ast
import json
import shutil
import sys
from pathlib import Path

import pytest

import featx
from featx import errors
from featx.comparison.runner import COMPARISON_VERSION, contenders
from featx.finetuning.result import VERSION as FINETUNE_VERSION
from featx.probing.runner import RESULTS_VERSION
from featx.results import SCHEMAS, load_results

from .conftest import REPO, make_folder

MODELS = ["timm:resnet18", "torchvision:resnet18"]
TINY = {"weights": "none", "image_size": 32, "progress": False}
TINY_FT = {"model": MODELS[0], **TINY, "workers": 0, "batch_size": 16}


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return make_folder(tmp_path_factory.mktemp("load") / "imgs", n_per_class=10, classes=("a", "b", "c"))


@pytest.fixture(scope="module")
def compared(folder, tmp_path_factory):
    """A real comparison of two tiny backbones: comparison.json and a probe result per backbone."""
    root = tmp_path_factory.mktemp("compared")
    res = featx.compare(f"folder:{folder}", MODELS, out_dir=root / "cmp", cache_dir=root / "cache", heads="logreg,knn",
                        jobs=1, layers="layer1,pre_logits", plots=False, **TINY)
    return res, root / "cmp"


@pytest.fixture(scope="module")
def probe_dir(compared):
    _, out = compared
    return out / "models" / contenders(MODELS[:1], weights="none")[0].slug


@pytest.fixture(scope="module")
def sweep(folder, tmp_path_factory):
    """A two-point fine-tuning sweep of one epoch each: sweep.json and a finetune.json per point."""
    out = tmp_path_factory.mktemp("sweep") / "sweep"
    res = featx.finetune(f"folder:{folder}", layer="layer2", sweep="lr=1e-2,1e-3", epochs=1, patience=None,
                         out_dir=out, **TINY_FT)
    return res, out


def _json(path: Path) -> dict:
    return json.loads(path.read_text())


def _copy(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


# ------------------------------------------------------------------------------ each kind, read back


def test_probe_result_round_trips(compared, probe_dir):
    res, _ = compared
    data = _json(probe_dir / "results.json")
    r = load_results(probe_dir)
    assert (r.kind, r.schema_version, r.path) == ("probe", RESULTS_VERSION, probe_dir)
    assert r.rows == data["rows"] and r.best == data["best"] and r.protocol == data["protocol"]
    assert r.entry == data["entry"] and r.raw == data and r.file == probe_dir / "results.json"
    assert len(r.rows) == 2 * 2 and r.best in r.rows and r.models == {}
    ran = res.probes[MODELS[0]]  # the object the run returned, against what was read back
    assert [(x["layer"], x["head"], x["test_top1"]) for x in r.rows] == \
        [(x["layer"], x["head"], x["test_top1"]) for x in ran.rows]
    assert r.entry["key"] == ran.entry["key"] and r.best["layer"] == ran.best["layer"]
    assert load_results(probe_dir / "results.json").rows == r.rows  # the file itself names the folder too
    assert featx.load_results is load_results and featx.api.load_results is load_results
    assert "kind='probe'" in repr(r) and "test_top1" in repr(r)


def test_probe_to_frame_has_one_row_per_cell(probe_dir):
    r = load_results(probe_dir)
    frame = r.to_frame()
    assert len(frame) == len(r.rows)
    assert {"layer", "head", "depth", "params", "val_top1", "test_top1", "test_top1_ci_low",
            "test_top1_ci_high", "balanced_accuracy", "macro_f1"} <= set(frame.columns)
    assert list(frame["layer"]) == [x["layer"] for x in r.rows]
    assert list(frame["test_top1"]) == [x["test_top1"] for x in r.rows]
    assert list(frame["test_top1_ci_low"]) == [x["test_top1_ci"][0] for x in r.rows]
    assert list(frame["test_top1_ci_high"]) == [x["test_top1_ci"][1] for x in r.rows]
    cols = list(frame.columns)
    assert cols.index("test_top1_ci_low") == cols.index("test_top1_ci") + 1
    best = frame[(frame["layer"] == r.best["layer"]) & (frame["head"] == r.best["head"])]
    assert len(best) == 1 and best["val_top1"].iloc[0] == frame["val_top1"].max()


def test_comparison_round_trips_with_each_backbones_probe(compared):
    res, out = compared
    data = _json(out / "comparison.json")
    r = load_results(out)
    assert (r.kind, r.schema_version, r.entry) == ("comparison", COMPARISON_VERSION, None)
    assert r.rows == data["leaderboard"] and r.best == data["leader"] and r.protocol == data["protocol"]
    assert [x["model"] for x in r.rows] == [x["model"] for x in res.leaderboard]
    assert set(r.models) == set(MODELS)
    for row in r.rows:
        own = r.models[row["model"]]
        assert own.kind == "probe" and own.path == out / row["results"]
        assert (own.best["layer"], own.best["head"], own.best["test_top1"]) == \
            (row["layer"], row["head"], row["test_top1"])
        assert own.entry["key"] == row["entry"]
    frame = r.to_frame()
    assert len(frame) == 2 and list(frame["rank"]) == [1, 2] and list(frame["model"]) == [x["model"] for x in r.rows]


def test_finetune_run_and_sweep_round_trip(sweep):
    res, out = sweep
    data = _json(out / "sweep.json")
    s = load_results(out)
    assert (s.kind, s.schema_version) == ("finetune-sweep", FINETUNE_VERSION)
    assert s.rows == data["rows"] and s.best == data["chosen"] and s.protocol == {"grid": data["grid"]}
    assert [x["lr"] for x in s.to_frame().to_dict("records")] == [0.01, 0.001]

    run_dir = Path(s.best["out_dir"])
    run = _json(run_dir / "finetune.json")
    r = load_results(run_dir)
    assert (r.kind, r.schema_version, r.entry) == ("finetune", FINETUNE_VERSION, None)
    assert r.rows == run["history"] and [x["epoch"] for x in r.rows] == [0, 1]
    assert r.protocol == run["config"]
    assert {k: r.best[k] for k in run["test"]} == run["test"]
    assert (r.best["layer"], r.best["best_epoch"], r.best["val_top1"]) == \
        (run["layer"], run["best_epoch"], run["best_val_top1"])
    assert r.best["test_top1"] == res.test_top1 == s.best["test_top1"]
    frame = r.to_frame()
    assert list(frame["epoch"]) == [0, 1] and "val_top1" in frame.columns


def test_unversioned_finetune_file_reads_as_version_1(sweep, tmp_path):
    """finetune.json before it carried format/version (version 1, older test keys) is read as what it is."""
    run_dir = _copy(Path(sweep[0].out_dir), tmp_path / "old")
    data = _json(run_dir / "finetune.json")
    for key in ("format", "version", "network"):
        data.pop(key)
    data["test"] = {"n": 18, "top1": 0.5, "top1_ci95": [0.3, 0.7], "balanced_accuracy": 0.5, "macro_f1": 0.4}
    (run_dir / "finetune.json").write_text(json.dumps(data))
    r = load_results(run_dir)
    assert r.schema_version == 1 and r.best["top1"] == 0.5 and r.rows == data["history"]
    assert r.to_frame()["epoch"].tolist() == [0, 1]


def test_writers_versions_are_the_newest_the_reader_knows():
    assert SCHEMAS["probe"].versions[-1] == RESULTS_VERSION
    assert SCHEMAS["comparison"].versions[-1] == COMPARISON_VERSION
    assert SCHEMAS["finetune"].versions[-1] == FINETUNE_VERSION == SCHEMAS["finetune-sweep"].versions[-1]


# ------------------------------------------------------------------------------ refused, by type


def test_kind_filter_refuses_another_kind(probe_dir, compared):
    with pytest.raises(errors.ResultsNotFoundError, match="holds a featx probe result.*not a finetune"):
        load_results(probe_dir, kind="finetune")
    assert load_results(compared[1], kind="comparison").kind == "comparison"
    with pytest.raises(errors.UsageError, match="Unknown result kind 'probes'"):
        load_results(probe_dir, kind="probes")


def test_missing_empty_and_foreign_folders_are_refused(tmp_path, compared):
    with pytest.raises(errors.ResultsNotFoundError, match="does not exist"):
        load_results(tmp_path / "nowhere")
    (tmp_path / "empty").mkdir()
    with pytest.raises(errors.ResultsNotFoundError, match="holds no featx result.*results.json.*found nothing"):
        load_results(tmp_path / "empty")
    notes = tmp_path / "notes"
    notes.mkdir()
    (notes / "todo.txt").write_text("x")
    with pytest.raises(errors.ResultsNotFoundError, match="found todo.txt"):
        load_results(notes)
    with pytest.raises(errors.ResultsNotFoundError, match="not a featx result file"):
        load_results(notes / "todo.txt")
    cache = Path(compared[0].probes[MODELS[0]].entry["path"]).parent
    with pytest.raises(errors.ResultsNotFoundError, match="feature cache.*load_features"):
        load_results(cache)
    assert issubclass(errors.ResultsNotFoundError, errors.UsageError)  # the CLI's exit code 2


def test_unfinished_finetune_run_is_refused(sweep, tmp_path):
    run_dir = _copy(Path(sweep[0].out_dir), tmp_path / "run")
    (run_dir / "finetune.json").unlink()
    (run_dir / "checkpoint.pt").write_bytes(b"")
    with pytest.raises(errors.ResultsNotFoundError, match="unfinished featx finetune result.*no finetune.json"):
        load_results(run_dir)


@pytest.mark.parametrize("damage, message", [
    (lambda text: text[: len(text) // 2], "is damaged: not valid JSON"),
    (lambda text: "[1, 2]", "holds a JSON list"),
    (lambda text: text.replace('"version": 2', '"version": 99'), "schema version 99.*newer featx.*upgrade"),
    (lambda text: text.replace('"version": 2', '"version": "2"'), "no valid schema version"),
    (lambda text: text.replace('"featx-probe-results"', '"someone-elses"'), "format 'someone-elses', expected"),
    (lambda text: text.replace('"rows":', '"cells":'), "'rows' is missing"),
], ids=["truncated", "not-an-object", "newer", "version-string", "other-format", "missing-rows"])
def test_damaged_or_newer_files_are_refused(probe_dir, tmp_path, damage, message):
    copy = _copy(probe_dir, tmp_path / "copy")
    file = copy / "results.json"
    text = file.read_text()
    damaged = damage(text)
    assert damaged != text
    file.write_text(damaged)
    with pytest.raises(errors.ResultsFormatError, match=message):
        load_results(copy)


def test_comparison_row_pointing_outside_is_refused(compared, tmp_path):
    copy = _copy(compared[1], tmp_path / "cmp")
    data = _json(copy / "comparison.json")
    data["leaderboard"][0]["results"] = "../../elsewhere"
    (copy / "comparison.json").write_text(json.dumps(data))
    r = load_results(copy)
    with pytest.raises(errors.ResultsFormatError, match="does not name its probe folder"):
        _ = r.models


def test_to_frame_without_pandas_names_the_install(probe_dir, monkeypatch):
    monkeypatch.setitem(sys.modules, "pandas", None)  # import pandas now raises ImportError
    with pytest.raises(errors.MissingDependencyError, match="pip install pandas") as info:
        load_results(probe_dir).to_frame()
    assert isinstance(info.value, ImportError)


def test_load_results_imports_no_torch_or_scikit_learn():
    """What ``featx.load_results`` runs, deferred imports included: JSON and the folder rules only."""
    from .test_dependencies import _import_nodes, _modules, _targets, import_graph

    graph = import_graph(REPO, deferred=True)
    modules = _modules(REPO)
    seen, todo = set(), ["featx.results"]
    while todo:
        name = todo.pop()
        if name not in seen:
            seen.add(name)
            todo += graph[name]
    assert {"featx.results", "featx._resultdir", "featx.errors"} <= seen
    heavy = []
    for name in seen:
        path, is_package = modules[name]
        for node in _import_nodes(ast.parse(path.read_text()), deferred=True):
            for target in _targets(node, name, is_package, modules):
                if target.split(".")[0] in ("torch", "timm", "torchvision", "sklearn", "h5py"):
                    heavy.append(f"{name} imports {target}")
    assert not heavy, heavy
