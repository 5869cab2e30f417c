"""Fine-tuning under torchrun: two gloo ranks compute what one process computes on the same data,
and after a rank is killed the same command resumes from rank 0's last checkpoint.

The runs fine-tune a random-init ResNet-18 at 32 px after layer3, frozen below layer2 with
gradual unfreezing (the set of parameters DDP synchronises changes after epoch 1), batch norm
statistics updated (synchronised across the ranks), a global batch of 15 images (uneven
shares of 7 and 8), plain SGD. SGD moves every weight by lr x gradient, so a wrong gradient
(a missing loss scale, per-share batch statistics, another sample order) shows up in the
weights in proportion, where Adam's normalised steps would hide a scale error.
"""

from __future__ import annotations

import copy
import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from timm.layers import BatchNormAct2d
from torch import nn

from featx.finetuning import finetune
from featx.finetuning.data import epoch_batches
from featx.finetuning.distributed import RankBatches
from featx.finetuning.syncbn import SyncedBatchNorm, synchronise_batchnorm

from .conftest import REPO, TINY_MODEL, make_folder
from .test_finetune import random_init_resnet18

OPTIONS = dict(model=TINY_MODEL, weights="none", image_size=32, layer="layer3", epochs=3, batch_size=15, workers=0,
               freeze_below="layer2", unfreeze="gradual", optimizer="sgd", lr=0.05, backbone_lr_ratio=1.0, patience=0,
               progress=False)
#: The two runs differ only in the order floats are summed (gradients over ranks, batch statistics
#: over shares): measured up to 1.2e-7, on running variances near 0.5. Training moves the trained
#: parameters by up to 1e-2 and the running statistics by 0.2-0.5, so a 1% error in a gradient or a
#: statistic (one share's loss scaled wrongly, per-share batch norm) would exceed these bounds 100-fold.
ATOL, RTOL = 1e-6, 1e-5
#: below --freeze-below, and layer2.0, which gradual unfreezing never reaches in three epochs
FROZEN = ("backbone.conv1.", "backbone.bn1.", "backbone.layer1.", "backbone.layer2.0.")


