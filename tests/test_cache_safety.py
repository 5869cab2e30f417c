"""The cache never loses or misreads data: outside files, environmental errors, metadata, leftovers."""

from __future__ import annotations

import errno
import hashlib
import logging
import os
import shutil
import time
from pathlib import Path

import h5py
import numpy as np
import pytest
from PIL import Image

import featx
from featx import errors
from featx.cache.store import CacheStore
from featx.data.images import ImageDecodeError
from featx.data.sources import ImageSource
from featx.errors import CacheCorruptError, FeatxError, UsageError

from .conftest import TINY, cli, make_folder


def _sha(path: Path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def _quarantined(cache: Path) -> list[Path]:
    q = cache / "quarantine"
    return sorted(q.iterdir()) if q.is_dir() else []


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    """One extracted entry (layer1 + layer3), copied into each test's own cache."""
    base = tmp_path_factory.mktemp("built")
    folder = make_folder(base / "images", n_per_class=3)
    entry = featx.extract(f"folder:{folder}", layers="layer1,layer3", cache_dir=base / "cache", **TINY)
    return folder, base / "cache", entry.path.name


@pytest.fixture
def entry(built, cache_dir):
    """(image folder, path of a complete entry in this test's cache)."""
    folder, src, name = built
    shutil.copytree(src, cache_dir)
    return folder, cache_dir / name


def _extract(folder, **kw):
    return featx.extract(f"folder:{folder}", layers="layer1,layer3", **{**TINY, **kw})


# ---------------------------------------------------------------- files outside the cache root


def _outside_copy(entry_path: Path, tmp_path: Path, damage: bool) -> Path:
    outside = tmp_path / "mine" / "features.h5"
    outside.parent.mkdir()
    shutil.copyfile(entry_path, outside)
    if damage:
        with open(outside, "r+b") as fh:
            fh.truncate(outside.stat().st_size // 2)
    return outside


def test_cache_info_never_moves_a_foreign_hdf5_file(tmp_path, cache_dir, capsys):
    other = tmp_path / "some" / "other" / "file.h5"
    other.parent.mkdir(parents=True)
    with h5py.File(other, "w") as f:
        f["x"] = np.arange(10)
    before = _sha(other)
    status, _, stderr = cli(capsys, "--cache-dir", str(cache_dir), "cache", "info", str(other))
    assert status != 0
    assert "not a featx" in stderr and "Traceback" not in stderr
    assert other.is_file() and _sha(other) == before
    assert _quarantined(cache_dir) == []


def test_damaged_outside_file_is_reported_and_left_alone(entry, tmp_path, cache_dir):
    _, path = entry
    outside = _outside_copy(path, tmp_path, damage=True)
    before = _sha(outside)
    for attempt in (lambda: featx.load_features(outside, "layer3"), lambda: featx.open_entry(outside),
                    lambda: CacheStore(cache_dir).resolve(str(outside))):
        with pytest.raises(CacheCorruptError, match="left untouched"):
            attempt()
    from featx.probing import probe

    with pytest.raises(CacheCorruptError):
        probe(outside, heads="knn", out_dir=False, progress=False)
    assert outside.is_file() and _sha(outside) == before
    assert _quarantined(cache_dir) == []


def test_outside_entry_is_read_but_never_removed(entry, tmp_path, cache_dir):
    _, path = entry
    outside = _outside_copy(path, tmp_path, damage=False)
    before = _sha(outside)
    store = CacheStore(cache_dir)
    assert featx.load_features(outside, "layer3").X.shape[0] > 0  # read-only use is fine
    with pytest.raises(UsageError, match="outside the cache root"):
        store.remove(store.resolve(outside))
    with pytest.raises(UsageError, match="outside the cache root"):
        store.resolve(outside, owned=True)
    assert store.quarantine(outside, "test") is None
    # a `..` detour and a symlink inside the root are both outside once resolved
    assert store.quarantine(cache_dir / ".." / "mine" / "features.h5", "test") is None
    link = cache_dir / path.name.replace(".h5", "-link.h5")
    link.symlink_to(outside)
    assert store.quarantine(link, "test") is None
    assert outside.is_file() and _sha(outside) == before
    assert path.is_file() and _quarantined(cache_dir) == []


def test_cache_rm_refuses_an_outside_path_and_removes_nothing(entry, tmp_path, cache_dir, capsys):
    from featx.cli import main

    _, path = entry
    outside = _outside_copy(path, tmp_path, damage=False)
    before = _sha(outside)
    with pytest.raises(SystemExit) as exit_info:
        main(["--cache-dir", str(cache_dir), "cache", "rm", path.name, str(outside)])
    assert exit_info.value.code == 2
    assert "outside the cache root" in capsys.readouterr().err
    assert outside.is_file() and _sha(outside) == before
    assert path.is_file()  # resolved-all-before-deleting-any still holds


# ---------------------------------------------------------------- environmental errors are not corruption


def _lock_error():
    return BlockingIOError(errno.EAGAIN, "Unable to synchronously open file (unable to lock file, errno = 11, "
                                         "error message = 'Resource temporarily unavailable')")


ENV_ERRORS = {
    "EACCES": lambda: PermissionError(errno.EACCES, "Unable to synchronously open file (unable to open file: "
                                                    "errno = 13, error message = 'Permission denied')"),
    "ENOLCK": lambda: OSError(errno.ENOLCK, "Unable to synchronously open file (unable to lock file, errno = 37, "
                                            "error message = 'No locks available')"),
    "EMFILE": lambda: OSError(errno.EMFILE, "Unable to synchronously open file (unable to open file: errno = 24, "
                                            "error message = 'Too many open files')"),
    "lock": _lock_error,
    # the errno only in HDF5's text, as some h5py versions report it
    "lock-text": lambda: OSError("Unable to synchronously open file (unable to lock file, errno = 11, "
                                 "error message = 'Resource temporarily unavailable')"),
}


def _fail_reads_of(monkeypatch, target: Path, make_error):
    real = h5py.File

    def fake(name, mode="r", *args, **kwargs):
        if mode == "r" and Path(name).name == target.name:
            raise make_error()
        return real(name, mode, *args, **kwargs)

    monkeypatch.setattr(h5py, "File", fake)


@pytest.mark.parametrize("kind", sorted(ENV_ERRORS))
def test_environmental_open_errors_leave_the_entry_alone(entry, cache_dir, monkeypatch, kind):
    folder, path = entry
    before, key = _sha(path), _key_of(path)
    with monkeypatch.context() as patched:
        _fail_reads_of(patched, path, ENV_ERRORS[kind])
        with pytest.raises(errors.CacheUnavailableError, match=path.name) as info:
            _extract(folder)
        assert isinstance(info.value.__cause__, OSError)
        with pytest.raises(errors.CacheUnavailableError):
            CacheStore(cache_dir).find(key)
    assert path.is_file() and _sha(path) == before
    assert _quarantined(cache_dir) == []
    assert not _extract(folder).last_run.forward_pass  # still a valid entry once the cause is gone


def _key_of(path: Path) -> str:
    with h5py.File(path, "r") as f:
        return str(f.attrs["key"])


def test_environmental_errors_while_reading_data_are_not_corruption(entry, cache_dir):
    _, path = entry
    e = featx.open_entry(path)
    real = h5py.File

    class Failing:
        def __init__(self, *a, **k):
            raise OSError(errno.EIO, "Can't synchronously read data (file read failed: errno = 5, "
                                     "error message = 'Input/output error')")

    h5py.File = Failing
    try:
        with pytest.raises(errors.CacheUnavailableError, match="Input/output"):
            e.load("layer3")
    finally:
        h5py.File = real
    assert path.is_file() and _quarantined(cache_dir) == []


def test_truncated_entry_is_still_quarantined_and_rebuilt(entry, cache_dir):
    folder, path = entry
    key = _key_of(path)
    with open(path, "r+b") as fh:
        fh.truncate(path.stat().st_size // 2)
    assert CacheStore(cache_dir).find(key) is None
    assert any(p.name.startswith(path.name) for p in _quarantined(cache_dir))
    assert _extract(folder).last_run.forward_pass


def test_read_only_cache_does_not_crash_on_quarantine(entry, cache_dir, monkeypatch, caplog):
    _, path = entry
    key = _key_of(path)
    with open(path, "r+b") as fh:
        fh.truncate(path.stat().st_size // 2)
    real = os.replace

    def read_only(src, dst, *a, **k):
        if "quarantine" in str(dst):
            raise OSError(errno.EROFS, "Read-only file system", str(src))
        return real(src, dst, *a, **k)

    monkeypatch.setattr(os, "replace", read_only)
    monkeypatch.setattr(logging.getLogger("featx"), "propagate", True)  # the in-process CLI turns it off
    with caplog.at_level(logging.WARNING):
        assert CacheStore(cache_dir).find(key) is None
    assert path.is_file()  # left where it was, skipped
    assert "could not move" in caplog.text


def test_read_only_cache_serves_hits_and_refuses_builds_clearly(entry, monkeypatch):
    folder, path = entry
    real_mkdir = Path.mkdir

    def read_only(self, *a, **k):
        if self.exists():  # exist_ok=True on an existing folder needs no write
            return real_mkdir(self, *a, **k)
        raise OSError(errno.EROFS, "Read-only file system", str(self))

    def no_rename(*a, **k):
        raise OSError(errno.EROFS, "Read-only file system")

    monkeypatch.setattr(Path, "mkdir", read_only)
    monkeypatch.setattr(os, "replace", no_rename)
    shutil.rmtree(path.parent / ".locks")
    assert not _extract(folder).last_run.forward_pass
    with pytest.raises(errors.CacheUnavailableError, match="Cannot write to the feature cache"):
        featx.extract(f"folder:{folder}", layers="layer2", **TINY)
    assert path.is_file()


# ---------------------------------------------------------------- names that are not entries


def test_non_entry_names_give_a_clear_error_not_a_recursion(entry, tmp_path, cache_dir, monkeypatch):
    _, path = entry
    (cache_dir / "quarantine").mkdir()
    (cache_dir / "quarantine" / "notes.txt").write_text("hello")
    shutil.copyfile(path, cache_dir / "quarantine" / "old.h5")
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    store = CacheStore(cache_dir.resolve())
    for ref in ("quarantine/notes.txt", str(cache_dir / "quarantine" / "notes.txt"), "quarantine/old.h5"):
        with pytest.raises(errors.EntryNotFoundError, match="not a featx cache entry"):
            store.resolve(ref)
    assert (cache_dir / "quarantine" / "old.h5").is_file()


def test_cli_non_entry_name_exits_2(tmp_path, cache_dir, capsys):
    (cache_dir / "quarantine").mkdir(parents=True)
    (cache_dir / "quarantine" / "notes.txt").write_text("hello")
    status, _, stderr = cli(capsys, "--cache-dir", str(cache_dir.resolve()), "cache", "info", "quarantine/notes.txt")
    assert status == 2, stderr
    assert "not a featx cache entry" in stderr and "RecursionError" not in stderr


# ---------------------------------------------------------------- a second pass keeps its own bad images


class FlakySource(ImageSource):
    """In-memory images; those listed in ``broken`` fail to decode (set between two extractions)."""

    in_memory = True

    def __init__(self):
        rng = np.random.default_rng(0)
        self.images = rng.integers(0, 255, size=(12, 24, 24, 3), dtype=np.uint8)
        self.spec, self.classes = "flaky", ["a", "b"]
        self.ids = np.asarray([f"img{i}" for i in range(12)], dtype=object)
        self.labels = np.arange(12, dtype=np.int64) % 2
        self.splits = np.asarray([""] * 12, dtype=object)
        self.broken: set[int] = set()

    def image(self, i):
        if i in self.broken:
            raise ImageDecodeError("truncated PNG")
        return Image.fromarray(self.images[i])

    def content_digest(self):
        return "fixed"


def test_second_pass_failures_mark_the_image_bad(cache_dir):
    source = FlakySource()
    source.broken = {3}
    first = featx.extract(source, layers="layer1", workers=0, **TINY)
    assert first.errors() == [("img3", "truncated PNG")]
    source.broken = {3, 5}
    second = featx.extract(source, layers="layer3", workers=0, **TINY)
    assert second.last_run.layers_added == ["layer3"]
    assert not second.samples()["ok"][[3, 5]].any() and second.samples()["ok"].sum() == 10
    assert dict(second.errors()) == {"img3": "truncated PNG", "img5": "truncated PNG"}
    for layer in ("layer1", "layer3"):
        assert list(second.load(layer).ids) == [f"img{i}" for i in range(12) if i not in (3, 5)]
    second.verify()  # the strings digest follows the new error texts


# ---------------------------------------------------------------- metadata is verified


def _retext(f, name, text):
    del f[name]
    f.create_dataset(name, data=text, dtype=h5py.string_dtype("utf-8"))


TAMPER = {
    "class name": lambda f: f["classes"].__setitem__(0, "zebra"),
    "ladder": lambda f: _retext(f, "ladder", f["ladder"].asstr()[()].replace('"depth": 0.', '"depth": 1.', 1)),
    "layer depth": lambda f: f["layers/layer3"].attrs.__setitem__("depth", 0.5),
    "layer module": lambda f: f["layers/layer1"].attrs.__setitem__("module", "layer2"),
    "layer pool": lambda f: f["layers/layer1"].attrs.__setitem__("pool", "max"),
}


@pytest.mark.parametrize("what", sorted(TAMPER))
def test_tampered_metadata_is_detected(entry, cache_dir, what):
    folder, path = entry
    with h5py.File(path, "r+") as f:
        TAMPER[what](f)
    with pytest.raises(CacheCorruptError):
        featx.open_entry(path)
    rebuilt = _extract(folder)  # quarantined and rebuilt
    assert rebuilt.last_run.forward_pass
    assert _quarantined(cache_dir)


def test_old_format_entries_are_rebuilt_not_quarantined(entry, cache_dir):
    folder, path = entry
    with h5py.File(path, "r+") as f:
        f.attrs["encoding-version"] = "1"
    with pytest.raises(errors.CacheFormatError, match="re-extract"):
        featx.open_entry(path)
    assert CacheStore(cache_dir).find(_key_of(path)) is None
    assert _extract(folder).last_run.forward_pass
    assert _quarantined(cache_dir) == []


# ---------------------------------------------------------------- housekeeping


def _leftovers(cache: Path) -> dict[str, Path]:
    keys = ["a" * 64, "b" * 64, "c" * 64]
    (cache / ".tmp").mkdir(parents=True, exist_ok=True)
    tmp = cache / ".tmp" / f"{keys[0]}.999999.h5"
    tmp.write_bytes(b"x" * 1000)
    for key in keys[1:]:
        (cache / ".partial" / key).mkdir(parents=True)
        (cache / ".partial" / key / "shard-000000.npz").write_bytes(b"y" * 2000)
    (cache / "quarantine").mkdir(exist_ok=True)
    q = cache / "quarantine" / "x-y-0123456789abcdef.h5.20260101T000000.1"
    q.write_bytes(b"z" * 3000)
    return {"tmp": tmp, "abandoned": cache / ".partial" / keys[1], "held": cache / ".partial" / keys[2],
            "quarantine": q, "held_key": keys[2]}


def test_gc_dry_run_lists_and_removes_nothing(entry, cache_dir):
    _, path = entry
    left = _leftovers(cache_dir)
    store = CacheStore(cache_dir)
    found = store.gc(dry_run=True)
    assert {item.path for item in found} >= {left["tmp"], left["abandoned"], left["held"], left["quarantine"]} - {
        left["held"]}
    assert sum(item.size for item in found) == 1000 + 2 * 2000 + 3000
    assert all(p.exists() for k, p in left.items() if k != "held_key") and path.is_file()
    assert len(featx.cache_gc(cache_dir, dry_run=True)) == len(found)


def test_gc_removes_abandoned_leftovers_but_not_a_held_run(entry, cache_dir):
    _, path = entry
    left = _leftovers(cache_dir)
    store = CacheStore(cache_dir)
    with store.lock(left["held_key"]):  # a live extraction of that key
        removed = store.gc()
    assert {item.kind for item in removed} == {"tmp", "partial", "quarantine"}
    assert not left["tmp"].exists() and not left["abandoned"].exists() and not left["quarantine"].exists()
    assert left["held"].is_dir() and path.is_file()
    assert store.gc() and not left["held"].exists()  # once released it is abandoned too


def test_gc_older_than_keeps_recent_leftovers(entry, cache_dir):
    left = _leftovers(cache_dir)
    old = time.time() - 3 * 86400
    os.utime(left["quarantine"], (old, old))
    removed = CacheStore(cache_dir).gc(older_than_days=2)
    assert [item.path for item in removed] == [left["quarantine"]]
    assert left["tmp"].exists()


def test_cache_ls_and_gc_commands_report_leftovers(entry, cache_dir, capsys):
    from featx.cli import main

    left = _leftovers(cache_dir)

    def cli(*args):
        with pytest.raises(SystemExit) as info:
            main(["--cache-dir", str(cache_dir), *args])
        assert info.value.code in (0, None)
        return capsys.readouterr().out

    ls = cli("cache", "ls")
    assert "featx cache gc" in ls and "1 temporary" in ls and "quarantine" in ls
    dry = cli("cache", "gc", "--dry-run")
    assert "would remove" in dry and left["tmp"].name in dry and left["tmp"].exists()
    cli("cache", "gc")
    assert not left["tmp"].exists() and not left["quarantine"].exists()
    assert "featx cache gc" not in cli("cache", "ls")


def test_featx_errors_are_typed():
    assert issubclass(errors.CacheUnavailableError, FeatxError)
    assert errors.CacheUnavailableError.exit_code == 1


def test_gc_removes_torchrun_heartbeats_only_once_idle(cache_dir):
    live = cache_dir / ".dist" / ("a" * 32)
    dead = cache_dir / ".dist" / ("b" * 32)
    for session in (live, dead):
        session.mkdir(parents=True)
        (session / "rank-0").write_text("beat")
    old = time.time() - 2 * 86400
    for path in (dead, dead / "rank-0"):
        os.utime(path, (old, old))
    removed = CacheStore(cache_dir).gc()
    assert [item.path for item in removed] == [dead]
    assert live.exists() and not dead.exists()


def test_gc_refuses_a_negative_age_and_removes_nothing(entry, cache_dir, capsys):
    from featx.cli import main

    left = _leftovers(cache_dir)
    with pytest.raises(SystemExit) as info:
        main(["--cache-dir", str(cache_dir), "cache", "gc", "--older-than", "-1"])
    assert info.value.code == 2
    assert "--older-than" in capsys.readouterr().err
    assert all(left[name].exists() for name in ("tmp", "abandoned", "held", "quarantine"))
