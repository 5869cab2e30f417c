"""Result folders: featx never deletes what it did not write, and a result is replaced without
a moment in which the folder is missing (checked by a watcher, by fault injection and by kill)."""

from __future__ import annotations

import errno
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

import featx
from featx import _resultdir
from featx._resultdir import FINETUNE, MARKER, PROBE, exchange, found_kind, staged
from featx.errors import UsageError

from .conftest import TINY, TINY_MODEL, cli, make_folder, run_python

TINY_ARGS = ["--model", TINY_MODEL, "--weights", "none", "--image-size", "32", "--no-progress"]
TINY_FT = {"model": TINY_MODEL, "weights": "none", "image_size": 32, "progress": False, "workers": 0,
           "batch_size": 16}


def snapshot(directory: Path) -> dict[str, bytes]:
    return {str(p.relative_to(directory)): p.read_bytes() for p in sorted(directory.rglob("*")) if p.is_file()}


def notes(folder: Path) -> Path:
    """A user's folder with work in it, as in the report: ``my-notes/thesis.tex``."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "thesis.tex").write_text("\\section{Results}\nmonths of work\n")
    (folder / "refs.bib").write_text("@book{x}\n")
    return folder


def hidden_siblings(target: Path) -> list[str]:
    return sorted(p.name for p in target.parent.iterdir() if p.name.startswith(f".{target.name}."))


@pytest.fixture(scope="module")
def images(tmp_path_factory) -> Path:
    return make_folder(tmp_path_factory.mktemp("rd") / "images", n_per_class=10, classes=("a", "b", "c"))


@pytest.fixture(scope="module")
def entry(tmp_path_factory, images):
    return featx.extract(f"folder:{images}", layers="layer1,layer3", dtype="float32",
                         cache_dir=tmp_path_factory.mktemp("rd-cache"), **TINY)


def probe(entry, out, heads="logreg", **kw):
    return featx.probe(entry, heads=heads, out_dir=out, progress=False, jobs=1, plots=kw.pop("plots", False), **kw)


@pytest.fixture(scope="module")
def finetune_run(tmp_path_factory, images):
    out = tmp_path_factory.mktemp("rd-ft") / "run"
    featx.finetune(f"folder:{images}", layer="layer2", epochs=1, out_dir=out, **TINY_FT)
    return out


# ------------------------------------------------------------------------------ the reported defect


def test_probe_cli_refuses_a_folder_of_user_files_before_extracting(tmp_path, images, capsys):
    folder = notes(tmp_path / "my-notes")
    before = snapshot(folder)
    status, stdout, stderr = cli(capsys, "probe", f"folder:{images}", *TINY_ARGS, "--heads", "logreg", "--jobs", "1",
                                 "--no-plots", "--out", "my-notes")
    assert status == 2, stderr
    message = " ".join(stderr.split())
    assert "my-notes" in message and "thesis.tex" in message and "--out" in message
    assert snapshot(folder) == before and sorted(os.listdir(folder)) == ["refs.bib", "thesis.tex"]
    assert "extracted" not in stdout and not list(tmp_path.glob("cache/**/*.h5"))  # before any extraction
    assert hidden_siblings(folder) == []


def test_probe_api_refuses_user_files_and_other_kinds(entry, tmp_path, finetune_run):
    folder = notes(tmp_path / "my-notes")
    before = snapshot(folder)
    with pytest.raises(UsageError, match=r"my-notes is not empty and holds no featx result \(found refs.bib, "
                                         r"thesis.tex\).*another output folder"):
        probe(entry, folder)
    assert snapshot(folder) == before and hidden_siblings(folder) == []

    ft_before = snapshot(finetune_run)
    with pytest.raises(UsageError, match="holds a featx fine-tuning run, not a featx probe result"):
        probe(entry, finetune_run)
    assert snapshot(finetune_run) == ft_before

    (tmp_path / "file").write_text("x")
    with pytest.raises(UsageError, match="exists and is not a folder"):
        probe(entry, tmp_path / "file")


def test_run_checks_the_folder_before_extracting(tmp_path, images, monkeypatch):
    folder = notes(tmp_path / "my-notes")

    def no_extraction(*args, **kwargs):
        raise AssertionError("extraction started although --out was refused")

    monkeypatch.setattr(featx.api, "extract", no_extraction)
    with pytest.raises(UsageError, match="thesis.tex"):
        featx.run(f"folder:{images}", TINY_MODEL, out_dir=folder, weights="none", image_size=32, progress=False)
    assert sorted(os.listdir(folder)) == ["refs.bib", "thesis.tex"]


def test_a_probe_result_with_user_files_added_is_not_replaced(entry, tmp_path):
    out = tmp_path / "res"
    probe(entry, out)
    (out / "my-analysis.ipynb").write_text("{}")
    before = snapshot(out)
    with pytest.raises(UsageError, match=r"together with files featx did not write \(my-analysis.ipynb\)"):
        probe(entry, out, heads="knn")
    assert snapshot(out) == before


# ------------------------------------------------------------------------------ replacing a result


def test_an_existing_probe_result_is_replaced_whole(entry, tmp_path):
    out = tmp_path / "res"
    probe(entry, out, heads="knn", plots=True)
    assert found_kind(out) == PROBE and (out / "layers.png").is_file()
    probe(entry, out, heads="logreg")
    rows = json.loads((out / "results.json").read_text())["rows"]
    assert {r["head"] for r in rows} == {"logreg"}
    assert not (out / "layers.png").exists()  # nothing of the old result is left behind
    assert json.loads((out / MARKER).read_text())["kind"] == PROBE
    assert hidden_siblings(out) == []


@pytest.mark.parametrize("fault", ["joblib.dump", "plot"])
def test_a_write_failing_midway_keeps_the_old_result(entry, tmp_path, monkeypatch, fault):
    out = tmp_path / "res"
    probe(entry, out, heads="knn")
    before = snapshot(out)

    def disk_full(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    if fault == "joblib.dump":
        import joblib
        monkeypatch.setattr(joblib, "dump", disk_full)
    else:
        from featx.report import plots
        monkeypatch.setattr(plots.LayerCurveDisplay, "save", disk_full)
    with pytest.raises(OSError, match="No space left"):
        probe(entry, out, heads="logreg", plots=True)
    assert snapshot(out) == before
    assert hidden_siblings(out) == []


@pytest.mark.subprocess
@pytest.mark.slow  # a subprocess
def test_a_write_killed_midway_keeps_the_old_result_and_the_next_write_cleans_up(tmp_path):
    target = tmp_path / "res"
    with staged(target, PROBE) as tmp:
        (tmp / "results.json").write_text('{"format": "featx-probe-results", "rows": "old"}')
    code = f"""
