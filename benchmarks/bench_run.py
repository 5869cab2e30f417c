"""The main job against the hardware: ``featx run`` from a cold cache vs a bare forward pass.

- floor: ``bench_floor.floor``, the model's channels_last forward pass over the same images
  already resized in memory (no decoding, no per-image work, nothing kept);
- run:   ``featx run`` as a user types it (a fresh cache and result folder), timed from the
  outside, with the peak memory of its whole process tree (the probe's workers included)
  sampled from /proc every 0.2 s, as the sum of RSS and the sum of PSS (shared pages counted
  once).

All in one benchmark run, the floor before and after the run; the ratio against the mean floor
is the acceptance figure (target <= 3).
Standalone: ``python -m benchmarks.bench_run [--limit N]`` prints the result as JSON.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

IMAGE_SIZE = 96  # featx run's default input size (featx/cli.py)
N_FASHION = 70_000


def _tree_memory(root: int) -> tuple[int, int, list[dict]]:
    """Resident and proportional bytes (RSS, PSS) of ``root`` and all its descendants, and each
    process's share (pid, command, MiB).

    The RSS sum counts a page shared by several processes (torch's libraries, the page cache of
    a file they all read) once per process; PSS divides it among them, so its sum is what the
    tree occupies. Both are reported."""
    children: dict[int, list[int]] = {}
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        try:
            with open(f"/proc/{entry.name}/stat") as f:
                ppid = int(f.read().rsplit(")", 1)[1].split()[1])
        except OSError:
            continue
        children.setdefault(ppid, []).append(int(entry.name))
    processes = []
    stack = [root]
    while stack:
        pid = stack.pop()
        stack += children.get(pid, [])
        try:
            with open(f"/proc/{pid}/smaps_rollup") as f:
                sizes = {line.split()[0]: int(line.split()[1]) * 1024 for line in f if line.split()[0] in
                         ("Rss:", "Pss:")}
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                command = f.read().replace(b"\0", b" ").decode(errors="replace")[:80]
        except (OSError, ValueError, IndexError):
            continue
        processes.append({"pid": pid, "command": command, "rss_mib": round(sizes.get("Rss:", 0) / 2**20),
                          "pss_mib": round(sizes.get("Pss:", 0) / 2**20)})
    return (sum(p["rss_mib"] for p in processes) * 2**20, sum(p["pss_mib"] for p in processes) * 2**20,
            processes)


def _environment(changes: dict[str, str | None] | None) -> dict[str, str]:
    """This process's environment with ``changes`` applied (None removes a variable)."""
    env = dict(os.environ)
    for name, value in (changes or {}).items():
        env.pop(name, None) if value is None else env.__setitem__(name, value)
    return env