def cli_args(images: Path, out: Path) -> list[str]:
    args = [f"folder:{images}", "--out", str(out)]
    for key, value in OPTIONS.items():
        flag = "--" + key.replace("_", "-")
        if key == "progress":
            args.append("--no-progress")
        else:
            args += [flag, str(value)]
    return args


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _torchrun(images: Path, out: Path, log: Path) -> subprocess.Popen:
    """``torchrun --nproc-per-node 2 -m featx finetune ...`` on gloo, one thread per rank."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-port",
           str(free_port()), "-m", "featx", "finetune", *cli_args(images, out)]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    with open(log, "w") as fh:
        return subprocess.Popen(cmd, stdout=fh, stderr=subprocess.STDOUT, env=env, stdin=subprocess.DEVNULL,
                                start_new_session=True)


def finish(proc: subprocess.Popen, log: Path, timeout: float = 300) -> str:
    try:
        proc.wait(timeout=timeout)
    finally:
        stop(proc)
    text = log.read_text()
    assert proc.returncode == 0, text[-3000:]
    return text


def stop(proc: subprocess.Popen) -> None:
    """Nothing of a launch outlives the test."""
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    proc.wait()


def rank_pid(agent: int, rank: int) -> int | None:
    """The worker process of ``rank`` started by the torchrun agent ``agent``."""
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            parent = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
            environ = (entry / "environ").read_bytes()
        except (OSError, IndexError, ValueError):
            continue
        if parent == agent and f"\0RANK={rank}\0".encode() in b"\0" + environ:
            return int(entry.name)
    return None


def weights(out: Path) -> dict[str, torch.Tensor]:
    return torch.load(out / "model.pt", weights_only=True)


def assert_close(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for k in a:
        np.testing.assert_allclose(a[k].double().numpy(), b[k].double().numpy(), rtol=RTOL, atol=ATOL, err_msg=k)


def metrics(result: dict) -> list[list]:
    keys = ("epoch", "val_top1", "trainable_blocks")
    return [[h.get(k) for k in keys] for h in result["history"]]


@pytest.fixture(scope="module")
def images(tmp_path_factory) -> Path:
    return make_folder(tmp_path_factory.mktemp("ddp") / "images", n_per_class=12)


@pytest.fixture(scope="module")
def two_ranks(tmp_path_factory, images) -> tuple[Path, str]:
    """An uninterrupted two-rank run: (its output folder, what it printed)."""
    root = tmp_path_factory.mktemp("two")
    out = root / "run"
    return out, finish(_torchrun(images, out, root / "log.txt"), root / "log.txt")


# ------------------------------------------------------------------------------ one process = two ranks


@pytest.mark.slow
@pytest.mark.subprocess
def test_two_gloo_ranks_compute_what_one_process_computes(two_ranks, images, tmp_path):
    out, printed = two_ranks
    alone = finetune(f"folder:{images}", out_dir=tmp_path / "alone", **OPTIONS)
    ranks = json.loads((out / "finetune.json").read_text())

    assert ranks["fingerprint"] == alone.fingerprint  # the number of processes is not part of the configuration
    assert ranks["extra"]["distributed"] == {"world_size": 2, "backend": "gloo", "synchronised_batchnorm": True}
    assert alone.extra["distributed"] == {"world_size": 1, "backend": None}
    assert ranks["test"]["test_top1"] == alone.test["test_top1"]
    assert ranks["test"]["n_test"] == alone.test["n_test"] == 36
    assert metrics(ranks) == metrics(alone.to_json())  # same validation, so the same best epoch
    assert ranks["best_epoch"] == alone.best_epoch
    np.testing.assert_allclose([h.get("train_loss", 0) for h in ranks["history"]],
                               [h.get("train_loss", 0) for h in alone.history], rtol=1e-5)

    two, one, start = weights(out), weights(tmp_path / "alone"), random_init_resnet18()
    assert_close(two, one)
    trained = [k for k in two if k.startswith("backbone.layer3.") and k.endswith((".weight", ".bias"))]
    assert max(float((two[k] - start[k.removeprefix("backbone.")]).abs().max()) for k in trained) > 1000 * ATOL
    for k in two:  # frozen blocks, batch norm statistics included, are untouched on every rank
        if k.startswith(FROZEN):
            assert torch.equal(two[k], start[k.removeprefix("backbone.")]), k

    assert sorted(p.name for p in out.iterdir()) == [".featx-result.json", "curves.png", "finetune.json", "model.json",
                                                     "model.pt"]
    assert printed.count("fine-tuned after layer3") == 1  # rank 0 reports, once


# ------------------------------------------------------------------------------ a killed rank


@pytest.mark.slow
@pytest.mark.subprocess
@pytest.mark.skipif(not Path("/proc/self/environ").exists(), reason="finds rank 1 through /proc (Linux)")
def test_a_killed_rank_resumes_from_rank_zeros_last_checkpoint(two_ranks, images, tmp_path):
    out, log = tmp_path / "killed", tmp_path / "log.txt"
    proc = _torchrun(images, out, log)
    try:
        deadline = time.monotonic() + 300
        while not (out / "checkpoint.pt").exists():
            assert proc.poll() is None, log.read_text()[-3000:]
            assert time.monotonic() < deadline, "no checkpoint was written"
            time.sleep(0.02)
        victim = rank_pid(proc.pid, 1)
        assert victim is not None, "rank 1 not found among the launcher's processes"
        os.kill(victim, signal.SIGKILL)
        proc.wait(timeout=120)  # torchrun stops rank 0 once rank 1 is gone
    finally:
        stop(proc)
    assert proc.returncode != 0
    assert not (out / "finetune.json").exists()
    checkpoint = torch.load(out / "checkpoint.pt", map_location="cpu", weights_only=True)
    done = int(checkpoint["epoch"])
    assert 1 <= done < OPTIONS["epochs"]

    finish(_torchrun(images, out, log), log)  # the same command again
    resumed = json.loads((out / "finetune.json").read_text())
    assert resumed["resumed_at_epoch"] == done
    assert resumed["history"][:done + 1] == json.loads(checkpoint["history"])  # epochs kept, not trained again
    assert [h["epoch"] for h in resumed["history"]] == [0, 1, 2, 3]

    straight = json.loads((two_ranks[0] / "finetune.json").read_text())
    assert resumed["fingerprint"] == straight["fingerprint"]
    assert resumed["test"]["test_top1"] == straight["test"]["test_top1"]
    assert metrics(resumed) == metrics(straight)
    assert_close(weights(out), weights(two_ranks[0]))
    assert not (out / "checkpoint.pt").exists()


# ------------------------------------------------------------------------------ the parts, in one process


def test_the_ranks_shares_are_the_single_process_batches():
    indices = np.arange(100, 138)
    for world in (2, 3, 4):
        ranks = [RankBatches(indices, 15, seed=7, rank=r, world=world) for r in range(world)]
        for epoch in (0, 1):
            for sampler in ranks:
                sampler.set_epoch(epoch)
            single = epoch_batches(indices, 15, epoch, 7, shuffle=True)
            shares = [list(sampler) for sampler in ranks]
            assert all(len(s) == len(single) for s in shares)  # one schedule step per batch on every rank
            for b, batch in enumerate(single):
                parts = [s[b] for s in shares]
                assert sum(parts, []) == batch
                assert max(map(len, parts)) - min(map(len, parts)) <= 1
    first, again = RankBatches(indices, 15, 7, 0, 2), RankBatches(indices, 15, 7, 0, 2)
    again.set_epoch(1)
    assert list(first) != list(again)


def test_synchronised_batchnorm_keeps_names_tensors_modes_and_the_activation():
    net = nn.Sequential(nn.Conv2d(3, 4, 3), BatchNormAct2d(4, act_layer=nn.ReLU), nn.BatchNorm2d(4))
    net[2].eval()  # a frozen layer stays frozen
    reference = copy.deepcopy(net)
    tensors = {k: v.data_ptr() for k, v in net.state_dict().items()}
    assert synchronise_batchnorm(net) == 2
    assert all(isinstance(net[i], SyncedBatchNorm) for i in (1, 2))
    assert net[1].training and not net[2].training
    assert {k: v.data_ptr() for k, v in net.state_dict().items()} == tensors  # the same tensors, same names
    x = torch.randn(5, 3, 8, 8)
    out = net(x)
    torch.testing.assert_close(out, reference(x))  # one process: plain batch norm, then the activation
    torch.testing.assert_close(net.state_dict(), reference.state_dict())  # statistics updated alike
