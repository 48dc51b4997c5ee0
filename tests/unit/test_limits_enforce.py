"""Limit resolution per principal and the outcome of a check: allowed, 429, fail modes."""

from __future__ import annotations

from typing import Any

import pytest
from prometheus_client import CollectorRegistry

from proxy.errors import RateLimited, ServiceUnavailable
from proxy.limits.enforce import RateLimits, limit_key, most_generous
from proxy.limits.gcra import Decision
from proxy.limits.limiter import LimiterUnavailable, MemoryLimiter
from proxy.observability.metrics import Metrics
from proxy.settings.auth import DEFAULT_ROLES, RoleSettings
from proxy.settings.limits import Limit, RateLimitSettings


class Clock:
    now = 50.0

    def __call__(self) -> float:
        return self.now


class DownLimiter:
    """A limiter whose store is unreachable (what RedisLimiter raises when Redis fails)."""

    degraded = True

    def __init__(self) -> None:
        self.calls = 0

    async def check(self, key: str, emission: int, burst: int) -> Decision:
        self.calls += 1
        raise LimiterUnavailable("connection", 2.5)


def decisions(metrics: Metrics, route_class: str, outcome: str) -> float:
    value = metrics.registry.get_sample_value(
        "comfygate_ratelimit_decisions_total", {"route_class": route_class, "outcome": outcome}
    )
    return value or 0.0


def make(
    limiter: Any = None,
    roles: dict[str, RoleSettings] | None = None,
    metrics: Metrics | None = None,
    **settings: Any,
) -> RateLimits:
    return RateLimits(
        RateLimitSettings(**settings),
        DEFAULT_ROLES if roles is None else roles,
        limiter if limiter is not None else MemoryLimiter(Clock()),
        metrics or Metrics(CollectorRegistry()),
    )


def test_most_generous_prefers_unlimited_then_rate_then_burst() -> None:
    slow_big = Limit(rate="1/second", burst=100)
    fast_small = Limit(rate="10/second", burst=1)
    fast_big = Limit(rate="600/minute", burst=5)
    assert most_generous([slow_big, fast_small]) is fast_small
    assert most_generous([fast_small, fast_big]) is fast_big  # same rate: larger burst
    assert most_generous([fast_big, Limit(rate="unlimited")]).unlimited


def test_limit_per_principal_roles() -> None:
    limits = make()
    assert limits.limit_for(frozenset({"user"}), "submit").limit == Limit(rate="5/second", burst=20)
    power = limits.limit_for(frozenset({"user", "power"}), "submit")
    assert power.limit == Limit(rate="10/second", burst=50)
    # power sets no view limit of its own: the default applies.
    assert limits.limit_for(frozenset({"power"}), "view").limit == Limit(
        rate="50/second", burst=200
    )
    assert limits.limit_for(frozenset({"user", "admin"}), "read").unlimited
    # Unknown roles (or none): the default.
    assert (
        limits.limit_for(frozenset({"ghost"}), "read").limit == RateLimitSettings().default["read"]
    )
    assert limits.limit_for(frozenset(), "login").limit == Limit(rate="10/minute", burst=5)


def test_keys_are_one_cluster_slot_per_allowance() -> None:
    assert limit_key("submit", "u:alice-123") == "comfygate:rl:{submit:u:alice-123}"


async def test_allowed_then_limited_with_headers_and_metrics() -> None:
    metrics = Metrics(CollectorRegistry())
    limits = make(metrics=metrics, default={"submit": {"rate": "1/minute", "burst": 2}})
    limit = limits.limit_for(frozenset({"user"}), "submit")
    headers: list[tuple[str, str]] = []
    await limits.spend(limit, "u:a", headers)
    assert dict(headers)["RateLimit"] == '"submit";r=1;t=60'
    await limits.spend(limit, "u:a", [])
    refused: list[tuple[str, str]] = []
    with pytest.raises(RateLimited) as info:
        await limits.spend(limit, "u:a", refused)
    exc = info.value
    assert exc.status == 429
    assert exc.retry_after == 60
    assert exc.headers["Retry-After"] == "60"
    assert exc.fields == {"retry_after": 60}
    assert "Try again in 60 seconds" in exc.message
    assert dict(refused)["RateLimit"] == '"submit";r=0;t=60'
    await limits.spend(limit, "u:b", [])  # another user's allowance is untouched
    assert decisions(metrics, "submit", "allowed") == 3
    assert decisions(metrics, "submit", "limited") == 1


async def test_unlimited_never_touches_the_store() -> None:
    down = DownLimiter()
    limits = make(down)
    headers: list[tuple[str, str]] = []
    await limits.spend(limits.limit_for(frozenset({"admin"}), "submit"), "u:root", headers)
    assert down.calls == 0
    assert headers == []


async def test_fail_open_and_fail_closed() -> None:
    down, metrics = DownLimiter(), Metrics(CollectorRegistry())
    limits = make(down, metrics=metrics)
    headers: list[tuple[str, str]] = []
    await limits.spend(limits.limit_for(frozenset({"user"}), "read"), "u:a", headers)
    assert headers == []  # nothing true to say without the store
    for cls in ("submit", "upload", "login"):
        with pytest.raises(ServiceUnavailable) as info:
            await limits.spend(limits.limit_for(frozenset({"user"}), cls), "u:a", headers)
        assert info.value.error_type == "rate_limit_unavailable"
        assert info.value.status == 503
        assert info.value.headers["Retry-After"] == "3"
    assert down.calls == 4
    assert limits.degraded
    assert decisions(metrics, "read", "failed_open") == 1
    assert decisions(metrics, "submit", "failed_closed") == 1


async def test_fail_modes_are_configurable() -> None:
    limits = make(DownLimiter(), fail_closed=("read",))
    await limits.spend(limits.limit_for(frozenset({"user"}), "submit"), "u:a", [])
    with pytest.raises(ServiceUnavailable):
        await limits.spend(limits.limit_for(frozenset({"user"}), "read"), "u:a", [])
