"""The core rate-limit and queue-quota checks on every Redis deployment: a single server, a
Sentinel-managed master and a 3-node Redis Cluster (``redis_backend``), each time with two
proxy apps sharing it, through HTTP only.

- Rate limit exactness: with burst B (and a slow refill, so timing cannot blur it), exactly B
  requests pass at once and the next is 429 with a ``Retry-After`` - over concurrent requests
  split between the two apps.
- Queue quota: concurrent submissions through both apps never exceed it; a finished prompt
  frees its slot through the WebSocket fast path and through the reconciler.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Iterator
from typing import Any

import aiohttp
import pytest
from aiohttp.test_utils import TestClient

from proxy.limits.quota.service import QUEUE_QUOTA
from tests.conftest import ProxyFactory, RedisBackend, bearer
from tests.fakes.comfyui import FakeComfyUI
from tests.integration.support import graph

Client = TestClient[Any, Any]
ALICE = bearer("alice")
BURST = 5
QUOTA = 3


async def pair(
    make_proxy: ProxyFactory, fake: FakeComfyUI, backend: RedisBackend
) -> tuple[Client, Client]:
    """Two proxy apps (two replicas) on one Redis deployment."""
    limits = {
        "queue_quota": QUOTA,
        "quota_poll_seconds": 3600.0,  # the test drives the reconciler
        "default": {"read": {"rate": "1/hour", "burst": BURST}, "submit": {"rate": "unlimited"}},
    }
    # Room in ComfyUI for every prompt the quota admits: the gateway queue lets each through
    # at once, answered and accepted by the replica that took it (these tests are about the
    # quota; the gateway queue's own replicas: tests/integration/test_scheduler_redis.py).
    scheduler = {"max_pending": QUOTA}
    one, two = [
        await make_proxy(
            fake.url, token=None, redis=backend.settings, rate_limits=limits, scheduler=scheduler
        )
        for _ in range(2)
    ]
    return one, two


@pytest.fixture
def held(fake_comfy: FakeComfyUI) -> Iterator[FakeComfyUI]:
    fake_comfy.hold()
    yield fake_comfy
    fake_comfy.release()


async def test_burst_is_exact_across_replicas(
    make_proxy: ProxyFactory, fake_comfy: FakeComfyUI, redis_backend: RedisBackend
) -> None:
    one, two = await pair(make_proxy, fake_comfy, redis_backend)

    async def get(client: Client) -> tuple[int, str | None]:
        async with client.get("/object_info", headers=ALICE) as resp:
            await resp.read()
            return resp.status, resp.headers.get("Retry-After")

    results = await asyncio.gather(*(get(one if i % 2 else two) for i in range(4 * BURST)))
    assert [s for s, _ in results].count(200) == BURST
    refused = [r for s, r in results if s == 429]
    assert len(refused) == 3 * BURST
    assert all(r is not None and 0 < int(r) <= 3600 for r in refused)
    assert (await get(one))[0] == 429  # B+1 is refused on either replica, later too


async def submit(client: Client, client_id: str | None = None) -> tuple[int, dict[str, Any]]:
    body: dict[str, Any] = {"prompt": graph()}
    if client_id is not None:
        body["client_id"] = client_id
    async with client.post("/prompt", json=body, headers=ALICE) as resp:
        return resp.status, await resp.json()


async def test_queue_quota_across_replicas(
    make_proxy: ProxyFactory, held: FakeComfyUI, redis_backend: RedisBackend
) -> None:
    one, two = await pair(make_proxy, held, redis_backend)
    ws = await one.ws_connect("/ws?clientId=tab", headers=ALICE)
    results = await asyncio.gather(
        *(submit(one if i % 2 else two, "tab") for i in range(4 * QUOTA))
    )
    statuses = [s for s, _ in results]
    assert statuses.count(200) == QUOTA
    accepted = {a["prompt_id"] for s, a in results if s == 200}
    full = [a for s, a in results if s == 429]
    assert all(a["error"]["type"] == "queue_full" for a in full)
    assert len(full) == 3 * QUOTA

    # Fast path: the first prompt ends; its events on the socket (relayed by ``one``) free
    # the slot before the client sees them, for ``two`` as well.
    first = await held.wait_held()
    held.release()
    held.hold()
    end = {"type": "executing", "data": {"node": None, "prompt_id": first}}
    while (frame := await ws.receive(timeout=10)).type is not aiohttp.WSMsgType.TEXT or (
        json.loads(frame.data) != end
    ):
        pass
    status, answer = await submit(two)
    assert status == 200  # no socket: only the reconciler sees it end
    accepted.add(answer["prompt_id"])
    assert (await submit(one))[0] == 429

    # Reconciler: everything ends (the gateway queue releases what it held as ComfyUI has
    # room); the socketless prompt is noticed by the poll alone (the others may have been
    # released by their events already).
    held.release()
    await held.queue.wait_for(lambda: accepted <= set(held.queue.history))
    await held.wait_idle()
    reconciler = two.app[QUEUE_QUOTA].reconciler
    assert 1 <= await reconciler.poll_once() <= QUOTA
    held.hold()  # still running when the over-quota one has the queue read again: refused
    assert [(await submit(one))[0] for _ in range(QUOTA + 1)] == [200] * QUOTA + [429]
    await ws.close()
