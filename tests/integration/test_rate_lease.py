"""Token leases (``proxy.limits.lease``) against a real redis-server: the script's ``want``
(parity with the Python arithmetic, granted only with twice as many left), two replicas
sharing one Redis never admitting more than Redis counted, sparse keys never leased, the
headers a lease reports, Redis going away, and which classes lease at all.

The limits are slow (one token a minute) wherever exactness is asserted: no refill can happen
while a test runs, so "admitted + held == burst" is exact whatever the machine's speed.
"""

from __future__ import annotations

import asyncio
import random
from collections.abc import AsyncIterator

import pytest
import redis.asyncio as redis
from prometheus_client import CollectorRegistry

from proxy.errors import ServiceUnavailable
from proxy.limits.enforce import RateLimits, limit_key
from proxy.limits.gcra import GCRA_LUA, GCRA_SHA, MICROS, gcra_grant
from proxy.limits.lease import TokenLeases, lease_size
from proxy.limits.limiter import LimiterUnavailable, RedisLimiter
from proxy.observability.metrics import Metrics
from proxy.settings.limits import Limit, RateLimitSettings
from tests.redis_server import RedisServer

T = 60 * MICROS  # one token a minute: nothing refills during a test
KEY = "comfygate:rl:{read:u:lease}"
NOW = 1_700_000_000 * MICROS


@pytest.fixture
async def client(redis_url: str) -> AsyncIterator[redis.Redis]:
    c = redis.Redis.from_url(redis_url)
    yield c
    await c.aclose()


async def evalsha_calls(client: redis.Redis) -> int:
    stats = await client.info("commandstats")
    return int(stats.get("cmdstat_evalsha", {}).get("calls", 0))


class Replica:
    """One proxy replica's limiter and leases, on a connection of its own."""

    def __init__(self, url: str, lease_seconds: float = 10.0) -> None:
        self.client = redis.Redis.from_url(url)
        self.limiter = RedisLimiter(
            self.client, RateLimitSettings(redis_budget_ms=5000), Metrics(CollectorRegistry())
        )
        self.leases = TokenLeases(self.limiter, lease_seconds)
        self.admitted = 0

    async def request(self, key: str, burst: int, most: int) -> bool:
        decision = await self.leases.check(key, T, burst, most)
        self.admitted += decision.allowed
        return decision.allowed

    async def close(self) -> None:
        await self.limiter.close()
        await self.client.aclose()


