"""featx compare: backbones through one protocol on the same rows, paired tests, reuse of the cache."""

import json
from html.parser import HTMLParser

import numpy as np
import pytest

import featx
from featx.cli import main
from featx.comparison.runner import Contender, compare, contenders, summarise
from featx.errors import UsageError

from .conftest import make_folder

MODELS = ["timm:resnet18", "torchvision:resnet18"]
OPTIONS = {"weights": "none", "image_size": 32, "progress": False, "heads": "logreg,knn", "jobs": 1,
           "layers": "layer1,layer3,pre_logits"}


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return make_folder(tmp_path_factory.mktemp("compare") / "imgs", n_per_class=12, classes=("a", "b", "c"))


@pytest.fixture(scope="module")
def done(folder, tmp_path_factory):
    cache = tmp_path_factory.mktemp("compare-cache")
    out = tmp_path_factory.mktemp("compare-out") / "cmp"
    first = featx.extract(f"folder:{folder}", MODELS[0], weights="none", image_size=32, progress=False,
                          cache_dir=cache, layers=OPTIONS["layers"])  # already cached before the comparison
    res = compare(f"folder:{folder}", MODELS, out_dir=out, cache_dir=cache, shots="1,3,all", shot_seeds=2, **OPTIONS)
    return res, out, cache, first


class _Page(HTMLParser):
    def __init__(self):
        super().__init__()
        self.images, self.rows, self.table, self.urls = [], {}, None, []

    def handle_starttag(self, tag, attrs):
        attrs = dict(attrs)
        if tag == "img":
            self.images.append(attrs["src"])
        if tag == "table":
            self.table = attrs.get("id")
            self.rows[self.table] = -1  # the header row
        if tag == "tr" and self.table:
            self.rows[self.table] += 1
        self.urls += [v for v in attrs.values() if v and v.startswith(("http:", "https:", "//"))]


def test_compare_writes_leaderboard_paired_tests_and_report(done, folder):
    res, out, _, _ = done
    for name in ("comparison.json", "comparison.csv", "depth.png", "shots.png", "report.html"):
        assert (out / name).is_file(), name
    for c in contenders(MODELS, weights="none"):
        assert (out / "models" / c.slug / "results.json").is_file()
    data = json.loads((out / "comparison.json").read_text(), parse_constant=lambda c: pytest.fail(c))
    assert data["format"] == "featx-comparison" and data["version"] == 1
    assert [r["rank"] for r in data["leaderboard"]] == [1, 2]
    assert {r["model"] for r in data["leaderboard"]} == set(MODELS)
    vals = [r["val_top1"] for r in data["leaderboard"]]
    assert vals == sorted(vals, reverse=True)  # ranked on validation data
    (pair,) = data["paired"]
    assert pair["leader"] == data["leader"]["model"] and pair["verdict"] in ("tie", "leader", "other")
    for row in data["leaderboard"]:
        assert row["parameters"] > 1e6 and row["width"] > 0 and row["bytes_on_disk"] > 0
        assert row["images_per_second"] > 0 and row["probe_seconds"] > 0
    assert (out / "comparison.csv").read_text().count("\n") == 3
    page = _Page()
    page.feed((out / "report.html").read_text())
    assert page.images and all(src.startswith("data:image/png;base64,") for src in page.images)
    assert page.rows["leaderboard"] == 2 and not page.urls
    assert page.rows["curves"] == sum(len(c) for c in data["curves"].values()) == 6
    for curve in data["shots"].values():  # learning curves at each backbone's best cell
        assert [p["shots"] for p in curve["points"]] == [1, 3, "all"] and curve["layer"]
        assert [len(p["test_top1"]) for p in curve["points"]] == [2, 2, 1]
    assert page.rows["shots"] == 6
    assert "featx compare" in (out / "report.html").read_text()


