"""What to fine-tune, on which images: resolved from a probe result or from explicit options.

From a probe result, everything that shaped the probe's features is taken from its cache
entry's configuration (dataset and ``--limit``, model and weights digest, preprocessing,
pooling) and checked against what is on disk now, so the fine-tuned network sees exactly the
images the probe saw. The test split is the probe's (same protocol, same seed); when the
probe recorded its test ids, they are compared. Validation is a seeded, stratified hold-out of
the training rows; the test rows are touched once, at the end.

Two shapes of network: cut right after one layer (the probe's best by default: the blocks
above it are dropped), or ``full``: kept up to the top of the ladder (the pre-logits embedding),
the head sitting there, with the probe's best layer as the default point below which blocks
stay frozen. A full network is the same thing as a cut at its top layer, so both describe (and
fingerprint) a run alike.
"""

from __future__ import annotations

import hashlib
import json
import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .._digest import canonical_json, file_digest
from ..backbones.ladder import trace_ladder
from ..backbones.registry import ModelInfo, build_model, describe_model, parse_model
from ..cache.entry import FeatureEntry
from ..cache.store import CacheStore
from ..data import open_dataset, stratified_limit
from ..data.crop_rule import dataset_preprocessing
from ..data.sources import ImageSource
from ..data.transforms import Preprocessing
from ..errors import CacheCorruptError, DataError, UsageError
from ..layer import Ladder, Layer, check_pool, layer_rule
from ..probing.linear_head import FILENAME as HEAD_FILE
from ..probing.linear_head import LinearHead
from ..probing.protocol import TEST_FRACTION, assign_splits, require_two_per_class, validation_folds

log = logging.getLogger(__name__)

RESULTS_FILE = "results.json"


@dataclass
class ProbeResult:
    """The parts of a probe's ``results.json`` that fine-tuning relies on."""

    directory: Path
    data: dict

    @property
    def entry(self) -> dict:
        return self.data["entry"]

    @property
    def best_layer(self) -> str:
        return self.data["best"]["layer"]

    @property
    def seed(self) -> int:
        return int(self.data["protocol"]["seed"])

    @property
    def test_fraction(self) -> float:
        fraction = self.data["protocol"].get("splits", {}).get("test_fraction")
        return TEST_FRACTION if fraction is None else float(fraction)

    def accuracy_at(self, layer: str) -> dict:
        """The probe's test accuracy at ``layer``: its logistic head and its best head there."""
        rows = [r for r in self.data.get("rows", []) if r.get("layer") == layer and r.get("test_top1") is not None]
        logreg = next((r for r in rows if r.get("head") == "logreg"), None)
        best = max(rows, key=lambda r: r["test_top1"], default=None)
        return {
            "results": str(self.directory),
            "layer": layer,
            "logreg_test_top1": logreg["test_top1"] if logreg else None,
            "best_head_at_layer": {"head": best["head"], "test_top1": best["test_top1"]} if best else None,
            "best": {k: self.data["best"].get(k) for k in ("layer", "head", "test_top1")},
        }


def read_probe_result(path: str | Path) -> ProbeResult:
    """A probe's output directory (or its results.json), checked for the fields fine-tuning needs."""
    path = Path(path).expanduser()
    directory = path.parent if path.name == RESULTS_FILE else path
    file = directory / RESULTS_FILE
    if not file.is_file():
        raise UsageError(
            f"{directory} holds no {RESULTS_FILE}. Pass the output directory of featx probe, or fine-tune "
            "explicitly with --model M --layer L DATASET."
        )
    try:
        data = json.loads(file.read_text())
        for keys in (("entry", "config"), ("entry", "key"), ("protocol", "seed"), ("best", "layer")):
            node = data
            for k in keys:
                node = node[k]
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise UsageError(f"{file} is not a featx probe result (missing or unreadable: {exc}).") from None
    return ProbeResult(directory.resolve(), data)


