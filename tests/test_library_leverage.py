"""featx leans on its libraries where they know the answer: the Hugging Face Hub cache and
offline switch, timm's data config and feature metadata, scikit-learn's confusion matrix."""

from __future__ import annotations

import ast
import socket
import time
from pathlib import Path

import pytest
import torch

from featx.backbones.registry import build_model, describe_model, parse_model
from featx.errors import WeightsUnavailableError

REPO_ID = "timm/resnet18.a1_in1k"
COMMIT = "0123456789abcdef0123456789abcdef01234567"


@pytest.fixture
def hf_cache(tmp_path, monkeypatch):
    """An empty Hugging Face Hub cache (HF_HUB_CACHE) that the hub library reads from."""
    cache = tmp_path / "hf"
    cache.mkdir()
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_CACHE", str(cache))  # read once, at import
    return cache


@pytest.fixture
def offline(monkeypatch):
    """HF_HUB_OFFLINE=1, and any name lookup or connection attempt fails the test."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_OFFLINE", True)  # read once, at import

    def no_connect(self, address):
        pytest.fail(f"offline mode connected to {address}")

    def no_lookup(host, *args, **kwargs):
        pytest.fail(f"offline mode looked up {host}")

    monkeypatch.setattr(socket.socket, "connect", no_connect)
    monkeypatch.setattr(socket, "getaddrinfo", no_lookup)


def _put_in_cache(cache, state: dict[str, torch.Tensor]):
    from safetensors.torch import save_file

    repo = cache / ("models--" + REPO_ID.replace("/", "--"))
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(COMMIT)
    snapshot = repo / "snapshots" / COMMIT
    snapshot.mkdir(parents=True)
    save_file(state, str(snapshot / "model.safetensors"))
    return snapshot / "model.safetensors"


def test_offline_missing_hub_weights_name_repo_file_and_cache_without_a_connection(hf_cache, offline):
    start = time.monotonic()
    with pytest.raises(WeightsUnavailableError) as info:
        describe_model(parse_model("timm:resnet18.a1_in1k"))
    message = str(info.value)
    assert REPO_ID in message and "model.safetensors" in message and str(hf_cache) in message
    assert "HF_HUB_OFFLINE" in message and "--weights none" in message
    assert time.monotonic() - start < 5


def test_offline_torchvision_weights_name_the_file_without_a_connection(tmp_path, monkeypatch, offline):
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path / "hub"))
    with pytest.raises(WeightsUnavailableError, match=r"hub/checkpoints/resnet18-f37072fd\.pth"):
        describe_model(parse_model("torchvision:resnet18"))


def test_offline_weights_in_the_hub_cache_are_found_and_loaded(hf_cache, offline):
    random = build_model(describe_model(parse_model("timm:resnet18", weights="none")))
    state = {k: (v + 0.25 if v.is_floating_point() else v).contiguous() for k, v in random.state_dict().items()}
    path = _put_in_cache(hf_cache, state)
    info = describe_model(parse_model("timm:resnet18.a1_in1k"))
    assert info.weights_file.resolve() == path.resolve()
    assert info.identity["weights"]["kind"] == "pretrained"
    loaded = build_model(info).state_dict()
    for k, v in state.items():
        torch.testing.assert_close(loaded[k], v)


def test_a_machine_without_network_is_told_at_once_not_after_the_hubs_retries(hf_cache, monkeypatch):
    """Not in offline mode, but every connection fails: one failed HEAD ends the attempt."""
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_OFFLINE", False)
    attempts = []

    def unreachable(self, address):
        attempts.append(address)
        raise OSError(101, "Network is unreachable")

    monkeypatch.setattr(socket.socket, "connect", unreachable)
    start = time.monotonic()
    with pytest.raises(WeightsUnavailableError, match=REPO_ID):
        describe_model(parse_model("timm:resnet18.a1_in1k"))
    assert time.monotonic() - start < 5  # hf_hub_download alone retries for ~23 s per file name


# ------------------------------------------------------------------------------ plots


def test_confusion_display_is_scikit_learns_on_featx_figure_without_pyplot_state(tmp_path):
    import matplotlib.pyplot as plt
    from sklearn.metrics import ConfusionMatrixDisplay, confusion_matrix

    from featx.report.plots import ConfusionDisplay

    plt.close("all")
    y_true = [0, 0, 0, 1, 1, 2, 2, 2, 2]
    y_pred = [0, 0, 1, 1, 1, 2, 0, 2, 2]
    display = ConfusionDisplay.from_predictions(y_true, y_pred, ["cat", "dog", "owl"], title="t")
    assert plt.get_fignums() == []  # nothing registered with pyplot, nothing to leak
    assert isinstance(display.display_, ConfusionMatrixDisplay) and display.ax_.figure is display.figure_
    np_counts = confusion_matrix(y_true, y_pred, labels=[0, 1, 2])
    assert (display.matrix == np_counts).all()
    texts = [[t.get_text() for t in row] for row in display.display_.text_]
    assert texts == [["2", "1", ""], ["", "2", ""], ["1", "", "3"]]  # counts; colour is the row share
    assert [t.get_text() for t in display.ax_.get_xticklabels()] == ["cat", "dog", "owl"]
    assert display.save(tmp_path / "confusion.png").stat().st_size > 1000


def test_layer_curve_display_leaves_pyplot_alone(tmp_path):
    import matplotlib.pyplot as plt

    from featx.report.plots import LayerCurveDisplay

    plt.close("all")
    rows = [{"head": "logreg", "layer": name, "order": i, "depth": d, "test_top1": a, "test_top1_ci": [a - .1, a]}
            for i, (name, d, a) in enumerate([("layer1", 0.3, 0.6), ("layer2", 0.7, 0.8)])]
    display = LayerCurveDisplay.from_rows(rows, title="t", best=rows[1])
    assert plt.get_fignums() == []
    assert display.save(tmp_path / "layers.png").stat().st_size > 1000


# ------------------------------------------------------------------------ preprocessing


SQUASH_MODEL = "timm:convnextv2_nano.fcmae_ft_in22k_in1k_384"  # timm evaluates it with crop_mode squash


@pytest.mark.parametrize("model", ["efficientnet_lite0", "timm:resnet18", SQUASH_MODEL])
def test_preprocessing_is_timms_data_config(model):
    """featx's preprocessing says what timm's resolve_model_data_config says about the built model."""
    from timm.data import resolve_model_data_config

    info = describe_model(parse_model(model, weights="none"))
    config = resolve_model_data_config(build_model(info))
    pre = info.preprocessing
    assert (pre.crop_size, pre.interpolation, pre.crop_mode) == (
        config["input_size"][-1], config["interpolation"], config["crop_mode"])
    assert pre.resize_size == int(pre.crop_size / config["crop_pct"])
    assert pre.mean == pytest.approx(config["mean"]) and pre.std == pytest.approx(config["std"])
    if model == "efficientnet_lite0":  # the default model keeps exactly what it always had
        assert pre.to_dict() == {"crop_size": 224, "resize_size": 256, "interpolation": "bicubic",
                                 "mean": [0.5, 0.5, 0.5], "std": [0.5, 0.5, 0.5]}


@pytest.mark.parametrize("mode", ["center", "squash", "border"])
def test_each_crop_mode_gives_timms_own_eval_pixels(mode):
    import numpy as np
    from PIL import Image
    from timm.data import create_transform

    from featx.data.transforms import Preprocessing

    rng = np.random.default_rng(7)
    mean, std = (0.48, 0.46, 0.41), (0.27, 0.26, 0.28)
    pre = Preprocessing(28, 32, "bicubic", mean, std, mode)
    timm_eval = create_transform(input_size=(3, 28, 28), interpolation="bicubic", crop_pct=0.875, crop_mode=mode,
                                 mean=mean, std=std, use_prefetcher=True)  # uint8 out, like featx's workers
    for w, h in [(50, 37), (37, 50), (90, 90)]:
        img = Image.fromarray(rng.integers(0, 256, size=(h, w, 3), dtype=np.uint8))
        ours, theirs = pre.pil_to_uint8(img), timm_eval(img)
        assert ours.dtype == torch.uint8 and torch.equal(ours, theirs), (mode, w, h)


def test_a_squash_model_extracts_with_its_crop_mode_in_the_key(image_folder):
    import featx

    entry = featx.extract(f"folder:{image_folder}", model=SQUASH_MODEL, weights="none", image_size=32,
                          layers="pre_logits", progress=False)
    assert entry.config["preprocessing"]["crop_mode"] == "squash"


def test_crop_mode_is_in_the_key_only_where_it_changes_features():
    from featx.data.transforms import Preprocessing

    center = Preprocessing(224, 256, "bicubic", (0.5,) * 3, (0.5,) * 3)
    assert "crop_mode" not in center.to_dict()  # entries made before crop modes keep their keys
    squash = Preprocessing(224, 256, "bicubic", (0.5,) * 3, (0.5,) * 3, "squash")
    assert squash.to_dict()["crop_mode"] == "squash"
    assert Preprocessing.from_dict(squash.to_dict()) == squash
    assert Preprocessing.from_dict(center.to_dict()) == center
    assert squash.override(image_size=96).crop_mode == "squash"


# ---------------------------------------------------------------------------- layer ladder


@pytest.mark.parametrize("model", ["timm:resnet18", "timm:convnext_atto", "efficientnet_lite0",
                                   "timm:mobilenetv3_small_050", "timm:regnetx_002"])
def test_auto_stage_outputs_are_timms_feature_info(model):
    """timm's feature_info names each stage output; featx's ``auto`` picks the same modules.

    Where featx decides otherwise: at the deepest resolution it takes the very last map unless
    the network averages that map into ``pre_logits`` (EfficientNet's ``bn2``, ResNet's
    ``layer4``), and maps of the head after that resolution are kept.
    """
    import featx

    ladder = featx.layers(model, image_size=64)
    net = build_model(describe_model(parse_model(model, weights="none")))
    canonical = {alias: layer.name for layer in ladder.layers for alias in (layer.name, *layer.aliases)}
    stages = [canonical[info["module"]] for info in net.feature_info]
    maps = [name for name in ladder.auto if name != "pre_logits"]
    assert maps[:len(stages) - 1] == stages[:-1]
    by_name = {layer.name: layer for layer in ladder.layers}
    deepest = by_name[stages[-1]]
    rest = [by_name[name] for name in maps[len(stages) - 1:]]
    # at the deepest resolution at most one map, then only head maps (MobileNetV3's 1x1 ``act2``)
    same_size = [layer for layer in rest if layer.raw_shape[1:] == deepest.raw_shape[1:]]
    assert len(same_size) <= 1
    assert all(layer.order > deepest.order for layer in rest if layer not in same_size)


# ------------------------------------------------------------------------- test markers

_STARTS_PROCESSES = {"run_cli", "run_python", "_torchrun", "_torchrun_check", "Popen", "LocalCluster"}
_SUBPROCESS_CALLS = {"run", "call", "check_call", "check_output", "Popen"}


def _marks(decorators) -> set[str]:
    """Names X of ``@pytest.mark.X`` / ``@pytest.mark.X(...)`` / ``pytestmark = [...]``."""
    out = set()
    for node in decorators:
        for sub in ast.walk(node):
            if isinstance(sub, ast.Attribute) and isinstance(sub.value, ast.Attribute) and sub.value.attr == "mark":
                out.add(sub.attr)
    return out


def _starts_processes(func) -> bool:
    for node in ast.walk(func):
        if isinstance(node, ast.Call):
            f = node.func
            if isinstance(f, ast.Name) and f.id in _STARTS_PROCESSES:
                return True
            if isinstance(f, ast.Attribute) and (f.attr in _STARTS_PROCESSES or (
                    f.attr in _SUBPROCESS_CALLS and isinstance(f.value, ast.Name) and f.value.id == "subprocess")):
                return True
    return False


def test_tests_that_start_processes_say_so():
    """`pytest -m "not slow"` stays fast only if every test that starts a process is marked."""
    unmarked = []
    for path in sorted(Path(__file__).parent.glob("test_*.py")):
        tree = ast.parse(path.read_text())
        module = _marks([n.value for n in tree.body if isinstance(n, ast.Assign)
                         and any(isinstance(t, ast.Name) and t.id == "pytestmark" for t in n.targets)])
        for func in tree.body:
            if not isinstance(func, ast.FunctionDef) or not func.name.startswith("test_"):
                continue
            marks = module | _marks(func.decorator_list)
            if _starts_processes(func) and not {"slow", "subprocess"} <= marks:
                unmarked.append(f"{path.name}::{func.name} starts a process: mark it slow and subprocess")
            elif "subprocess" in marks and "slow" not in marks:
                unmarked.append(f"{path.name}::{func.name} is marked subprocess but not slow")
    assert not unmarked, "\n".join(unmarked)


def test_auto_follows_the_stage_modules_timm_names():
    """The library's stage list is what ``auto`` takes: name another module of a stage's size
    in ``feature_info`` and ``auto`` takes that one; the traced shapes alone would not."""
    from featx.backbones.ladder import trace_ladder

    net = build_model(describe_model(parse_model("timm:resnet18", weights="none")))
    before = trace_ladder(net, 64).auto
    assert "layer2" in before and "layer2.0" not in before
    for info in net.feature_info:
        if info["module"] == "layer2":
            info["module"] = "layer2.0"
    after = trace_ladder(net, 64).auto
    assert after == [("layer2.0" if name == "layer2" else name) for name in before]
