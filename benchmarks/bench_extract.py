"""Extraction benchmarks: every figure is a ratio of two timings taken in the same run.

Cases (each in a fresh process, so peak memory and thread pools do not leak between them):
- overhead:   featx.extract of all auto layers vs a bare forward pass over the same loader
- one_pass:   one pass for L layers vs L single-layer passes
- cache_hit:  second identical call vs the cold run
- memory:     peak RSS at two dataset sizes (should stay flat)
- cpu:        the CPU settings featx picks (threads, workers, channels_last, allocator, batch)
"""

from __future__ import annotations

import resource
import shutil
import tempfile
import time

MODEL = "efficientnet_lite0"


def _source(n: int, seed: int = 0):
    from featx.data import open_dataset, stratified_limit

    return stratified_limit(open_dataset("fashion-mnist", download=False), n, seed)


def _peak_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def bare_forward(n: int, image_size: int, batch_size: int | None = None, workers: int | None = None,
                 threads: int | None = None, channels_last: bool = True, malloc: bool = True) -> dict:
    """The same loader and model as featx.extract, with a plain ``model(x)`` and nothing kept."""
    import torch

    from featx import _runtime
    from featx.backbones.registry import build_model, describe_model, parse_model
    from featx.data import ImageDataset
    from featx.extraction.plan import default_batch_size

    source = _source(n)
    t0 = time.perf_counter()
    dev = _runtime.resolve_device("cpu")
    info = describe_model(parse_model(MODEL))
    pre = info.preprocessing.override(image_size)
    net = build_model(info, image_size=pre.crop_size).eval()
    bs = batch_size or default_batch_size(dev, pre.crop_size)
    n_workers = _runtime.default_workers(dev, source.in_memory) if workers is None else workers
    if malloc:
        _runtime.tune_malloc()
    _runtime.configure_threads(threads or _runtime.plan_cpu_threads(n_workers))
    loader = torch.utils.data.DataLoader(ImageDataset(source, pre), batch_size=bs, num_workers=n_workers,
                                         prefetch_factor=4 if n_workers else None)
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    net = net.to(memory_format=fmt)
    normalise = pre.normalizer(dev.torch_device)
    t_loop = time.perf_counter()
    with torch.inference_mode():
        for images, _ in loader:
            net(normalise(images).contiguous(memory_format=fmt))
    end = time.perf_counter()
    return {"seconds": end - t0, "loop_seconds": end - t_loop, "images_per_second": n / (end - t_loop),
            "batch_size": bs, "workers": n_workers, "threads": torch.get_num_threads(), "peak_rss_mb": _peak_mb()}


def featx_extract(n: int, image_size: int, layers: str = "auto", cache_dir: str | None = None,
                  repeat: int = 1) -> dict:
    import featx

    source = _source(n)
    own = cache_dir is None
    cache_dir = cache_dir or tempfile.mkdtemp(prefix="featx-bench-")
    try:
        runs = []
        for _ in range(repeat):
            t0 = time.perf_counter()
            entry = featx.extract(source, MODEL, image_size=image_size, layers=layers, cache_dir=cache_dir,
                                  progress=False)
            runs.append({"seconds": time.perf_counter() - t0, "forward_pass": entry.last_run.forward_pass,
                         "loop_seconds": entry.last_run.seconds})
        return {"runs": runs, "layers": entry.layer_names, "entry_mb": entry.size_bytes / 2**20,
                "peak_rss_mb": _peak_mb()}
    finally:
        if own:
            shutil.rmtree(cache_dir, ignore_errors=True)


def layer_names(image_size: int) -> list[str]:
    import featx

    return featx.layers(MODEL, image_size=image_size).auto


# --------------------------------------------------------------------------- cases


def case_overhead(run, n: int, image_size: int) -> dict:
    bare = [run(bare_forward, n, image_size) for _ in range(2)]
    ours = [run(featx_extract, n, image_size) for _ in range(2)]
    b = min(x["seconds"] for x in bare)
    f = min(x["runs"][0]["seconds"] for x in ours)
    return {"images": n, "image_size": image_size, "bare_forward_seconds": b, "featx_extract_seconds": f,
            "ratio": f / b, "target": "<= 1.10", "bare_runs": bare, "extract_runs": ours}


def case_one_pass(run, n: int, image_size: int) -> dict:
    names = run(layer_names, image_size)
    together = run(featx_extract, n, image_size, ",".join(names))["runs"][0]["seconds"]
    separate = {name: run(featx_extract, n, image_size, name)["runs"][0]["seconds"] for name in names}
    return {"images": n, "image_size": image_size, "layers": names, "one_pass_seconds": together,
            "separate_passes_seconds": sum(separate.values()), "per_layer": separate,
            "speedup": sum(separate.values()) / together}


def case_cache_hit(run, n: int, image_size: int) -> dict:
    res = run(featx_extract, n, image_size, "auto", None, 2)
    cold, hit = res["runs"]
    assert cold["forward_pass"] and not hit["forward_pass"]
    return {"images": n, "image_size": image_size, "cold_seconds": cold["seconds"], "hit_seconds": hit["seconds"],
            "speedup": cold["seconds"] / hit["seconds"], "entry_mb": res["entry_mb"]}


def case_memory(run, sizes: tuple[int, int], image_size: int) -> dict:
    peaks = {n: run(featx_extract, n, image_size)["peak_rss_mb"] for n in sizes}
    small, large = sizes
    return {"image_size": image_size, "peak_rss_mb": peaks, "dataset_ratio": large / small,
            "memory_ratio": peaks[large] / peaks[small]}


def case_cpu(run, n: int, image_size: int) -> dict:
    """The settings featx picks on this machine against the alternatives (bare loop, img/s)."""
    variants = {
        "featx defaults": {},
        "1 worker, threads=cores": {"workers": 1},
        "1 worker, threads=cores-1": {"workers": 1, "threads": 1},
        "channels_first": {"channels_last": False},
        "glibc malloc untuned": {"malloc": False},
        "batch 8": {"batch_size": 8},
        "batch 64": {"batch_size": 64},
        "1 thread": {"threads": 1},
    }
    passive = {"OMP_WAIT_POLICY": "PASSIVE"}
    variants.update({
        "OMP_WAIT_POLICY=PASSIVE": {"env": passive},
        "1 worker, threads=cores, PASSIVE": {"workers": 1, "env": passive},
    })
    out = {name: run(bare_forward, n, image_size, **kw) for name, kw in variants.items()}
    base = out["featx defaults"]["images_per_second"]
    return {"images": n, "image_size": image_size,
            "images_per_second": {k: round(v["images_per_second"], 1) for k, v in out.items()},
            "relative_to_defaults": {k: round(v["images_per_second"] / base, 3) for k, v in out.items()},
            "defaults": {k: out["featx defaults"][k] for k in ("batch_size", "workers", "threads")}}