def featx_run(limit: int | None, cache_dir: str, extra: list[str] = (),
              env_changes: dict[str, str | None] | None = None) -> dict:
    """``featx run`` into an emptied ``cache_dir``: wall seconds, peak tree RSS and its results.

    The cache is kept afterwards, so that later cases probe the very entry this run built.
    """
    shutil.rmtree(cache_dir, ignore_errors=True)
    work = Path(tempfile.mkdtemp(prefix="featx-run-bench-"))
    cmd = [sys.executable, "-m", "featx", "--cache-dir", cache_dir, "run", "--out", str(work / "out"),
           "--no-progress", *extra]
    if limit:
        cmd += ["--limit", str(limit)]
    peak, peak_pss, at_peak = 0, 0, {}
    try:
        t0 = time.perf_counter()
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                stdin=subprocess.DEVNULL, env=_environment(env_changes))
        done = threading.Event()

        def sample():
            nonlocal peak, peak_pss, at_peak
            while not done.wait(0.2):
                rss, pss, processes = _tree_memory(proc.pid)
                if pss > peak_pss:  # who holds the memory at the peak, and when
                    at_peak = {"seconds": round(time.perf_counter() - t0, 1), "processes": processes}
                peak, peak_pss = max(peak, rss), max(peak_pss, pss)

        sampler = threading.Thread(target=sample, daemon=True)
        sampler.start()
        output, _ = proc.communicate()
        seconds = time.perf_counter() - t0
        done.set()
        sampler.join()
        if proc.returncode:
            raise RuntimeError(f"featx run failed ({proc.returncode}):\n{output[-3000:]}")
        results = json.loads((work / "out" / "results.json").read_text())
        best = results["best"]
        return {
            "entry": results["entry"]["path"],
            "seconds": seconds, "peak_rss_bytes": peak, "peak_pss_bytes": peak_pss, "at_peak_pss": at_peak,
            "probe_seconds": results["seconds"],
            "best": {k: best[k] for k in ("layer", "head", "params", "test_top1", "test_top1_ci")},
            "layers": list(dict.fromkeys(r["layer"] for r in results["rows"])),
            "table": {f"{r['layer']}/{r['head']}": r["test_top1"] for r in results["rows"]},
            "cells": {f"{r['layer']}/{r['head']}": {"params": r["params"], "test_top1": r["test_top1"],
                                                     "val_top1": r["val_top1"]} for r in results["rows"]},
            "cell_seconds": {f"{r['layer']}/{r['head']}": r["fit_seconds"] for r in results["rows"]},
            "protocol": {k: results["protocol"].get(k)
                         for k in ("device", "engines", "selection_rows", "jobs", "blas")},
            "output_tail": output[-1500:],
        }
    finally:
        shutil.rmtree(work, ignore_errors=True)