@dataclass
class Plan:
    """Data, splits, model and cut of one fine-tuning problem (shared by every run of a sweep)."""

    mode: str  # results | explicit
    source: ImageSource
    fit: np.ndarray  # row indices into ``source``
    val: np.ndarray
    test: np.ndarray
    test_source: str
    test_seed: int
    info: ModelInfo
    pre: Preprocessing
    ladder: Ladder
    layer: Layer
    pooling: dict  # pool, token_pool, rule
    dataset: dict  # fingerprint incl. limit
    head: LinearHead | None = None
    head_digest: str | None = None
    probe: ProbeResult | None = None
    entry_key: str | None = None
    #: ``full``: the network kept to its top layer; where blocks stay frozen unless told otherwise,
    #: and why the head starts where it does
    full: bool = False
    freeze_default: str | None = None
    head_note: str = ""

    @property
    def classes(self) -> list[str]:
        return list(self.source.classes)

    @property
    def model_name(self) -> str:
        return self.info.spec.name

    def build_backbone(self):
        return build_model(self.info, image_size=self.pre.crop_size)

    def describe(self, head_init: str) -> dict:
        """Everything about the problem that determines a run's result (part of its fingerprint)."""
        h = hashlib.sha256()
        for part in (self.fit, self.val, self.test):
            h.update(np.asarray(part, dtype=np.int64).tobytes())
            h.update(b"|")
        return {
            "mode": self.mode,
            "dataset": self.dataset,
            "model": {"name": self.model_name, **self.info.identity},
            "preprocessing": self.pre.to_dict(),
            "layer": self.layer.name,
            "pooling": self.pooling,
            "splits": {"test_source": self.test_source, "test_seed": self.test_seed, "fit": len(self.fit),
                       "val": len(self.val), "test": len(self.test), "digest": h.hexdigest()},
            "head": {"init": head_init, "digest": self.head_digest if head_init == "lpft" else None},
            "entry": self.entry_key,
        }


# ---------------------------------------------------------------------------- shared steps


def top_layer(ladder: Ladder) -> Layer:
    """The deepest layer of the ladder: the pre-logits embedding when the network has a classifier."""
    return max(ladder.layers, key=lambda x: x.order)


def refuse_layer_with_full(layer) -> None:
    if layer is not None:
        raise UsageError(
            f"--layer {layer} chooses where to cut the network, and --full keeps all of it (the head sits on the "
            "top layer). To choose which blocks stay frozen in the full network, use --freeze-below LAYER; to cut "
            "after a layer, drop --full."
        )


def _cut(info: ModelInfo, pre: Preprocessing, layer, pool: str, token_pool: str,
         full: bool = False) -> tuple[Ladder, Layer, dict]:
    """The ladder of the model at this input size and the one layer to cut after (its top when ``full``)."""
    ladder = trace_ladder(build_model(info, image_size=pre.crop_size), pre.crop_size)
    spec = str(layer).strip() if layer is not None else ""
    if full:
        cut = top_layer(ladder)
    elif not spec:
        raise UsageError(f"--layer is required with --model: one layer of {info.spec.name} to cut after "
                         f"(see: featx layers {info.spec.name}), or --full to keep the whole network.")
    else:
        picked = ladder.select(spec, info.spec.name)
        if len(picked) != 1:
            raise UsageError(
                f"--layer must name exactly one layer to cut after; {spec!r} selects {len(picked)}: "
                + ", ".join(x.name for x in picked[:8]) + ("..." if len(picked) > 8 else "") + "."
            )
        cut = picked[0]
    rule = layer_rule(cut.kind, cut.has_cls, pool, token_pool)
    return ladder, cut, {"pool": pool, "token_pool": token_pool, "rule": rule}


def _validation_split(y_train: np.ndarray, seed: int, fraction: float,
                      class_names=None) -> tuple[np.ndarray, np.ndarray]:
    """Seeded stratified hold-out of the training rows; refuses splits that would be empty."""
    n = len(y_train)
    classes, counts = np.unique(y_train, return_counts=True)
    wanted = fraction * n
    if n == 0 or round(wanted) < 1:
        raise UsageError(
            f"The validation split would be empty: --val-fraction {fraction} of {n} training images is "
            f"{wanted:.2f} images. Early stopping and the best checkpoint are chosen on it; use more images "
            "(a larger --limit) or a larger --val-fraction."
        )
    require_two_per_class(y_train, class_names, stage="fine-tuning")  # the probe's check and message
    if n - max(int(round(wanted)), len(classes)) < len(classes):
        raise UsageError(
            f"--val-fraction {fraction} leaves too few of the {n} training images to train on "
            f"({len(classes)} classes). Use a smaller --val-fraction or more images."
        )
    (fit, val), = validation_folds(y_train, None, seed, fraction=fraction)
    return fit, val


def _splits(source: ImageSource, usable: np.ndarray, test_seed: int, test_fraction: float, seed: int,
            val_fraction: float):
    labels = np.asarray(source.labels)
    rows = np.flatnonzero(usable)
    s = assign_splits(labels[rows], np.asarray(source.splits)[rows], test_seed, test_fraction)
    train, test = rows[s.train], rows[s.test]
    if len(s.val):  # the dataset's own validation split, as in the probe
        return train, rows[s.val], test, s.test_source
    fit, val = _validation_split(labels[train], seed, val_fraction, source.classes)
    return train[fit], train[val], test, s.test_source


# ---------------------------------------------------------------------------- explicit


