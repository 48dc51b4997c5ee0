"""The same test over in-process state and over a real Redis (never a mock)."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import TYPE_CHECKING, Any

import pytest
import redis.asyncio as redis
from aiohttp.test_utils import TestClient

from proxy.tenancy.ownership import MemoryOwnershipStore, OwnershipStore, RedisOwnershipStore

if TYPE_CHECKING:
    from tests.conftest import ProxyFactory
    from tests.fakes.comfyui import FakeComfyUI

STATES = ["memory", "redis"]
"""``@pytest.fixture(params=STATES)``: where a fixture keeps its state."""


async def proxy_over(
    request: pytest.FixtureRequest, make_proxy: ProxyFactory, fake_comfy: FakeComfyUI
) -> TestClient[Any, Any]:
    """The proxy (requests say who they are), its state in process or in the session's Redis
    as ``request.param`` says."""
    if request.param == "memory":
        return await make_proxy(fake_comfy.url, token=None)
    url: str = request.getfixturevalue("redis_url")
    return await make_proxy(fake_comfy.url, token=None, redis={"url": url})


@asynccontextmanager
async def ownership_store(
    request: pytest.FixtureRequest, retention_seconds: float
) -> AsyncIterator[OwnershipStore]:
    """An ownership store in memory or in the session's Redis, as ``request.param`` says."""
    if request.param == "memory":
        yield MemoryOwnershipStore(retention_seconds)
        return
    url: str = request.getfixturevalue("redis_url")
    client = redis.Redis.from_url(url)
    store = RedisOwnershipStore(client, retention_seconds)
    try:
        yield store
    finally:
        await store.aclose()
        await client.aclose()
