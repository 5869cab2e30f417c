"""The units of an extraction: the validated request, the shard plan, and the CPU settings
that extraction and fine-tuning share."""

import dataclasses
import json

import numpy as np
import pytest
import torch

import featx
from featx._runtime import Device, cpu_settings, default_workers, plan_cpu_threads
from featx.backbones.ladder import trace_ladder
from featx.backbones.registry import build_model, describe_model, parse_model
from featx.data import open_dataset
from featx.errors import BadImageError, UsageError
from featx.extraction.plan import ExtractionRequest, ShardPlan, entry_config, plan_shards

from .conftest import TINY, TINY_MODEL, make_folder

CPU = Device(torch.device("cpu"), None)
CUDA = Device(torch.device("cuda"), None)  # only its type is looked at: no GPU needed


def _request(folder, **options) -> ExtractionRequest:
    info = describe_model(parse_model(TINY_MODEL, weights="none"))
    settings = {"layers": "layer3,pre_logits", "pool": "avg", "token_pool": "auto", "dtype": "float16",
                "device": CPU, **options}
    return ExtractionRequest(source=open_dataset(f"folder:{folder}"), info=info,
                             pre=info.preprocessing.override(32), **settings)


# ----------------------------------------------------------------------------- the shard plan


def test_plan_dict_keeps_the_stored_format():
    """plan.json of interrupted runs: a changed dict would discard their shards."""
    plan = ShardPlan.build("k", 100, "float16", 16, None, {"layer3": "avg", "pre_logits": "identity"},
                           {"layer3": 256, "pre_logits": 512})
    assert plan.to_dict() == {
        "key": "k", "n": 100, "batch_size": 16, "shard_rows": 1024, "dtype": "float16",
        "layers": ["layer3", "pre_logits"], "rules": {"layer3": "avg", "pre_logits": "identity"},
    }
    assert list(plan.to_dict()) == ["key", "n", "batch_size", "shard_rows", "dtype", "layers", "rules"]
    assert plan.estimated_bytes == 100 * 768 * 2


@pytest.mark.parametrize("dtype, batch_size, width, shard_rows, expected", [
    ("float32", 8, 64 * 56 * 56, None, 40),  # ~32 MiB of whole batches
    ("float32", 8, 10_000_000, None, 8),  # wider than a shard: one batch per shard
    ("float16", 32, 10, None, 2048),  # narrow: at most 64 batches
    ("float16", 32, 10, 7, 7),  # given: used as is
])
def test_shard_rows_are_whole_batches_of_about_32_mib(dtype, batch_size, width, shard_rows, expected):
    plan = ShardPlan.build("k", 10, dtype, batch_size, shard_rows, {"x": "avg"}, {"x": width})
    assert plan.shard_rows == expected


def test_plan_of_a_traced_model(image_folder):
    request = _request(image_folder)
    net = build_model(request.info, image_size=32)
    todo = trace_ladder(net, 32).select(request.layers, request.model_name)
    plan = plan_shards(request, todo, "abc")
    assert plan.to_dict() == {
        "key": "abc", "n": 36, "batch_size": 32, "shard_rows": 2048, "dtype": "float16",
        "layers": ["layer3", "pre_logits"], "rules": {"layer3": "avg", "pre_logits": "identity"},
    }
    assert [(r.name, r.width, r.pool) for r in plan.records(todo)] == [("layer3", 256, "avg"),
                                                                       ("pre_logits", 512, "identity")]


def test_interrupted_run_stores_the_plan_in_the_same_format(tmp_path, cache_dir):
    """A real run stopped by a bad image in its second shard leaves plan.json as before."""
    root = make_folder(tmp_path / "imgs", n_per_class=4, splits=None, size=32)
    (root / "dog" / "img001.png").write_bytes(b"not an image")  # row 5: shard 1 of 4-row shards
    with pytest.raises(BadImageError):
        featx.extract(f"folder:{root}", layers="layer3", batch_size=2, shard_rows=4, strict=True, dtype="float32",
                      device="cpu", **TINY)
    (partial,) = (cache_dir / ".partial").iterdir()
    assert json.loads((partial / "plan.json").read_text()) == {
        "key": partial.name, "n": 12, "batch_size": 2, "shard_rows": 4, "dtype": "float32",
        "layers": ["layer3"], "rules": {"layer3": "avg"},
    }
    assert sorted(p.name for p in partial.glob("shard-*.npz")) == ["shard-000000.npz"]


