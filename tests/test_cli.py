"""The command line as a user runs it: output, exit codes, messages without tracebacks."""

import json

import pytest

from .conftest import cli, last_json, make_folder, run_cli, run_python

TINY_ARGS = ["--model", "timm:resnet18", "--weights", "none", "--image-size", "32", "--no-progress"]


def _ok(result):
    status, stdout, stderr = result
    assert status == 0, stderr
    return stdout, stderr


def test_extract_then_cache_hit_then_ls_info_rm(tmp_path, capsys):
    root = make_folder(tmp_path / "imgs", n_per_class=3)
    stdout, stderr = _ok(cli(capsys, "extract", f"folder:{root}", *TINY_ARGS))
    assert "extracted" in stdout and "img/s" in stdout
    assert "about" in stderr and "on disk" in stderr  # the size estimate, before the run
    stdout, _ = _ok(cli(capsys, "extract", f"folder:{root}", *TINY_ARGS))
    assert "cache hit: no forward pass" in stdout

    ls, _ = _ok(cli(capsys, "cache", "ls"))
    assert "timm:resnet18" in ls and "samples" in ls
    key = json.loads(_ok(cli(capsys, "cache", "info", "--json", next(
        p.name for p in (tmp_path / "cache").glob("*.h5"))))[0])["key"]
    info, _ = _ok(cli(capsys, "cache", "info", key[:10], "--verify"))
    assert "all checksums verified" in info and "layer3" in info
    _ok(cli(capsys, "cache", "rm", key[:10]))
    assert "No entries" in _ok(cli(capsys, "cache", "ls"))[0]


def test_layers_and_models_commands(capsys):
    stdout, _ = _ok(cli(capsys, "layers", "torchvision:resnet18", "--image-size", "64"))
    assert "layer4" in stdout and "pre_logits" in stdout and "512" in stdout
    js = json.loads(_ok(cli(capsys, "layers", "efficientnet_lite0", "--json", "--pool", "avgmax"))[0])
    assert js["input_size"] == 224 and [r["name"] for r in js["layers"] if r["auto"]][-1] == "pre_logits"
    assert js["layers"][-1]["width"] == 1280 and js["layers"][0]["width"] == 64  # avgmax doubles maps only
    models, _ = _ok(cli(capsys, "models", "*lite*"))
    assert "efficientnet_lite0" in models and "timm:tf_efficientnet_lite0.in1k" in models


BAD_INPUT = [
    (["extract", "digits", "--model", "torchvision:resnet5"], 2, "Did you mean 'resnet50'"),
    (["extract", "digits", "--model", "resnet50"], 2, "'torchvision:resnet50' or 'timm:resnet50'"),
    (["extract", "digits", "--model", "nosuchsource:x"], 2, "Unknown model source"),
    (["extract", "digitz"], 2, "Did you mean 'digits'"),
    (["extract", "digits", *TINY_ARGS, "--layers", "layr3"], 2, "Did you mean 'layer3'"),
    (["extract", "digits", *TINY_ARGS, "--layers", "99"], 2, "out of range"),
    (["extract", "digits", *TINY_ARGS, "--pool", "mean"], 2, "Unknown pooling 'mean'"),
    (["extract", "digits", *TINY_ARGS, "--dtype", "int8"], 2, "Unknown dtype 'int8'"),
    (["extract", "digits", *TINY_ARGS, "--limit", "0"], 2, "--limit must be a positive integer"),
    (["extract", "digits", *TINY_ARGS, "--image-size", "4"], 2, "--image-size must be an integer >= 8"),
    (["extract", "digits", *TINY_ARGS, "--device", "tpu"], 2, "Unknown device 'tpu'"),
    (["extract", "digits", *TINY_ARGS, "--weights", "bogus", "--model", "torchvision:resnet18"], 2,
     "has no weights 'bogus'"),
    (["extract", "folder:/no/such/folder", *TINY_ARGS], 2, "does not exist"),
    (["extract", "digits", "--model", "file:/tmp/x.pt"], 2, "needs an architecture"),
    (["cache", "info", "ffffffff"], 2, "No cache entry 'ffffffff'"),
    (["layers", "timm:resnet1"], 2, "Did you mean"),
    (["extract", "digits", "--batch-size", "-3"], 2, "--batch-size must be a positive integer"),
]


@pytest.mark.parametrize("args, code, message", BAD_INPUT, ids=[" ".join(a[:4]) for a, _, _ in BAD_INPUT])
def test_bad_input_gets_a_message_and_an_exit_code(capsys, args, code, message):
    status, _, stderr = cli(capsys, *args)
    assert status == code, stderr
    assert message in " ".join(stderr.split())
    assert "Traceback" not in stderr


@pytest.mark.slow
@pytest.mark.subprocess
def test_bad_input_exit_code_in_a_real_process():
    res = run_cli("extract", "digits", "--model", "torchvision:resnet5")
    assert res.returncode == 2 and "Did you mean 'resnet50'" in res.stderr and "Traceback" not in res.stderr


def test_missing_dataset_is_a_runtime_error_with_instructions(tmp_path, capsys, monkeypatch):
    if _debian_fmnist():
        pytest.skip("Debian's dataset-fashion-mnist is installed; the missing case is covered in test_data")
    monkeypatch.setenv("FEATX_DATA", str(tmp_path / "none"))
    status, _, stderr = cli(capsys, "extract", "fashion-mnist", "--no-download", *TINY_ARGS)
    assert status == 1 and "apt-get install dataset-fashion-mnist" in stderr
    assert "Traceback" not in stderr


