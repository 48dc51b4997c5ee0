"""The GCRA Lua script and the Redis limiter against a real redis-server.

Exactness is driven through the script's test-only ``now`` argument (Redis ``TIME`` otherwise),
and checked for parity with the Python arithmetic the in-memory limiter uses. Fault injection
uses a dedicated redis-server that the test stops and restarts.
"""

from __future__ import annotations

import asyncio
import random
import time
from collections.abc import AsyncIterator

import pytest
import redis.asyncio as redis
from prometheus_client import CollectorRegistry

from proxy.limits.gcra import GCRA_SHA, MICROS, GcraScript, gcra
from proxy.limits.limiter import LimiterUnavailable, RedisLimiter
from proxy.observability.metrics import Metrics
from proxy.redis.breaker import BreakerState, CircuitBreaker
from proxy.settings.limits import RateLimitSettings
from tests.redis_server import RedisServer

T, B = 10 * MICROS, 5
"""Slow on purpose: keys expire in Redis's real time, so the injected clock must never run
behind a key's lifetime (a TTL of T * B = 50 s outlives any test)."""
NOW = 1_700_000_000 * MICROS
KEY = "comfygate:rl:{submit:u:test}"


@pytest.fixture
async def client(redis_url: str) -> AsyncIterator[redis.Redis]:
    c = redis.Redis.from_url(redis_url)
    yield c
    await c.aclose()


async def test_exactly_burst_then_retry_after_then_on_schedule(client: redis.Redis) -> None:
    script = GcraScript(client)
    results = [await script.run(KEY, T, B, now=NOW) for _ in range(B + 1)]
    assert [d.allowed for d in results] == [True] * B + [False]
    assert [d.remaining for d in results] == [4, 3, 2, 1, 0, 0]
    assert results[-1].retry_after == 10.0
    assert results[-1].reset == 50.0
    early = await script.run(KEY, T, B, now=NOW + T - 1)
    assert not early.allowed
    assert early.retry_after == 1 / MICROS
    assert (await script.run(KEY, T, B, now=NOW + T)).allowed
    assert not (await script.run(KEY, T, B, now=NOW + T)).allowed
    # The key expires once full again (no state left behind).
    assert 40_000 < await client.pttl(KEY) <= 50_000


