"""Extraction under torchrun: two CPU processes (gloo) share the shards of one entry."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest

import featx

from .conftest import TINY, make_folder

pytestmark = [pytest.mark.slow, pytest.mark.subprocess]  # torchrun starts three processes

RANK_SCRIPT = """
import json, os, sys
import featx
try:
    entry = featx.extract(sys.argv[1], model="timm:resnet18", weights="none", image_size=32, progress=False,
                          dtype="float32", batch_size=4, shard_rows=8, device="cpu", strict=len(sys.argv) > 3)
    run = entry.last_run
    report = {"path": str(entry.path), "forward": run.forward_pass, "images": run.images}
except featx.errors.FeatxError as exc:
    report = {"error": type(exc).__name__, "message": str(exc)}
with open(os.path.join(sys.argv[2], f"rank{os.environ['RANK']}.json"), "w") as fh:
    json.dump(report, fh)
"""


def _torchrun(tmp_path, src: str, cache_dir, tag: str, *extra: str) -> list[dict]:
    script = tmp_path / "rank.py"
    script.write_text(RANK_SCRIPT)
    out = tmp_path / tag
    out.mkdir()
    env = {**os.environ, "FEATX_CACHE_DIR": str(cache_dir)}
    res = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                          str(script), src, str(out), *extra], capture_output=True, text=True, env=env, timeout=600,
                         stdin=subprocess.DEVNULL)
    assert res.returncode == 0, res.stderr[-3000:]
    return [json.loads((out / f"rank{r}.json").read_text()) for r in range(2)]


def test_two_ranks_share_the_shards_and_match_a_single_process(tmp_path, cache_dir):
    src = f"folder:{make_folder(tmp_path / 'imgs', n_per_class=7, splits=None, size=32)}"  # 21 images, 3 shards
    ranks = _torchrun(tmp_path, src, cache_dir, "first")
    assert ranks[0]["path"] == ranks[1]["path"]
    assert all(r["forward"] for r in ranks), ranks
    assert sorted(r["images"] for r in ranks) == [8, 13]  # shard 1 on rank 1; shards 0 and 2 (8 + 5 images) on rank 0
    assert len(list(cache_dir.glob("*.h5"))) == 1
    assert not list((cache_dir / ".partial").iterdir())

    single = featx.extract(src, cache_dir=tmp_path / "single", dtype="float32", batch_size=4, shard_rows=8,
                           device="cpu", **TINY)
    shared = featx.load_features(ranks[0]["path"], "layer3")
    alone = single.load("layer3")
    assert os.path.basename(ranks[0]["path"]) == single.path.name  # same key: same entry
    assert list(shared.ids) == list(alone.ids)
    np.testing.assert_allclose(shared.X, alone.X, rtol=1e-5, atol=1e-6)

    again = _torchrun(tmp_path, src, cache_dir, "second")
    assert not any(r["forward"] for r in again)  # every rank sees the cache hit


def test_a_failing_rank_stops_every_rank_and_keeps_the_others_shards(tmp_path, cache_dir):
    root = make_folder(tmp_path / "imgs", n_per_class=7, splits=None, size=32)
    (root / "dog" / "img003.png").write_bytes(b"not an image")  # row 10: shard 1, rank 1's
    ranks = _torchrun(tmp_path, f"folder:{root}", cache_dir, "strict", "--strict")
    assert ranks[1]["error"] == "BadImageError" and "img003.png" in ranks[1]["message"]
    assert ranks[0]["error"] == "FeatxError" and "rank 1 failed" in ranks[0]["message"]
    assert not list(cache_dir.glob("*.h5"))  # no entry appears
    (partial,) = (cache_dir / ".partial").iterdir()
    assert sorted(p.name for p in partial.glob("shard-*.npz")) == ["shard-000000.npz", "shard-000002.npz"]


# ----------------------------------------------------------------- ranks that disagree or hang

CHECK_SCRIPT = """
import json, os, sys, time
import featx
import featx.extraction.runner as runner
rank = int(os.environ["RANK"])
mode, out, src, base = sys.argv[1], sys.argv[2], sys.argv[3], sys.argv[4]
forward = []
real_forward = runner._forward_pass
def counting_forward(*args, **kwargs):
    forward.append(1)
    if mode == "hang" and rank == 1:
        time.sleep(120)  # a peer that never comes back
    return real_forward(*args, **kwargs)
