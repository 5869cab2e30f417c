"""Start-up benchmark: ``python -m featx cache ls`` on an empty cache, this tree against a git revision.

Both trees are timed in the same run, alternately, each call a fresh interpreter with
``PYTHONPATH`` pointing at its tree; the baseline is ``git archive REV`` unpacked into a
temporary folder. The median of ``runs`` calls is reported, with the ratio baseline/current
(higher is better) and whether the command loaded torch.

    python -m benchmarks.bench_startup [--baseline REV] [--runs N]
"""

from __future__ import annotations

import argparse
import io
import json
import os
import statistics
import subprocess
import sys
import tarfile
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
RESULTS = Path(__file__).resolve().parent / "results"
COMMAND = ["-m", "featx", "cache", "ls"]
#: runs the command in-process, then says whether it loaded torch
_LOADS_TORCH = ("import runpy, sys\nsys.argv = ['featx', 'cache', 'ls']\ntry:\n"
                "    runpy.run_module('featx', run_name='__main__')\nexcept SystemExit:\n    pass\n"
                "print('torch' in sys.modules, file=sys.stderr)")


def export_tree(rev: str, dest: Path) -> Path:
    """The files of ``rev`` (``git archive``: no checkout, the working tree is untouched)."""
    data = subprocess.run(["git", "-C", str(REPO), "archive", rev], capture_output=True, check=True).stdout
    with tarfile.open(fileobj=io.BytesIO(data)) as tar:
        tar.extractall(dest, filter="data") if sys.version_info >= (3, 12) else tar.extractall(dest)
    return dest


def _env(tree: Path, cache: Path) -> dict:
    return {**os.environ, "PYTHONPATH": str(tree), "FEATX_CACHE_DIR": str(cache)}


def time_once(tree: Path, cache: Path) -> float:
    t0 = time.perf_counter()
    subprocess.run([sys.executable, *COMMAND], env=_env(tree, cache), cwd=cache.parent, check=True,
                   capture_output=True)
    return time.perf_counter() - t0


def loads_torch(tree: Path, cache: Path) -> bool:
    proc = subprocess.run([sys.executable, "-c", _LOADS_TORCH], env=_env(tree, cache), cwd=cache.parent,
                          check=True, capture_output=True, text=True)
    return proc.stderr.strip().splitlines()[-1] == "True"


def case_cache_ls(baseline: str = "HEAD", runs: int = 5) -> dict:
    """Median start-up of ``featx cache ls`` for this tree and ``baseline``, alternating calls."""
    with tempfile.TemporaryDirectory(prefix="featx-startup-") as tmp:
        tmp = Path(tmp)
        cache = tmp / "cache"  # empty: the command only starts, looks and reports nothing
        trees = {"current": REPO, "baseline": export_tree(baseline, tmp / "baseline")}
        for tree in trees.values():
            time_once(tree, cache)  # warm the file cache for both
        times: dict[str, list[float]] = {name: [] for name in trees}
        for _ in range(runs):
            for name, tree in trees.items():
                times[name].append(time_once(tree, cache))
        torch_loaded = {name: loads_torch(tree, cache) for name, tree in trees.items()}
    median = {name: statistics.median(t) for name, t in times.items()}
    return {
        "command": "python " + " ".join(COMMAND), "baseline_rev": baseline,
        "baseline_commit": subprocess.run(["git", "-C", str(REPO), "rev-parse", baseline], capture_output=True,
                                          text=True, check=True).stdout.strip(),
        "runs": runs, "seconds": {name: [round(x, 3) for x in t] for name, t in times.items()},
        "median_seconds": {name: round(m, 3) for name, m in median.items()},
        "ratio": round(median["baseline"] / median["current"], 2),
        "loads_torch": torch_loaded,
        "load_average": list(os.getloadavg()),
    }


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--baseline", default="HEAD", help="git revision to compare with (default HEAD).")
    parser.add_argument("--runs", type=int, default=5, help="calls per tree; the median is reported.")
    args = parser.parse_args(argv)
    result = case_cache_ls(args.baseline, args.runs)
    result["finished_utc"] = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    RESULTS.mkdir(exist_ok=True)
    path = RESULTS / "startup.json"
    from .run import machine

    path.write_text(json.dumps({"machine": machine(), "cache_ls": result}, indent=2, sort_keys=True) + "\n")
    print(json.dumps({k: result[k] for k in ("median_seconds", "ratio", "loads_torch")}), file=sys.stderr)
    print(f"wrote {path}", file=sys.stderr)


if __name__ == "__main__":
    main()
