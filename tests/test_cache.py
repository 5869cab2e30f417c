"""The feature cache: identity, reuse, growth, crash safety, concurrency, corruption."""

import json
import os
import signal
import subprocess
import sys
import time

import h5py
import numpy as np
import pytest

import featx
from featx.cache.key import canonical_json, config_key
from featx.cache.store import CacheStore
from featx.errors import CacheCorruptError

from .conftest import TINY, make_folder, run_python

CONFIG = {"model": {"name": "x", "weights": {"digest": "sha256:00"}}, "dtype": "float16",
          "pooling": {"pool": "avg", "token_pool": "auto"}, "preprocessing": {"mean": [0.5, 0.25, 0.125]},
          "dataset": {"source": "digits", "n": 3, "limit": None}, "format": 1}


def test_canonical_json_ignores_key_order_and_keeps_defaults():
    shuffled = json.loads(json.dumps(CONFIG))
    shuffled = dict(reversed(list(shuffled.items())))
    assert canonical_json(shuffled) == canonical_json(CONFIG)
    assert '"limit":null' in canonical_json(CONFIG)  # defaults are written, not implied
    other = json.loads(json.dumps(CONFIG))
    other["pooling"]["pool"] = "max"
    assert config_key(other) != config_key(CONFIG)


@pytest.mark.slow
@pytest.mark.subprocess
@pytest.mark.parametrize("hashseed", ["0", "1", "12345"])
def test_cache_key_is_stable_across_processes(hashseed):
    code = ("import json, sys; from featx.cache.key import config_key; "
            f"print(config_key(json.loads({json.dumps(json.dumps(CONFIG))})))")
    res = run_python(code, env={"PYTHONHASHSEED": hashseed})
    assert res.returncode == 0, res.stderr
    assert res.stdout.strip() == config_key(CONFIG)


@pytest.mark.slow
@pytest.mark.subprocess
def test_end_to_end_key_is_stable_across_processes(image_folder, cache_dir):
    """The key of a real extraction (model, preprocessing, dataset fingerprint) in fresh processes."""
    entry = featx.extract(f"folder:{image_folder}", **TINY)
    code = (f"import featx; e = featx.extract('folder:{image_folder}', model='timm:resnet18', weights='none', "
            "image_size=32, progress=False); print(e.key, e.last_run.forward_pass)")
    for seed in ("3", "4"):
        res = run_python(code, env={"PYTHONHASHSEED": seed, "FEATX_CACHE_DIR": str(cache_dir)})
        assert res.returncode == 0, res.stderr
        assert res.stdout.split() == [entry.key, "False"]


def test_every_setting_changes_the_key(image_folder):
    base = featx.extract(f"folder:{image_folder}", **TINY)
    variants = [dict(pool="max"), dict(dtype="float32"), dict(image_size=40), dict(limit=20),
                dict(crop_pct=0.9), dict(token_pool="mean")]
    keys = {base.key}
    for change in variants:
        keys.add(featx.extract(f"folder:{image_folder}", **{**TINY, **change}).key)
    assert len(keys) == 1 + len(variants)


def test_second_run_reuses_the_entry_without_a_forward_pass(image_folder):
    first = featx.extract(f"folder:{image_folder}", **TINY)
    mtime = first.path.stat().st_mtime_ns
    second = featx.extract(f"folder:{image_folder}", **TINY)
    assert first.last_run.forward_pass and not second.last_run.forward_pass
    assert second.path == first.path and second.path.stat().st_mtime_ns == mtime


def test_adding_layers_extracts_only_the_missing_ones(image_folder):
    src = f"folder:{image_folder}"
    first = featx.extract(src, layers="layer1,layer3", **TINY)
    before = {name: first.load(name).X for name in first.layer_names}
    grown = featx.extract(src, layers="layer2,layer3", **TINY)
    assert grown.key == first.key and grown.last_run.layers_added == ["layer2"]
    assert grown.layer_names == ["layer1", "layer2", "layer3"]  # depth order kept
    for name, X in before.items():
        np.testing.assert_array_equal(grown.load(name).X, X)
    again = featx.extract(src, layers="layer1,layer2", **TINY)
    assert not again.last_run.forward_pass


def test_layer_order_and_attributes_are_stored(image_folder):
    e = featx.extract(f"folder:{image_folder}", layers="all", **TINY)
    with h5py.File(e.path) as f:
        order = json.loads(f["layers"].attrs["order"])
        assert order == [layer.name for layer in featx.layers("timm:resnet18", image_size=32).layers]
        ds = f["layers"]["layer2"]
        assert ds.fletcher32 and ds.dtype == np.float16
        assert list(ds.attrs["raw_shape"]) == [128, 4, 4] and ds.attrs["pool"] == "avg"
        assert f.attrs["encoding-type"] == "featx-features" and f.attrs["complete"]
        assert json.loads(f.attrs["config"])["pooling"] == {"pool": "avg", "token_pool": "auto"}


KILL_SCRIPT = """
import featx, sys
featx.extract(sys.argv[1], model="timm:resnet18", weights="none", image_size=48, layers="all",
              dtype="float32", batch_size=8, shard_rows=16, workers=0, progress=False)
"""


