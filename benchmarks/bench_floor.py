"""Extraction at the floor: featx.extract of all auto layers vs a bare forward pass over images
already resized in memory, so that the floor holds no decoding and no per-image work.

- floor:   the model in eval mode, channels_last, under torch.inference_mode, over one uint8
           tensor of the images resized before the clock starts; each batch is normalised;
           featx's batch size and CPU settings (threads, allocator).
- extract: featx.extract into a fresh cache with ``featx run``'s defaults (96 px, grid2 pooling,
           float16, auto layers) from the same in-memory subset, once per resize engine:
           ``tensor`` (whole batches on the device) and ``pil`` (image by image, as before).

Every measurement runs in a fresh process, the variants interleaved; the ratios are of the
fastest run of each. ``ratio`` compares whole calls (model construction included on both
sides); ``loop_ratio`` compares the batch loops alone; ``cpu_ratio`` compares the CPU time of
whole calls, which other work on a busy machine disturbs less than wall time.

Standalone: ``python -m benchmarks.bench_floor [--quick]`` prints the result as JSON.
"""

from __future__ import annotations

import shutil
import tempfile
import time

MODEL = "efficientnet_lite0"
RUN_DEFAULTS = {"layers": "auto", "pool": "grid2", "dtype": "float16"}  # featx run's (featx/cli.py)
ENGINES = ("tensor", "pil")


def _source(n: int, seed: int = 0):
    from featx.data import open_dataset, stratified_limit

    return stratified_limit(open_dataset("fashion-mnist", download=False), n, seed)


def floor(n: int, image_size: int) -> dict:
    """The bare forward pass over pre-resized images; nothing is pooled or kept."""
    import torch

    from featx import _runtime
    from featx.backbones.registry import build_model, describe_model, parse_model
    from featx.extraction.plan import default_batch_size

    source = _source(n)
    dev = _runtime.resolve_device("cpu")
    info = describe_model(parse_model(MODEL))
    pre = info.preprocessing.override(image_size)
    images = torch.stack([pre.pil_to_uint8(source.image(i)) for i in range(len(source))])  # contiguous
    with _runtime.cpu_settings(dev, workers=0):  # what featx uses for an in-memory dataset
        t0, cpu0 = time.perf_counter(), time.process_time()
        net = build_model(info, image_size=pre.crop_size).eval().to(memory_format=torch.channels_last)
        bs = default_batch_size(dev, pre.crop_size)
        normalise = pre.normalizer(dev.torch_device)
        with torch.inference_mode():
            net(normalise(images[:bs]).contiguous(memory_format=torch.channels_last))  # as featx's layer trace
            t_loop = time.perf_counter()
            for start in range(0, n, bs):
                net(normalise(images[start:start + bs]).contiguous(memory_format=torch.channels_last))
        end, cpu = time.perf_counter(), time.process_time() - cpu0
        threads = torch.get_num_threads()
    return {"seconds": end - t0, "loop_seconds": end - t_loop, "cpu_seconds": cpu,
            "images_per_second": n / (end - t_loop), "batch_size": bs, "threads": threads}


def extract(n: int, image_size: int, engine: str) -> dict:
    """featx.extract of the auto layers into a fresh cache; the source is loaded, and featx imported
    (featx.extract loads its API lazily), before the clock, as the floor's imports are."""
    from featx import extract as featx_extract

    source = _source(n)
    cache_dir = tempfile.mkdtemp(prefix="featx-floor-")
    try:
        t0, cpu0 = time.perf_counter(), time.process_time()
        entry = featx_extract(source, MODEL, image_size=image_size, cache_dir=cache_dir, progress=False,
                              resize_engine=engine, **RUN_DEFAULTS)
        seconds, cpu = time.perf_counter() - t0, time.process_time() - cpu0
        assert entry.last_run.forward_pass
        return {"seconds": seconds, "loop_seconds": entry.last_run.seconds, "cpu_seconds": cpu,
                "images_per_second": n / seconds, "layers": entry.layer_names,
                "resize_engine": entry.config["preprocessing"].get("resize_engine", "pil")}
    finally:
        shutil.rmtree(cache_dir, ignore_errors=True)


def _least(runs: list[dict], field: str) -> float:
    return min(r[field] for r in runs)


def case_floor(run, n: int, image_size: int, repeats: int = 2) -> dict:
    floors, extracts = [], {engine: [] for engine in ENGINES}
    for _ in range(repeats):  # interleaved, so that a slow spell of the machine hits every variant
        floors.append(run(floor, n, image_size))
        for engine in ENGINES:
            extracts[engine].append(run(extract, n, image_size, engine))
    base = min(floors, key=lambda r: r["seconds"])
    best = {engine: min(runs, key=lambda r: r["seconds"]) for engine, runs in extracts.items()}
    ratios = {engine: round(r["seconds"] / base["seconds"], 3) for engine, r in best.items()}
    return {
        "images": n, "image_size": image_size, "model": MODEL, "pool": RUN_DEFAULTS["pool"],
        "dtype": RUN_DEFAULTS["dtype"],
        "floor_images_per_second": round(n / base["seconds"], 1),
        "floor_loop_images_per_second": round(base["images_per_second"], 1),
        "extract_images_per_second": {e: round(r["images_per_second"], 1) for e, r in best.items()},
        "ratio": ratios["tensor"], "ratio_by_engine": ratios,
        "loop_ratio_by_engine": {e: round(r["loop_seconds"] / base["loop_seconds"], 3) for e, r in best.items()},
        "cpu_ratio_by_engine": {e: round(_least(runs, "cpu_seconds") / _least(floors, "cpu_seconds"), 3)
                                for e, runs in extracts.items()},
        "speedup_over_pil": round(best["pil"]["seconds"] / best["tensor"]["seconds"], 3),
        "target": "<= 1.10", "auto_layers": best["tensor"]["layers"],
        "floor_runs": floors, "extract_runs": extracts,
    }


if __name__ == "__main__":
    import argparse
    import json

    from .run import isolated, machine

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="2,000 images instead of 10,000 (noisier).")
    args = parser.parse_args()
    result = {"machine": machine(), "floor_96px": case_floor(isolated, 2000 if args.quick else 10000, 96)}
    print(json.dumps(result, indent=2, sort_keys=True))
