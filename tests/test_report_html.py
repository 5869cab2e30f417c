"""report.html: one self-contained page per probe, and the commands in it rebuild the result."""

from __future__ import annotations

import base64
import json
import logging
import shlex
from html.parser import HTMLParser

import pytest

import featx
from featx.cache.store import CacheStore
from featx.errors import UsageError
from featx.report.html import PNG_SIGNATURE, Figure, Heading, Paragraph, Table, render, write_html
from featx.report.reproduce import probe_command, reproduce_commands

from .conftest import TINY, make_folder

HEADS = "logreg,knn"


class Page(HTMLParser):
    """What a reader of the page gets: tags, attribute values, table rows, text and code blocks."""

    def __init__(self, text: str):
        super().__init__()
        self.tags, self.attributes, self.images, self.code, self.text = [], [], [], [], []
        self.tables: dict[str, list[dict]] = {}
        self.style = ""
        self._table = self._cell = None
        self._in_body = self._in_code = self._in_style = False
        self.feed(text)
        self.close()

    def handle_starttag(self, tag, attrs):
        attrs = dict(attrs)
        self.tags.append(tag)
        self.attributes += [v or "" for v in attrs.values()]
        if tag == "img":
            self.images.append(attrs)
        elif tag == "table":
            self._table = attrs.get("id", "")
            self.tables[self._table] = []
        elif tag == "tbody":
            self._in_body = True
        elif tag == "tr" and self._in_body:
            self.tables[self._table].append({"class": attrs.get("class"), "cells": []})
        elif tag in ("td", "th") and self._in_body:
            self.tables[self._table][-1]["cells"].append("")
            self._cell = True
        elif tag == "pre":
            self._in_code = True
            self.code.append("")
        elif tag == "style":
            self._in_style = True

    def handle_endtag(self, tag):
        if tag == "tbody":
            self._in_body = False
        elif tag in ("td", "th"):
            self._cell = None
        elif tag == "pre":
            self._in_code = False
        elif tag == "style":
            self._in_style = False

    def handle_data(self, data):
        if self._in_style:
            self.style += data
            return
        self.text.append(data)
        if self._cell:
            self.tables[self._table][-1]["cells"][-1] += data
        if self._in_code:
            self.code[-1] += data


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    return tmp_path_factory.mktemp("report-cache")


@pytest.fixture(scope="module")
def entry(tmp_path_factory, cache):
    root = make_folder(tmp_path_factory.mktemp("report") / "imgs", n_per_class=12, classes=("a", "b", "c"))
    return featx.extract(f"folder:{root}", layers="layer2,pre_logits", cache_dir=cache, **TINY)


@pytest.fixture(scope="module")
def probed(entry, tmp_path_factory):
    out = tmp_path_factory.mktemp("probed") / "res"
    return featx.probe(entry, heads=HEADS, out_dir=out, progress=False, jobs=1)


def _page(results) -> Page:
    return Page((results.out_dir / results.files["report"]).read_text(encoding="utf-8"))


def _no_network(page: Page) -> None:
    assert not [v for v in page.attributes if v.strip().lower().startswith(("http://", "https://", "//"))]
    assert not {"script", "link", "iframe", "object", "embed", "base"} & set(page.tags)
    assert page.style and "url(" not in page.style and "@import" not in page.style  # not even from CSS


def test_report_is_self_contained_and_complete(probed):
    assert probed.files["report"] == "report.html"
    assert json.loads((probed.out_dir / "results.json").read_text())["files"]["report"] == "report.html"
    page = _page(probed)
    _no_network(page)

    assert len(page.images) == 2
    for img, png_file in zip(page.images, ("layers.png", "confusion.png")):
        prefix, _, data = img["src"].partition(",")
        assert prefix == "data:image/png;base64" and img["alt"]
        png = base64.b64decode(data, validate=True)
        assert png.startswith(PNG_SIGNATURE)
        assert png == (probed.out_dir / png_file).read_bytes()  # rendered once, for the file and the page

    rows = page.tables["results"]
    assert len(rows) == len(probed.rows) == 4
    assert [(r["cells"][0], r["cells"][3]) for r in rows] == [(r["layer"], r["head"]) for r in probed.rows]
    best = [r for r in rows if r["class"] == "highlight"]
    assert [(b["cells"][0], b["cells"][3]) for b in best] == [(probed.best["layer"], probed.best["head"])]
    assert f"{probed.best['test_top1']:.3f}" in best[0]["cells"]

    text = "".join(page.text)
    assert probed.recommendation in text
    assert {"about", "results", "protocol"} <= page.tables.keys()
    assert probed.entry["key"] in text
    assert reproduce_commands(probed) == page.code
    assert page.code[1].startswith(f"featx probe {probed.entry['key'][:12]} --heads logreg,knn ")


