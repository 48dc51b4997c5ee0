"""A relayed WebSocket keeps working through a Redis outage (issue 14, finding 1).

Redis is a real redis-server of the test alone (``own_redis``), stopped while a socket is open
and started again on the same port. While it is down, a frame whose owner cannot be looked up
is withheld (default deny: never deliver what could not be attributed) and counted; the relay
goes on, and once Redis is back the next prompt's events reach the same socket. Both the direct
relay (one instance) and the fan-in (three instances) are covered.

Synchronisation: frames on one upstream socket are relayed in order, so a marker frame sent
after a frame under test and received by the client proves the earlier one was handled.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import Callable
from typing import Any

import pytest

from proxy.comfy.records import PromptRecord
from proxy.multi.fanin import FanInRelay
from proxy.tenancy.namespaces import upstream_client_id
from proxy.tenancy.ownership import OWNERSHIP
from tests.conftest import ProxyFactory
from tests.fakes.comfyui import FakeComfyUI
from tests.integration.multi_support import (
    ALICE,
    BOB,
    A,
    B,
    Client,
    Fakes,
    connect,
    ended,
    fakes,
    multi_proxy,
    place,
    receive_until,
)
from tests.integration.support import sample
from tests.redis_server import RedisServer

__all__ = ["fakes", "multi_proxy"]  # fixtures used by name

FAST_REDIS = {"socket_timeout_seconds": 0.5, "connect_timeout_seconds": 0.5, "retries": 0}


def marked(marker: str) -> Callable[[Any], bool]:
    return lambda f: isinstance(f, dict) and f.get("data", {}).get("marker") == marker


async def unattributable_then_marker(fake: FakeComfyUI, sid: str, marker: str) -> None:
    """A frame of a prompt nobody has looked up yet (its owner must be read from Redis), then
    a status frame every socket passes on."""
    prompt = {"type": "executing", "data": {"node": "1", "prompt_id": str(uuid.uuid4())}}
    await fake.send_json(sid, prompt)
    await fake.send_json(sid, {"type": "status", "data": {"status": {}, "marker": marker}})


def filter_failures(client: Client) -> float:
    return sample(client, "comfygate_redis_errors_total", op="ws_owner", kind="connection")


async def test_direct_relay_survives_a_redis_outage(
    make_proxy: ProxyFactory, fake_comfy: FakeComfyUI, own_redis: RedisServer
) -> None:
    client: Client = await make_proxy(
        fake_comfy.url, token=None, redis={"url": own_redis.url, **FAST_REDIS}
    )
    ws, _ = await connect(client, A, "tab")
    sid = upstream_client_id(ALICE, "tab")
    await fake_comfy.wait_socket(sid, flags=True)

    own_redis.stop()
    try:
        await unattributable_then_marker(fake_comfy, sid, "during")
        frames = await receive_until(ws, marked("during"))
    finally:
        own_redis.start()
    # SECURITY: the frame nobody could attribute was not delivered.
    assert [f for f in frames if f.get("type") == "executing"] == []
    assert filter_failures(client) >= 1
    assert not ws.closed

    prompt_id = await place(client, fake_comfy, ALICE, "tab")
    events = await receive_until(ws, ended(prompt_id))
    assert any(f.get("type") == "execution_success" for f in events)
    await ws.close()


async def test_fanin_links_survive_a_redis_outage(
    multi_proxy: Callable[..., Any], fakes: Fakes, own_redis: RedisServer
) -> None:
    client: Client = await multi_proxy(redis={"url": own_redis.url, **FAST_REDIS})
    ws, _ = await connect(client, A, "tab")
    b_ws, _ = await connect(client, B, "tab-b")
    sid, b_sid = upstream_client_id(ALICE, "tab"), upstream_client_id(BOB, "tab-b")
    for fake in fakes:
        await fake.wait_socket(sid, flags=True)
        await fake.wait_socket(b_sid, flags=True)

    own_redis.stop()
    try:
        for i, fake in enumerate(fakes):  # every instance's link meets the outage
            await unattributable_then_marker(fake, sid, f"during-{i}")
            await receive_until(ws, marked(f"during-{i}"))
    finally:
        own_redis.start()
    assert filter_failures(client) >= len(fakes.items)
    assert not ws.closed

    for fake in fakes:  # the next prompt on each instance reaches the socket
        prompt_id = await place(client, fake, ALICE, "tab")
        events = await receive_until(ws, ended(prompt_id))
        assert any(f.get("type") == "execution_success" for f in events)
    # And Bob's socket, which met no outage frame, heard none of Alice's events.
    await fakes[0].broadcast({"type": "status", "data": {"status": {}, "marker": "end"}})
    b_frames = await receive_until(b_ws, marked("end"))
    assert {f["type"] for f in b_frames} <= {"status", "feature_flags"}
    await ws.close()
    await b_ws.close()


async def test_a_file_record_that_failed_is_retried_and_the_frame_delivered(
    make_proxy: ProxyFactory, fake_comfy: FakeComfyUI, own_redis: RedisServer
) -> None:
    """``executed`` of the caller's own prompt while Redis is down: the frame is the caller's
    (its owner was looked up before the outage), so it is delivered; the preview files it names
    are recorded as the caller's by the next frame of the caller's once Redis answers again."""
    client: Client = await make_proxy(
        fake_comfy.url, token=None, redis={"url": own_redis.url, **FAST_REDIS}
    )
    ws, _ = await connect(client, A, "tab")
    sid = upstream_client_id(ALICE, "tab")
    await fake_comfy.wait_socket(sid, flags=True)
    prompt_id = str(uuid.uuid4())
    ownership = client.app[OWNERSHIP]
    record = PromptRecord(prompt_id, ALICE, "u", sid, time.time(), previews=("2",))
    assert await ownership.record_prompt(record)
    await fake_comfy.send_json(sid, {"type": "execution_start", "data": {"prompt_id": prompt_id}})
    await receive_until(ws, lambda f: f.get("type") == "execution_start")  # owner now cached

    image = {"filename": "alice_preview.png", "subfolder": "", "type": "temp"}
    output = {"images": [image]}
    executed = {"node": "2", "display_node": "2", "output": output, "prompt_id": prompt_id}
    own_redis.stop()
    try:
        await fake_comfy.send_json(sid, {"type": "executed", "data": executed})
        frames = await receive_until(ws, lambda f: f.get("type") == "executed")
    finally:
        own_redis.start()
    assert frames[-1]["data"]["output"] == output  # the caller's own: delivered
    assert sample(client, "comfygate_redis_errors_total", op="ws_files", kind="connection") >= 1
    assert await ownership.file_owner(("temp", "", "alice_preview.png")) is None

    done = {"node": None, "prompt_id": prompt_id}
    await fake_comfy.send_json(sid, {"type": "executing", "data": done})
    await receive_until(ws, ended(prompt_id))  # a later frame of the caller's: retried
    assert await ownership.file_owner(("temp", "", "alice_preview.png")) == ALICE
    await ws.close()


async def test_a_fanin_link_that_fails_is_restarted(
    multi_proxy: Callable[..., Any], fakes: Fakes, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Whatever a link fails on (here: a bug injected in the fan-in's own event handling),
    it is logged, counted, its socket closed and opened again, and the instance's next
    prompt reaches the client."""
    client: Client = await multi_proxy(upstream={"ws_reconnect_max_seconds": 0.5})
    ws, _ = await connect(client, A, "tab")
    sid = upstream_client_id(ALICE, "tab")
    for fake in fakes:
        await fake.wait_socket(sid, flags=True)
    observe = FanInRelay._observe
    failed = False

    def failing_once(self: FanInRelay, link: Any, frame: str) -> None:
        nonlocal failed
        if not failed:
            failed = True
            raise RuntimeError("injected bug")
        observe(self, link, frame)

    monkeypatch.setattr(FanInRelay, "_observe", failing_once)
    fake = fakes[1]
    await place(client, fake, ALICE, "tab")  # its first watched event breaks the link
    # The link reconnects and sends the client's flags again (a second time on this sid).
    reconnected = fake.socket_table.wait_for(
        lambda: sid in fake.sockets and flags_sent(fake, sid) >= 2
    )
    await asyncio.wait_for(reconnected, 10)
    assert sample(client, "comfygate_task_failures_total", task="fanin_link") == 1

    prompt_id = await place(client, fake, ALICE, "tab")
    events = await receive_until(ws, ended(prompt_id))
    assert any(f.get("type") == "execution_success" for f in events)
    assert not ws.closed
    await ws.close()


def flags_sent(fake: FakeComfyUI, sid: str) -> int:
    return sum(
        1
        for to, kind, text in fake.ws_received
        if to == sid and kind == "text" and isinstance(text, str) and "feature_flags" in text
    )
