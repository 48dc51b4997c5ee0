"""The principal a verified token becomes: ComfyUI user ids and role checks."""

from __future__ import annotations

import dataclasses
import re

import pytest

from proxy.principal import Principal, comfy_user_id
from proxy.settings.auth import DEFAULT_ROLES, RoleSettings

ROLES = {
    **DEFAULT_ROLES,
    "ops": RoleSettings(allow_routes=("internal",)),
}


def principal(*roles: str, subject: str = "alice") -> Principal:
    return Principal(subject=subject, roles=frozenset(roles), source="bearer")


@pytest.mark.parametrize(
    "subject",
    [
        "alice",
        "alice@example.com",
        "CN=Alice,O=Example",
        "../../etc/passwd",
        "__system",
        "",
        "ü" * 80,
    ],
)
def test_comfy_user_id_is_safe_and_stable(subject: str) -> None:
    user = comfy_user_id(subject)
    assert re.fullmatch(r"[A-Za-z0-9_-]+", user)
    assert not user.startswith("__")
    assert user == comfy_user_id(subject)
    assert principal(subject=subject).comfy_user == user


def test_comfy_user_id_distinguishes_subjects_that_read_alike() -> None:
    subjects = ["a.b", "a/b", "a b", "a-b", "A-b"]
    assert len({comfy_user_id(s) for s in subjects}) == len(subjects)


def test_comfy_user_id_keeps_a_readable_prefix() -> None:
    assert comfy_user_id("alice@example.com").startswith("alice-example-com-")


def test_admin_and_route_rules() -> None:
    assert principal("admin").is_admin(ROLES)
    assert not principal("user", "viewer").is_admin(ROLES)
    assert principal("admin").may_use("free", ROLES)
    assert principal("ops").may_use("internal", ROLES)
    assert not principal("ops").may_use("free", ROLES)
    assert not principal("user").may_use("internal", ROLES)


def test_roles_not_in_config_grant_nothing() -> None:
    """A role name that is no longer configured (a stale session) is ignored, not a KeyError."""
    ghost = principal("gone", "user")
    assert not ghost.is_admin(ROLES)
    assert not ghost.may_use("internal", ROLES)


def test_principal_is_immutable() -> None:
    p = principal("user")
    with pytest.raises(dataclasses.FrozenInstanceError):
        p.subject = "mallory"  # type: ignore[misc]
    assert p.token_id is None
    assert p.expires_at is None
