"""Shared fixtures: a private cache per test, synthetic image folders, tiny models."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

REPO = Path(__file__).resolve().parents[1]
#: a small random-init network used wherever the architecture does not matter
TINY_MODEL = "timm:resnet18"
TINY = {"model": TINY_MODEL, "weights": "none", "image_size": 32, "progress": False}


@pytest.fixture(autouse=True)
def _isolated(tmp_path, monkeypatch):
    """No test touches the repository's cache or the user's data directory."""
    monkeypatch.setenv("FEATX_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.chdir(tmp_path)
    yield
    _reset_featx_logger()


def _reset_featx_logger() -> None:
    """The command line, run in-process, points featx's logger at its own stderr: undo that, so
    later tests' caplog sees featx's records again."""
    import logging

    logger = logging.getLogger("featx")
    logger.handlers.clear()
    logger.propagate = True
    logger.setLevel(logging.NOTSET)


@pytest.fixture
def cache_dir(tmp_path) -> Path:
    return tmp_path / "cache"


def synthetic_image(label: int, index: int, size: int = 24, mode: str = "RGB") -> Image.Image:
    """Class = colour of a square whose position varies with the index: separable, not trivial."""
    rng = np.random.default_rng(1000 * label + index)
    img = rng.integers(0, 60, size=(size, size, 3), dtype=np.uint8)
    colour = np.array([[220, 40, 40], [40, 200, 40], [40, 40, 220], [200, 200, 40]][label % 4], dtype=np.uint8)
    x, y = rng.integers(0, size // 2, size=2)
    img[y:y + size // 2, x:x + size // 2] = colour
    out = Image.fromarray(img)
    return out.convert(mode) if mode != "RGB" else out


def make_folder(root: Path, n_per_class: int = 6, classes=("cat", "dog", "owl"), splits=("train", "test"),
                size: int = 24) -> Path:
    """folder:ROOT with class sub-folders (under split folders when ``splits`` is given)."""
    for s, split in enumerate(splits or ("",)):
        for label, name in enumerate(classes):
            d = root / split / name if split else root / name
            d.mkdir(parents=True, exist_ok=True)
            for i in range(n_per_class):
                synthetic_image(label, 100 * s + i, size).save(d / f"img{i:03d}.png")
    return root


@pytest.fixture
def image_folder(tmp_path) -> Path:
    return make_folder(tmp_path / "images")


def run_cli(*args: str, env: dict | None = None, timeout: float = 600) -> subprocess.CompletedProcess:
    """Run ``python -m featx ...`` in a subprocess, as a user would."""
    full_env = {**os.environ, **(env or {})}
    return subprocess.run(
        [sys.executable, "-m", "featx", *args], capture_output=True, text=True, env=full_env,
        timeout=timeout, stdin=subprocess.DEVNULL,
    )


def cli(capsys, *args: str) -> tuple[int, str, str]:
    """The console entry point in this process (the same code path as the installed script):
    (exit code, stdout, stderr). For checks of output and exit codes, where the process boundary
    itself is not what is tested."""
    from featx.cli import main

    with pytest.raises(SystemExit) as exited:
        main(list(args))
    captured = capsys.readouterr()
    return exited.value.code, captured.out, captured.err


def run_python(code: str, env: dict | None = None, timeout: float = 600) -> subprocess.CompletedProcess:
    full_env = {**os.environ, **(env or {})}
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=full_env,
                          timeout=timeout, stdin=subprocess.DEVNULL)


def last_json(stdout: str) -> dict:
    return json.loads(stdout.strip().splitlines()[-1])


def noisy_copy(entry, rows, folder: Path, rng, scale: float = 50.0) -> Path:
    """A copy of a cache entry in ``folder`` whose ``rows`` are noise in every layer (written
    through h5py, so checksums stay valid: the probe reads it as it would any entry)."""
    import shutil

    import h5py

    folder.mkdir(parents=True, exist_ok=True)
    path = folder / entry.path.name
    shutil.copy(entry.path, path)
    rows = np.flatnonzero(rows) if np.asarray(rows).dtype == bool else np.asarray(rows)
    with h5py.File(path, "r+") as f:
        for name in entry.layer_names:
            ds = f["layers"][name]
            ds[rows] = (rng.normal(size=(len(rows), ds.shape[1])) * scale).astype(ds.dtype)
    return path