# ----------------------------------------------------------------------------- the request


@pytest.mark.parametrize("options, message", [
    ({"dtype": "float64"}, "Unknown dtype 'float64'. Valid: float16, float32."),
    ({"batch_size": 0}, "--batch-size must be a positive integer, got 0."),
    ({"workers": -1}, "--workers must be a non-negative integer, got -1."),
    ({"shard_rows": 2.5}, "shard_rows must be a positive integer, got 2.5."),
    ({"pool": "mean"}, "Unknown pooling 'mean'"),
    ({"token_pool": "max"}, "Unknown token pooling 'max'"),
])
def test_request_refuses_invalid_options(image_folder, options, message):
    with pytest.raises(UsageError) as info:
        _request(image_folder, **options)
    assert message in str(info.value)


def test_request_refuses_an_empty_dataset(tmp_path):
    folder = make_folder(tmp_path / "imgs", n_per_class=1, splits=None)
    empty = open_dataset(f"folder:{folder}").subset(np.array([], dtype=np.int64))
    with pytest.raises(UsageError, match="no samples"):
        dataclasses.replace(_request(folder), source=empty)


def test_options_are_checked_before_the_dataset_is_opened(tmp_path):
    with pytest.raises(UsageError, match="Unknown dtype"):
        featx.extract(f"folder:{tmp_path / 'missing'}", dtype="float64", **TINY)


def test_request_is_frozen_and_names_the_key_document(image_folder):
    request = _request(image_folder, limit=None, seed=3)
    with pytest.raises(dataclasses.FrozenInstanceError):
        request.dtype = "float32"
    assert request.config() == entry_config(request.info, request.pre, "avg", "auto", "float16", CPU,
                                            request.source, None, 3)


# ----------------------------------------------------------------------------- CPU settings


@pytest.mark.parametrize("cores", [1, 2, 3, 4, 6, 8, 16, 64])
@pytest.mark.parametrize("in_memory", [False, True])
def test_cpu_settings_never_oversubscribe(cores, in_memory):
    """Decoding workers never take every core, and the compute threads fit beside them (the
    first worker overlaps the main process's wait for data: measured in benchmarks/)."""
    workers = default_workers(CPU, in_memory, cores)
    threads = plan_cpu_threads(workers, cores)
    assert workers == 0 or workers < cores
    assert 1 <= threads and threads + max(0, workers - 1) <= cores
    if in_memory or cores < 2:
        assert workers == 0 and threads == cores


@pytest.mark.parametrize("cores", [1, 2, 4, 16, 64])
def test_cuda_leaves_a_core_to_the_main_process(cores):
    assert 1 <= default_workers(CUDA, False, cores) <= max(1, min(8, cores - 1))


def test_cpu_settings_set_and_restore_the_thread_pool():
    before = torch.get_num_threads()
    with cpu_settings(CPU, workers=0, cores=1):
        assert torch.get_num_threads() == 1
    assert torch.get_num_threads() == before
    with cpu_settings(CUDA, workers=3, cores=1):
        assert torch.get_num_threads() == before  # the GPU path leaves the CPU pool alone


def test_extraction_and_finetuning_share_one_implementation():
    import featx.extraction.loop as loop
    import featx.finetuning.data as data
    import featx.finetuning.runner as finetune

    assert loop.default_workers is finetune.default_workers is default_workers
    assert loop.cpu_settings is finetune.cpu_settings is cpu_settings
    assert not hasattr(data, "default_workers")
