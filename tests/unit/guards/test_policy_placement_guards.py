"""Unit tests of the workflow policy guard (``proxy.policy.guard``) and the placement guard
(``proxy.multi.placement_guard``): their decisions made before any body is read."""

from __future__ import annotations

from pathlib import Path

import pytest
from prometheus_client import CollectorRegistry

from proxy.multi.placement_guard import PlacementGuard
from proxy.observability.metrics import Metrics
from proxy.policy.guard import PolicyGuard
from proxy.policy.refusal import PolicyRejected
from proxy.policy.store import PolicyStore
from proxy.upstream.pool import UpstreamPool
from tests.unit.guards.support import principal, request, settings

POLICY_TEXT = """
[policies.base]
nodes.allow = ["SaveImage"]
models.allow = ["*"]
limits = { max_body_mb = 1 }
"""


def policy_guard(tmp_path: Path) -> tuple[PolicyGuard, Metrics]:
    path = tmp_path / "policy.toml"
    path.write_text(POLICY_TEXT)
    configured = settings(policy={"files": [str(path)]})
    metrics = Metrics(CollectorRegistry())
    store = PolicyStore(configured.policy, configured.roles)
    return PolicyGuard(store, metrics, isolation=True), metrics


async def test_policy_refuses_a_body_over_the_roles_size_unread(tmp_path: Path) -> None:
    guard, metrics = policy_guard(tmp_path)
    big = str(2 * 1024 * 1024)
    req, ctx = request(
        "POST", "/prompt", rule="prompt", who=principal("alice"), headers={"Content-Length": big}
    )
    with pytest.raises(PolicyRejected):
        await guard.check(req, ctx)
    assert ctx.body is None  # refused on its announced size alone
    refused = metrics.registry.get_sample_value(
        "comfygate_policy_refusals_total", {"reason": "body_too_large"}
    )
    assert refused == 1


@pytest.mark.parametrize(
    ("method", "who"), [("GET", principal("alice")), ("POST", principal("root", "admin"))]
)
async def test_policy_passes_reads_and_unrestricted_roles(
    tmp_path: Path, method: str, who: object
) -> None:
    guard, _ = policy_guard(tmp_path)
    big = str(2 * 1024 * 1024)
    req, ctx = request(method, "/prompt", rule="prompt", who=who, headers={"Content-Length": big})  # type: ignore[arg-type]
    await guard.check(req, ctx)
    assert ctx.body is None


async def test_placement_leaves_a_single_instance_alone() -> None:
    configured = settings()
    guard = PlacementGuard(
        UpstreamPool(configured.upstream),
        Metrics(CollectorRegistry()),
        configured.upstream.placement,
    )
    req, ctx = request("POST", "/prompt", rule="prompt", who=principal("alice"), body=b"{}")
    await guard.check(req, ctx)
    assert ctx.target is None
    assert ctx.failover is None
