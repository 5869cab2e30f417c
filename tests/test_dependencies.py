"""Dependency floors: featx must not admit versions with known holes in what it relies on."""

from __future__ import annotations

import sys

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib
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
