"""The ownership store behaves the same in memory and in a real Redis."""

from __future__ import annotations

import time
from collections.abc import AsyncIterator

import pytest

from proxy.comfy.records import PromptRecord
from proxy.redis.client import connect
from proxy.settings import RedisSettings
from proxy.tenancy.ownership import MemoryOwnershipStore, OwnershipStore, RedisOwnershipStore
from tests.conftest import RedisBackend
from tests.support.backends import STATES, ownership_store


@pytest.fixture(params=STATES)
async def store(request: pytest.FixtureRequest) -> AsyncIterator[OwnershipStore]:
    async with ownership_store(request, 3600) as opened:
        yield opened


def record(prompt_id: str, owner: str) -> PromptRecord:
    return PromptRecord(prompt_id, owner, "127.0.0.1:8188", f"cid-{owner}", time.time())


async def test_prompts(store: OwnershipStore) -> None:
    assert await store.record_prompt(record("p1", "alice"))
    assert not await store.record_prompt(record("p1", "bob"))  # ids are never taken over
    assert await store.record_prompt(record("p2", "alice"))
    assert await store.record_prompt(record("p3", "bob"))
    found = await store.prompt("p1")
    assert found is not None
    assert (found.owner, found.client_id) == ("alice", "cid-alice")
    assert await store.prompts_of("alice") == {"p1", "p2"}
    assert await store.prompts_of("bob") == {"p3"}  # the taken p1 never joined Bob's prompts
    await store.forget_prompt("p1")
    assert await store.prompt("p1") is None
    assert await store.prompts_of("alice") == {"p2"}
    assert await store.prompt("unknown") is None


async def test_files(store: OwnershipStore) -> None:
    ref = ("output", "users/alice-1", "cat_00001_.png")
    await store.record_files("alice", [ref, ("temp", "", "ComfyUI_temp_abcde_00001_.png")])
    assert await store.file_owner(ref) == "alice"
    assert await store.file_owner(("temp", "", "ComfyUI_temp_abcde_00001_.png")) == "alice"
    assert await store.file_owner(("output", "users/alice-1", "other.png")) is None


async def test_a_file_claimed_first_stays_its_owners(store: OwnershipStore) -> None:
    """Files are claimed, never taken over: an identical graph answered from ComfyUI's cache
    names the first user's preview again, and that must not hand it to the second."""
    ref = ("temp", "", "ComfyUI_temp_abcde_00001_.png")
    await store.record_files("alice", [ref])
    await store.record_files("bob", [ref, ("temp", "", "bobs.png")])
    assert await store.file_owner(ref) == "alice"
    assert await store.file_owner(("temp", "", "bobs.png")) == "bob"
    await store.record_files("alice", [ref])  # the owner's own claim again: still hers
    assert await store.file_owner(ref) == "alice"


async def test_preview_nodes_are_kept_with_the_prompt(store: OwnershipStore) -> None:
    mine = PromptRecord("p1", "alice", "u", "cid", time.time(), previews=("7", "12"))
    assert await store.record_prompt(mine)
    found = await store.prompt("p1")
    assert found is not None
    assert found.previews == ("7", "12")
    assert await store.record_prompt(record("p2", "alice"))
    found = await store.prompt("p2")
    assert found is not None
    assert found.previews == ()


async def test_memory_entries_expire() -> None:
    now = [1000.0]
    store = MemoryOwnershipStore(60, clock=lambda: now[0])
    await store.record_prompt(record("p1", "alice"))
    await store.record_files("alice", [("output", "", "a.png")])
    now[0] += 61
    assert await store.prompt("p1") is None
    assert await store.prompts_of("alice") == set()
    assert await store.file_owner(("output", "", "a.png")) is None
    assert await store.record_prompt(record("p1", "bob"))  # an expired id can be used again


async def test_a_taken_id_never_joins_another_owners_prompts(redis_backend: RedisBackend) -> None:
    """One script on a standalone or Sentinel-managed Redis; on a cluster (the record and the
    index in different slots) the index is written only after the claim succeeded."""
    connection = connect(RedisSettings(**redis_backend.settings))
    assert connection is not None
    store = RedisOwnershipStore(connection.client, 3600)
    try:
        assert await store.record_prompt(record("p1", "alice"))
        assert not await store.record_prompt(record("p1", "bob"))
        assert await store.prompts_of("bob") == set()
        assert await store.prompts_of("alice") == {"p1"}
        found = await store.prompt("p1")
        assert found is not None
        assert found.owner == "alice"
        await store.forget_prompt("p1")
        assert await store.prompts_of("alice") == set()
        assert await store.record_prompt(record("p1", "bob"))  # free again
        assert await store.prompts_of("bob") == {"p1"}
    finally:
        await store.aclose()
        await connection.close()