def _debian_fmnist():
    from featx.data.sources import DEBIAN_FASHION_MNIST

    return (DEBIAN_FASHION_MNIST / "train-images-idx3-ubyte.gz").exists()


def test_strict_bad_image_exits_1_with_the_path(tmp_path, capsys):
    root = make_folder(tmp_path / "imgs", n_per_class=2, splits=None)
    (root / "owl" / "zero.png").write_bytes(b"")
    status, _, stderr = cli(capsys, "extract", f"folder:{root}", *TINY_ARGS, "--strict")
    assert status == 1 and "owl/zero.png" in stderr and "empty file" in stderr
    _, lenient = _ok(cli(capsys, "extract", f"folder:{root}", *TINY_ARGS))
    assert "1 image(s) could not be read" in lenient and "owl/zero.png" in lenient


def test_help_and_version(capsys):
    assert "extract" in _ok(cli(capsys, "--help"))[0]
    assert _ok(cli(capsys, "--version"))[0].startswith("featx ")
    assert cli(capsys)[0] == 2  # no command: usage


def test_probe_command_on_an_entry_and_on_a_dataset(tmp_path, capsys):
    root = make_folder(tmp_path / "imgs", n_per_class=8)
    stdout, _ = _ok(cli(capsys, "probe", f"folder:{root}", *TINY_ARGS, "--heads", "logreg,knn", "--jobs", "1",
                        "--out", str(tmp_path / "res")))
    assert "best:" in stdout and "advice" in stdout and "test top-1" in stdout
    assert (tmp_path / "res" / "layers.png").is_file()
    key = json.loads((tmp_path / "res" / "results.json").read_text())["entry"]["key"]
    again, _ = _ok(cli(capsys, "probe", key[:12], "--heads", "knn", "--jobs", "1", "--no-plots", "--out",
                       str(tmp_path / "res2")))
    assert "knn" in again and "extracted" not in again  # read from the cache only


BAD_PROBE = [
    (["probe", "digits", "--model", "timm:resnet18", "--weights", "none", "--image-size", "32", "--heads", "svn"],
     2, "Did you mean 'svm'"),
    (["probe", "deadbeef00"], 2, "No cache entry 'deadbeef00'"),
    (["finetune", "/no/such/results"], 2, "'/no/such/results' does not exist and is not a probe result"),
    (["finetune", "digits", "--model", "timm:resnet18", "--weights", "none", "--image-size", "32", "--layer",
      "layer2", "--lr", "0"], 2, "--lr must be a positive number, got 0.0"),
]


@pytest.mark.parametrize("args, code, message", BAD_PROBE, ids=[" ".join(a[:3]) for a, _, _ in BAD_PROBE])
def test_bad_probe_and_finetune_input(capsys, args, code, message):
    status, _, stderr = cli(capsys, *args)
    assert status == code, stderr
    assert message in " ".join(stderr.split())


def test_progress_bars_redraw_rarely_when_written_to_a_log(monkeypatch):
    import io
    import sys

    from featx._progress import LOG_INTERVAL, progress_bar

    monkeypatch.setattr(sys, "stderr", io.StringIO())  # a log file: not a terminal
    bar = progress_bar(total=10, desc="extract", unit="img", file=sys.stderr)
    assert bar.mininterval == LOG_INTERVAL
    bar.close()
    tty = io.StringIO()
    tty.isatty = lambda: True
    monkeypatch.setattr(sys, "stderr", tty)
    bar = progress_bar(total=10, desc="extract", unit="img", file=sys.stderr)
    assert bar.mininterval < 1
    bar.close()


@pytest.mark.slow
@pytest.mark.subprocess
def test_run_extracts_in_a_child_so_the_probe_parent_never_loads_torch(tmp_path):
    """featx run from a process without torch: the extraction runs (and frees its memory) in a
    child; the probe, the report and the result are those of an in-process run on the same entry."""
    options = dict(model="timm:resnet18", weights="none", image_size=32, limit=150, heads="logreg",
                   layers="layer3,layer4", plots=False, cache_dir=str(tmp_path / "cache"), progress=False)
    code = (f"import json, logging, sys, featx\nlogging.getLogger('featx').setLevel('DEBUG')\n"
            f"logging.getLogger('featx').addHandler(logging.StreamHandler())\n"
            f"res = featx.run('digits', out_dir={str(tmp_path / 'child')!r}, **{options!r})\n"
            "print(json.dumps({'torch': 'torch' in sys.modules, 'entry': res.entry['path'], 'rows': res.rows}))")
    res = run_python(code)
    assert res.returncode == 0, res.stderr
    assert "extracting in a child process" in res.stderr
    child = last_json(res.stdout)
    assert child["torch"] is False
    import featx  # this process has torch: the same call extracts here, and finds the child's entry

    here = featx.run("digits", out_dir=tmp_path / "here", **options)
    assert here.entry["path"] == child["entry"]
    assert [(r["layer"], r["test_top1"]) for r in here.rows] == [(r["layer"], r["test_top1"]) for r in child["rows"]]


@pytest.mark.slow
@pytest.mark.subprocess
def test_a_failure_in_the_child_is_raised_here_with_its_type():
    from featx._isolated import call_in_child
    from featx.errors import UsageError
    from featx.probing.heads import resolve_heads

    with pytest.raises(UsageError, match="Unknown head 'lgoreg'"):
        call_in_child(resolve_heads, "lgoreg")
