"""The command lines that rebuild a probe result: one ``featx extract``, one ``featx probe``.

Built from what a result records (the cache entry's configuration, the protocol, the probed
rows), so they work from a live result or a ``results.json`` read back from disk. Every
setting that enters the cache key is spelled out, so the extraction finds (or rebuilds) the
same entry, with the same key, on another machine.
"""

from __future__ import annotations

import shlex

#: what ``featx extract`` and ``featx probe`` do without the option; such options are left out
EXTRACT_DEFAULTS = {"dtype": "float16", "token_pool": "auto", "precision": "float32"}
CHECKPOINT_PLACEHOLDER = "CHECKPOINT_FILE"


def _as_dict(results) -> dict:
    """A ProbeResults or the dict of its results.json."""
    return results if isinstance(results, dict) else {
        "entry": results.entry, "protocol": results.protocol, "rows": results.rows}


def extract_command(entry: dict, layers: list[str]) -> str:
    """``featx extract`` for the cache entry ``entry`` (results' ``entry``), holding at least ``layers``."""
    config = entry.get("config") or {}
    model = config.get("model", {})
    args = ["featx", "extract", str(entry["dataset"]), "--model", str(model.get("name", entry.get("model")))]
    weights = model.get("weights") or {}
    if weights.get("kind") == "random-init":
        args += ["--weights", "none"]
    elif weights.get("kind") == "checkpoint":  # only its digest is recorded: the user knows the file
        args += ["--checkpoint", CHECKPOINT_PLACEHOLDER]
    elif model.get("source") == "torchvision" and model.get("pretrained"):
        args += ["--weights", str(model["pretrained"]).rpartition(".")[2]]  # ResNet18_Weights.IMAGENET1K_V1
    if layers:
        args += ["--layers", ",".join(layers)]
    pooling = config.get("pooling", {})
    args += ["--pool", str(pooling.get("pool", "avg"))]
    if pooling.get("token_pool", "auto") != EXTRACT_DEFAULTS["token_pool"]:
        args += ["--token-pool", str(pooling["token_pool"])]
    pre = config.get("preprocessing") or {}
    if pre.get("crop_size"):
        crop, resize = int(pre["crop_size"]), int(pre["resize_size"])
        args += ["--image-size", str(crop)]
        if not pre.get("crop_rule"):
            # chosen explicitly (or before featx had a crop rule): the exact ratio gives back the same
            # resize size whatever the model's default; a recorded rule chooses the same crop again by itself
            args += ["--crop-pct", repr(crop / resize)]
    if pre.get("interpolation"):
        args += ["--interpolation", str(pre["interpolation"])]
    if config.get("dtype", "float16") != EXTRACT_DEFAULTS["dtype"]:
        args += ["--dtype", str(config["dtype"])]
    dataset = config.get("dataset") or {}
    limit = dataset.get("limit")
    if limit:
        args += ["--limit", str(limit["n"]), "--seed", str(limit["seed"])]
    if dataset.get("content_mode") == "sha256":
        args.append("--hash-content")
    device = (config.get("device") or {}).get("type")
    if device:
        args += ["--device", str(device)]
    if config.get("precision", "float32") != EXTRACT_DEFAULTS["precision"]:
        args += ["--precision", str(config["precision"])]
    return shlex.join(args)


def probe_command(entry: dict, protocol: dict, layers: list[str], heads: list[str]) -> str:
    """``featx probe`` of the entry with the same heads, layers, seed and selection.

    Heads passed as estimators through the Python API have no command-line name: they are
    named in a trailing shell comment instead.
    """
    descriptions = protocol.get("heads") or {}
    custom = [h for h in heads if str(descriptions.get(h, "")).startswith("custom ")]
    named = [h for h in heads if h not in custom]
    args = ["featx", "probe", str(entry["key"])[:12]]
    if named:
        args += ["--heads", ",".join(named)]
    if layers:
        args += ["--layers", ",".join(layers)]
    args += ["--seed", str(protocol.get("seed", 0))]
    if protocol.get("cv"):
        args += ["--cv", str(protocol["cv"])]
    selection = protocol.get("selection_rows")
    if isinstance(selection, dict):
        args += ["--selection-rows", str(int(selection.get("limit") or 0))]
    if protocol.get("device"):
        args += ["--device", str(protocol["device"])]
    command = shlex.join(args)
    if custom:
        command += f"  # heads given through the Python API (featx.probe(heads={{...}})): {', '.join(custom)}"
    return command


def reproduce_commands(results) -> list[str]:
    """[extract command, probe command] for a ProbeResults or a results.json dict."""
    data = _as_dict(results)
    rows = data.get("rows") or []
    layers = list(dict.fromkeys(r["layer"] for r in rows))
    heads = list((data.get("protocol") or {}).get("heads") or dict.fromkeys(r["head"] for r in rows))
    return [extract_command(data["entry"], layers), probe_command(data["entry"], data.get("protocol") or {},
                                                                   layers, heads)]
