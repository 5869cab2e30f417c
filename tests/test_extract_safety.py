"""Extraction safety: environment faults are never cached as bad images, absurd or foreign images
are refused one by one, and the cache key names everything that defines the numbers."""

from __future__ import annotations

import builtins
import errno
import io
import struct
import zlib

import numpy as np
import pytest
from PIL import EpsImagePlugin, Image

import featx
from featx.data import ImageDataset, Preprocessing, open_dataset
from featx.data.images import ImageDecodeError, ImageReadError, decode_image
from featx.errors import FeatxError

from .conftest import TINY, cli, make_folder

PRE = Preprocessing(32, 36, "bilinear", (0.5, 0.5, 0.5), (0.5, 0.5, 0.5))


@pytest.fixture(autouse=True)
def _fast_retries(monkeypatch):
    monkeypatch.setattr("featx.data.images.READ_RETRY_DELAY", 0.001)


def _failing_open(monkeypatch, name: str, code: int, times: int | None = None) -> list:
    """Make the OS refuse to open files called ``name`` with ``code`` (all times, or the first ``times``)."""
    real_open = builtins.open
    calls = []

    def fake_open(file, mode="r", *args, **kwargs):
        if str(file).endswith(name) and "r" in mode:
            calls.append(file)
            if times is None or len(calls) <= times:
                raise OSError(code, f"{errno.errorcode[code]} injected", str(file))
        return real_open(file, mode, *args, **kwargs)

    monkeypatch.setattr(builtins, "open", fake_open)
    return calls


# ----------------------------------------------------------------- environment vs image faults


def test_io_error_while_choosing_the_crop_fails_the_run_instead_of_changing_the_key(tmp_path):
    """The crop rule reads a few image headers; a file-system fault there must not make it decide
    on fewer images (and so, perhaps, build an entry under another key)."""
    root = make_folder(tmp_path / "f", n_per_class=4, splits=None)
    with pytest.MonkeyPatch.context() as fault, pytest.raises(ImageReadError, match="owl/img002.png"):
        calls = _failing_open(fault, "owl/img002.png", errno.EIO)
        featx.extract(f"folder:{root}", dtype="float32", workers=0, **TINY)
    assert len(calls) == 3 and not list((tmp_path / "cache").glob("*.h5"))


@pytest.mark.parametrize("code", [errno.EIO, errno.EACCES, errno.ENOENT, errno.ESTALE, errno.ETIMEDOUT])
def test_io_error_fails_the_run_and_is_never_cached_as_a_bad_image(tmp_path, monkeypatch, code):
    root = make_folder(tmp_path / "f", n_per_class=4, splits=None)  # 12 images
    with pytest.MonkeyPatch.context() as fault, pytest.raises(ImageReadError) as info:
        calls = _failing_open(fault, "owl/img002.png", code)
        featx.extract(f"folder:{root}", dtype="float32", batch_size=4, shard_rows=4, workers=0, crop_pct=0.875,
                      **TINY)  # an explicit crop: no header is read to choose it, the fault meets the pixels
    message = str(info.value)
    assert "owl/img002.png" in message and f"Errno {code}" in message and "run the same command again" in message
    assert len(calls) == 3  # retried before giving up
    assert not list((tmp_path / "cache").glob("*.h5"))
    # the file system has recovered: the resume reads the image and keeps the shards
    entry = featx.extract(f"folder:{root}", dtype="float32", batch_size=4, shard_rows=4, workers=0, crop_pct=0.875,
                          **TINY)
    assert entry.last_run.resumed_rows == 8
    assert entry.samples()["ok"].all() and dict(entry.errors()) == {}


@pytest.mark.slow
@pytest.mark.subprocess
def test_io_error_in_a_dataloader_worker_is_raised_with_a_clean_message(tmp_path, monkeypatch):
    root = make_folder(tmp_path / "f", n_per_class=2, splits=None)
    _failing_open(monkeypatch, "dog/img001.png", errno.EIO)  # forked workers inherit the fault
    with pytest.raises(ImageReadError) as info:
        featx.extract(f"folder:{root}", dtype="float32", workers=1, **TINY)
    message = str(info.value)
    assert message.startswith("Could not read ") and "dog/img001.png" in message
    assert "Traceback" not in message
    assert not list((tmp_path / "cache").glob("*.h5"))