def featx_probe(entry_path: str, env_changes: dict[str, str | None], extra: list[str] = ()) -> dict:
    """``featx probe`` of an entry with the main job's heads (and ``extra`` options), in a process whose
    environment has ``env_changes`` applied (None removes a variable): wall seconds and what results.json
    reports."""
    from featx.cli import RUN_HEADS

    work = Path(tempfile.mkdtemp(prefix="featx-probe-bench-"))
    try:
        t0 = time.perf_counter()
        subprocess.run([sys.executable, "-m", "featx", "probe", entry_path, "--heads", RUN_HEADS,
                        "--out", str(work / "out"), "--no-progress", *extra], check=True,
                       env=_environment(env_changes),
                       stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        seconds = time.perf_counter() - t0
        results = json.loads((work / "out" / "results.json").read_text())
    finally:
        shutil.rmtree(work, ignore_errors=True)
    best = results["best"]
    return {"seconds": round(seconds, 1), "probe_seconds": round(results["seconds"], 1),
            "blas": results["protocol"]["blas"],
            **{k: results["protocol"].get(k) for k in ("backend", "precision", "engines")},
            "best": {k: best[k] for k in ("layer", "head", "params", "test_top1")},
            "table": {f"{r['layer']}/{r['head']}": r["test_top1"] for r in results["rows"]},
            "cell_seconds": {f"{r['layer']}/{r['head']}": r["fit_seconds"] for r in results["rows"]}}


def _head_seconds(run: dict, head: str) -> float:
    return round(sum(v for cell, v in run["cell_seconds"].items() if cell.endswith(f"/{head}")), 1)


def case_head_precision(entry_path: str) -> dict:
    """The main job's probe as it runs by default (threads; the MLP in bfloat16 where the CPU multiplies it
    natively) against full precision, in threads and in loky processes (the previous default), each in a
    fresh process: seconds, and what changes in the table (only the MLP's cells may)."""
    sides = {"auto": ["--head-precision", "auto"], "float32": ["--head-precision", "float32"],
             "float32, loky processes": ["--head-precision", "float32", "--backend", "loky"]}
    runs = {name: featx_probe(entry_path, {}, extra) for name, extra in sides.items()}
    auto, full = runs["auto"], runs["float32"]
    mlp = {c: round(auto["table"][c] - full["table"][c], 4) for c in auto["table"] if c.endswith("/mlp")}
    others = [abs(auto["table"][c] - full["table"][c]) for c in auto["table"] if not c.endswith("/mlp")]
    return {"entry": entry_path, "runs": runs,
            "seconds": {name: r["probe_seconds"] for name, r in runs.items()},
            "speedup_over_auto": {name: round(r["probe_seconds"] / auto["probe_seconds"], 2)
                                  for name, r in runs.items()},
            "mlp_seconds": {name: _head_seconds(r, "mlp") for name, r in runs.items()},
            "mlp_test_top1_auto_minus_float32": mlp,
            "max_abs_difference_other_heads": round(max(others, default=0.0), 4),
            "same_best_cell": len({(r["best"]["layer"], r["best"]["head"]) for r in runs.values()}) == 1}


def case_blas_kernels(entry_path: str, rounds: int = 1) -> dict:
    """The main job's probe with the BLAS kernels this environment selects against the other choice,
    alternating: without OPENBLAS_CORETYPE when the environment pins one, else pinned to AVX2 Haswell."""
    pinned = os.environ.get("OPENBLAS_CORETYPE")
    other = {"OPENBLAS_CORETYPE": None} if pinned else {"OPENBLAS_CORETYPE": "Haswell"}
    sides = {"environment": {}, "without the pin" if pinned else "pinned to Haswell": other}
    runs = {name: [] for name in sides}
    for _ in range(rounds):
        for name, changes in sides.items():
            runs[name].append(featx_probe(entry_path, changes))
    first, second = runs.values()
    tables = [r["table"] for r in first + second]
    return {"entry": entry_path, "environment_openblas_coretype": pinned, "runs": runs,
            "seconds_environment_over_other": [round(a["seconds"] / b["seconds"], 2) for a, b in zip(first, second)],
            "same_best_cell": len({(r["best"]["layer"], r["best"]["head"]) for r in first + second}) == 1,
            "max_abs_cell_difference": round(max(abs(t[c] - tables[0][c]) for t in tables for c in t), 4)}


def case_run_vs_floor(run, cache_dir: str, limit: int | None = None,
                      env_changes: dict[str, str | None] | None = None) -> dict:
    """The floor is measured before and after the run, and the ratio taken against their mean:
    this machine's speed drifts by 10-20% over the minutes a run takes, and a floor on one
    side only would credit or charge the run with that drift. ``env_changes`` apply to the run
    only (the floor is torch's, which no BLAS variable changes)."""
    from .bench_floor import floor

    n = limit or N_FASHION
    before = run(floor, n, IMAGE_SIZE)
    ours = run(featx_run, limit, cache_dir, (), env_changes)
    after = run(floor, n, IMAGE_SIZE)
    floors = [before["seconds"], after["seconds"]]
    base = sum(floors) / 2
    return {
        "images": n, "image_size": IMAGE_SIZE, "floor_seconds": round(base, 1),
        "floor_seconds_before_after": [round(f, 1) for f in floors],
        "floor_images_per_second": round(n / base, 1),
        "run_seconds": round(ours["seconds"], 1), "probe_seconds": ours["probe_seconds"],
        "ratio": round(ours["seconds"] / base, 3),
        "ratio_against_floor_before_after": [round(ours["seconds"] / f, 3) for f in floors],
        "target": "<= 3 (and peak RSS <= 3 GB)",
        "peak_rss_gb": round(ours["peak_rss_bytes"] / 2**30, 2),
        "peak_pss_gb": round(ours["peak_pss_bytes"] / 2**30, 2), "run": ours,
        "run_environment_changes": env_changes or {},
    }


if __name__ == "__main__":
    import argparse

    from .run import isolated, machine

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--limit", type=int, default=None, help="Images (default: all 70,000).")
    parser.add_argument("--cache-dir", default="cache/bench-run", help="Emptied, then kept (default %(default)s).")
    args = parser.parse_args()
    print(json.dumps({"machine": machine(), "run_vs_floor": case_run_vs_floor(isolated, args.cache_dir, args.limit)},
                     indent=2, sort_keys=True))
