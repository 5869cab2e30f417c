"""The command line's options: one set per stage, the same on every command that runs the stage."""

import json
from pathlib import Path

import pytest
import typer
from typer.testing import CliRunner

from featx.cli import app
from featx.errors import UsageError

from .conftest import make_folder

runner = CliRunner()
TINY = ["--model", "timm:resnet18", "--weights", "none", "--image-size", "32", "--no-progress"]


def _commands(group: typer.Typer = app, prefix: str = "") -> dict:
    click_group = typer.main.get_command(group)
    found = {}
    for name, command in click_group.commands.items():
        if hasattr(command, "commands"):
            found.update({f"{name} {sub}": c for sub, c in command.commands.items()})
        else:
            found[prefix + name] = command
    return found


def _options(command) -> dict:
    return {p.name: p for p in command.params if not p.hidden and p.param_type_name == "option"}


def _ok(result):
    assert result.exit_code == 0, (result.output, result.exception)
    return result


def test_every_command_that_extracts_takes_every_extract_option():
    commands = _commands()
    extract = _options(commands["extract"])
    for name in ("probe", "run", "compare"):
        options = _options(commands[name])
        missing = set(extract) - set(options)
        assert not missing, f"featx {name} lacks {sorted(missing)}"
        for option, spec in extract.items():  # the same spelling, not only the same keyword
            assert set(options[option].opts) == set(spec.opts), (name, option)


def test_commands_that_probe_share_the_probe_options():
    commands = _commands()
    probe = _options(commands["probe"])
    for name in ("run", "compare"):
        assert set(probe) <= set(_options(commands[name])), name


def test_global_options_after_every_command_name():
    for name, command in _commands().items():
        assert {"cache_dir", "verbose", "quiet", "debug"} <= set(_options(command)), name


def test_cache_dir_is_read_before_and_after_the_command(tmp_path):
    before, after = tmp_path / "before", tmp_path / "after"
    shown = json.loads(_ok(runner.invoke(app, ["cache", "ls", "--json", "--cache-dir", str(after)])).stdout)
    assert shown["root"] == str(after)
    shown = json.loads(_ok(runner.invoke(app, ["--cache-dir", str(before), "cache", "ls", "--json"])).stdout)
    assert shown["root"] == str(before)
    shown = json.loads(_ok(runner.invoke(app, ["--cache-dir", str(before), "cache", "ls", "--json",
                                               "--cache-dir", str(after)])).stdout)
    assert shown["root"] == str(after)  # the one nearer the command wins


def test_short_help_and_completion():
    assert "Usage: featx" in _ok(runner.invoke(app, ["-h"])).stdout
    assert "--selection-rows" in _ok(runner.invoke(app, ["run", "-h"])).stdout
    assert "--install-completion" in _ok(runner.invoke(app, ["--help"])).stdout
    assert "gc" in _ok(runner.invoke(app, ["cache", "-h"])).stdout
    assert "--dry-run" in _ok(runner.invoke(app, ["cache", "gc", "-h"])).stdout


def test_run_and_extract_defaults_differ_and_are_documented():
    commands = _commands()
    run, extract = _options(commands["run"]), _options(commands["extract"])
    assert run["image_size"].default == 96 and extract["image_size"].default is None
    assert run["pool"].default == "grid2" and extract["pool"].default == "avg"
    assert _options(commands["probe"])["heads"].default == "logreg,linsvm,knn,mlp,svm"
    assert run["heads"].default == "logreg,knn,mlp"


def test_models_json():
    rows = json.loads(_ok(runner.invoke(app, ["models", "*lite0*", "--json"])).stdout)
    assert {"model": "efficientnet_lite0", "weights": rows[0]["weights"]} in rows


@pytest.mark.slow
def test_extract_and_probe_json_carry_only_json(tmp_path):
    folder = make_folder(tmp_path / "imgs", n_per_class=8, splits=("train", "test"))
    cache = tmp_path / "c"
    result = _ok(runner.invoke(app, ["extract", f"folder:{folder}", *TINY, "--layers", "layer3,pre_logits",
                                     "--json", "--cache-dir", str(cache)]))
    entry = json.loads(result.stdout)  # nothing but the JSON document on stdout
    assert entry["run"]["forward_pass"] and entry["samples"] == 48
    assert [layer["name"] for layer in entry["layers"]] == ["layer3", "pre_logits"]
    assert "featx extract" in result.stderr and "image_size=32" in result.stderr  # the effective settings

    out = tmp_path / "res"
    stem = Path(entry["path"]).stem  # the file name without .h5 names the entry, not a dataset
    result = _ok(runner.invoke(app, ["probe", stem, "--heads", "logreg", "--json", "--out", str(out),
                                     "--no-plots", "--cache-dir", str(cache), "--no-progress"]))
    probed = json.loads(result.stdout)
    assert probed == json.loads((out / "results.json").read_text())
    assert {row["layer"] for row in probed["rows"]} == {"layer3", "pre_logits"}


@pytest.mark.slow
def test_run_takes_arch_for_a_checkpoint_file(tmp_path):
    """``featx run --model file:PATH --arch NAME`` used to fail with "No such option: --arch"."""
    import timm
    import torch

    weights = tmp_path / "r18.pth"
    torch.save(timm.create_model("resnet18", pretrained=False).state_dict(), weights)
    folder = make_folder(tmp_path / "imgs", n_per_class=8, splits=("train", "test"))
    out = tmp_path / "res"
    result = _ok(runner.invoke(app, ["run", f"folder:{folder}", "--model", f"file:{weights}", "--arch",
                                     "timm:resnet18", "--image-size", "32", "--layers", "pre_logits", "--heads",
                                     "logreg", "--batch-size", "16", "--workers", "0", "--precision", "float32",
                                     "--out", str(out), "--no-plots", "--no-progress", "--json",
                                     "--cache-dir", str(tmp_path / "c")]))
    results = json.loads(result.stdout)
    import hashlib

    digest = hashlib.sha256(weights.read_bytes()).hexdigest()
    assert results["entry"]["config"]["model"]["weights"] == {"digest": f"sha256:{digest}", "kind": "checkpoint"}
    assert [r["layer"] for r in results["rows"]] == ["pre_logits"]


@pytest.mark.parametrize("command", ["run", "probe", "compare"])
@pytest.mark.parametrize("option, value, message", [
    ("--head-precision", "bf16", "Unknown head precision 'bf16'. Valid: auto, float32"),
    ("--backend", "threads", "Unknown backend 'threads'. Valid: auto, loky, threading, dask"),
])
def test_bad_probe_options_are_refused_before_any_extraction(tmp_path, command, option, value, message):
    args = [command, "digits", option, value, "--cache-dir", str(tmp_path / "cache"), "--no-progress"]
    if command == "compare":
        args[2:2] = ["--model", "efficientnet_lite0"]
    result = runner.invoke(app, args)
    assert isinstance(result.exception, UsageError) and result.exception.exit_code == 2  # featx's main prints it
    assert message in str(result.exception)
    assert not (tmp_path / "cache").exists() or not list((tmp_path / "cache").glob("*.h5"))  # nothing extracted
