"""``[roles.x]`` adds to or overrides the built-in roles (issue 15): a configuration defining only
``[roles.operator]`` (docs/identity.md's own example) used to drop viewer, user, power and admin
without a word. Replacing them all is explicit (``auth.builtin_roles = false``), and
``check-config`` prints the effective roles."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from proxy.cli import main
from proxy.errors import SettingsError
from proxy.settings import Settings, load_settings
from proxy.settings.auth import DEFAULT_ROLES, RoleSettings
from proxy.settings.limits import Limit

BUILTIN = ["viewer", "user", "power", "admin"]


@pytest.fixture(autouse=True)
def _no_environment_config(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("COMFYGATE_CONFIG", raising=False)


def from_toml(tmp_path: Path, text: str, environ: dict[str, str] | None = None) -> Settings:
    path = tmp_path / "c.toml"
    path.write_text(text, encoding="utf-8")
    return load_settings(path, environ=environ or {})


def test_a_configured_role_is_added_to_the_builtin_ones(tmp_path: Path) -> None:
    settings = from_toml(tmp_path, '[roles.operator]\nallow_routes = ["free", "internal"]\n')
    assert list(settings.roles) == [*BUILTIN, "operator"]
    assert settings.roles["admin"] == DEFAULT_ROLES["admin"]  # admin is still an admin
    assert settings.roles["operator"] == RoleSettings(allow_routes=("free", "internal"))


def test_a_builtin_role_is_overridden_key_by_key(tmp_path: Path) -> None:
    settings = from_toml(
        tmp_path,
        """
[roles.admin]
queue_quota = 5
[roles.power.rate_limits]
submit = { rate = "10/minute", burst = 2 }
""",
    )
    admin = settings.roles["admin"]
    assert (admin.admin, admin.priority, admin.queue_quota) == (True, True, 5)
    assert admin.rate_limits == DEFAULT_ROLES["admin"].rate_limits
    power = settings.roles["power"].rate_limits
    assert power["submit"] == Limit(rate="10/minute", burst=2)
    assert power["read"] == DEFAULT_ROLES["power"].rate_limits["read"]  # the other classes stay
    assert settings.roles["power"].queue_quota == 50


def test_replacing_the_builtin_roles_is_explicit(tmp_path: Path) -> None:
    text = "[auth]\nbuiltin_roles = false\n[roles.operator]\nadmin = true\n"
    settings = from_toml(tmp_path, text)
    assert list(settings.roles) == ["operator"]
    # The environment can say it too (values arrive as strings).
    env = {"COMFYGATE_AUTH__BUILTIN_ROLES": "false"}
    settings = from_toml(tmp_path, "[roles.operator]\nadmin = true\n", environ=env)
    assert list(settings.roles) == ["operator"]


def test_references_to_builtin_roles_resolve(tmp_path: Path) -> None:
    """role_map may name admin while the file only defines another role."""
    jwt = '[auth.jwt]\nrole_map = { "ops" = "admin" }\n[roles.operator]\nsubmit = false\n'
    assert from_toml(tmp_path, jwt).auth.jwt.role_map == {"ops": "admin"}
    with pytest.raises(SettingsError, match=r"auth.jwt.role_map.ops: 'admin' is not a defined"):
        from_toml(tmp_path, "[auth]\nbuiltin_roles = false\n" + jwt)


def test_bad_role_keys_are_still_reported(tmp_path: Path) -> None:
    with pytest.raises(SettingsError, match=r"roles\.admin\.colour: unknown key"):
        from_toml(tmp_path, '[roles.admin]\ncolour = "red"\n')


@pytest.mark.parametrize(
    ("roles", "expected"),
    [
        ({"vip": {"priority": True}}, [*BUILTIN, "vip"]),
        ({"vip": RoleSettings(priority=True)}, [*BUILTIN, "vip"]),
    ],
)
def test_overrides_as_data_or_objects(roles: dict[str, Any], expected: list[str]) -> None:
    settings = load_settings(None, overrides={"roles": roles}, environ={})
    assert list(settings.roles) == expected
    assert settings.roles["vip"].priority


def test_check_config_prints_the_effective_roles(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = tmp_path / "c.toml"
    path.write_text(
        '[roles.admin]\nqueue_quota = 5\n[roles.operator]\nallow_routes = ["free"]\n',
        encoding="utf-8",
    )
    assert main(["check-config", "-c", str(path)]) == 0
    out = capsys.readouterr()
    assert list(json.loads(out.out)["roles"]) == [*BUILTIN, "operator"]
    lines = out.err.split("effective roles (built-in + configured):\n", 1)[1].splitlines()
    assert lines[:5] == [
        "  viewer    built-in  (read-only)",
        "  user      built-in",
        "  power     built-in  (queue_quota=50)",
        "  admin     built-in, overridden  (admin; queue_quota=5)",
        "  operator  configured  (allow_routes=free)",
    ]

    path.write_text("[auth]\nbuiltin_roles = false\n[roles.user]\n", encoding="utf-8")
    assert main(["check-config", "-c", str(path)]) == 0
    err = capsys.readouterr().err
    assert "effective roles (configured only: auth.builtin_roles = false):" in err
    assert "no admin role: nobody can use the admin-only routes" in err
