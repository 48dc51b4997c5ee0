"""``auth.revocation_cache_seconds``: the revocation answer cached per token id.

What must hold: a revocation made through a process is refused there at once; one made on
another replica is refused after at most the TTL; failures are never cached; concurrent lookups
of one id share one query; the cache is bounded; 0 switches it off. Time is an injected clock
and queries in flight are held on events; nothing sleeps.
"""

from __future__ import annotations

import asyncio
import time
from typing import Any

import pytest
from aiohttp.test_utils import TestClient

from proxy.auth.authenticator import AUTH
from proxy.auth.revocation import (
    CachedRevocationList,
    FailModeRevocations,
    MemoryRevocationList,
    RedisRevocationList,
    RevocationUnavailable,
    cached,
)
from proxy.settings import Settings
from tests.conftest import ProxyFactory, make_token
from tests.fakes.comfyui import FakeComfyUI

TTL = 2.0


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


class CountingList:
    """A revocation list that counts its queries, can hold them in flight and can fail."""

    def __init__(self) -> None:
        self.memory = MemoryRevocationList()
        self.queries = 0
        self.gate: asyncio.Event | None = None
        self.started = asyncio.Event()
        self.down = False

    async def revoke(self, token_id: str, until: float | None) -> None:
        await self.memory.revoke(token_id, until)

    async def is_revoked(self, token_id: str) -> bool:
        self.queries += 1
        if self.down:
            raise RevocationUnavailable("the token revocation list is unavailable")
        answer = await self.memory.is_revoked(token_id)  # read now, answered later
        self.started.set()
        if self.gate is not None:
            await self.gate.wait()
        return answer


def cache_over(inner: CountingList, **kwargs: int) -> tuple[CachedRevocationList, Clock]:
    clock = Clock()
    return CachedRevocationList(inner, TTL, clock=clock, **kwargs), clock


# -- across replicas, through the app --------------------------------------------------------


async def get_queue(client: TestClient[Any, Any], token: str) -> tuple[int, str]:
    async with client.get("/api/queue", headers={"Authorization": f"Bearer {token}"}) as resp:
        body = await resp.json()
        return resp.status, body["error"]["type"] if resp.status != 200 else ""


async def test_a_revocation_on_one_replica_is_refused_by_another_within_the_ttl(
    make_proxy: ProxyFactory, fake_comfy: FakeComfyUI, redis_url: str
) -> None:
    sections = {"redis": {"url": redis_url}, "auth": {"revocation_cache_seconds": TTL}}
    replica_a = await make_proxy(fake_comfy.url, token=None, **sections)
    replica_b = await make_proxy(fake_comfy.url, token=None, **sections)
    clock = Clock()
    for replica in (replica_a, replica_b):
        outer = replica.app[AUTH].revocations
        assert isinstance(outer, FailModeRevocations)
        revocations = outer.inner
        assert isinstance(revocations, CachedRevocationList)
        assert revocations.ttl == TTL
        revocations.clock = clock
    jti = f"replicas-{time.time_ns()}"
    token = make_token("alice", ("user",), jti=jti)
    assert await get_queue(replica_a, token) == (200, "")
    assert await get_queue(replica_b, token) == (200, "")  # B has the answer cached now

    await replica_a.app[AUTH].revocations.revoke(jti, time.time() + 3600)
    assert await get_queue(replica_a, token) == (401, "token_revoked")  # this replica: at once
    clock.now += TTL - 0.001
    assert await get_queue(replica_b, token) == (200, "")  # the other: not before the TTL...
    clock.now += 0.001
    assert await get_queue(replica_b, token) == (401, "token_revoked")  # ...and not after it


async def test_zero_switches_the_cache_off(
    make_proxy: ProxyFactory, fake_comfy: FakeComfyUI, redis_url: str
) -> None:
    client = await make_proxy(
        fake_comfy.url, redis={"url": redis_url}, auth={"revocation_cache_seconds": 0}
    )
    outer = client.app[AUTH].revocations
    assert isinstance(outer, FailModeRevocations)
    assert isinstance(outer.inner, RedisRevocationList)
    inner = MemoryRevocationList()
    assert cached(inner, 0) is inner


def test_the_default_is_short() -> None:
    assert 0 < Settings().auth.revocation_cache_seconds <= 2


# -- the cache itself -------------------------------------------------------------------------


async def test_answers_are_reused_until_the_ttl_from_when_the_query_was_sent() -> None:
    inner = CountingList()
    cache, clock = cache_over(inner)
    assert not await cache.is_revoked("t1")
    clock.now += TTL - 0.001
    assert not await cache.is_revoked("t1")
    assert inner.queries == 1
    clock.now += 0.001
    assert not await cache.is_revoked("t1")
    assert inner.queries == 2


async def test_a_revocation_through_the_cache_is_refused_at_once() -> None:
    inner = CountingList()
    cache, _ = cache_over(inner)
    assert not await cache.is_revoked("t1")
    await cache.revoke("t1", None)
    assert await cache.is_revoked("t1")
    assert await cache.is_revoked("t1")  # a revoked answer is cached too (it cannot lapse)
    assert inner.queries == 2


async def test_a_query_overlapping_a_revocation_is_not_stored() -> None:
    inner = CountingList()
    cache, _ = cache_over(inner)
    inner.gate = asyncio.Event()
    early = asyncio.create_task(cache.is_revoked("t1"))
    await inner.started.wait()  # read "not revoked", reply still on its way
    await cache.revoke("t1", None)
    late = asyncio.create_task(cache.is_revoked("t1"))  # must not join the early query
    inner.gate.set()
    assert await early is False  # asked before the revocation: answered as it was then
    assert await late is True
    assert await cache.is_revoked("t1") is True
    assert inner.queries == 2


async def test_concurrent_lookups_share_one_query() -> None:
    inner = CountingList()
    cache, _ = cache_over(inner)
    inner.gate = asyncio.Event()
    lookups = [asyncio.create_task(cache.is_revoked("t1")) for _ in range(5)]
    await inner.started.wait()
    inner.gate.set()
    assert await asyncio.gather(*lookups) == [False] * 5
    assert inner.queries == 1


async def test_a_caller_going_away_does_not_cancel_the_others_query() -> None:
    inner = CountingList()
    cache, _ = cache_over(inner)
    inner.gate = asyncio.Event()
    leaving = asyncio.create_task(cache.is_revoked("t1"))
    staying = asyncio.create_task(cache.is_revoked("t1"))
    await inner.started.wait()
    leaving.cancel()
    inner.gate.set()
    assert await staying is False
    with pytest.raises(asyncio.CancelledError):
        await leaving
    assert not await cache.is_revoked("t1")
    assert inner.queries == 1


async def test_failures_are_never_cached() -> None:
    inner = CountingList()
    cache, _ = cache_over(inner)
    inner.down = True
    for _ in range(2):
        with pytest.raises(RevocationUnavailable):  # SECURITY: fails closed, every time
            await cache.is_revoked("t1")
    assert inner.queries == 2
    inner.down = False
    await inner.revoke("t1", None)
    assert await cache.is_revoked("t1")


async def test_the_cache_is_bounded() -> None:
    inner = CountingList()
    cache, _ = cache_over(inner, max_entries=2)
    for token_id in ("a", "b", "c"):
        assert not await cache.is_revoked(token_id)
    assert len(cache) == 2
    assert not await cache.is_revoked("a")  # the oldest went: asked again
    assert inner.queries == 4


def test_a_zero_ttl_cache_is_refused() -> None:
    with pytest.raises(ValueError, match="ttl_seconds"):
        CachedRevocationList(MemoryRevocationList(), 0)
