"""``PolicyStore``: effective policies per principal, reloads that swap whole or not at all."""

from __future__ import annotations

from pathlib import Path

import pytest

from proxy.policy.loader import PolicyError
from proxy.policy.store import PolicyStore
from proxy.principal import Principal
from proxy.settings.auth import DEFAULT_ROLES
from proxy.settings.policy import PolicySettings


def principal(*roles: str) -> Principal:
    return Principal(subject="alice", roles=frozenset(roles), source="bearer")


@pytest.fixture
def policy_file(tmp_path: Path) -> Path:
    path = tmp_path / "policy.toml"
    path.write_text('[policies.base]\nnodes.allow = ["KSampler"]\n')
    return path


@pytest.fixture
def store(policy_file: Path) -> PolicyStore:
    return PolicyStore(PolicySettings(files=(str(policy_file),)), DEFAULT_ROLES)


def test_role_key_is_sorted_known_roles(store: PolicyStore) -> None:
    assert store.role_key(principal("user", "power")) == "power+user"
    assert store.role_key(principal("user", "no-such-role")) == "user"
    assert store.role_key(principal()) == ""


def test_effective_policy_is_cached_per_combination(store: PolicyStore) -> None:
    one = store.for_principal(principal("user"))
    assert store.for_principal(principal("user")) is one
    assert one.key == "user"
    assert one.version == 1
    assert one.allows_node("KSampler")
    assert not one.allows_node("Other")
    nobody = store.for_principal(principal())
    assert nobody.members == ()
    assert not nobody.allows_node("KSampler")
    admin = store.for_principal(principal("user", "admin"))
    assert admin.unrestricted
    assert admin.allows_node("Other")
    assert admin.allows_model("x")


def test_reload_swaps_the_policy_and_bumps_the_version(
    store: PolicyStore, policy_file: Path
) -> None:
    before = store.for_principal(principal("user"))
    policy_file.write_text('[policies.base]\nnodes.allow = ["Other"]\n')
    assert store.reload() == 2
    after = store.for_principal(principal("user"))
    assert after.version == 2
    assert after.allows_node("Other")
    assert not after.allows_node("KSampler")
    assert before.allows_node("KSampler")  # a request holding the old policy keeps it whole


def test_bad_reload_keeps_the_old_policy(store: PolicyStore, policy_file: Path) -> None:
    policy_file.write_text('[policies.base]\nnodes.allow = "KSampler"\n')
    with pytest.raises(PolicyError) as info:
        store.reload()
    assert info.value.problems == [
        f"{policy_file}: policies.base.nodes.allow: must be a list of non-empty strings"
    ]
    assert store.version == 1
    assert store.for_principal(principal("user")).allows_node("KSampler")


def test_bad_policy_at_startup(tmp_path: Path) -> None:
    with pytest.raises(PolicyError):
        PolicyStore(PolicySettings(files=(str(tmp_path / "missing.toml"),)), DEFAULT_ROLES)


def test_output_counts_from_object_info(store: PolicyStore) -> None:
    assert store.output_counts is None
    store.set_object_info({"KSampler": {"output": ["LATENT"]}, "Odd": {"output": "x"}, "Bad": []})
    assert store.output_counts == {"KSampler": 1}
