"""Where a probe head computes: the device, its arrays, and the torch thread budget.

Heads stay scikit-learn estimators. An engine only decides which estimator class fits them
(scikit-learn's on numpy, scikit-learn's on torch tensors through the array API, or a torch
estimator such as the cosine k-NN) and on which device. torch is imported on first use, so
``import featx.probing`` stays light.
"""

from __future__ import annotations

import contextlib
import os
import re
import sys

import numpy as np

from ..errors import UsageError

DEVICES = ("auto", "cpu", "cuda", "cuda:N")
VALID_TORCH_DEVICES = "cpu, cuda, cuda:N, auto (or a torch.device)"
#: engines that run scikit-learn on torch tensors need SciPy's array API switched on before
#: SciPy is first imported (featx/__init__.py sets it unless the user did)
ARRAY_API_ENV = "SCIPY_ARRAY_API"


def resolve_device(device) -> str:
    """``"auto"`` -> ``"cuda"`` when a GPU is visible, else ``"cpu"``; other values are checked."""
    text = str(device if device is not None else "auto").strip().lower()
    if text == "auto":
        if "torch" not in sys.modules and not _gpu_driver_present():
            return "cpu"  # without importing torch: its CUDA libraries alone map about 600 MB
        try:
            import torch
        except ImportError:
            return "cpu"
        return "cuda" if torch.cuda.is_available() else "cpu"
    if text == "cpu" or re.fullmatch(r"cuda(:\d+)?", text):
        if text.startswith("cuda"):
            import torch

            if not torch.cuda.is_available():
                raise UsageError(f"--device {text}: no CUDA device is visible to torch. Valid here: auto, cpu.")
        return text
    raise UsageError(f"Unknown device {device!r}. Valid: {', '.join(DEVICES)}.")


#: device nodes of the NVIDIA and ROCm kernel drivers; torch sees no GPU without one of them
GPU_DRIVER_PATHS = ("/dev/nvidiactl", "/dev/nvidia0", "/proc/driver/nvidia/version", "/dev/kfd")


def _gpu_driver_present() -> bool:
    if not sys.platform.startswith("linux"):
        return True  # no cheap test elsewhere: ask torch
    return any(os.path.exists(p) for p in GPU_DRIVER_PATHS)


def device_type(device: str) -> str:
    return str(device).split(":")[0]


def array_api_ready() -> bool:
    """Whether scikit-learn can take torch tensors here (scikit-learn >= 1.6, SciPy's switch on)."""
    try:
        import sklearn
        from sklearn.utils._array_api import _check_array_api_dispatch  # noqa: F401
    except ImportError:
        return False
    major, minor = (int(p) for p in sklearn.__version__.split(".")[:2])
    if (major, minor) < (1, 6):
        return False
    try:
        from scipy._lib._array_api import SCIPY_ARRAY_API
    except ImportError:
        return os.environ.get(ARRAY_API_ENV) == "1"
    return bool(SCIPY_ARRAY_API)


@contextlib.contextmanager
def array_api(enabled: bool):
    """scikit-learn's array API dispatch around fits on torch tensors (nothing for numpy)."""
    if not enabled:
        yield
        return
    import sklearn

    with sklearn.config_context(array_api_dispatch=True):
        yield


def to_device(X: np.ndarray, device: str):
    import torch

    return torch.from_numpy(np.ascontiguousarray(X)).to(device)


def to_numpy(x) -> np.ndarray:
    """numpy from a numpy array or a (CPU or CUDA) torch tensor."""
    if hasattr(x, "detach") and hasattr(x, "cpu"):
        return x.detach().cpu().numpy()
    return np.asarray(x)


def portable(model):
    """The fitted model as plain scikit-learn on numpy, so ``best_head.joblib`` loads anywhere:
    torch estimators give their scikit-learn twin (``to_sklearn``), array-API fits their numpy
    attributes."""
    from sklearn.pipeline import Pipeline

    if isinstance(model, Pipeline):
        model.steps = [(name, portable(step)) for name, step in model.steps]
        return model
    to_sklearn = getattr(model, "to_sklearn", None)
    if callable(to_sklearn):
        return to_sklearn()
    for name, value in list(vars(model).items()):
        if name.endswith("_") and hasattr(value, "detach"):
            setattr(model, name, to_numpy(value))
    return model


def resolve_torch_device(device):
    """``device`` as a ``torch.device``; anything else is a UsageError naming the valid choices."""
    import torch

    if isinstance(device, torch.device):
        spec = str(device)
    elif isinstance(device, str):
        spec = device.strip().lower()
    else:
        raise UsageError(f"Unknown device {device!r}. Valid devices: {VALID_TORCH_DEVICES}.")
    if spec == "auto":
        spec = "cuda" if torch.cuda.is_available() else "cpu"
    if spec == "cpu":
        return torch.device("cpu")
    if spec != "cuda" and not (spec.startswith("cuda:") and spec[5:].isdigit()):
        raise UsageError(f"Unknown device {device!r}. Valid devices: {VALID_TORCH_DEVICES}.")
    if not torch.cuda.is_available():
        raise UsageError(f"Device {spec!r} was requested but CUDA is not available on this machine. "
                         f"Valid devices here: cpu, auto.")
    dev = torch.device(spec)
    if dev.index is not None and dev.index >= torch.cuda.device_count():
        raise UsageError(f"Device {spec!r} does not exist: this machine has {torch.cuda.device_count()} CUDA "
                         f"device(s) (cuda:0 to cuda:{torch.cuda.device_count() - 1}).")
    return dev


def blas_thread_limit() -> int | None:
    """The smallest thread count of the BLAS libraries loaded, as threadpoolctl sees (and limits) them."""
    from threadpoolctl import threadpool_info

    counts = [info["num_threads"] for info in threadpool_info() if info.get("user_api") == "blas"]
    return min(counts) if counts else None


@contextlib.contextmanager
def torch_threads(n_threads: int | None):
    """torch's intra-op pool sized to the caller's budget for the block, then put back.

    The setting is the calling thread's (OpenMP's thread count and MKL's local one, which a thread
    takes from torch's last global setting when it first computes): cells in threads of one process
    (the probe's threading backend) set and restore their own, without changing each other's."""
    import torch

    before = torch.get_num_threads()
    wanted = n_threads
    if wanted is None:
        limit = blas_thread_limit()
        wanted = before if limit is None else min(before, limit)
    wanted = max(1, int(wanted))
    if wanted != before:
        torch.set_num_threads(wanted)
    try:
        yield wanted
    finally:
        if torch.get_num_threads() != before:
            torch.set_num_threads(before)
