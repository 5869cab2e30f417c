"""What an extraction will do, decided before any image is read.

:class:`ExtractionRequest` holds the user's options once validated; :func:`entry_config` is
the description the cache key hashes; :class:`ShardPlan` fixes the batches and shards of the
layers still missing. The plan is stored beside the shards of an unfinished run, so its dict
must stay exactly as it is: a changed plan discards the shards of every interrupted run.
"""

from __future__ import annotations

import platform
from dataclasses import dataclass, replace

import numpy as np
import torch

from .. import __version__
from .._runtime import Device
from ..backbones.registry import ModelInfo
from ..cache.key import FORMAT_VERSION
from ..data.sources import ImageSource
from ..data.transforms import Preprocessing
from ..errors import UsageError
from ..layer import Layer, check_pool, layer_rule, pooled_width

DTYPES = ("float16", "float32")
#: ``auto``: ``tensor`` where the source allows it, else ``pil``; see :func:`choose_resize_engine`
RESIZE_ENGINES = ("auto", "pil", "tensor")
#: target size of one shard file; shards are whole batches, at most 64 of them
SHARD_BYTES = 32 * 1024**2


def check_options(dtype: str, batch_size: int | None, workers: int | None, shard_rows: int | None) -> None:
    """Refuse an unknown dtype and sizes that are not positive integers (workers may be 0)."""
    if dtype not in DTYPES:
        raise UsageError(f"Unknown dtype {dtype!r}. Valid: {', '.join(DTYPES)}.")
    for name, value in (("--batch-size", batch_size), ("--workers", workers), ("shard_rows", shard_rows)):
        if value is not None and (not isinstance(value, int) or value < (0 if name == "--workers" else 1)):
            raise UsageError(f"{name} must be a {'non-negative' if name == '--workers' else 'positive'} "
                             f"integer, got {value!r}.")


def check_resize_engine(engine: str) -> None:
    if engine not in RESIZE_ENGINES:
        raise UsageError(f"Unknown resize engine {engine!r}. Valid: {', '.join(RESIZE_ENGINES)}.")


def choose_resize_engine(source: ImageSource, pre: Preprocessing, requested: str = "auto") -> str:
    """``tensor`` (whole batches resized on the device, no PIL) or ``pil`` (one image at a time).

    The tensor engine needs the images as one uint8 array of one size (in-memory datasets such
    as digits and Fashion-MNIST) and a preprocessing it reproduces (``Preprocessing.batch_resizable``).
    Its pixels differ from PIL's by a grey level or two, so the key names it; ``pil`` keeps the
    features (and cache entries) of the per-image path.
    """
    check_resize_engine(requested)
    if requested == "pil":
        return "pil"
    shape = source.pixel_shape()
    if shape is not None and pre.batch_resizable(shape[0], shape[1]):
        return "tensor"
    if requested == "tensor":
        raise UsageError(
            "The tensor resize engine needs a dataset held in memory as uint8 images of one size (grey or RGB), "
            f"bilinear or bicubic interpolation, no 'border' crop and a sane size; {source.spec} with "
            f"{pre.interpolation}/{pre.crop_mode} does not qualify. Use resize_engine='auto' or 'pil'."
        )
    return "pil"


@dataclass(frozen=True)
class ExtractionRequest:
    """The validated options of one ``extract`` call, resolved to a model, a dataset and a device."""

    source: ImageSource
    info: ModelInfo
    pre: Preprocessing
    layers: str | list[str] | None
    pool: str
    token_pool: str
    dtype: str
    device: Device
    batch_size: int | None = None
    workers: int | None = None
    strict: bool = False
    force: bool = False
    progress: bool = True
    shard_rows: int | None = None
    limit: int | None = None
    seed: int = 0
    hash_content: bool = False
    #: the engine chosen by :func:`choose_resize_engine`, ``pil`` or ``tensor``
    resize_engine: str = "pil"

    def __post_init__(self):
        check_pool(self.pool, self.token_pool)
        check_options(self.dtype, self.batch_size, self.workers, self.shard_rows)
        if len(self.source) == 0:
            raise UsageError("The dataset has no samples.")
        if self.resize_engine not in ("pil", "tensor"):
            raise ValueError(f"resize_engine must be chosen before the request, got {self.resize_engine!r}")

    @property
    def model_name(self) -> str:
        return self.info.spec.name

    def config(self) -> dict:
        """The cache key's document for this request."""
        return entry_config(self.info, self.pre, self.pool, self.token_pool, self.dtype, self.device,
                            self.source, self.limit, self.seed, self.resize_engine)


# ------------------------------------------------------------------------------- the key document


def device_numerics(device: Device) -> dict:
    """What about the device changes float32 results: its type (cpu, cuda, mps; never its index,
    so ranks on different GPUs of one kind share an entry) and the switches that let it trade
    precision for speed (TF32 convolutions and matmuls on CUDA, the matmul precision setting)."""
    numerics = {"type": device.torch_device.type,
                "float32_matmul_precision": torch.get_float32_matmul_precision()}
    if device.is_cuda:
        numerics["tf32"] = {"matmul": bool(torch.backends.cuda.matmul.allow_tf32),
                            "cudnn": bool(torch.backends.cudnn.allow_tf32)}
    return numerics


