"""``comfygate check-config`` validates the workflow policy files as startup does (issue 6):
the same message (file, key, rule, every problem at once) on stderr, exit status 2."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from proxy.cli import main
from proxy.policy.loader import PolicyError
from proxy.policy.store import PolicyStore
from proxy.settings import load_settings

GOOD = """
[policies.base]
nodes.allow = ["EmptyImage", "SaveImage"]

[policies.user]
nodes.allow = ["KSampler"]
[policies.user.bounds]
"*" = ["steps <= 60"]
"""

BAD = """
[policies.base]
nodes.allow = ["EmptyImage"]
colour = "blue"

[policies.user.bounds]
"*" = ["steps <=", "width * height <= 2048 * 2048"]
"""


def config(tmp_path: Path, policy: str, *, enabled: bool = True) -> str:
    policy_file = tmp_path / "policy.toml"
    policy_file.write_text(policy, encoding="utf-8")
    path = tmp_path / "comfygate.toml"
    path.write_text(
        f"[policy]\nenabled = {str(enabled).lower()}\nfiles = [{json.dumps(str(policy_file))}]\n",
        encoding="utf-8",
    )
    return str(path)


@pytest.fixture(autouse=True)
def _no_environment_config(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("COMFYGATE_CONFIG", raising=False)


def test_a_valid_policy_passes(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["check-config", "-c", config(tmp_path, GOOD)]) == 0
    out = capsys.readouterr()
    assert json.loads(out.out)["policy"]["files"] == [str(tmp_path / "policy.toml")]


@pytest.mark.parametrize("enabled", [True, False])
def test_a_bad_policy_fails_like_startup(
    enabled: bool, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = config(tmp_path, BAD, enabled=enabled)
    assert main(["check-config", "-c", path]) == 2
    out = capsys.readouterr()
    assert out.out == ""  # no settings printed for a configuration that would not start
    policy_file = str(tmp_path / "policy.toml")
    assert out.err.startswith("invalid workflow policy:\n  ")
    assert f"{policy_file}: policies.base.colour: unknown key" in out.err
    assert f"{policy_file}: policies.user.bounds.\"*\"[0]: 'steps <='" in out.err  # the rule
    # Startup (the app builds the policy store, enabled or not) refuses with the same text.
    settings = load_settings(path)
    with pytest.raises(PolicyError) as info:
        PolicyStore(settings.policy, settings.roles)
    assert out.err == f"{info.value}\n"


def test_a_missing_policy_file_fails(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "comfygate.toml"
    path.write_text('[policy]\nfiles = ["/nonexistent/policy.toml"]\n', encoding="utf-8")
    assert main(["check-config", "-c", str(path)]) == 2
    assert "/nonexistent/policy.toml" in capsys.readouterr().err
