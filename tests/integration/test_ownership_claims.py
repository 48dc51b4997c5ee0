"""Prompt claims in Redis: concurrent claims share a round trip (the coalescer the rate
limiter uses), the script is reloaded after a flush, and every failure is a redis error (the
request then answers 503 state_unavailable)."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Sequence
from typing import Any

import pytest
import redis.asyncio as redis

from proxy.comfy.records import PromptRecord
from proxy.redis.client import connect
from proxy.redis.coalesce import ScriptCall
from proxy.settings import RedisSettings
from proxy.tenancy.ownership import RedisOwnershipStore
from tests.redis_server import RedisServer


def record(prompt_id: str, owner: str) -> PromptRecord:
    return PromptRecord(prompt_id, owner, "127.0.0.1:8188", f"cid-{owner}", time.time())


@pytest.fixture
async def client(own_redis: RedisServer) -> AsyncIterator[redis.Redis]:
    connection = connect(RedisSettings(url=own_redis.url, socket_timeout_seconds=0.2))
    assert connection is not None
    assert isinstance(connection.client, redis.Redis)
    yield connection.client
    await connection.close()


@pytest.fixture
async def store(client: redis.Redis) -> AsyncIterator[RedisOwnershipStore]:
    store = RedisOwnershipStore(client, 3600)
    yield store
    await store.aclose()


async def test_concurrent_claims_share_one_round_trip(store: RedisOwnershipStore) -> None:
    batches: list[int] = []
    exchange = store._pipe.exchange

    async def counted(calls: Sequence[ScriptCall]) -> list[Any]:
        batches.append(len(calls))
        return await exchange(calls)

    store._pipe.exchange = counted  # type: ignore[method-assign]
    ids = [f"p{i}" for i in range(20)] + ["p3"]  # p3 twice: one claim of it loses
    results = await asyncio.gather(*(store.record_prompt(record(i, "alice")) for i in ids))
    # The first claim goes alone (nothing else was waiting); the rest wait for it and share one.
    assert batches == [1, 20]
    assert results.count(False) == 1
    assert await store.prompts_of("alice") == set(ids)


async def test_the_script_is_loaded_again_after_a_flush(
    store: RedisOwnershipStore, client: redis.Redis
) -> None:
    assert await store.record_prompt(record("p1", "alice"))
    await client.script_flush()
    assert await store.record_prompt(record("p2", "alice"))
    assert not await store.record_prompt(record("p2", "bob"))
    assert await store.prompts_of("alice") == {"p1", "p2"}


async def test_an_outage_is_a_redis_error_and_the_next_claim_reconnects(
    store: RedisOwnershipStore, own_redis: RedisServer
) -> None:
    assert await store.record_prompt(record("p1", "alice"))
    own_redis.stop()
    try:
        with pytest.raises(redis.ConnectionError):
            await store.record_prompt(record("p2", "alice"))
    finally:
        own_redis.start()
    assert await store.record_prompt(record("p2", "alice"))  # a fresh server: p1 is gone


async def test_a_slow_redis_is_a_redis_timeout(
    store: RedisOwnershipStore, own_redis: RedisServer
) -> None:
    """Bounded by ``redis.socket_timeout_seconds`` (0.2 s here), as a command of the shared
    client is; the connection is dropped and the next claim works."""
    assert await store.record_prompt(record("p1", "alice"))
    async with redis.Redis.from_url(own_redis.url) as admin:
        # Every client's commands wait for longer than the timeout.
        await admin.client_pause(600, all=True)
        with pytest.raises(redis.TimeoutError):
            await store.record_prompt(record("p2", "alice"))
        await admin.client_unpause()
    assert await store.record_prompt(record("p3", "alice"))