@pytest.mark.slow
@pytest.mark.subprocess
def test_sigkill_then_resume_is_bit_identical(tmp_path):
    root = make_folder(tmp_path / "big", n_per_class=60, splits=None, size=48)
    src = f"folder:{root}"
    killed_cache = tmp_path / "killed"
    env = {**os.environ, "FEATX_CACHE_DIR": str(killed_cache)}
    proc = subprocess.Popen([sys.executable, "-c", KILL_SCRIPT, src], env=env, stdin=subprocess.DEVNULL,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.time() + 300
    shards = []
    while time.time() < deadline and proc.poll() is None:
        shards = list((killed_cache / ".partial").glob("*/shard-*.npz"))
        if len(shards) >= 2:
            break
        time.sleep(0.02)
    assert proc.poll() is None, "the extraction finished before it could be killed: " + proc.stderr.read().decode()
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not list(killed_cache.glob("*.h5")), "no entry may be visible before it is complete"

    resumed = featx.extract(src, model="timm:resnet18", weights="none", image_size=48, layers="all",
                            dtype="float32", batch_size=8, shard_rows=16, workers=0, progress=False,
                            cache_dir=killed_cache)
    assert resumed.last_run.resumed_rows >= 32
    clean = featx.extract(src, model="timm:resnet18", weights="none", image_size=48, layers="all",
                          dtype="float32", batch_size=8, shard_rows=16, workers=0, progress=False,
                          cache_dir=tmp_path / "clean")
    assert clean.key == resumed.key
    for name in clean.layer_names:
        np.testing.assert_array_equal(resumed.load(name).X, clean.load(name).X)
    assert not (killed_cache / ".partial" / resumed.key).exists()


CONCURRENT = """
import featx, json, sys
e = featx.extract(sys.argv[1], model="timm:resnet18", weights="none", image_size=48, progress=False,
                  workers=0)
print(json.dumps({"key": e.key, "forward": e.last_run.forward_pass}))
"""


@pytest.mark.slow
@pytest.mark.subprocess
def test_two_processes_build_one_entry_once(tmp_path, cache_dir):
    src = f"folder:{make_folder(tmp_path / 'c', n_per_class=40, splits=None, size=48)}"
    env = {**os.environ, "FEATX_CACHE_DIR": str(cache_dir)}
    procs = [subprocess.Popen([sys.executable, "-c", CONCURRENT, src], env=env, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True, stdin=subprocess.DEVNULL) for _ in range(2)]
    results = []
    for p in procs:
        stdout, stderr = p.communicate(timeout=600)
        assert p.returncode == 0, stderr
        results.append(json.loads(stdout.strip().splitlines()[-1]))
    assert results[0]["key"] == results[1]["key"]
    assert sorted(r["forward"] for r in results) == [False, True]  # one built, the other waited and reused
    assert len(list(cache_dir.glob("*.h5"))) == 1


def _corrupt_layer_bytes(path, layer):
    with h5py.File(path) as f:
        chunk = f["layers"][layer].id.get_chunk_info(0)
        offset = chunk.byte_offset + chunk.size // 2
    with open(path, "r+b") as fh:
        fh.seek(offset)
        block = bytearray(fh.read(64))
        fh.seek(offset)
        fh.write(bytes(b ^ 0xFF for b in block))


def test_flipped_bytes_are_detected_quarantined_and_rebuilt(image_folder, cache_dir):
    good = featx.extract(f"folder:{image_folder}", dtype="float32", **TINY)
    reference = good.load("layer3").X
    _corrupt_layer_bytes(good.path, "layer3")
    with pytest.raises(CacheCorruptError, match="checksum"):
        featx.load_features(good.path, "layer3")
    rebuilt = featx.extract(f"folder:{image_folder}", dtype="float32", **TINY)
    assert rebuilt.last_run.forward_pass
    np.testing.assert_array_equal(rebuilt.load("layer3").X, reference)
    assert list((cache_dir / "quarantine").glob("*.h5.*"))


@pytest.mark.parametrize("damage", ["truncate", "garbage", "incomplete"])
def test_damaged_entry_files_are_never_read_as_valid(image_folder, cache_dir, damage):
    good = featx.extract(f"folder:{image_folder}", **TINY)
    reference = good.load("pre_logits").X
    if damage == "truncate":
        with open(good.path, "r+b") as fh:
            fh.truncate(good.path.stat().st_size // 2)
    elif damage == "garbage":
        good.path.write_bytes(os.urandom(4096))
    else:
        with h5py.File(good.path, "r+") as f:
            f.attrs["complete"] = False
    assert CacheStore(cache_dir).find(good.key) is None  # quarantined, not returned
    rebuilt = featx.extract(f"folder:{image_folder}", **TINY)
    assert rebuilt.last_run.forward_pass
    np.testing.assert_array_equal(rebuilt.load("pre_logits").X, reference)


def test_cache_ls_info_rm_through_the_api(image_folder, cache_dir):
    e = featx.extract(f"folder:{image_folder}", **TINY)
    store = CacheStore(cache_dir)
    assert [x.key for x in store.entries()] == [e.key]
    assert store.resolve(e.key[:8]).path == e.path
    info = e.info()
    assert info["samples"] == 36 and info["splits"] == {"test": 18, "train": 18}
    store.remove(store.resolve(e.key[:8]))
    assert store.entries() == []