def plan_explicit(dataset, *, model: str, layer=None, weights=None, checkpoint=None, arch=None, image_size=None,
                  crop_pct=None, interpolation=None, pool: str = "avg", token_pool: str = "auto",
                  data_root=None, download: bool = True, limit=None, seed: int = 0,
                  val_fraction: float = 0.2, full: bool = False) -> Plan:
    """``--model M --layer L DATASET`` (or ``--full``): the same preprocessing rules as ``featx extract``."""
    check_pool(pool, token_pool)
    if full:
        refuse_layer_with_full(layer)
    if dataset is None:
        raise UsageError("A dataset is required with --model (e.g. fashion-mnist, folder:PATH); or pass a probe "
                         "result directory instead.")
    source = dataset if isinstance(dataset, ImageSource) else open_dataset(dataset, data_root, download)
    source = stratified_limit(source, limit, seed)
    info = describe_model(parse_model(model, weights=weights, checkpoint=checkpoint, arch=arch))
    pre = dataset_preprocessing(info.preprocessing, source, image_size, crop_pct, interpolation)
    ladder, cut, pooling = _cut(info, pre, layer, pool, token_pool, full)
    usable = np.ones(len(source), dtype=bool)  # unreadable images are found (and skipped) while training
    fit, val, test, test_source = _splits(source, usable, seed, TEST_FRACTION, seed, val_fraction)
    fingerprint = source.fingerprint()
    fingerprint["limit"] = {"n": limit, "seed": seed} if limit is not None else None
    return Plan("explicit", source, fit, val, test, test_source, seed, info, pre, ladder, cut, pooling, fingerprint,
                full=full, head_note="a fresh head (no probe result)" if full else "")


# ---------------------------------------------------------------------------- from a probe


def _model_from_config(model_config: dict, checkpoint) -> ModelInfo:
    """The probe's model, with the very weights it used (checked by digest)."""
    name = model_config["name"]
    kind = model_config.get("weights", {}).get("kind")
    if name.startswith("finetuned:"):
        spec = parse_model(name)
    elif kind == "checkpoint":
        if checkpoint is None:
            raise UsageError(
                f"The probe's features came from {name} with weights from a checkpoint file "
                f"({model_config['weights'].get('digest', '')[:19]}...); pass that file with --checkpoint PATH."
            )
        spec = parse_model(name, checkpoint=checkpoint)
    elif kind == "random-init":
        spec = parse_model(name, weights="none")
    elif name.startswith("torchvision:") and model_config.get("pretrained"):
        spec = parse_model(name, weights=str(model_config["pretrained"]).rsplit(".", 1)[-1])
    else:
        spec = parse_model(name)
    info = describe_model(spec)
    if canonical_json({"name": spec.name, **info.identity}) != canonical_json(model_config):
        raise DataError(
            f"The weights of {name} on this machine are not the ones the probe used "
            f"(probe: {json.dumps(model_config.get('weights'))}, now: {json.dumps(info.identity.get('weights'))}). "
            "Re-run the probe, or fine-tune explicitly with --model and --layer."
        )
    return info


def _source_from_config(dataset_config: dict, data_root, download: bool) -> ImageSource:
    source = open_dataset(dataset_config.get("location") or dataset_config["source"], data_root, download,
                          hash_content=dataset_config.get("content_mode") == "sha256")
    limit = dataset_config.get("limit")
    if limit:
        source = stratified_limit(source, int(limit["n"]), int(limit["seed"]))
    now = source.fingerprint()
    expected = {k: v for k, v in dataset_config.items() if k != "limit"}
    if canonical_json(now) != canonical_json(expected):
        changed = [k for k in expected if canonical_json(expected.get(k)) != canonical_json(now.get(k))]
        raise DataError(
            f"The dataset {dataset_config['source']} is not the one the probe ran on (changed: "
            f"{', '.join(changed)}). Re-run extract and probe, or fine-tune explicitly with --model and --layer."
        )
    return source


def _probe_entry(probe: ProbeResult, cache_dir) -> FeatureEntry | None:
    """The probe's cache entry, if it is still on disk (it says which images were unreadable)."""
    key = probe.entry["key"]
    path = probe.entry.get("path")
    try:
        if path and Path(path).is_file():
            entry = FeatureEntry(path)
            if entry.key == key:
                return entry
        return CacheStore(cache_dir).find(key)
    except CacheCorruptError as exc:
        log.warning("the probe's cache entry is unreadable (%s)", exc)
        return None


def _probe_head(probe: ProbeResult) -> tuple[LinearHead, str]:
    """The probe's logistic head and the digest of its file, checked to belong to the probe's entry."""
    head = LinearHead.load(probe.directory)  # UsageError when the probe ran no logistic head
    if head.meta.get("entry_key") not in (None, probe.entry["key"]):
        raise DataError(f"{probe.directory / HEAD_FILE} was fitted on entry {head.meta['entry_key'][:12]}, "
                        f"not on this result's entry {probe.entry['key'][:12]}.")
    return head, file_digest(probe.directory / HEAD_FILE)