runner._forward_pass = counting_forward
kwargs = dict(model="timm:resnet18", weights="none", image_size=32, progress=False, dtype="float32",
              batch_size=4, shard_rows=8, device="cpu", cache_dir=base)
if mode == "limit" and rank == 1:
    kwargs["limit"] = 12  # a different sample list: a different key
if mode == "cachedir":
    kwargs["cache_dir"] = os.path.join(base, f"rank{rank}")
if mode == "plan" and rank == 1:
    kwargs["batch_size"] = 2  # same key, another plan
t0 = time.monotonic()
try:
    featx.extract(src, **kwargs)
    report = {"ok": True}
except featx.errors.FeatxError as exc:
    report = {"error": type(exc).__name__, "message": str(exc)}
report.update(forward=len(forward), seconds=time.monotonic() - t0)
with open(os.path.join(out, f"rank{rank}.json"), "w") as fh:
    json.dump(report, fh)
sys.exit(0 if report.get("ok") else 1)
"""


def _torchrun_check(tmp_path, mode: str, timeout: str = "60") -> tuple[list[dict], subprocess.CompletedProcess]:
    src = f"folder:{make_folder(tmp_path / 'imgs', n_per_class=7, splits=None, size=32)}"
    script = tmp_path / "check.py"
    script.write_text(CHECK_SCRIPT)
    out = tmp_path / mode
    out.mkdir()
    env = {**os.environ, "FEATX_DIST_TIMEOUT": timeout}
    res = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                          str(script), mode, str(out), src, str(tmp_path / "cache")], capture_output=True, text=True,
                         env=env, timeout=300, stdin=subprocess.DEVNULL)
    return [json.loads(p.read_text()) for p in sorted(out.glob("rank*.json"))], res


@pytest.mark.slow
def test_ranks_with_different_keys_stop_before_any_forward_pass(tmp_path):
    ranks, res = _torchrun_check(tmp_path, "limit")
    assert len(ranks) == 2, res.stderr[-3000:]
    for r in ranks:
        assert r["error"] == "FeatxError" and "disagree on the cache key" in r["message"], r
        assert "rank 1 differs from rank 0 in" in r["message"] and "dataset.limit" in r["message"]
        assert r["forward"] == 0
    assert not list((tmp_path / "cache").glob("*.h5"))
    assert not (tmp_path / "cache" / ".partial").exists() or not list((tmp_path / "cache" / ".partial").iterdir())


@pytest.mark.slow
def test_ranks_with_different_plans_stop_before_any_forward_pass(tmp_path):
    ranks, res = _torchrun_check(tmp_path, "plan")
    assert len(ranks) == 2, res.stderr[-3000:]
    for r in ranks:
        assert "disagree on the extraction plan" in r["message"] and "batch_size" in r["message"], r
        assert r["forward"] == 0


@pytest.mark.slow
def test_ranks_that_do_not_share_the_cache_directory_stop_with_a_clear_error(tmp_path):
    ranks, res = _torchrun_check(tmp_path, "cachedir")
    assert len(ranks) == 2, res.stderr[-3000:]
    for r in ranks:
        assert "not shared by all ranks" in r["message"] and "rank 1 uses" in r["message"], r
        assert r["forward"] == 0


@pytest.mark.slow
def test_a_hung_rank_ends_the_wait_with_an_error_not_a_hang(tmp_path):
    ranks, res = _torchrun_check(tmp_path, "hang", timeout="5")
    rank0 = json.loads((tmp_path / "hang" / "rank0.json").read_text())
    assert rank0["error"] == "FeatxError" and "Rank 1 has shown no sign of progress" in rank0["message"], rank0
    assert rank0["forward"] == 1 and rank0["seconds"] < 60
    assert res.returncode != 0  # torchrun stops the hung rank once rank 0 has failed
    (partial,) = (tmp_path / "cache" / ".partial").iterdir()
    assert sorted(p.name for p in partial.glob("shard-*.npz")) == ["shard-000000.npz", "shard-000002.npz"]
