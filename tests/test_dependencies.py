"""Dependencies: floors without known holes, and featx's own map (what may import what).

The map: the cache, probing and reporting never import torch or the backbones (a probe
worker and ``featx cache`` start without a deep-learning stack), and featx has no import
cycles, counting imports deferred into functions.
"""

from __future__ import annotations

import ast
import json
import os
import subprocess
import sys

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib
import pytest
from packaging.requirements import Requirement
from packaging.version import Version

from .conftest import REPO

#: package -> the first release without the hole featx would otherwise be exposed to
FLOORS = {
    "torch": Version("2.6"),  # torch.load(weights_only=True) could be bypassed before 2.6
    "pillow": Version("10.3"),  # the libwebp heap overflow is fixed in the wheels from 10.3
}


def _requirements() -> dict[str, Requirement]:
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    reqs = [Requirement(r) for r in project["dependencies"]]
    return {r.name.lower(): r for r in reqs}


def test_floors_exclude_known_holes():
    reqs = _requirements()
    for name, safe in FLOORS.items():
        spec = reqs[name].specifier
        below = Version(f"{safe.major}.{safe.minor - 1}") if safe.minor else Version(f"{safe.major - 1}.99")
        assert not spec.contains(below, prereleases=True), f"{name}{spec} admits {below}"
        assert spec.contains(safe, prereleases=True) or any(spec.contains(Version(f"{safe}.{p}")) for p in range(5))


def test_installed_versions_meet_floors():
    from importlib.metadata import version

    for name, safe in FLOORS.items():
        assert Version(version(name)) >= safe, f"installed {name} {version(name)} is older than {safe}"


# ------------------------------------------------------------------ the dependency map

HEAVY = ("torch", "timm", "torchvision")
#: the parts that read and report on features: usable without a deep-learning stack
TORCH_FREE = ("featx/cache", "featx/probing", "featx/report")
#: the probe's device engines: torch on first use (a k-NN search, a GPU fit), never at import,
#: and never the backbones
DEVICE_ENGINES = ("featx/probing/engines.py", "featx/probing/knn.py", "featx/probing/mlp.py")


def _modules(root) -> dict[str, tuple]:
    """featx's modules: dotted name -> (path, is_package)."""
    out = {}
    for path in sorted((root / "featx").rglob("*.py")):
        parts = list(path.relative_to(root).with_suffix("").parts)
        is_package = parts[-1] == "__init__"
        out[".".join(parts[:-1] if is_package else parts)] = (path, is_package)
    return out


def _import_nodes(tree: ast.Module, deferred: bool):
    """Import statements run when the module is imported; with ``deferred``, also those inside functions."""
    found = []

    def visit(nodes):
        for node in nodes:
            if isinstance(node, (ast.Import, ast.ImportFrom)):
                found.append(node)
            elif isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda)) and not deferred:
                continue
            elif isinstance(node, ast.If) and isinstance(node.test, ast.Name) and node.test.id == "TYPE_CHECKING":
                continue  # annotations only, never run
            else:
                visit(ast.iter_child_nodes(node))

    visit(tree.body)
    return found


def _targets(node, name: str, is_package: bool, modules: dict) -> list[str]:
    """Absolute names a statement imports (``from . import x`` resolved to the module ``x`` when it is one)."""
    if isinstance(node, ast.Import):
        return [alias.name for alias in node.names]
    base = node.module or ""
    if node.level:
        package = name.split(".") if is_package else name.split(".")[:-1]
        package = package[:len(package) - (node.level - 1)]
        base = ".".join(package + ([node.module] if node.module else []))
    return [f"{base}.{a.name}" if f"{base}.{a.name}" in modules else base for a in node.names]


