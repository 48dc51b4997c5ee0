"""The per-process record cache of ``GET /history/{id}`` (``proxy.isolation.record_cache``):
B attacks A's entries once A's records are cached, and the cache saves round trips only for
entries ComfyUI answered with (family "isolation/history")."""

from __future__ import annotations

import time
from typing import Any

import aiohttp
import pytest

from proxy.comfy.records import PromptRecord
from proxy.isolation.record_cache import MAX_AGE_SECONDS, RecordCache
from proxy.tenancy.ownership import OWNERSHIP, OwnershipStore
from tests.fakes.comfyui import FakeComfyUI
from tests.integration.support import get_json
from tests.security.test_history_views import (  # noqa: F401 - fixtures
    ALICE,
    BOB,
    A,
    B,
    Client,
    client,
    direct,
    submit,
)


def count_record_reads(store: OwnershipStore, monkeypatch: pytest.MonkeyPatch) -> list[str]:
    reads: list[str] = []
    original = store.records

    async def counting(ids: Any) -> list[PromptRecord | None]:
        reads.extend(ids)
        return await original(ids)

    monkeypatch.setattr(store, "records", counting)
    return reads


async def test_b_never_sees_as_entry_once_it_is_cached(
    client: Client,  # noqa: F811
    direct: aiohttp.ClientSession,  # noqa: F811
    fake_comfy: FakeComfyUI,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    a_id = await submit(client, direct, ALICE)
    b_id = await submit(client, direct, BOB)
    await fake_comfy.wait_idle()
    reads = count_record_reads(client.app[OWNERSHIP], monkeypatch)
    for _ in range(3):
        assert list(await get_json(client, f"/history/{a_id}", A)) == [a_id]
        assert await get_json(client, f"/history/{a_id}", B) == {}  # SECURITY: A's, cached
        assert list(await get_json(client, f"/history/{b_id}", B)) == [b_id]
        assert await get_json(client, f"/history/{b_id}", A) == {}
    assert sorted(reads) == sorted([a_id, b_id])  # each record read once, then remembered
    # ComfyUI answered (each time) for every one of them: the cache saves the store, not the
    # upstream exchange.
    asked = [r for r in fake_comfy.received if r.path in (f"/history/{a_id}", f"/history/{b_id}")]
    assert len(asked) == 12


async def test_an_id_without_record_is_asked_again(
    client: Client,  # noqa: F811
    direct: aiohttp.ClientSession,  # noqa: F811
    fake_comfy: FakeComfyUI,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """An entry of nobody the proxy knows (no record) is never cached: had B's record been
    written late, B would see it at once; and A never sees it."""
    unknown = fake_comfy.queue.preload_history(1)[0]
    reads = count_record_reads(client.app[OWNERSHIP], monkeypatch)
    for _ in range(3):
        assert await get_json(client, f"/history/{unknown}", A) == {}
    assert reads == [unknown] * 3


def record(pid: str, owner: str, created_at: float) -> PromptRecord:
    return PromptRecord(pid, owner, "u", "ns", created_at)


def test_cache_never_outlives_the_record_nor_its_max_age() -> None:
    now = time.time()
    cache = RecordCache(retention_seconds=100.0)
    cache.put(record("old", ALICE, now - 99.0), now)
    assert cache.get("old", now) is not None
    assert cache.get("old", now + 1.0) is None  # the record expires in Redis at created + 100
    cache.put(record("expired", ALICE, now - 200.0), now)
    assert cache.get("expired", now) is None
    long = RecordCache(retention_seconds=1e9)
    long.put(record("p", ALICE, now), now)
    assert long.get("p", now + MAX_AGE_SECONDS - 1) is not None
    assert long.get("p", now + MAX_AGE_SECONDS) is None