import os, signal
from featx._resultdir import staged
with staged({str(target)!r}, "probe") as tmp:
    (tmp / "results.json").write_text('{{"format": "featx-probe-results", "rows": "new"}}')
    os.kill(os.getpid(), signal.SIGKILL)
"""
    res = run_python(code)
    assert res.returncode == -9
    assert json.loads((target / "results.json").read_text())["rows"] == "old"
    left = hidden_siblings(target)
    assert len(left) == 1 and ".res.featx-new-" in left[0]  # recognisable by name
    with staged(target, PROBE) as tmp:
        (tmp / "results.json").write_text('{"format": "featx-probe-results", "rows": "newer"}')
    assert json.loads((target / "results.json").read_text())["rows"] == "newer"
    assert hidden_siblings(target) == []


def test_an_old_result_moved_aside_by_the_rename_fallback_is_restored(tmp_path):
    target = tmp_path / "res"
    dead = next(pid for pid in range(2**22 - 1, 1, -1) if not _resultdir._pid_alive(pid))
    aside = tmp_path / f".res.featx-old-{dead}-0123abcd"  # a crash inside the fallback's window
    aside.mkdir()
    (aside / MARKER).write_text(json.dumps({"kind": PROBE}))
    (aside / "results.json").write_text("{}")
    _resultdir.clean_stale(target)
    assert (target / "results.json").is_file() and hidden_siblings(target) == []


# ------------------------------------------------------------------------------ the exchange primitive


def test_exchange_swaps_two_folders_atomically(tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    a.mkdir(), b.mkdir()
    (a / "new.txt").write_text("new")
    (b / "old.txt").write_text("old")
    try:
        _resultdir._renameat2(a, b, _resultdir.RENAME_EXCHANGE)  # the real system call, no fallback
    except OSError as exc:
        if exc.errno in (errno.EINVAL, errno.ENOSYS):
            pytest.skip(f"this filesystem or kernel has no RENAME_EXCHANGE ({exc})")
        raise
    assert os.listdir(b) == ["new.txt"] and os.listdir(a) == ["old.txt"]
    exchange(a, b)
    assert os.listdir(b) == ["old.txt"] and os.listdir(a) == ["new.txt"]


_WATCH = """
import os, sys
path, stop = sys.argv[1:3]
missing = looks = 0
while not os.path.exists(stop):
    looks += 1
    missing += not os.path.exists(path)