def import_graph(root, deferred: bool) -> dict[str, set[str]]:
    """featx module -> featx modules its imports execute.

    Importing ``a.b.c`` from outside ``a.b`` also runs ``a/b/__init__.py``, so that package is an
    edge too (``report -> probing.linear_head`` runs ``probing/__init__``).
    """
    modules = _modules(root)
    graph = {}
    for name, (path, is_package) in modules.items():
        own = name if is_package else name.rpartition(".")[0]
        edges = set()
        for node in _import_nodes(ast.parse(path.read_text()), deferred):
            for target in _targets(node, name, is_package, modules):
                parts = target.split(".")
                for i in range(2, len(parts) + 1):
                    step = ".".join(parts[:i])
                    inside = own == step or own.startswith(step + ".")
                    if step in modules and step != name and (i == len(parts) or not inside):
                        edges.add(step)
        graph[name] = edges
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    state, stack = {}, []

    def visit(node):
        state[node] = "open"
        stack.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == "open":
                return stack[stack.index(nxt):] + [nxt]
            if nxt not in state and (cycle := visit(nxt)):
                return cycle
        stack.pop()
        state[node] = "done"
        return None

    for node in sorted(graph):
        if node not in state and (cycle := visit(node)):
            return cycle
    return None


@pytest.mark.parametrize("deferred", [False, True], ids=["module-level", "with-deferred-imports"])
def test_no_import_cycles(deferred):
    """A cycle broken only by importing inside a function is still two parts that need each other
    (``finetuned:`` models: registry -> fine-tuning export -> registry)."""
    cycle = find_cycle(import_graph(REPO, deferred))
    assert cycle is None, "import cycle: " + " -> ".join(cycle)


def test_cache_probing_report_never_import_backbones_or_torch():
    """Not even inside a function: reading, probing and reporting features need no network.
    The probe's device engines alone may import torch, inside the functions that compute."""
    modules = _modules(REPO)
    offenders = []
    for name, (path, is_package) in modules.items():
        relative = str(path.relative_to(REPO))
        if not relative.startswith(TORCH_FREE):
            continue
        engine = relative in DEVICE_ENGINES
        for node in _import_nodes(ast.parse(path.read_text()), deferred=True):
            for target in _targets(node, name, is_package, modules):
                heavy = target.split(".")[0] in HEAVY and not (engine and node.col_offset > 0)
                if heavy or target.startswith("featx.backbones"):
                    offenders.append(f"{path.relative_to(REPO)}:{node.lineno} imports {target}")
    assert not offenders, "\n".join(offenders)


def _fresh_python(code: str, **env) -> dict:
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                          env={**os.environ, "PYTHONPATH": str(REPO), **env}, cwd=REPO)
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout.strip().splitlines()[-1])


@pytest.mark.slow
@pytest.mark.subprocess
def test_storage_probing_reporting_load_without_torch():
    """What a probe worker (loky) and ``featx cache`` import: none of torch, timm, torchvision."""
    loaded = _fresh_python(
        "import json, sys\n"
        "import featx.cache, featx.cache.store, featx.cache.entry, featx.probing, featx.probing.fit\n"
        "import featx.probing.engines, featx.probing.knn, featx.probing.mlp\n"
        "import featx.report, featx.report.outputs, featx.report.advice, featx.report.plots\n"
        "import featx.cli, featx.data\n"
        f"print(json.dumps([m for m in {HEAVY!r} if m in sys.modules]))"
    )
    assert loaded == []


@pytest.mark.slow
@pytest.mark.subprocess
def test_probe_of_a_cache_entry_loads_no_torch_on_a_cpu_machine(tmp_path):
    """``featx probe ENTRY`` reads features only: on a machine without a GPU driver its process
    never imports torch (its CUDA libraries alone map about 600 MB), not even for the k-NN search."""
    import featx
    from featx.probing.engines import GPU_DRIVER_PATHS

    from .conftest import TINY, make_folder

    if any(os.path.exists(p) for p in GPU_DRIVER_PATHS):
        pytest.skip("a GPU driver is present: device auto asks torch")
    images = make_folder(tmp_path / "imgs", n_per_class=20, classes=("a", "b", "c"))
    path = featx.extract(f"folder:{images}", layers="pre_logits", cache_dir=tmp_path / "cache", **TINY).path
    code = (
        "import json, sys\n"
        "from featx.cli import app\n"
        "try:\n"
        f"    app(['probe', {str(path)!r}, '--heads', 'logreg,knn', '--jobs', '1', '--no-plots', '--out',"
        f" {str(tmp_path / 'out')!r}], standalone_mode=False)\n"
        "except SystemExit as exc:\n"
        "    assert not exc.code, exc.code\n"
        f"print(json.dumps([m for m in {HEAVY!r} if m in sys.modules]))"
    )
    assert _fresh_python(code) == []
    assert (tmp_path / "out" / "results.json").is_file()