def test_a_transient_io_error_is_retried_and_the_image_is_read(tmp_path, monkeypatch):
    root = make_folder(tmp_path / "f", n_per_class=2, splits=None)
    calls = _failing_open(monkeypatch, "cat/img000.png", errno.EIO, times=2)
    entry = featx.extract(f"folder:{root}", dtype="float32", workers=0, crop_pct=0.875, **TINY)  # no header read
    assert len(calls) == 3 and entry.samples()["ok"].all()


def test_io_error_through_the_cli_exits_1_naming_the_file(tmp_path, monkeypatch, capsys):
    import featx.data.images as im

    root = make_folder(tmp_path / "f", n_per_class=2, splits=None)
    real = builtins.open

    def fake(f, mode="r", *args, **kwargs):
        if str(f).endswith("cat/img001.png") and "r" in mode:
            raise OSError(errno.EIO, "Input/output error", str(f))
        return real(f, mode, *args, **kwargs)

    monkeypatch.setattr(builtins, "open", fake)
    monkeypatch.setattr(im, "READ_RETRY_DELAY", 0.001)
    status, _, stderr = cli(capsys, "extract", f"folder:{root}", "--model", "timm:resnet18", "--weights", "none",
                            "--image-size", "32", "--workers", "0")
    assert status == 1, stderr[-2000:]
    assert "cat/img001.png" in stderr and "Input/output error" in stderr
    assert "Traceback" not in stderr


def test_io_errors_inside_a_torchvision_dataset_are_not_bad_images(tmp_path, monkeypatch):
    from torchvision.datasets import ImageFolder

    from featx.data.sources import TorchvisionSource

    root = make_folder(tmp_path / "f", n_per_class=2, splits=None)
    (root / "owl" / "img001.png").write_bytes((root / "owl" / "img001.png").read_bytes()[:60])  # truncated
    ds = ImageFolder(str(root))
    src = TorchvisionSource("folder-tv", [("train", ds)], ds.targets, ds.classes, root)
    items = ImageDataset(src, PRE)
    assert "truncated" in items[5][1] or "cannot decode" in items[5][1]  # the image's own fault: recorded
    _failing_open(monkeypatch, "cat/img000.png", errno.EIO)
    with pytest.raises(ImageReadError, match="Errno 5"):
        items[0]


# ----------------------------------------------------------------- absurd sizes, any decoder failure


def _strip_png(path, width: int, height: int = 1) -> None:
    """A grayscale PNG of width x height black pixels, a few KB whatever the width."""
    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
    raw = b"".join(b"\0" + b"\0" * width for _ in range(height))
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0))
                     + chunk(b"IDAT", zlib.compress(raw, 9)) + chunk(b"IEND", b""))


def test_extreme_aspect_ratio_is_refused_per_image_before_decoding(tmp_path):
    _strip_png(tmp_path / "strip.png", 3_000_000)  # the 8.8 KB image that used to abort with MemoryError
    assert (tmp_path / "strip.png").stat().st_size < 20_000
    with pytest.raises(ImageDecodeError, match=r"absurd size.*3000000x1.*aspect ratio"):
        decode_image(tmp_path / "strip.png")


def test_absurd_images_are_recorded_and_the_run_completes(tmp_path):
    root = make_folder(tmp_path / "f", n_per_class=2, splits=None)
    _strip_png(root / "cat" / "wide.png", 20_000)  # resized to 36 rows: 26M pixels before the fix
    _strip_png(root / "dog" / "tall.png", 1, 5_000)
    entry = featx.extract(f"folder:{root}", dtype="float32", **TINY)
    bad = dict(entry.errors())
    assert set(bad) == {"cat/wide.png", "dog/tall.png"}
    assert all("absurd size" in reason and "aspect ratio" in reason for reason in bad.values())
    assert int(entry.samples()["ok"].sum()) == 6