print(missing, looks)
"""


@pytest.mark.subprocess
@pytest.mark.slow  # a watcher subprocess
@pytest.mark.parametrize("swap", ["exchange", "two renames"])
def test_the_target_is_never_missing_while_results_are_replaced(tmp_path, monkeypatch, swap):
    """A separate process polls the result while it is replaced 150 times. The two-rename swap
    (what featx did before, and the documented fallback) shows its window; the exchange never."""
    if swap == "two renames":
        def refuse(src, dst, flags):
            raise OSError(errno.EINVAL, "Invalid argument")
        monkeypatch.setattr(_resultdir, "_renameat2", refuse)
    target = tmp_path / "res"
    with staged(target, PROBE) as tmp:
        (tmp / "results.json").write_text('{"n": 0}')
    watcher = subprocess.Popen([sys.executable, "-c", _WATCH, str(target / "results.json"), str(tmp_path / "stop")],
                               stdout=subprocess.PIPE, text=True)
    try:
        for n in range(1, 150):
            with staged(target, PROBE) as tmp:
                (tmp / "results.json").write_text(json.dumps({"n": n}))
                assert json.loads((target / "results.json").read_text())["n"] == n - 1  # old kept until the swap
    finally:
        (tmp_path / "stop").write_text("")
        missing, looks = map(int, watcher.communicate(timeout=60)[0].split())
    assert looks > 1000
    assert (missing == 0) if swap == "exchange" else (missing > 0)
    assert json.loads((target / "results.json").read_text())["n"] == 149 and hidden_siblings(target) == []


def test_exchange_falls_back_to_renames_only_where_it_is_refused(tmp_path, monkeypatch):
    a, b = tmp_path / "a", tmp_path / "b"
    a.mkdir(), b.mkdir()
    (a / "new.txt").write_text("new")
    (b / "old.txt").write_text("old")

    def refuse(code):
        def renameat2(src, dst, flags):
            raise OSError(code, os.strerror(code))
        return renameat2

    monkeypatch.setattr(_resultdir, "_renameat2", refuse(errno.EXDEV))
    with pytest.raises(OSError) as info:
        exchange(a, b)
    assert info.value.errno == errno.EXDEV and os.listdir(b) == ["old.txt"] and os.listdir(a) == ["new.txt"]
    monkeypatch.setattr(_resultdir, "_renameat2", refuse(errno.EINVAL))  # e.g. a filesystem without exchange
    exchange(a, b)
    assert os.listdir(b) == ["new.txt"] and os.listdir(a) == ["old.txt"]
    assert sorted(os.listdir(tmp_path)) == ["a", "b"]


# ------------------------------------------------------------------------------ fine-tuning output folders


def test_finetune_refuses_user_files_and_a_probe_result_and_deletes_nothing(images, entry, tmp_path):
    folder = notes(tmp_path / "my-notes")
    before = snapshot(folder)
    with pytest.raises(UsageError, match=r"my-notes is not empty and holds no featx result.*thesis.tex"):
        featx.finetune(f"folder:{images}", layer="layer2", epochs=1, out_dir=folder, **TINY_FT)
    assert snapshot(folder) == before and sorted(os.listdir(folder)) == ["refs.bib", "thesis.tex"]

    result = tmp_path / "probe"
    probe(entry, result)
    before = snapshot(result)
    with pytest.raises(UsageError, match="holds a featx probe result, not a featx fine-tuning run"):
        featx.finetune(result, epochs=1, out_dir=result, progress=False, workers=0, batch_size=16)
    assert snapshot(result) == before


def test_finetune_cli_refuses_user_files_before_training(tmp_path, images, capsys):
    folder = notes(tmp_path / "my-notes")
    status, _, stderr = cli(capsys, "finetune", f"folder:{images}", *TINY_ARGS, "--layer", "layer2", "--epochs", "1",
                            "--out", "my-notes")
    assert status == 2, stderr
    assert "thesis.tex" in " ".join(stderr.split())
    assert sorted(os.listdir(folder)) == ["refs.bib", "thesis.tex"]


def test_a_sweep_and_a_single_run_do_not_share_folders(images, finetune_run):
    before = snapshot(finetune_run)
    with pytest.raises(UsageError, match="holds a featx fine-tuning run, not a featx fine-tuning sweep"):
        featx.finetune(f"folder:{images}", layer="layer2", sweep="lr=1e-2,1e-3", out_dir=finetune_run, **TINY_FT)
    assert snapshot(finetune_run) == before


def test_a_finetune_folder_is_marked_from_its_first_checkpoint_and_reused(images, finetune_run):
    assert found_kind(finetune_run) == FINETUNE
    assert json.loads((finetune_run / MARKER).read_text())["kind"] == FINETUNE
    before = snapshot(finetune_run)
    again = featx.finetune(f"folder:{images}", layer="layer2", epochs=1, out_dir=finetune_run, **TINY_FT)
    assert again.reused and snapshot(finetune_run) == before


def test_a_sweep_into_user_files_is_refused_before_any_work(images, tmp_path):
    folder = notes(tmp_path / "my-notes")
    before = snapshot(folder)
    with pytest.raises(UsageError, match="my-notes is not empty and holds no featx result"):
        featx.finetune(f"folder:{images}", layer="layer2", sweep="lr=1e-2,1e-3", out_dir=folder, **TINY_FT)
    assert snapshot(folder) == before


def test_low_level_finetune_writers_refuse_foreign_folders(tmp_path):
    from featx.finetuning.checkpoint import save_checkpoint
    from featx.finetuning.export import save_finetuned

    folder = notes(tmp_path / "my-notes")
    before = snapshot(folder)
    with pytest.raises(UsageError, match="thesis.tex"):
        save_checkpoint(folder, {"config": "{}"})
    with pytest.raises(UsageError, match="thesis.tex"):
        save_finetuned(folder, None, {})
    assert snapshot(folder) == before


def test_results_written_before_the_marker_are_still_recognised(entry, tmp_path):
    out = tmp_path / "res"
    probe(entry, out, heads="knn")
    (out / MARKER).unlink()  # as written by an earlier featx
    assert found_kind(out) == PROBE
    probe(entry, out, heads="logreg")
    assert {r["head"] for r in json.loads((out / "results.json").read_text())["rows"]} == {"logreg"}

    run = tmp_path / "interrupted"  # an interrupted fine-tuning run: only its checkpoint
    run.mkdir()
    (run / "checkpoint.pt").write_bytes(b"PK")
    assert found_kind(run) == FINETUNE
    (run / "thesis.tex").write_text("x")
    assert found_kind(run) is None


def test_a_sweep_written_before_the_marker_is_recognised_only_with_nothing_else(finetune_run, tmp_path):
    import shutil

    root = tmp_path / "sweep-root"
    shutil.copytree(finetune_run, root / "sweep" / "lr=0.01")
    (root / "sweep" / "lr=0.01" / MARKER).unlink()
    assert found_kind(root) == _resultdir.SWEEP
    (root / "sweep" / "notes.txt").write_text("x")
    assert found_kind(root) is None