def test_cache_commands_do_not_load_torch(tmp_path):
    """``featx cache ls`` and ``cache gc --dry-run`` run the real command, then look at what it loaded."""
    code = (
        "import json, sys\n"
        "from featx.cli import app\n"
        "for args in (['cache', 'ls'], ['cache', 'gc', '--dry-run']):\n"
        "    try:\n"
        "        app(args, standalone_mode=False)\n"
        "    except SystemExit as exc:\n"
        "        assert not exc.code, exc.code\n"
        f"print(json.dumps([m for m in {HEAVY!r} if m in sys.modules]))"
    )
    assert _fresh_python(code, FEATX_CACHE_DIR=str(tmp_path / "cache")) == []


# ------------------------------------------------------------------ one layer record


def test_one_layer_record_for_ladder_entry_and_rows():
    """The ladder's layer, the stored layer and the CLI row are one record; the ladder's JSON is unchanged."""
    from featx.cache.entry import FeatureEntry
    from featx.layer import Ladder, Layer

    assert FeatureEntry.layer.__annotations__["return"] in ("Layer", Layer)
    layer = Layer(name="blocks.3", index=3, depth=0.5, raw_shape=(197, 192), kind="tokens", module="blocks.3",
                  prefix_tokens=1, has_cls=True, order=7)
    assert set(layer.to_dict()) == {"name", "index", "depth", "raw_shape", "kind", "module", "hook", "order",
                                    "prefix_tokens", "has_cls", "aliases"}
    stored = Layer.from_attrs(layer.name, layer.pooled("avg", "cls+mean").to_attrs(), "float16")
    assert (stored.pool, stored.width, stored.dtype, stored.order) == ("cls+mean", 384, "float16", 7)
    assert Layer.from_dict(stored.to_dict()) == stored
    ladder = Ladder([layer], ["blocks.3"], 224)
    assert Ladder.from_dict(json.loads(json.dumps(ladder.to_dict()))).layers == [layer]


# ------------------------------------------------------------------ tracing errors keep their cause


def _failing_net(exc):
    """A network whose forward pass runs a layer, then fails with ``exc``."""
    from torch import nn

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(3, 4, 3)

        def forward(self, x):
            self.conv(x)
            raise exc

    return Net()


@pytest.mark.parametrize("exc", [ZeroDivisionError("a bug in the model"), MemoryError(),
                                 RuntimeError("CUDA out of memory. Tried to allocate 2.00 GiB"),
                                 RuntimeError("expected scalar type Float but found Double")],
                         ids=["bug", "host-oom", "device-oom", "dtype-bug"])
def test_trace_failure_that_is_not_the_users_keeps_its_type(exc):
    from featx.backbones.ladder import trace_ladder
    from featx.errors import UsageError

    with pytest.raises(type(exc)) as caught:
        trace_ladder(_failing_net(exc), 32)
    assert not isinstance(caught.value, UsageError)
    assert caught.value is exc


def test_trace_rejecting_the_input_size_is_a_usage_error_with_its_cause():
    from torch import nn

    from featx.backbones.ladder import trace_ladder
    from featx.errors import UsageError

    net = nn.Sequential(nn.Conv2d(3, 4, 3), nn.Flatten(), nn.Linear(4 * 30 * 30, 2))  # built for 32x32
    assert [layer.name for layer in trace_ladder(net, 32).layers]
    with pytest.raises(UsageError, match="does not accept 48x48 inputs.*--image-size") as caught:
        trace_ladder(net, 48)
    assert caught.value.exit_code == 2
    assert isinstance(caught.value.__cause__, RuntimeError)
