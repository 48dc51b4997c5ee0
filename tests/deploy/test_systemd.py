"""deploy/systemd/comfygate.service: ``systemd-analyze verify`` and ``security``, and the
directives the single-host deployment relies on."""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

import pytest

from proxy.settings import Settings
from tests.deploy.files import ROOT, SYSTEMD_UNIT, tool

INSTALLED_BINARY = "/opt/comfygate/bin/comfygate"
MAX_EXPOSURE = 2.0
"""``systemd-analyze security`` scores 0 (locked down) to 10 (unprotected); below 2 is "OK"."""


def directives() -> dict[str, list[str]]:
    """``Key -> [values]`` of the unit (a key may repeat, e.g. Environment=)."""
    result: dict[str, list[str]] = {}
    for raw in SYSTEMD_UNIT.read_text(encoding="utf-8").splitlines():
        line = raw.strip()
        if not line or line.startswith(("#", ";", "[")):
            continue
        key, _, value = line.partition("=")
        result.setdefault(key.strip(), []).append(value.strip())
    return result


def local_copy(tmp_path: Path, *, replace: tuple[str, str] | None = None) -> Path:
    """The unit with ExecStart pointing at this checkout's comfygate (verify checks that the
    binary exists and is executable), optionally with one more textual change."""
    binary = ROOT / ".venv" / "bin" / "comfygate"
    if not binary.exists():
        pytest.skip(f"{binary} missing (make install)")
    text = SYSTEMD_UNIT.read_text(encoding="utf-8").replace(INSTALLED_BINARY, str(binary))
    if replace is not None:
        assert replace[0] in text
        text = text.replace(*replace)
    path = tmp_path / "comfygate.service"
    path.write_text(text, encoding="utf-8")
    return path


def verify(unit: Path) -> subprocess.CompletedProcess[str]:
    analyze = tool("systemd-analyze", "apt-get install systemd")
    return subprocess.run(
        [analyze, "verify", str(unit)], capture_output=True, text=True, timeout=60, check=False
    )


def test_systemd_analyze_verify_is_clean(tmp_path: Path) -> None:
    result = verify(local_copy(tmp_path))
    # verify reports unknown keys and bad values on stderr while still exiting 0: both count.
    assert result.returncode == 0, result.stderr
    assert result.stderr.strip() == "", result.stderr


def test_verify_would_catch_a_typo(tmp_path: Path) -> None:
    """The check above is not vacuous: a misspelt value is reported."""
    result = verify(local_copy(tmp_path, replace=("ProtectSystem=strict", "ProtectSystem=strct")))
    assert "strct" in result.stderr, result.stderr


def test_sandbox_exposure_is_low(tmp_path: Path) -> None:
    analyze = tool("systemd-analyze", "apt-get install systemd")
    result = subprocess.run(
        [analyze, "security", "--offline=true", "--no-pager", str(local_copy(tmp_path))],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    match = re.search(r"Overall exposure level for \S+: ([0-9.]+)", result.stdout)
    assert match, result.stdout + result.stderr
    assert float(match.group(1)) <= MAX_EXPOSURE, result.stdout


def test_hardening_and_lifecycle_directives() -> None:
    unit = directives()
    assert unit["ExecStart"] == [f"{INSTALLED_BINARY} serve"]
    # Non-root, no privilege gain, read-only system, explicit writable paths.
    assert unit.get("DynamicUser") == ["yes"] or unit.get("User", ["root"])[0] != "root"
    assert unit["NoNewPrivileges"] == ["yes"]
    assert unit["ProtectSystem"] == ["strict"]
    assert unit["ReadWritePaths"]
    assert unit["CapabilityBoundingSet"] == [""]
    # Secrets from a root-only environment file (optional: "-").
    assert unit["EnvironmentFile"] == ["-/etc/comfygate/comfygate.env"]
    assert unit["Restart"] == ["on-failure"]
    # systemctl reload = SIGHUP = policy reload (proxy.server installs the handler).
    assert unit["ExecReload"] == ["/bin/kill -HUP $MAINPID"]


def test_stop_timeout_outlasts_the_graceful_shutdown() -> None:
    server = Settings().server
    (timeout,) = directives()["TimeoutStopSec"]
    seconds = float(timeout.removesuffix("s"))
    assert seconds > server.drain_seconds + server.shutdown_grace_seconds
