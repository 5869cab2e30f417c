"""From images to class scores, one scorer per kind of result.

A probe's head was fitted on what ``load_features`` returned: the backbone's output at one layer,
pooled by the entry's rule, stored in the entry's dtype (float16 by default) and read back as
float32. :class:`ProbeScorer` rebuilds that chain from the entry's recorded configuration (the
same model and weights, checked by digest; the same preprocessing; the forward pass stopped
after the layer) and applies the saved head. :class:`FinetunedScorer` runs a fine-tuned
network, which ends in its own classifier, and turns its logits into probabilities.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .._runtime import Device, resolve_device
from ..errors import DataError, FeatxError, UsageError
from .folder import HEAD_FILE, HEAD_INFO_FILE, ResultFolder
from .inputs import ImageList
from .network import RunOptions, run_images

log = logging.getLogger(__name__)

#: how a score column is labelled: what the scores are
PROBABILITY, DECISION, VOTE = "probability", "decision", "vote"


@dataclass
class Scores:
    """Per image: the predicted class index (into ``classes``) and a score per class; rows whose
    image could not be read (``errors[i] != ''``) hold -1 and NaN."""

    predicted: np.ndarray  # int (N,)
    scores: np.ndarray  # float64 (N, C)
    classes: list[str]
    kind: str  # PROBABILITY | DECISION | VOTE
    errors: list[str]


def device_for(device: str, precision: str | None, recorded: str | None) -> Device:
    """The device, computing in the precision the features were made with unless told otherwise."""
    if precision is not None:
        return resolve_device(device, precision)
    dev = resolve_device(device, "auto")
    wanted = recorded or dev.precision
    if wanted == "float16" and not dev.is_cuda:
        log.warning("the probe's features were computed under float16 autocast on CUDA; on this CPU they are "
                    "computed in float32, so scores may differ slightly from the probe's")
        wanted = "float32"
    return resolve_device(device, wanted)


# ------------------------------------------------------------------------------ probe results


class ProbeScorer:
    """The probe's best head on features computed as its cache entry computed them."""

    def __init__(self, folder: ResultFolder, *, checkpoint=None, device: str = "auto", precision: str | None = None):
        import joblib

        from ..backbones.ladder import trace_ladder
        from ..backbones.registry import build_model
        from ..data.transforms import Preprocessing

        results = folder.results
        self.entry = results["entry"]
        config = self.entry["config"]
        self.best = results["best"]
        self.classes = [str(c) for c in self.entry["classes"]]
        self.dtype = np.dtype(config["dtype"])
        self.pre = Preprocessing.from_dict(config["preprocessing"])
        self.resize_engine = config["preprocessing"].get("resize_engine", "pil")
        _check_head_info(folder, self.entry["key"], self.best)
        self.head = joblib.load(folder.path / HEAD_FILE)  # a pickle: result folders are trusted like code
        self.info = model_from_entry(config["model"], checkpoint)
        self.device = device_for(device, precision, config.get("precision"))
        recorded = config.get("device", {}).get("type")
        if recorded not in (None, self.device.torch_device.type):
            log.warning("the probe's features were computed on %s, these on %s: scores may differ in their last digits",
                        recorded, self.device.torch_device.type)
        self.net = build_model(self.info, image_size=self.pre.crop_size)
        table = recorded_ladder(self.entry)
        if self.best["layer"] not in table:
            table = trace_ladder(self.net, self.pre.crop_size).by_name()
        if self.best["layer"] not in table:
            raise DataError(f"Layer {self.best['layer']!r} of the probe is not a layer of {self.info.spec.name} at "
                            f"{self.pre.crop_size} px; the model changed since the probe ran. Run the probe again.")
        self.layer = table[self.best["layer"]]
        self.rule = self.best.get("pool") or self.layer.pooled(config["pooling"]["pool"],
                                                               config["pooling"]["token_pool"]).pool

    @property
    def description(self) -> dict:
        return {"kind": "probe", "model": self.info.spec.name, "layer": self.layer.name, "head": self.best["head"],
                "pool": self.rule, "dtype": self.dtype.name, "entry": self.entry["key"]}

    def features(self, images: ImageList, options: RunOptions) -> tuple[np.ndarray, list[str]]:
        """float32 features of the probe's layer, through the entry's storage dtype, as load_features gives them."""
        from ..backbones.taps import LayerTaps

        taps = LayerTaps(self.net, [self.layer], {self.layer.name: self.rule})
        try:
            X, errors = run_images(lambda x: taps(x)[self.layer.name], self.net, images.paths, self.pre, options,
                                   self.resize_engine)
        finally:
            taps.remove()
        with np.errstate(over="ignore"):
            X = X.astype(self.dtype).astype(np.float32)
        for i in np.flatnonzero(~np.isfinite(X).all(axis=1)):
            if not errors[i]:
                errors[i] = (f"layer {self.layer.name} gave activations that are not finite in {self.dtype.name}, the "
                             "dtype the probe's features were stored in")
        return X, errors

    def score(self, images: ImageList, options: RunOptions) -> Scores:
        X, errors = self.features(images, options)
        ok = np.array([not e for e in errors], dtype=bool)
        names = [self.classes[int(c)] for c in self.head.classes_]
        scores = np.full((len(X), len(names)), np.nan)
        predicted = np.full(len(X), -1, dtype=np.int64)
        kind = head_score_kind(self.head)
        if ok.any():
            scores[ok] = head_scores(self.head, X[ok], kind)
            predicted[ok] = np.searchsorted(self.head.classes_, self.head.predict(X[ok]))
        return Scores(predicted, scores, names, kind, errors)


