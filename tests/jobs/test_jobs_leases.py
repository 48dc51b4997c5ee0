"""The due sets behind the webhook outbox and the job watcher, on a real Redis and in memory:
one claimer per item at a time, a lease that ends hands the item over, a stale claimer
changes nothing, ``once`` adds a job's message a single time."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import pytest
import redis.asyncio as redis

from proxy.jobs.leases import DueSet, MemoryDueSet, RedisDueSet


@pytest.fixture
async def client(redis_url: str) -> AsyncIterator[redis.Redis]:
    conn = redis.Redis.from_url(redis_url)
    yield conn
    await conn.aclose()


async def test_two_replicas_claim_disjoint_items(client: redis.Redis) -> None:
    one, two = RedisDueSet(client, "t"), RedisDueSet(client, "t")
    for n in range(50):
        await one.add(f"m{n}", b"x", 100.0)
    first, second = await asyncio.gather(one.claim(200.0, 60, 30), two.claim(200.0, 60, 30))
    mine = {item for item, _, _ in first}
    theirs = {item for item, _, _ in second}
    assert not mine & theirs
    assert len(mine | theirs) == 50
    assert await one.claim(200.0, 60, 100) == []  # all leased


@pytest.mark.parametrize("backend", ["redis", "memory"])
async def test_lease_ends_and_stale_claimer_is_ignored(client: redis.Redis, backend: str) -> None:
    due: DueSet = RedisDueSet(client, "t2") if backend == "redis" else MemoryDueSet()
    await due.add("m", b"payload", 10.0)
    [(_, payload, stale)] = await due.claim(10.0, 5, 10)
    assert payload == b"payload"
    assert await due.claim(14.0, 5, 10) == []  # leased until 15
    [(_, _, fresh)] = await due.claim(15.0, 5, 10)  # the claimer died: taken over
    assert not await due.finish("m", stale)
    assert not await due.reschedule("m", stale, 99.0, b"old")
    assert await due.reschedule("m", fresh, 30.0, b"new")
    [(_, payload, last)] = await due.claim(30.0, 5, 10)
    assert payload == b"new"
    assert await due.finish("m", last)
    assert await due.depth() == 0


@pytest.mark.parametrize("backend", ["redis", "memory"])
async def test_once_adds_a_single_time(client: redis.Redis, backend: str) -> None:
    due: DueSet = RedisDueSet(client, "t3") if backend == "redis" else MemoryDueSet()
    assert await due.add("a", b"1", 1.0, once="job", once_ttl=60)
    assert not await due.add("b", b"2", 1.0, once="job", once_ttl=60)
    [(item, _, token)] = await due.claim(2.0, 5, 10)
    assert item == "a"
    assert await due.finish(item, token)
    assert not await due.add("c", b"3", 1.0, once="job", once_ttl=60)  # delivered: still once
