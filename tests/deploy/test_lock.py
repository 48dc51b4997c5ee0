"""requirements/*.txt: the committed lock that every install path uses (``make install``,
``.ci/run``, the Dockerfile, the systemd notes).

The lock must cover pyproject.toml (every direct dependency pinned within its range), pin every
package with hashes, agree with itself (the runtime lock is the dev lock's runtime subset, at the
same versions), and be what this environment was actually installed from.
"""

from __future__ import annotations

import os
import tomllib
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name
from packaging.version import Version

from tests.deploy.files import ROOT

REQUIREMENTS = ROOT / "requirements"
LOCKS = ("dev.txt", "runtime.txt", "build.txt", "oldest.txt")
GATING_TOOLS = ("ruff", "mypy")


@dataclass(frozen=True)
class Pin:
    name: str
    version: str
    requirement: Requirement
    hashes: int


def read_lock(path: Path) -> dict[str, Pin]:
    """The pins of a ``uv pip compile --generate-hashes`` file (continuation lines joined)."""
    logical: list[str] = []
    for line in path.read_text(encoding="utf-8").splitlines():
        stripped = line.split("#", 1)[0].rstrip() if not line.lstrip().startswith("--") else line
        if not stripped.strip():
            continue
        if logical and logical[-1].endswith("\\"):
            logical[-1] = logical[-1][:-1] + " " + stripped.strip()
        else:
            logical.append(stripped.strip())
    pins: dict[str, Pin] = {}
    for entry in logical:
        spec, *options = entry.split(" --hash=")
        requirement = Requirement(spec.strip())
        (specifier,) = requirement.specifier
        assert specifier.operator == "==", f"{path.name}: {entry!r} is not pinned"
        name = canonicalize_name(requirement.name)
        pins[name] = Pin(name, specifier.version, requirement, len(options))
    return pins


def pyproject() -> dict[str, object]:
    with (ROOT / "pyproject.toml").open("rb") as handle:
        return tomllib.load(handle)["project"]  # type: ignore[no-any-return]


def direct(extra: str | None = None) -> list[Requirement]:
    project = pyproject()
    if extra is None:
        return [Requirement(r) for r in project["dependencies"]]  # type: ignore[attr-defined]
    return [Requirement(r) for r in project["optional-dependencies"][extra]]  # type: ignore[index]


@pytest.mark.parametrize("lock", LOCKS)
def test_every_pin_is_exact_and_hashed(lock: str) -> None:
    pins = read_lock(REQUIREMENTS / lock)
    assert pins, lock
    for pin in pins.values():
        assert pin.hashes >= 1, f"{lock}: {pin.name} has no hash"


def test_the_dev_lock_covers_pyproject_within_its_ranges() -> None:
    pins = read_lock(REQUIREMENTS / "dev.txt")
    for requirement in (*direct(), *direct("dev")):
        name = canonicalize_name(requirement.name)
        assert name in pins, f"{requirement} is not in the lock: run make lock"
        assert requirement.specifier.contains(pins[name].version, prereleases=True), (
            f"{name}=={pins[name].version} is outside pyproject's {requirement}: run make lock"
        )


def test_the_runtime_lock_is_the_dev_lock_s_runtime_subset() -> None:
    dev = read_lock(REQUIREMENTS / "dev.txt")
    runtime = read_lock(REQUIREMENTS / "runtime.txt")
    for requirement in direct():
        assert canonicalize_name(requirement.name) in runtime, requirement
    for name, pin in runtime.items():
        assert name in dev, f"{name} is in runtime.txt only"
        assert dev[name].version == pin.version, f"{name}: runtime and dev locks disagree"
    for requirement in direct("dev"):
        assert canonicalize_name(requirement.name) not in runtime or any(
            canonicalize_name(r.name) == canonicalize_name(requirement.name) for r in direct()
        ), f"dev tool {requirement.name} would be installed in production images"


def test_the_oldest_lock_holds_the_lower_bounds() -> None:
    """``make test-oldest`` runs the suite on the lowest versions pyproject admits."""
    oldest = read_lock(REQUIREMENTS / "oldest.txt")
    for requirement in direct():
        name = canonicalize_name(requirement.name)
        lower = [Version(s.version) for s in requirement.specifier if s.operator in (">=", "==")]
        if lower and requirement.marker is None:
            assert Version(oldest[name].version) == lower[0], f"{name}: {oldest[name]} > {lower}"


def test_tools_that_gate_ci_are_pinned_exactly() -> None:
    for requirement in direct("dev"):
        if canonicalize_name(requirement.name) in GATING_TOOLS:
            (specifier,) = requirement.specifier
            assert specifier.operator == "==", f"{requirement}: pin it exactly"


def test_this_environment_was_installed_from_the_lock() -> None:
    """What ``make install`` put in the venv is exactly what dev.txt pins (markers applied);
    ``make test-oldest`` names its own lock in ``COMFYGATE_TEST_LOCK``."""
    lock = os.environ.get("COMFYGATE_TEST_LOCK", "dev.txt")
    for pin in read_lock(REQUIREMENTS / lock).values():
        marker = pin.requirement.marker
        if marker is not None and not marker.evaluate():
            continue
        assert metadata.version(pin.name) == pin.version, f"{pin.name}: not the locked version"