def recorded_ladder(entry: dict) -> dict:
    """{name: layer} of the ladder the cache entry stored, when its file is still where results.json
    says; else {} (then the network is traced, which costs two forward passes)."""
    from ..cache.entry import FeatureEntry

    path = entry.get("path")
    if not path or not Path(path).is_file():
        return {}
    try:
        stored = FeatureEntry(path)
    except FeatxError:
        return {}
    return stored.ladder.by_name() if stored.key == entry["key"] else {}


def _check_head_info(folder: ResultFolder, entry_key: str, best: dict) -> None:
    """best_head.json, when present, must describe the best cell of this result's entry."""
    try:
        info = json.loads((folder.path / HEAD_INFO_FILE).read_text())
    except (OSError, ValueError):
        return
    if info.get("entry_key", entry_key) != entry_key or info.get("layer", best["layer"]) != best["layer"]:
        raise DataError(f"{folder.path / HEAD_FILE} was fitted on layer {info.get('layer')} of entry "
                        f"{str(info.get('entry_key'))[:12]}, not on the best layer ({best['layer']}) of this result's "
                        f"entry ({entry_key[:12]}). Run the probe again.")


def model_from_entry(model_config: dict, checkpoint=None):
    """The model of a cache entry with the very weights it used (checked by digest)."""
    from ..finetuning.plan import _model_from_config

    name = model_config["name"]
    if model_config.get("weights", {}).get("kind") == "checkpoint" and checkpoint is None:
        raise UsageError(f"The probe's features came from {name} with weights from a checkpoint file "
                         f"({model_config['weights'].get('digest', '')[:19]}...); pass that file with "
                         "--checkpoint FILE (checkpoint= in Python).")
    try:
        return _model_from_config(model_config, checkpoint)
    except DataError as exc:
        raise DataError(f"{exc} Prediction needs the probe's own weights: its head was fitted on their "
                        "features.") from None


def head_score_kind(head) -> str:
    if hasattr(head, "predict_proba"):
        return PROBABILITY
    if hasattr(head, "decision_function"):
        return DECISION
    return VOTE


def head_scores(head, X: np.ndarray, kind: str) -> np.ndarray:
    """(N, C) scores in ``head.classes_`` order: predict_proba, else decision_function, else a one-hot vote."""
    if kind == PROBABILITY:
        return np.asarray(head.predict_proba(X), dtype=np.float64)
    if kind == DECISION:
        d = np.asarray(head.decision_function(X), dtype=np.float64)
        return np.stack([-d, d], axis=1) if d.ndim == 1 else d  # two classes: one margin, for the second
    votes = np.zeros((len(X), len(head.classes_)))
    votes[np.arange(len(X)), np.searchsorted(head.classes_, head.predict(X))] = 1.0
    return votes


# ------------------------------------------------------------------------------ fine-tuned networks


class FinetunedScorer:
    """A fine-tuned network (``finetuned:DIR``) with its own classifier; softmax of its logits."""

    def __init__(self, folder: ResultFolder, *, device: str = "auto", precision: str | None = None):
        from ..backbones.registry import build_model, describe_model, parse_model
        from ..data.transforms import Preprocessing

        self.info = describe_model(parse_model(f"finetuned:{folder.path}"))
        description = self.info.extra["description"]
        self.classes = [str(c) for c in description["classes"]]
        self.pre = Preprocessing.from_dict(description["preprocessing"])
        self.layer = description["layer"]["name"]
        self.device = resolve_device(device, precision or "auto")
        self.net = build_model(self.info, image_size=self.pre.crop_size)

    @property
    def description(self) -> dict:
        return {"kind": "finetune", "model": self.info.spec.name, "layer": self.layer, "head": "fine-tuned linear"}

    def score(self, images: ImageList, options: RunOptions) -> Scores:
        import torch

        logits, errors = run_images(self.net, self.net, images.paths, self.pre, options)
        ok = np.array([not e for e in errors], dtype=bool)
        scores = np.full(logits.shape, np.nan)
        scores[ok] = torch.softmax(torch.from_numpy(logits[ok]).double(), dim=1).numpy()
        predicted = np.where(ok, logits.argmax(axis=1), -1)
        return Scores(predicted, scores, self.classes, PROBABILITY, errors)