def test_resized_pixel_bound_is_checked_before_resizing(tmp_path, monkeypatch):
    Image.new("RGB", (90, 10)).save(tmp_path / "wide.png")
    monkeypatch.setattr("featx.data.images.MAX_RESIZED_PIXELS", 36 * 300)  # 36 x 324 would exceed it
    src = open_dataset(f"folder:{_one_class(tmp_path, 'wide.png')}")
    _, reason = ImageDataset(src, PRE)[0]
    assert "absurd size" in reason and "shorter side of 36" in reason


def _one_class(tmp_path, name):
    d = tmp_path / "one" / "a"
    d.mkdir(parents=True)
    (tmp_path / name).rename(d / name)
    return tmp_path / "one"


@pytest.mark.parametrize("exc", [MemoryError, ValueError("bad filter"), ZeroDivisionError, RuntimeError("x")])
def test_any_exception_while_resizing_is_recorded_for_that_image(tmp_path, monkeypatch, exc):
    root = make_folder(tmp_path / "f", n_per_class=2, splits=None, size=40)
    Image.fromarray(np.full((30, 50, 3), 7, np.uint8)).save(root / "owl" / "odd.png")
    real_resize = Image.Image.resize

    def resize(self, size, *args, **kwargs):
        if self.size == (50, 30):  # the resizer fails on this one image
            raise exc
        return real_resize(self, size, *args, **kwargs)

    monkeypatch.setattr(Image.Image, "resize", resize)
    entry = featx.extract(f"folder:{root}", dtype="float32", workers=0, **TINY)
    bad = dict(entry.errors())
    assert list(bad) == ["owl/odd.png"] and "cannot decode or resize image" in bad["owl/odd.png"]
    assert int(entry.samples()["ok"].sum()) == 6


def test_any_exception_inside_the_decoder_is_recorded_for_that_image(tmp_path, monkeypatch):
    from PIL import ImageFile

    root = make_folder(tmp_path / "f", n_per_class=2, splits=None)
    Image.new("RGB", (50, 30), (1, 2, 3)).save(root / "dog" / "boom.png")
    real_load = ImageFile.ImageFile.load

    def load(self):
        if self.size == (50, 30):  # the decoder runs out of memory on this one image
            raise MemoryError
        return real_load(self)

    monkeypatch.setattr(ImageFile.ImageFile, "load", load)
    entry = featx.extract(f"folder:{root}", dtype="float32", workers=0, **TINY)
    bad = dict(entry.errors())
    assert list(bad) == ["dog/boom.png"] and "MemoryError" in bad["dog/boom.png"]
    assert int(entry.samples()["ok"].sum()) == 6


def test_keyboard_interrupt_is_not_swallowed(tmp_path, monkeypatch):
    root = make_folder(tmp_path / "f", n_per_class=1, splits=None)
    monkeypatch.setattr(Image.Image, "resize", lambda *a, **k: (_ for _ in ()).throw(KeyboardInterrupt))
    src = open_dataset(f"folder:{root}")
    with pytest.raises(KeyboardInterrupt):
        ImageDataset(src, PRE)[0]


# ----------------------------------------------------------------- formats featx does not open


EPS = b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 8 8\nshowpage\n"


def test_postscript_in_a_png_is_a_bad_image_and_never_reaches_ghostscript(tmp_path, monkeypatch):
    opened = []
    monkeypatch.setattr(EpsImagePlugin.EpsImageFile, "_open", lambda self: opened.append(self))
    monkeypatch.setattr(EpsImagePlugin, "Ghostscript", lambda *a, **k: opened.append("gs"))
    root = make_folder(tmp_path / "f", n_per_class=2, splits=None)
    (root / "cat" / "evil.png").write_bytes(EPS)
    entry = featx.extract(f"folder:{root}", dtype="float32", workers=0, **TINY)
    assert opened == []
    bad = dict(entry.errors())
    assert list(bad) == ["cat/evil.png"] and "unsupported format EPS" in bad["cat/evil.png"]
    with pytest.raises(ImageDecodeError, match="unsupported format EPS"):
        decode_image(EPS)
    assert opened == []


