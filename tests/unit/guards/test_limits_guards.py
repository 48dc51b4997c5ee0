"""Unit tests of the rate-limit and queue-quota guards (``proxy.limits.guard``,
``proxy.limits.quota.guard``), on the in-memory limiter and quota store."""

from __future__ import annotations

import pytest
from prometheus_client import CollectorRegistry

from proxy.errors import RateLimited
from proxy.limits.enforce import RateLimits
from proxy.limits.guard import RateLimitGuard
from proxy.limits.limiter import MemoryLimiter
from proxy.limits.quota.guard import QueueQuotaGuard, SocketQuotaGuard
from proxy.limits.quota.model import MemoryQuotaStore
from proxy.limits.quota.reconciler import QuotaEventObserver
from proxy.limits.quota.service import QueueQuota
from proxy.observability.metrics import Metrics
from proxy.upstream.pool import UpstreamPool
from tests.unit.guards.support import principal, request, rule_named, settings

LIMITED = settings(
    rate_limits={
        "enabled": True,
        "queue_quota": 1,
        "default": {"read": {"rate": "1/minute", "burst": 1}},
    }
)
USER = principal("alice", "user")


def limits() -> RateLimits:
    metrics = Metrics(CollectorRegistry())
    return RateLimits(LIMITED.rate_limits, LIMITED.roles, MemoryLimiter(), metrics)


def quota() -> QueueQuota:
    return QueueQuota(LIMITED, MemoryQuotaStore(60), Metrics(CollectorRegistry()))


async def test_rate_limit_spends_per_user_then_refuses() -> None:
    guard = RateLimitGuard(rule_named("history"), limits())
    req, ctx = request("GET", "/history", rule="history", who=USER)
    await guard.check(req, ctx)
    req, ctx = request("GET", "/history", rule="history", who=principal("alice", "user"))
    with pytest.raises(RateLimited):
        await guard.check(req, ctx)
    # Another user has an allowance of their own.
    req, ctx = request("GET", "/history", rule="history", who=principal("bob", "user"))
    await guard.check(req, ctx)


async def test_rate_limit_keys_anonymous_callers_by_address() -> None:
    guard = RateLimitGuard(rule_named("queue"), limits())
    anonymous = principal("anonymous", "user", source="anonymous")
    for address, passes in (("10.0.0.1", True), ("10.0.0.2", True), ("10.0.0.1", False)):
        req, ctx = request("GET", "/queue", rule="queue", who=anonymous)
        ctx.client_ip = address
        if passes:
            await guard.check(req, ctx)
        else:
            with pytest.raises(RateLimited):
                await guard.check(req, ctx)


async def test_socket_quota_observer_only_on_upgrades_of_counted_users() -> None:
    guard = SocketQuotaGuard(quota())
    req, ctx = request("GET", "/ws", rule="ws", who=USER, headers={"Upgrade": "websocket"})
    await guard.check(req, ctx)
    assert [type(f) for f in ctx.frame_filters] == [QuotaEventObserver]
    req, ctx = request("GET", "/ws", rule="ws", who=USER)
    await guard.check(req, ctx)
    assert ctx.frame_filters == []


async def test_prompt_quota_leaves_reads_and_uncounted_callers_alone() -> None:
    guard = QueueQuotaGuard(quota(), UpstreamPool(LIMITED.upstream))
    req, ctx = request("GET", "/prompt", rule="prompt", who=USER)
    await guard.check(req, ctx)  # a read: nothing counted, the body never read
    admin = principal("root", "admin")  # queue_quota 0: not counted
    req, ctx = request("POST", "/prompt", rule="prompt", who=admin, body=b"{}")
    await guard.check(req, ctx)
    assert ctx.response_filters == []
