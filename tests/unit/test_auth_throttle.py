"""Login throttling per IP and per username, sliding window, in memory and in a real Redis."""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable

import pytest
import redis.asyncio as redis

from proxy.auth.throttle import KEY_PREFIX, LoginThrottle

MAX = 3
WINDOW = 300.0


class Clock:
    def __init__(self, now: float = 1_700_000_000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


Factory = Callable[..., LoginThrottle]


@pytest.fixture(params=["memory", "redis"])
async def make_throttle(request: pytest.FixtureRequest, clock: Clock) -> AsyncIterator[Factory]:
    client: redis.Redis | None = None
    if request.param == "redis":
        client = redis.Redis.from_url(request.getfixturevalue("redis_url"))

    def factory(max_failures: int = MAX, window: float = WINDOW) -> LoginThrottle:
        return LoginThrottle(max_failures, window, client, clock=clock)

    yield factory
    if client is not None:
        await client.aclose()


@pytest.fixture
def clock() -> Clock:
    return Clock()


async def fail(throttle: LoginThrottle, times: int, ip: str, user: str = "") -> None:
    for _ in range(times):
        await throttle.failed(ip, user)


async def test_allowed_until_max_failures_then_wait_for_the_window(
    make_throttle: Factory, clock: Clock
) -> None:
    throttle = make_throttle()
    assert await throttle.allowed("10.0.0.1", "alice") == 0
    await fail(throttle, MAX - 1, "10.0.0.1", "alice")
    assert await throttle.allowed("10.0.0.1", "alice") == 0
    await throttle.failed("10.0.0.1", "alice")
    assert await throttle.allowed("10.0.0.1", "alice") == pytest.approx(WINDOW)
    clock.now += 100
    assert await throttle.allowed("10.0.0.1", "alice") == pytest.approx(WINDOW - 100)
    clock.now += WINDOW - 100
    assert await throttle.allowed("10.0.0.1", "alice") == 0


async def test_window_slides_one_failure_at_a_time(make_throttle: Factory, clock: Clock) -> None:
    throttle = make_throttle()
    for _ in range(MAX):
        await throttle.failed("10.0.0.1")
        clock.now += 100  # failures at t=0, 100, 200
    # t=300: the first failure (t=0) has just left the window
    assert await throttle.allowed("10.0.0.1") == 0
    await throttle.failed("10.0.0.1")  # t=300: three within the window again (100, 200, 300)
    assert await throttle.allowed("10.0.0.1") == pytest.approx(100)  # until t=100 leaves
    clock.now += 100
    assert await throttle.allowed("10.0.0.1") == 0


async def test_a_username_is_throttled_from_every_ip(make_throttle: Factory) -> None:
    throttle = make_throttle()
    for i in range(MAX):
        await throttle.failed(f"10.0.0.{i}", "Alice")
    assert await throttle.allowed("10.9.9.9", "alice") > 0  # lowercased
    assert await throttle.allowed("10.9.9.9", "ALICE") > 0
    assert await throttle.allowed("10.9.9.9", "bob") == 0
    assert await throttle.allowed("10.0.0.1", "bob") == 0  # one failure from that IP only


async def test_an_ip_is_throttled_for_every_username(make_throttle: Factory) -> None:
    throttle = make_throttle()
    for name in ("alice", "bob", "carol"):
        await throttle.failed("10.0.0.1", name)
    assert await throttle.allowed("10.0.0.1", "dave") > 0
    assert await throttle.allowed("10.0.0.1") > 0  # token login: per IP only
    assert await throttle.allowed("10.0.0.2", "dave") == 0


async def test_success_clears_the_username_but_not_the_ip(make_throttle: Factory) -> None:
    throttle = make_throttle()
    await fail(throttle, MAX, "10.0.0.1", "alice")
    await throttle.succeeded("10.0.0.1", "alice")
    assert await throttle.allowed("10.0.0.2", "alice") == 0
    # A client with one valid account must not reset its IP between guesses at others.
    assert await throttle.allowed("10.0.0.1", "bob") > 0


async def test_concurrent_failures_in_one_tick_all_count(make_throttle: Factory) -> None:
    throttle = make_throttle()
    await fail(throttle, MAX, "10.0.0.1")  # same clock value each time
    assert await throttle.allowed("10.0.0.1") > 0


async def test_redis_keys_expire_and_hold_at_most_max_entries(redis_url: str, clock: Clock) -> None:
    client = redis.Redis.from_url(redis_url)
    try:
        throttle = LoginThrottle(MAX, WINDOW, client, clock=clock)
        await fail(throttle, 10, "10.0.0.1", "alice")
        raw = await client.keys(f"{KEY_PREFIX}*")
        keys = sorted(k.decode() if isinstance(k, bytes) else k for k in raw)
        assert len(keys) == 2
        assert f"{KEY_PREFIX}ip:10.0.0.1" in keys
        assert all("alice" not in k for k in keys)  # typed names are hashed
        for key in keys:
            assert await client.zcard(key) == MAX
            assert 0 < await client.ttl(key) <= WINDOW + 1
        # Shared between replicas: a second throttle on the same Redis sees the failures.
        other = LoginThrottle(MAX, WINDOW, client, clock=clock)
        assert await other.allowed("10.0.0.1") > 0
    finally:
        await client.aclose()


def test_invalid_parameters_are_refused() -> None:
    with pytest.raises(ValueError, match="max_failures"):
        LoginThrottle(0, 10)
    with pytest.raises(ValueError, match="window_seconds"):
        LoginThrottle(1, 0)
