"""A Redis outage never lets another user's events through a socket (issue 14, finding 1).

ComfyUI broadcasts the events of a prompt submitted without a ``client_id`` to every socket;
the proxy passes each to its owner's sockets only, after an ownership lookup in Redis. While
Redis is down that lookup fails: the frame is dropped on every socket (default deny), the
relays stay open, and once Redis answers again B's events reach B and still not A.

Redis is a real redis-server of the test alone; a marker frame sent after the frames under
test, received by the client, proves they were handled (frames of one socket stay in order).
"""

from __future__ import annotations

import time
import uuid
from typing import Any

import aiohttp

from proxy.comfy.records import PromptRecord
from proxy.tenancy.namespaces import upstream_client_id
from proxy.tenancy.ownership import OWNERSHIP
from tests.conftest import ProxyFactory
from tests.fakes.comfyui import FakeComfyUI
from tests.integration.multi_support import ALICE, BOB, A, B, Client, connect, receive_until
from tests.redis_server import RedisServer

FAST_REDIS = {"socket_timeout_seconds": 0.5, "connect_timeout_seconds": 0.5, "retries": 0}


async def broadcast_prompt(fake: FakeComfyUI, prompt_id: str, marker: str) -> None:
    """What ComfyUI sends every socket for a prompt without a client_id, then a marker."""
    for kind, data in (
        ("execution_start", {"prompt_id": prompt_id}),
        ("executing", {"node": "1", "prompt_id": prompt_id}),
        ("progress", {"value": 1, "max": 2, "node": "1", "prompt_id": prompt_id}),
        ("executing", {"node": None, "prompt_id": prompt_id}),
    ):
        await fake.broadcast({"type": kind, "data": data})
    await fake.broadcast({"type": "status", "data": {"status": {}, "marker": marker}})


async def heard(ws: aiohttp.ClientWebSocketResponse, marker: str) -> list[Any]:
    frames = await receive_until(ws, lambda f: f.get("data", {}).get("marker") == marker)
    return [f for f in frames if f.get("data", {}).get("prompt_id") is not None]


async def test_b_events_reach_nobody_while_redis_is_down_and_only_b_after(
    make_proxy: ProxyFactory, fake_comfy: FakeComfyUI, own_redis: RedisServer
) -> None:
    client: Client = await make_proxy(
        fake_comfy.url, token=None, redis={"url": own_redis.url, **FAST_REDIS}
    )
    a_ws, _ = await connect(client, A, "tab-a")
    b_ws, _ = await connect(client, B, "tab-b")
    for sid in (upstream_client_id(ALICE, "tab-a"), upstream_client_id(BOB, "tab-b")):
        await fake_comfy.wait_socket(sid, flags=True)
    prompt_id = str(uuid.uuid4())
    record = PromptRecord(prompt_id, BOB, "u", upstream_client_id(BOB, ""), time.time())
    assert await client.app[OWNERSHIP].record_prompt(record)

    own_redis.stop()
    try:
        await broadcast_prompt(fake_comfy, prompt_id, "down")
        assert await heard(a_ws, "down") == []  # SECURITY: not attributable, not delivered
        assert await heard(b_ws, "down") == []  # not even to its owner: nobody could tell
    finally:
        own_redis.start()
    # The store came back empty (a restarted Redis without persistence): B records again.
    assert await client.app[OWNERSHIP].record_prompt(record)

    await broadcast_prompt(fake_comfy, prompt_id, "up")
    assert len(await heard(b_ws, "up")) == 4
    assert await heard(a_ws, "up") == []
    assert not a_ws.closed
    assert not b_ws.closed
    await a_ws.close()
    await b_ws.close()