def code_versions() -> dict:
    """Versions of the code that defines the numbers, part of the key.

    featx (pooling, layer taps), timm and torchvision (architectures, their preprocessing
    defaults and the resize used on every image) define what is computed; torch defines how:
    its kernels (oneDNN/cuDNN algorithms, summation order) change float results between
    releases, and a stale entry silently mixed with new features is worse than one re-extraction
    after an upgrade. Pillow decodes and resizes images (torchvision resizes those of the tensor
    resize engine), so its version is included too.
    numpy, h5py and python only store the results and are left out.
    """
    import PIL
    import timm
    import torchvision

    return {"featx": __version__, "timm": timm.__version__, "torchvision": torchvision.__version__,
            "torch": torch.__version__, "pillow": PIL.__version__}


def library_versions() -> dict:
    """Every library involved, recorded in the entry for the record (not part of the key)."""
    import h5py
    import timm
    import torchvision

    return {
        "featx": __version__, "python": platform.python_version(), "torch": torch.__version__,
        "torchvision": torchvision.__version__, "timm": timm.__version__, "h5py": h5py.__version__,
        "numpy": np.__version__,
    }


def entry_config(info: ModelInfo, pre: Preprocessing, pool: str, token_pool: str, dtype: str, device: Device,
                 source: ImageSource, limit: int | None, seed: int, resize_engine: str = "pil") -> dict:
    """The full description that the cache key hashes; every default is spelled out, except the
    ``pil`` resize engine: entries made before there was a choice keep their keys."""
    dataset = source.fingerprint()
    dataset["limit"] = {"n": limit, "seed": seed} if limit is not None else None
    preprocessing = pre.to_dict()
    if resize_engine != "pil":
        preprocessing["resize_engine"] = resize_engine
    return {
        "format": FORMAT_VERSION,
        "model": {"name": info.spec.name, **info.identity},
        "preprocessing": preprocessing,
        "pooling": {"pool": pool, "token_pool": token_pool},
        "dtype": dtype,
        "precision": device.precision,
        "device": device_numerics(device),
        "code": code_versions(),
        "dataset": dataset,
    }


# ------------------------------------------------------------------------------- the shard plan


def default_batch_size(device: Device, image_size: int) -> int:
    """Measured on 2 CPU cores (benchmarks/): small batches keep activations in cache."""
    if device.is_cuda:
        return 256 if image_size <= 128 else 128 if image_size <= 256 else 64
    return 32 if image_size <= 128 else 16 if image_size <= 256 else 8


@dataclass(frozen=True)
class ShardPlan:
    """How the missing layers of one entry are cut into batches and shards.

    Shards are whole batches and cover the same rows in every run with this plan, which is
    what makes a resumed run bit-identical to an uninterrupted one."""

    key: str
    n: int
    batch_size: int
    shard_rows: int
    dtype: str
    layers: tuple[str, ...]
    rules: dict[str, str]  # layer name -> pooling rule, in the order of ``layers``
    widths: dict[str, int]  # layer name -> pooled width

    @classmethod
    def build(cls, key: str, n: int, dtype: str, batch_size: int, shard_rows: int | None,
              rules: dict[str, str], widths: dict[str, int]) -> ShardPlan:
        """Without ``shard_rows``, shards hold about SHARD_BYTES: between 1 and 64 whole batches."""
        row_bytes = max(1, sum(widths.values()) * np.dtype(dtype).itemsize)
        bs = batch_size
        rows = shard_rows or max(bs, min(64 * bs, (SHARD_BYTES // row_bytes) // bs * bs))
        return cls(key, n, batch_size, rows, dtype, tuple(rules), dict(rules), dict(widths))

    @property
    def estimated_bytes(self) -> int:
        return self.n * sum(self.widths.values()) * np.dtype(self.dtype).itemsize

    def to_dict(self) -> dict:
        """The plan as stored beside the shards (``plan.json``); unchanged since format 1."""
        return {
            "key": self.key, "n": self.n, "batch_size": self.batch_size, "shard_rows": self.shard_rows,
            "dtype": self.dtype, "layers": list(self.layers), "rules": dict(self.rules),
        }

    def records(self, layers: list[Layer]) -> list[Layer]:
        """Each planned layer as the entry stores it: with its pooling rule, width and dtype."""
        return [replace(layer, pool=self.rules[layer.name], width=self.widths[layer.name], dtype=self.dtype)
                for layer in layers]


def plan_shards(request: ExtractionRequest, layers: list[Layer], key: str) -> ShardPlan:
    """The plan for extracting ``layers`` (the missing ones) as ``request`` asks."""
    rules = {layer.name: layer_rule(layer.kind, layer.has_cls, request.pool, request.token_pool) for layer in layers}
    widths = {layer.name: pooled_width(layer.raw_shape, layer.kind, rules[layer.name]) for layer in layers}
    batch_size = request.batch_size or default_batch_size(request.device, request.pre.crop_size)
    return ShardPlan.build(key, len(request.source), request.dtype, batch_size, request.shard_rows, rules, widths)
