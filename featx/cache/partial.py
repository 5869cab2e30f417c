"""Durable progress of an extraction that has not finished yet.

Features are written in shards (a fixed run of whole batches each) to small ``.npz`` files
that appear by atomic rename after an fsync, so a shard that exists is complete. HDF5
itself is not crash-safe while open for writing, which is why the entry file is only
assembled from the shards once all of them exist. A killed run resumes from the shards it
left; because shards cover the same batches in every run, the result is bit-identical to
an uninterrupted run.
"""

from __future__ import annotations

import json
import logging
import shutil
import zipfile
from pathlib import Path

import numpy as np

from .._fileio import atomic_write_bytes

log = logging.getLogger(__name__)


class PartialRun:
    """Shard files of one extraction plan, in ``directory``."""

    def __init__(self, directory: Path, plan: dict):
        self.dir, self.plan = Path(directory), plan
        self.n_shards = -(-plan["n"] // plan["shard_rows"])
        plan_file = self.dir / "plan.json"
        if self.dir.exists():
            try:
                old = json.loads(plan_file.read_text())
            except (OSError, ValueError):
                old = None
            if old != plan:
                log.info("discarding an interrupted extraction with a different plan")
                shutil.rmtree(self.dir)
        if not self.dir.exists():
            self.dir.mkdir(parents=True)
            atomic_write_bytes(plan_file, lambda fh: fh.write(json.dumps(plan, sort_keys=True).encode()))

    def rows(self, shard: int) -> tuple[int, int]:
        start = shard * self.plan["shard_rows"]
        return start, min(start + self.plan["shard_rows"], self.plan["n"])

    def _path(self, shard: int) -> Path:
        return self.dir / f"shard-{shard:06d}.npz"

    def done(self) -> list[int]:
        """Shards already on disk and readable; unreadable ones are removed."""
        finished = []
        for shard in range(self.n_shards):
            path = self._path(shard)
            if not path.exists():
                continue
            try:
                with zipfile.ZipFile(path) as z:
                    if z.testzip() is not None:
                        raise zipfile.BadZipFile("CRC mismatch")
                finished.append(shard)
            except (OSError, zipfile.BadZipFile):
                log.warning("removing unreadable shard %s", path)
                path.unlink()
        return finished

    def write(self, shard: int, arrays: dict[str, np.ndarray], ok: np.ndarray, errors: list[str]) -> None:
        start, stop = self.rows(shard)
        if len(ok) != stop - start:
            raise ValueError(f"shard {shard} has {len(ok)} rows, expected {stop - start}")
        payload = {f"layer_{i}": arrays[name] for i, name in enumerate(self.plan["layers"])}
        payload["ok"] = np.asarray(ok, dtype=bool)
        payload["error"] = np.asarray(errors, dtype=np.str_)
        atomic_write_bytes(self._path(shard), lambda fh: np.savez(fh, **payload))

    def read(self, shard: int) -> tuple[dict[str, np.ndarray], np.ndarray, np.ndarray]:
        with np.load(self._path(shard), allow_pickle=False) as z:
            arrays = {name: z[f"layer_{i}"] for i, name in enumerate(self.plan["layers"])}
            return arrays, z["ok"], z["error"]

    def status(self, shard: int) -> tuple[np.ndarray, np.ndarray]:
        """ok flags and error texts of one shard, without loading its features."""
        with np.load(self._path(shard), allow_pickle=False) as z:
            return z["ok"], z["error"]

    def remove(self) -> None:
        shutil.rmtree(self.dir, ignore_errors=True)