async def test_want_parity_with_the_python_arithmetic(client: redis.Redis) -> None:
    assert await client.script_load(GCRA_LUA) == GCRA_SHA
    rng = random.Random(17)
    now, tat = NOW, None
    # Slow (10 s per token): keys expire in Redis's real time, so the injected clock must never
    # run behind a key's lifetime.
    emission, burst = 10 * MICROS, 40
    for _ in range(400):
        now += rng.choice((0, 0, 1, emission // 3, emission, 5 * emission, 30 * emission))
        want = rng.choice((1, 2, 4, 8, 16))
        new_tat, granted, expected = gcra_grant(tat, now, emission, burst, want)
        tat = new_tat if new_tat is not None else tat
        reply = await client.evalsha(
            GCRA_SHA, 1, "comfygate:rl:{read:u:p}", emission, burst, now, want
        )
        got_granted, remaining, retry_after, reset = (int(v) for v in reply)
        assert got_granted == granted
        assert (remaining, retry_after / MICROS, reset / MICROS) == (
            expected.remaining,
            expected.retry_after,
            expected.reset,
        )
        assert expected.allowed == (granted > 0)


async def test_a_lease_is_granted_only_with_twice_as_many_left(client: redis.Redis) -> None:
    async def ask(want: int) -> int:
        reply = await client.evalsha(GCRA_SHA, 1, KEY, T, 10, NOW, want)
        return int(reply[0])

    assert await ask(4) == 4  # 10 available: 4 of them
    assert await ask(4) == 1  # 6 available: fewer than 8, one at a time
    assert await ask(2) == 2  # 5 available
    assert [await ask(2) for _ in range(4)] == [1, 1, 1, 0]  # 3, 2, 1 left; then refused


async def test_two_replicas_never_admit_more_than_redis_counted(redis_url: str) -> None:
    one, two = Replica(redis_url), Replica(redis_url)
    admin = redis.Redis.from_url(redis_url)
    try:
        before = await evalsha_calls(admin)
        # Alternating one by one until both are refused: every held token gets spent first
        # (a replica asks Redis only when it holds none), so exactly the burst is admitted.
        refused = 0
        while refused < 2:
            for replica in (one, two):
                refused = 0 if await replica.request(KEY, 64, 4) else refused + 1
        assert one.admitted + two.admitted == 64
        assert one.admitted >= 16
        assert two.admitted >= 16
        assert await evalsha_calls(admin) - before < 64  # fewer round trips than requests
        assert one.leases.held(KEY) == two.leases.held(KEY) == 0
    finally:
        await one.close()
        await two.close()
        await admin.aclose()


async def test_concurrent_requests_on_two_replicas_never_exceed_the_burst(redis_url: str) -> None:
    one, two = Replica(redis_url), Replica(redis_url)
    admin = redis.Redis.from_url(redis_url)
    try:
        before = await evalsha_calls(admin)
        results = await asyncio.gather(
            *((one if i % 2 else two).request(KEY, 200, 8) for i in range(600))
        )
        admitted = sum(results)
        held = one.leases.held(KEY) + two.leases.held(KEY)
        # Redis counted every admitted request and every token still held: no more.
        assert admitted + held == 200
        assert admitted >= 200 - 2 * 7  # at most a lease's tokens per replica left over
        assert await evalsha_calls(admin) - before < 600
    finally:
        await one.close()
        await two.close()
        await admin.aclose()


async def test_concurrent_requests_of_one_key_share_a_lease(redis_url: str) -> None:
    replica = Replica(redis_url)
    admin = redis.Redis.from_url(redis_url)
    try:
        # Warm: the lease size doubles while the key stays busy.
        for _ in range(8):
            assert await replica.request(KEY, 100_000, 16)
        before = await evalsha_calls(admin)
        results = await asyncio.gather(*(replica.request(KEY, 100_000, 16) for _ in range(64)))
        assert all(results)
        assert await evalsha_calls(admin) - before <= 64 // 4
    finally:
        await replica.close()
        await admin.aclose()


async def test_a_sparse_key_is_never_leased(redis_url: str) -> None:
    """Requests further apart than the lease lifetime: each one is a plain check."""
    clock = [100.0]
    replica = Replica(redis_url)
    replica.leases = TokenLeases(replica.limiter, 0.5, clock=lambda: clock[0])
    admin = redis.Redis.from_url(redis_url)
    try:
        before = await evalsha_calls(admin)
        remaining = []
        for _ in range(6):
            decision = await replica.leases.check(KEY, T, 100, 8)
            remaining.append(decision.remaining)
            assert replica.leases.held(KEY) == 0
            clock[0] += 0.6
        assert remaining == [99, 98, 97, 96, 95, 94]  # one token each, no more
        assert await evalsha_calls(admin) - before == 6
    finally:
        await replica.close()
        await admin.aclose()


async def test_lease_headers_count_as_plain_checks_would(redis_url: str) -> None:
    """One replica: what a leased request reports is what a plain check would have said."""
    replica = Replica(redis_url)
    try:
        decisions = [await replica.leases.check(KEY, T, 100, 8) for _ in range(30)]
        assert all(d.allowed for d in decisions)
        assert [d.remaining for d in decisions] == list(range(99, 69, -1))
        resets = [d.reset for d in decisions]
        for i, reset in enumerate(resets):
            assert reset == pytest.approx((i + 1) * T / MICROS, abs=1.0)
        assert replica.leases.held(KEY) > 0  # the last ones came from a lease
    finally:
        await replica.close()


async def test_redis_going_away_spends_the_lease_then_fails_as_before(
    own_redis: RedisServer,
) -> None:
    replica = Replica(own_redis.url)
    try:
        for _ in range(10):
            assert await replica.request(KEY, 1000, 8)
        held = replica.leases.held(KEY)
        assert held > 0
        own_redis.stop()
        for _ in range(held):  # granted before Redis went away: spent
            assert await replica.request(KEY, 1000, 8)
        with pytest.raises(LimiterUnavailable):
            await replica.request(KEY, 1000, 8)
    finally:
        await replica.close()


async def test_only_fast_fail_open_classes_lease_and_fail_closed_is_unchanged(
    own_redis: RedisServer,
) -> None:
    fast = Limit(rate="1000/second", burst=10_000)
    settings = RateLimitSettings(
        default={"submit": fast, "read": fast, "view": Limit(rate="5/hour", burst=10_000)},
        breaker_failures=100,
    )
    client = redis.Redis.from_url(own_redis.url)
    limits = RateLimits(
        settings,
        {},
        RedisLimiter(client, settings, Metrics(CollectorRegistry())),
        Metrics(CollectorRegistry()),
    )
    try:
        nobody: frozenset[str] = frozenset()
        assert limits.limit_for(nobody, "read").lease == 32
        assert limits.limit_for(nobody, "submit").lease == 0  # fails closed: never leased
        assert limits.limit_for(nobody, "view").lease == 0  # 5/hour: slower than a lease
        submit = limits.limit_for(nobody, "submit")
        for _ in range(5):
            await limits.spend(submit, "u:x", [])
        own_redis.stop()
        # The first submit after Redis went away is refused, as without leases.
        with pytest.raises(ServiceUnavailable):
            await limits.spend(submit, "u:x", [])
    finally:
        assert isinstance(limits.limiter, RedisLimiter)
        await limits.limiter.close()
        await client.aclose()


def test_lease_size() -> None:
    second = MICROS
    assert lease_size(100, second // 20, 16, 0.5) == 6  # read default: burst 100 at 20/s
    assert lease_size(1000, second // 100, 16, 0.5) == 16  # static default
    assert lease_size(10, 2 * second, 16, 0.5) == 0  # ws_connect default: slow, small burst
    assert lease_size(1_000_000, 1, 16, 0.5) == 16
    assert lease_size(1_000_000, 1, 1, 0.5) == 0  # lease_tokens below 2: off
    assert lease_size(10_000, second, 16, 10.0) == 10  # refilled in lease_seconds


def test_limit_key_shape_is_the_one_leased() -> None:
    assert limit_key("read", "u:abc") == "comfygate:rl:{read:u:abc}"