def test_without_plots_every_table_and_no_image(entry, tmp_path):
    res = featx.probe(entry, heads=HEADS, out_dir=tmp_path / "np", plots=False, progress=False, jobs=1)
    page = _page(res)
    _no_network(page)
    assert page.images == [] and "img" not in page.tags
    assert not (tmp_path / "np" / "layers.png").exists()
    assert {"about", "results", "protocol"} <= page.tables.keys()
    assert len(page.tables["results"]) == len(res.rows)
    assert res.recommendation in "".join(page.text) and reproduce_commands(res)[1] in page.code


def test_report_leaves_matplotlib_global_state_alone(entry, tmp_path):
    import matplotlib
    import matplotlib.pyplot as plt

    plt.close("all")
    backend = matplotlib.get_backend()
    res = featx.probe(entry, heads="logreg", layers="pre_logits", out_dir=tmp_path / "o", progress=False, jobs=1)
    assert len(_page(res).images) == 2
    assert matplotlib.get_backend() == backend
    assert plt.get_fignums() == []


def _featx(cache, command: str, *extra: str) -> None:
    """Run a printed featx command in this process, as typed (plus ``extra`` options)."""
    from typer.testing import CliRunner

    from featx.cli import app

    logger = logging.getLogger("featx")  # the command line points featx's log at the runner's stream
    handlers, level, propagate = logger.handlers[:], logger.level, logger.propagate
    try:
        done = CliRunner().invoke(app, ["--cache-dir", str(cache), *shlex.split(command)[1:], *extra])
    finally:
        logger.handlers[:] = handlers
        logger.setLevel(level)
        logger.propagate = propagate
    assert done.exit_code == 0, done.output


def test_commands_rebuild_the_entry_and_the_numbers(probed, entry, cache, tmp_path):
    """The report's extract command hits the same cache entry; its probe command gives the same rows."""
    extract, probe = reproduce_commands(probed)
    assert "--weights none" in extract and "--layers layer2,pre_logits" in extract
    _featx(cache, extract, "--no-progress")
    assert [e.key for e in CacheStore(cache).entries()] == [entry.key]  # found, not built anew
    _featx(cache, probe, "--out", str(tmp_path / "again"), "--jobs", "1", "--no-progress")
    first = json.loads((probed.out_dir / "results.json").read_text())
    again = json.loads((tmp_path / "again" / "results.json").read_text())
    keep = ("layer", "head", "params", "val_top1", "test_top1", "test_top1_ci")
    assert [{k: r[k] for k in keep} for r in again["rows"]] == [{k: r[k] for k in keep} for r in first["rows"]]
    assert reproduce_commands(again) == [extract, probe]  # the same from results.json as from the live result


def test_extract_command_keeps_an_explicit_crop(entry, tmp_path):
    """A crop chosen by hand is written out exactly, so the command finds the entry again."""
    cache = tmp_path / "crop-cache"
    folder = entry.dataset.partition(":")[2]
    cropped = featx.extract(entry.dataset, layers="pre_logits", crop_pct=0.9, cache_dir=cache, **TINY)
    command = reproduce_commands({"entry": {"key": cropped.key, "dataset": cropped.dataset, "model": cropped.model,
                                            "config": cropped.config}, "protocol": {}, "rows": []})[0]
    assert f"featx extract folder:{folder} " in command and "--crop-pct" in command
    _featx(cache, command, "--layers", "pre_logits", "--no-progress")
    assert [e.key for e in CacheStore(cache).entries()] == [cropped.key]


def test_probe_command_names_heads_the_command_line_cannot_take():
    protocol = {"heads": {"logreg": "multinomial logistic regression", "tree": "custom DecisionTreeClassifier"},
                "seed": 3, "cv": 5, "selection_rows": {"limit": 0}, "device": "cpu"}
    command = probe_command({"key": "ab" * 32}, protocol, ["blocks.4"], ["logreg", "tree"])
    args, _, comment = command.partition("  # ")
    assert shlex.split(args) == ["featx", "probe", "ab" * 6, "--heads", "logreg", "--layers", "blocks.4", "--seed",
                                 "3", "--cv", "5", "--selection-rows", "0", "--device", "cpu"]
    assert "tree" in comment


def test_text_is_escaped_and_bad_input_refused(tmp_path):
    nasty = '<script>alert("x")</script> & <img src=https://example.org/t.png>'
    blocks = [Heading(nasty), Paragraph(nasty), Table(["a", "b"], [[nasty, 1.5]], caption=nasty, anchor="t")]
    path = write_html(tmp_path / "r.html", nasty, blocks)
    page = Page(path.read_text(encoding="utf-8"))
    assert "script" not in page.tags and "img" not in page.tags
    assert "".join(page.text).count(nasty) == 6  # title, h1, h2, paragraph, caption, cell
    assert page.tables["t"][0]["cells"] == [nasty, "1.5"]
    assert list(tmp_path.glob(".r.html.*")) == []  # no temporary file left behind
    with pytest.raises(UsageError):
        render("t", [Figure(b"GIF89a not a png", alt="x")])
    with pytest.raises(UsageError):
        render("t", [Table(["a", "b"], [[1]])])