@pytest.mark.parametrize("fmt, ext", [("PDF", "pdf"), ("ICO", "ico"), ("TGA", "tga")])
def test_formats_featx_does_not_list_are_refused_by_name(tmp_path, fmt, ext):
    img = Image.new("RGB", (16, 16), (200, 10, 10))
    buf = io.BytesIO()
    img.save(buf, format=fmt)
    with pytest.raises(ImageDecodeError, match="unsupported format|not a recognised image format"):
        decode_image(buf.getvalue())


@pytest.mark.parametrize("fmt", ["JPEG", "PNG", "BMP", "GIF", "TIFF", "WEBP", "PPM"])
def test_every_listed_format_still_decodes(fmt):
    buf = io.BytesIO()
    Image.new("RGB", (20, 12), (10, 200, 30)).save(buf, format=fmt)
    assert decode_image(buf.getvalue()).size == (20, 12)


def test_image_read_error_is_a_featx_error():
    assert issubclass(ImageReadError, FeatxError)


# ----------------------------------------------------------------- what the cache key names


def _config(device):
    from featx.backbones.registry import describe_model, parse_model
    from featx.extraction.plan import entry_config

    info = describe_model(parse_model("efficientnet_lite0"))  # pretrained: no versions in its identity
    src = open_dataset("digits")
    return entry_config(info, info.preprocessing, "avg", "auto", "float32", device, src, None, 0)


def _device(spec):
    import torch

    from featx._runtime import Device

    return Device(torch.device(spec), None)


@pytest.mark.slow
def test_key_names_the_device_type_but_not_its_index():
    from featx.cache.key import config_key

    cpu, cuda0, cuda1 = (_config(_device(s)) for s in ("cpu", "cuda:0", "cuda:1"))
    assert cpu["device"]["type"] == "cpu" and cuda0["device"]["type"] == "cuda"
    assert config_key(cpu) != config_key(cuda0)
    assert config_key(cuda0) == config_key(cuda1)


@pytest.mark.slow
def test_key_changes_with_tf32_on_cuda(monkeypatch):
    import torch

    from featx.cache.key import config_key

    monkeypatch.setattr(torch.backends.cuda.matmul, "allow_tf32", False)
    before = config_key(_config(_device("cuda")))
    monkeypatch.setattr(torch.backends.cuda.matmul, "allow_tf32", True)
    after = _config(_device("cuda"))
    assert after["device"]["tf32"]["matmul"] is True and config_key(after) != before


@pytest.mark.slow
@pytest.mark.parametrize("module", ["featx.extraction.plan.__version__", "timm.__version__",
                                    "torchvision.__version__", "torch.__version__"])
def test_key_changes_with_the_versions_of_the_code_that_defines_the_features(monkeypatch, module):
    from featx.cache.key import config_key

    before = config_key(_config(_device("cpu")))
    monkeypatch.setattr(module, "999.0")
    assert config_key(_config(_device("cpu"))) != before


def test_format_version_was_bumped_for_the_new_key_fields():
    from featx.cache.key import FORMAT_VERSION

    assert FORMAT_VERSION >= 2


@pytest.mark.parametrize("value", ["0", "-5", "soon", "nan"])
def test_a_bad_distributed_timeout_is_a_usage_error_naming_the_variable(value, monkeypatch):
    from featx.errors import UsageError
    from featx.extraction.distributed import dist_timeout

    monkeypatch.setenv("FEATX_DIST_TIMEOUT", value)
    with pytest.raises(UsageError, match="FEATX_DIST_TIMEOUT must be a positive number"):
        dist_timeout()


def test_the_distributed_timeout_defaults_and_reads_seconds(monkeypatch):
    from featx.extraction.distributed import DEFAULT_TIMEOUT, dist_timeout

    monkeypatch.delenv("FEATX_DIST_TIMEOUT", raising=False)
    assert dist_timeout() == DEFAULT_TIMEOUT
    monkeypatch.setenv("FEATX_DIST_TIMEOUT", "12.5")
    assert dist_timeout() == 12.5
