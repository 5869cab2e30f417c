"""Acceptance experiment for ``featx finetune``: Fashion-MNIST, the bundled EfficientNet-Lite0.

    python -m benchmarks.finetune_fmnist                      # the default budget (~50 min on 2 idle cores)
    python -m benchmarks.finetune_fmnist --limit 500 --epochs 1   # a smoke run (a minute or two)
    python -m benchmarks.finetune_fmnist --results DIR        # start from an existing featx probe result

Steps, each timed: (1) extract the ``auto`` layers at ``--image-size`` into the cache;
(2) ``featx.probe`` with its logreg head (the layer and C chosen on validation data), which
writes ``results.json`` + ``linear_head.npz`` (skipped with ``--results``); (3) fine-tuning from that
layer twice with the same budget: LP-FT (head from the probe) and a random head;
(4) JSON to ``benchmarks/results/finetune.json``: test top-1 with 95% intervals, per-epoch
history, seconds per phase, and whether 0.93 was reached.

Budget on 2 CPU cores: training costs about three forward passes and the network is cut after
the chosen layer; at 96 px one epoch over the 48,000 fit images plus validation takes about
5 minutes, so the default 4 epochs x 2 runs plus extraction and probe is about 50 minutes.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results"
TARGET = 0.93


def _run_summary(result, wall: float) -> dict:
    d = result.to_json()  # strict JSON (NaN -> null)
    keep = ("test", "best_epoch", "best_val_top1", "stopped_early", "history", "out_dir", "probe")
    return {**{k: d[k] for k in keep}, "train_seconds": round(result.train_seconds, 1),
            "wall_seconds": round(wall, 1)}


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--image-size", type=int, default=96, help="Input size for extraction and fine-tuning.")
    parser.add_argument("--epochs", type=int, default=4, help="Fine-tuning epochs per run (the budget).")
    parser.add_argument("--limit", type=int, default=None, help="Stratified subset of N images (smoke runs).")
    parser.add_argument("--lr", type=float, default=None, help="Head learning rate (default: featx's, 1e-3).")
    parser.add_argument("--backbone-lr-ratio", type=float, default=0.1)
    parser.add_argument("--batch-size", type=int, default=None)
    parser.add_argument("--heads", default="lpft,random", help="Which head initialisations to run.")
    parser.add_argument("--results", type=Path, default=None, help="Use this probe result instead of steps 1-2.")
    parser.add_argument("--workdir", type=Path, default=Path("featx-results") / "bench-finetune",
                        help="Where the probe result and the fine-tuning runs go.")
    parser.add_argument("--cache-dir", type=Path, default=None)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=RESULTS / "finetune.json")
    parser.add_argument("--no-progress", action="store_true")
    args = parser.parse_args(argv)

    import featx
    from featx.finetuning import finetune

    from .run import machine

    logging.basicConfig(level=logging.INFO, stream=sys.stderr, format="%(message)s")
    report: dict = {
        "experiment": "Fashion-MNIST, efficientnet_lite0: LP-FT vs random head, same budget",
        "machine": machine(),
        "settings": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
        "target_top1": TARGET,
    }
    workdir = args.workdir / (f"{args.image_size}px" + (f"-limit{args.limit}" if args.limit else ""))
    results_dir = args.results
    if results_dir is None:
        t0 = time.perf_counter()
        entry = featx.extract("fashion-mnist", model="efficientnet_lite0", layers="auto", image_size=args.image_size,
                              limit=args.limit, seed=args.seed, cache_dir=args.cache_dir,
                              progress=not args.no_progress)
        report["extract"] = {"entry": entry.key, "path": str(entry.path), "layers": entry.layer_names,
                             "seconds": round(time.perf_counter() - t0, 1)}
        t0 = time.perf_counter()
        results_dir = workdir / "probe"
        from featx.probing import probe

        res = probe(entry, heads="logreg", seed=args.seed, out_dir=results_dir, cache_dir=args.cache_dir,
                    progress=not args.no_progress)
        summary = {"best_layer": res.best["layer"], "test_top1": res.best["test_top1"],
                   "val_top1": {r["layer"]: r["val_top1"] for r in res.rows}}
        report["probe"] = {**summary, "seconds": round(time.perf_counter() - t0, 1),
                           "results_dir": str(results_dir)}
    else:
        data = json.loads((Path(results_dir) / "results.json").read_text())
        report["probe"] = {"results_dir": str(results_dir), "best_layer": data["best"]["layer"],
                           "test_top1": data["best"]["test_top1"]}
    print(f"probe: best layer {report['probe']['best_layer']}, test top-1 {report['probe']['test_top1']:.4f}",
          file=sys.stderr, flush=True)

    report["runs"] = {}
    for head_init in [h.strip() for h in args.heads.split(",") if h.strip()]:
        t0 = time.perf_counter()
        result = finetune(results=results_dir, head_init=head_init, epochs=args.epochs, lr=args.lr,
                          backbone_lr_ratio=args.backbone_lr_ratio, batch_size=args.batch_size, seed=args.seed,
                          out_dir=workdir / f"finetune-{head_init}-{args.epochs}ep", cache_dir=args.cache_dir,
                          progress=not args.no_progress)
        report["runs"][head_init] = _run_summary(result, time.perf_counter() - t0)
        print(f"{head_init}: test top-1 {result.test['test_top1']:.4f} "
              f"(95% CI {result.test['test_top1_ci'][0]:.4f}-{result.test['test_top1_ci'][1]:.4f}), "
              f"{result.train_seconds / 60:.1f} min of training", file=sys.stderr, flush=True)
    runs = report["runs"]
    report["reached_target"] = {k: v["test"]["test_top1"] >= TARGET for k, v in runs.items()}
    if "lpft" in runs and "random" in runs:
        report["lpft_minus_random_top1"] = runs["lpft"]["test"]["test_top1"] - runs["random"]["test"]["test_top1"]
    report["finished_utc"] = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2, allow_nan=False) + "\n")
    print(f"wrote {args.out}", file=sys.stderr)


if __name__ == "__main__":
    main()