async def test_parity_with_the_python_arithmetic(client: redis.Redis) -> None:
    script = GcraScript(client)
    rng = random.Random(5)
    now, tat = NOW, None
    for _ in range(300):
        now += rng.choice((0, 0, 1, T // 3, T, 2 * T, 7 * T))
        new_tat, expected = gcra(tat, now, T // 3, 7)
        tat = new_tat if new_tat is not None else tat
        assert await script.run("comfygate:rl:{read:u:parity}", T // 3, 7, now=now) == expected


async def test_time_comes_from_redis(client: redis.Redis) -> None:
    """Without the test-only ``now``: a burst of 3 at 1 per minute; the fourth waits ~20 s."""
    script = GcraScript(client)
    results = [await script.run(KEY, 20 * MICROS, 3) for _ in range(4)]
    assert [d.allowed for d in results] == [True, True, True, False]
    assert 19.9 < results[-1].retry_after <= 20.0
    seconds, micros = await client.time()
    assert int(await client.get(KEY) or 0) - (seconds * MICROS + micros) == pytest.approx(
        60 * MICROS, abs=0.2 * MICROS
    )


async def test_script_reloaded_after_script_flush(client: redis.Redis) -> None:
    script = GcraScript(client)
    assert (await script.run(KEY, T, B, now=NOW)).allowed
    assert await client.script_exists(GCRA_SHA) == [True]
    await client.script_flush()
    assert await client.script_exists(GCRA_SHA) == [False]
    second = await script.run(KEY, T, B, now=NOW)  # NOSCRIPT -> SCRIPT LOAD -> EVALSHA
    assert second.allowed
    assert second.remaining == B - 2  # the state survived; only the script was gone
    assert await client.script_exists(GCRA_SHA) == [True]


async def test_concurrent_checks_share_round_trips_and_stay_exact(redis_url: str) -> None:
    metrics = Metrics(CollectorRegistry())
    client = redis.Redis.from_url(redis_url)
    limiter = RedisLimiter(client, RateLimitSettings(), metrics)
    try:
        decisions = await asyncio.gather(*(limiter.check(KEY, T, 10) for _ in range(40)))
        assert sum(d.allowed for d in decisions) == 10
        assert sorted(d.remaining for d in decisions if d.allowed) == list(range(10))
        round_trips = sample(
            metrics, "comfygate_redis_command_duration_seconds_count", op="ratelimit"
        )
        assert 1 <= round_trips < 40
        # Other keys in the same batch are independent.
        mixed = await asyncio.gather(
            *(limiter.check(f"comfygate:rl:{{read:u:{i % 4}}}", T, 3) for i in range(20))
        )
        assert sum(d.allowed for d in mixed) == 12
    finally:
        await limiter.close()
        await client.aclose()


async def test_coalesced_batch_reloads_the_script(redis_url: str) -> None:
    client = redis.Redis.from_url(redis_url)
    limiter = RedisLimiter(client, RateLimitSettings(), Metrics(CollectorRegistry()))
    try:
        assert (await limiter.check(KEY, T, B)).allowed
        await client.script_flush()
        decisions = await asyncio.gather(*(limiter.check(KEY, T, B) for _ in range(3)))
        assert [d.remaining for d in decisions] == [3, 2, 1]
        assert state(limiter.breaker) is BreakerState.CLOSED
    finally:
        await limiter.close()
        await client.aclose()


async def test_a_connection_closed_by_redis_is_replaced_transparently(redis_url: str) -> None:
    """An idle connection closed by Redis (or a proxy in between) costs no failure."""
    metrics = Metrics(CollectorRegistry())
    client = redis.Redis.from_url(redis_url)
    limiter = RedisLimiter(client, RateLimitSettings(), metrics)
    admin = redis.Redis.from_url(redis_url)
    try:
        assert (await limiter.check(KEY, T, B)).remaining == B - 1
        assert await admin.client_kill_filter(_type="normal", skipme=True) >= 1
        assert (await limiter.check(KEY, T, B)).remaining == B - 2  # counted once
        assert state(limiter.breaker) is BreakerState.CLOSED
        errors = [
            sample(metrics, "comfygate_redis_errors_total", op="ratelimit", kind=k)
            for k in ("connection", "timeout", "error")
        ]
        assert errors == [0, 0, 0]
    finally:
        await limiter.close()
        await client.aclose()
        await admin.aclose()


# ------------------------------------------------------------------ fault injection
# (``own_redis``: a redis-server of the test alone, from tests/conftest.py)


def state(breaker: CircuitBreaker) -> BreakerState:
    """Read through a call: mypy must not narrow the attribute across the calls in between."""
    return breaker.state


def sample(metrics: Metrics, name: str, **labels: str) -> float:
    return metrics.registry.get_sample_value(name, labels) or 0.0


async def test_breaker_opens_on_a_dead_redis_and_recovers(own_redis: RedisServer) -> None:
    metrics = Metrics(CollectorRegistry())
    settings = RateLimitSettings(breaker_failures=2, breaker_open_seconds=1.0)
    clock_now = [0.0]
    client = redis.Redis.from_url(own_redis.url)
    limiter = RedisLimiter(client, settings, metrics, clock=lambda: clock_now[0])
    try:
        assert (await limiter.check(KEY, T, B)).allowed
        own_redis.stop()
        for _ in range(2):
            with pytest.raises(LimiterUnavailable) as info:
                await limiter.check(KEY, T, B)
            assert info.value.kind in ("connection", "timeout")
        assert state(limiter.breaker) is BreakerState.OPEN
        assert limiter.degraded
        assert sample(metrics, "comfygate_redis_breaker_state") == 2
        # Open: refused without touching Redis.
        with pytest.raises(LimiterUnavailable) as info:
            await limiter.check(KEY, T, B)
        assert info.value.kind == "breaker_open"
        assert info.value.retry_in == 1.0
        assert sample(metrics, "comfygate_redis_errors_total", op="ratelimit", kind="breaker_open")
        own_redis.start()
        clock_now[0] += 1.0  # the open period has passed: the next check is the probe
        decision = await limiter.check(KEY, T, B)
        assert decision.allowed
        assert state(limiter.breaker) is BreakerState.CLOSED
        assert sample(metrics, "comfygate_redis_breaker_state") == 0
        # A fresh server (no persistence): the script was reloaded on NOSCRIPT.
        assert await client.script_exists(GCRA_SHA) == [True]
    finally:
        await limiter.close()
        await client.aclose()


async def test_a_slow_redis_costs_at_most_the_budget(own_redis: RedisServer) -> None:
    """A Redis that accepts but does not answer (clients paused) fails within the budget."""
    metrics = Metrics(CollectorRegistry())
    settings = RateLimitSettings(redis_budget_ms=50, breaker_failures=1)
    client = redis.Redis.from_url(own_redis.url)
    limiter = RedisLimiter(client, settings, metrics)
    admin = redis.Redis.from_url(own_redis.url)
    try:
        await limiter.check(KEY, T, B)  # connected and loaded
        await admin.client_pause(2000)
        loop = asyncio.get_running_loop()
        started = loop.time()
        with pytest.raises(LimiterUnavailable) as info:
            await limiter.check(KEY, T, B)
        assert info.value.kind == "timeout"
        assert loop.time() - started < 0.5
        assert state(limiter.breaker) is BreakerState.OPEN
        started = loop.time()
        with pytest.raises(LimiterUnavailable):  # open: no wait at all
            await limiter.check(KEY, T, B)
        assert loop.time() - started < 0.01
        assert sample(metrics, "comfygate_redis_errors_total", op="ratelimit", kind="timeout") == 1
    finally:
        await admin.client_unpause()
        await limiter.close()
        await client.aclose()
        await admin.aclose()


async def test_a_cancelled_sender_does_not_strand_the_checks_queued_behind_it(
    own_redis: RedisServer,
) -> None:
    metrics = Metrics(CollectorRegistry())
    client = redis.Redis.from_url(own_redis.url, socket_connect_timeout=0.3)
    limiter = RedisLimiter(client, RateLimitSettings(redis_budget_ms=150), metrics)
    admin = redis.Redis.from_url(own_redis.url)
    try:
        await limiter.check(KEY, T, B)  # connected and loaded
        await admin.client_pause(3000)
        sender = asyncio.create_task(limiter.check(KEY, T, B))
        await asyncio.sleep(0)  # the sender's batch is on the wire, waiting for Redis
        queued = asyncio.create_task(limiter.check(KEY, T, B))
        await asyncio.sleep(0)
        sender.cancel()  # its client went away
        with pytest.raises(asyncio.CancelledError):
            await sender
        # Answered, not stranded: the sender's connection was dropped with its batch, so the
        # next batch reconnects, bounded by the connect timeout (0.3 s), then its budget.
        with pytest.raises(LimiterUnavailable) as info:
            await asyncio.wait_for(queued, 2.0)
        assert info.value.kind == "timeout"
    finally:
        await admin.client_unpause()
        await limiter.close()
        await client.aclose()
        await admin.aclose()


async def test_a_busy_proxy_is_not_mistaken_for_a_slow_redis(redis_url: str) -> None:
    """The event loop is blocked past the budget while Redis answers at once: no timeout, no
    breaker (``time.sleep`` stands for CPU-bound work of other requests)."""
    metrics = Metrics(CollectorRegistry())
    client = redis.Redis.from_url(redis_url)
    limiter = RedisLimiter(client, RateLimitSettings(redis_budget_ms=20), metrics)
    try:
        await limiter.check(KEY, T, B)  # connected and loaded
        check = asyncio.create_task(limiter.check(KEY, T, B))
        asyncio.get_running_loop().call_soon(time.sleep, 0.1)
        assert (await check).allowed
        assert state(limiter.breaker) is BreakerState.CLOSED
        assert sample(metrics, "comfygate_redis_errors_total", op="ratelimit", kind="timeout") == 0
    finally:
        await limiter.close()
        await client.aclose()