def test_paired_test_matches_an_independent_computation(done):
    statsmodels = pytest.importorskip("statsmodels.stats.contingency_tables")
    res, *_ = done
    a, b = (res.probes[r["model"]] for r in res.leaderboard)
    pred = a.predictions
    y = pred.y[pred.test]
    ra, rb = a.predictions.test_pred(a.best) == y, b.predictions.test_pred(b.best) == y
    table = [[np.sum(ra & rb), np.sum(ra & ~rb)], [np.sum(~ra & rb), np.sum(~ra & ~rb)]]
    (pair,) = res.paired
    assert pair["p_value"] == pytest.approx(statsmodels.mcnemar(table, exact=True).pvalue)
    assert pair["difference"] == pytest.approx(ra.mean() - rb.mean())
    assert pair["only_a"] == table[0][1] and pair["only_b"] == table[1][0]


def test_same_test_rows_and_an_existing_entry_is_reused(done):
    res, _, _, first = done
    tests = [p.predictions.ids[p.predictions.test] for p in res.probes.values()]
    assert np.array_equal(tests[0], tests[1])
    board = {r["model"]: r for r in res.leaderboard}
    assert board[MODELS[0]]["entry"] == first.key and not board[MODELS[0]]["extracted_now"]
    assert board[MODELS[1]]["extracted_now"]


def test_second_run_does_no_forward_pass(done, folder, tmp_path):
    _, _, cache, _ = done
    again = compare(f"folder:{folder}", ",".join(MODELS), out_dir=False, cache_dir=cache, **OPTIONS)
    assert not any(r["extracted_now"] for r in again.leaderboard)


def test_identical_predictions_are_a_tie(done):
    res, *_ = done
    probe = next(iter(res.probes.values()))
    rows = [Contender("x", MODELS[0], "none"), Contender("y", MODELS[1], "none")]
    entry = featx.open_entry(probe.entry["path"])
    tied = summarise(rows, [entry, entry], {"x": probe, "y": probe})
    (pair,) = tied.paired
    assert pair["verdict"] == "tie" and pair["p_value"] == 1.0 and pair["difference"] == 0


@pytest.mark.parametrize("models", [["timm:resnet18", "timm:resnet18"], "timm:resnet18, timm:resnet18"])
def test_a_model_listed_twice_is_refused(models):
    with pytest.raises(UsageError, match="listed twice"):
        contenders(models)


def test_baseline_adds_a_random_init_twin_and_refuses_random_models():
    rows = contenders(["efficientnet_lite0"], baseline=True)
    assert [(c.label, c.weights, c.baseline_of) for c in rows] == [
        ("efficientnet_lite0", None, None), ("efficientnet_lite0 (random init)", "none", "efficientnet_lite0")]
    with pytest.raises(UsageError, match="--baseline"):
        contenders(["timm:resnet18"], baseline=True, weights="none")


def _cli(capsys, *args):
    with pytest.raises(SystemExit) as exited:
        main(list(args))
    captured = capsys.readouterr()
    return exited.value.code, captured.out + captured.err


def test_command_line_compare_and_run_with_several_models(done, folder, tmp_path, capsys):
    _, _, cache, _ = done
    common = ["--weights", "none", "--image-size", "32", "--heads", "logreg", "--jobs", "1", "--no-progress",
              "--layers", "layer1,pre_logits"]
    code, text = _cli(capsys, "--cache-dir", str(cache), "compare", f"folder:{folder}", "--model", MODELS[0],
                      "--model", MODELS[1], "--out", str(tmp_path / "a"), *common)
    assert code == 0, text
    assert "paired tests" in text and "advice" in text and (tmp_path / "a" / "report.html").is_file()
    code, text = _cli(capsys, "--cache-dir", str(cache), "run", f"folder:{folder}", "--model", ",".join(MODELS),
                      "--out", str(tmp_path / "b"), *common)
    assert code == 0, text
    assert (tmp_path / "b" / "comparison.json").is_file()
    code, text = _cli(capsys, "--cache-dir", str(cache), "compare", f"folder:{folder}", "--model",
                      f"{MODELS[0]},{MODELS[0]}", *common)
    assert code == 2 and "listed twice" in " ".join(text.split())
