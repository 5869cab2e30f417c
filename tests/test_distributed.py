"""Extraction under torchrun: two CPU processes (gloo) share the shards of one entry."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np

import featx

from .conftest import TINY, make_folder

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
    shared = featx.load_features(ranks[0]["path"], "layer4")
    alone = single.load("layer4")
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