def _full_network_head(head: LinearHead | None, top: Layer, head_init: str) -> tuple[bool, str]:
    """Whether the full network's head starts from the probe's logistic head, and why (or why not).

    That head was fitted on the probe's best layer; on the features of any other layer its
    weights mean nothing, so it is used only when the best layer is the top one.
    """
    if head_init == "random":
        return False, "a fresh head (--head-init random)"
    if head is None:
        return False, f"a fresh head (the probe ran no logistic head: no {HEAD_FILE})"
    if head.layer == top.name:
        return True, f"the probe's logistic head on {top.name} (LP-FT)"
    if head_init == "lpft":
        raise UsageError(
            f"--head-init lpft starts from the probe's logistic head, which was fitted on {head.layer}; with --full "
            f"the head sits on {top.name}, the top of the network, whose features that head has never seen. Leave "
            "--head-init at auto (a fresh head trained alone first, then the blocks: linear probing, then "
            "fine-tuning), pass --head-init random, or drop --full to cut the network at "
            f"{head.layer} and start from the probe's head there."
        )
    return False, f"a fresh head (the probe's logistic head was fitted on {head.layer}, not on {top.name})"


def plan_from_results(results, *, layer=None, head_init: str = "lpft", checkpoint=None, data_root=None,
                      download: bool = True, cache_dir=None, seed: int = 0, val_fraction: float = 0.2,
                      full: bool = False) -> Plan:
    """The probe's data, model, preprocessing and pooling; cut after its best layer unless ``layer`` is
    given, or (``full``) kept to the top layer with the best layer as the default freeze point.

    With ``full``, ``head_init`` may be ``auto``: the probe's logistic head when it was fitted
    on the top layer, else a fresh one (``Plan.head`` is None; ``Plan.head_note`` says why).
    """
    probe = read_probe_result(results)
    config = probe.entry["config"]
    if full:
        refuse_layer_with_full(layer)
    probe_head = probe_head_digest = None
    if head_init == "lpft" or (full and head_init == "auto" and (probe.directory / HEAD_FILE).is_file()):
        probe_head, probe_head_digest = _probe_head(probe)
    default_layer = probe_head.layer if probe_head is not None else probe.best_layer
    if not full and probe_head is not None and layer is not None and str(layer) != probe_head.layer:
        raise UsageError(
            f"LP-FT starts from the probe's logistic head, which was fitted on layer {probe_head.layer!r}; it "
            f"cannot initialise a head on {str(layer)!r}. Drop --layer, or pass --head-init random."
        )
    source = _source_from_config(config["dataset"], data_root, download)
    info = _model_from_config(config["model"], checkpoint)
    pre = Preprocessing.from_dict(config["preprocessing"])
    pooling = config["pooling"]
    ladder, cut, pooling = _cut(info, pre, layer if layer is not None else default_layer,
                                pooling["pool"], pooling["token_pool"], full)
    head, head_digest, head_note = probe_head, probe_head_digest, ""
    if full:
        use_probe_head, head_note = _full_network_head(probe_head, cut, head_init)
        if not use_probe_head:
            head = head_digest = None

    entry = _probe_entry(probe, cache_dir)
    usable = np.ones(len(source), dtype=bool)
    if entry is not None:
        samples = entry.samples()
        if list(samples["id"]) != list(source.ids):
            raise DataError(f"The probe's cache entry {entry.path} lists other samples than the dataset now has.")
        usable = samples["ok"].copy()
        if cut.name in entry.layer_names and entry.layer(cut.name).pool != pooling["rule"]:
            raise DataError(f"Layer {cut.name} was pooled with {entry.layer(cut.name).pool!r} in the probe's entry, "
                            f"but would be pooled with {pooling['rule']!r} here.")
    else:
        log.warning("the probe's cache entry %s is gone; assuming every image is readable", probe.entry["key"][:12])
    fit, val, test, test_source = _splits(source, usable, probe.seed, probe.test_fraction, seed, val_fraction)
    if probe_head is not None and probe_head.meta.get("test_ids") is not None:
        if sorted(map(str, probe_head.meta["test_ids"])) != sorted(str(i) for i in source.ids[test]):
            raise DataError("The test split rebuilt here differs from the probe's recorded test ids; the data or "
                            "the protocol changed since the probe ran. Re-run the probe.")
    return Plan("results", source, fit, val, test, test_source, probe.seed, info, pre, ladder, cut, pooling,
                dict(config["dataset"]), head, head_digest, probe, probe.entry["key"], full,
                probe.best_layer if full else None, head_note)
