"""The owners' view indexes (submission order, bounded, trimmed on delete), in memory and in a
real Redis (standalone, Sentinel and cluster: the cluster writes them in separate steps)."""

from __future__ import annotations

import time
from collections.abc import AsyncIterator

import pytest

from proxy.comfy.records import PromptRecord
from proxy.redis.client import connect
from proxy.settings import RedisSettings
from proxy.tenancy import ownership
from proxy.tenancy.ownership import MemoryOwnershipStore, OwnershipStore, RedisOwnershipStore
from tests.conftest import RedisBackend
from tests.support.backends import STATES, ownership_store


@pytest.fixture(params=STATES)
async def store(request: pytest.FixtureRequest) -> AsyncIterator[OwnershipStore]:
    # Not whole seconds, as 7 * 24 * 3600.0 is not.
    async with ownership_store(request, 3600.5) as opened:
        yield opened


def record(prompt_id: str, owner: str) -> PromptRecord:
    return PromptRecord(prompt_id, owner, "127.0.0.1:8188", f"cid-{owner}", time.time())


async def test_submission_order_both_ways_and_paged(store: OwnershipStore) -> None:
    for i in range(5):
        assert await store.record_prompt(record(f"a{i}", "alice"))
        assert await store.record_prompt(record(f"b{i}", "bob"))
    assert await store.indexed_count("alice") == 5
    assert await store.indexed("alice", newest_first=False, count=10) == [f"a{i}" for i in range(5)]
    assert await store.indexed("alice", newest_first=True, count=2) == ["a4", "a3"]
    assert await store.indexed("alice", newest_first=True, skip=2, count=2) == ["a2", "a1"]
    assert await store.indexed("alice", newest_first=False, skip=4, count=9) == ["a4"]
    assert await store.indexed("alice", newest_first=True, count=0) == []
    assert await store.indexed("carol", newest_first=True, count=5) == []
    assert await store.indexed_count("carol") == 0


async def test_unindex_keeps_ownership_and_records(store: OwnershipStore) -> None:
    for i in range(3):
        await store.record_prompt(record(f"a{i}", "alice"))
    await store.unindex("alice", ["a1", "unknown"])
    assert await store.indexed("alice", newest_first=False, count=9) == ["a0", "a2"]
    assert await store.prompts_of("alice") == {"a0", "a1", "a2"}  # isolation decides on these
    assert [r.owner if r else None for r in await store.records(["a1", "x"])] == ["alice", None]
    await store.unindex("alice", ["a0", "a2"])
    assert await store.indexed_count("alice") == 0
    await store.record_prompt(record("a3", "alice"))  # an emptied index is not backfilled again
    assert await store.indexed("alice", newest_first=False, count=9) == ["a3"]
    await store.forget_prompt("a3")
    assert await store.indexed_count("alice") == 0


async def test_a_taken_id_never_joins_another_owners_view(store: OwnershipStore) -> None:
    assert await store.record_prompt(record("p1", "alice"))
    assert not await store.record_prompt(record("p1", "bob"))
    assert await store.indexed("bob", newest_first=True, count=9) == []
    assert await store.indexed("alice", newest_first=True, count=9) == ["p1"]


async def test_view_index_is_bounded(
    store: OwnershipStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(ownership, "VIEW_INDEX_MAX", 3)
    for i in range(6):
        await store.record_prompt(record(f"a{i}", "alice"))
    assert await store.indexed("alice", newest_first=False, count=9) == ["a3", "a4", "a5"]
    assert await store.prompts_of("alice") == {f"a{i}" for i in range(6)}


async def test_memory_view_entries_expire() -> None:
    now = [1000.0]
    store = MemoryOwnershipStore(60, clock=lambda: now[0])
    await store.record_prompt(record("p1", "alice"))
    now[0] += 30
    await store.record_prompt(record("p2", "alice"))
    now[0] += 31
    assert await store.indexed("alice", newest_first=True, count=9) == ["p2"]
    assert await store.indexed_count("alice") == 1


async def test_memory_eviction_leaves_the_owners_sets() -> None:
    store = MemoryOwnershipStore(3600, max_entries=2)
    for i in range(3):
        await store.record_prompt(record(f"a{i}", "alice"))
    assert await store.prompts_of("alice") == {"a1", "a2"}
    assert await store.indexed("alice", newest_first=False, count=9) == ["a1", "a2"]


async def test_owners_recorded_before_view_indexes_are_backfilled(
    redis_backend: RedisBackend,
) -> None:
    """Prompts recorded by a version without view indexes (only the ownership index, scored by
    expiry) appear in the owner's view, in submission order, once."""
    connection = connect(RedisSettings(**redis_backend.settings))
    assert connection is not None
    client = connection.client
    store = RedisOwnershipStore(client, 604800.0)
    try:
        now = time.time()
        legacy = {"old1": now - 100 + 604800, "old2": now - 50 + 604800, "gone": now - 10}
        await client.zadd("comfygate:own:owner:alice", legacy)
        await store.record_prompt(record("new1", "alice"))
        assert await store.indexed("alice", newest_first=False, count=9) == [
            "old1",
            "old2",
            "new1",
        ]
        await store.unindex("alice", ["old1"])
        fresh = RedisOwnershipStore(client, 604800.0)  # another replica: the mark is shared
        assert await fresh.indexed("alice", newest_first=True, count=9) == ["new1", "old2"]
        assert await fresh.indexed_count("alice") == 2
    finally:
        await store.aclose()
        await connection.close()
