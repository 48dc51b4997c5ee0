"""The /ws relay mechanics against a scripted upstream: frames, close codes, limits, slow clients.

The ComfyUI-specific behaviour (clientId routing, takeover, event sequences) is tested against the
fake ComfyUI in ``test_websocket_comfyui.py``.
"""

from __future__ import annotations

import asyncio
import os
import struct
from dataclasses import dataclass, field
from typing import Any

import aiohttp
import pytest
from aiohttp import WSMsgType, web
from pytest_aiohttp import AiohttpServer

from tests.conftest import ProxyFactory


@pytest.fixture
def make_proxy(make_proxy: ProxyFactory) -> ProxyFactory:
    """These tests are about the relay itself: no per-user client ids (isolation off)."""

    async def factory(upstream_url: str, **sections: Any) -> Any:
        sections.setdefault("isolation", {"enabled": False})
        return await make_proxy(upstream_url, **sections)

    return factory


@dataclass
class ScriptedUpstream:
    """A minimal /ws endpoint whose sockets the test drives directly."""

    url: str = ""
    sockets: dict[str, web.WebSocketResponse] = field(default_factory=dict)
    connected: dict[str, asyncio.Event] = field(default_factory=dict)
    closed: dict[str, asyncio.Future[tuple[int | None, str]]] = field(default_factory=dict)
    received: list[tuple[str, Any]] = field(default_factory=list)
    handshakes: list[web.Request] = field(default_factory=list)

    def event(self, sid: str) -> asyncio.Event:
        return self.connected.setdefault(sid, asyncio.Event())

    def closed_future(self, sid: str) -> asyncio.Future[tuple[int | None, str]]:
        if sid not in self.closed:
            self.closed[sid] = asyncio.get_running_loop().create_future()
        return self.closed[sid]

    async def handler(self, request: web.Request) -> web.WebSocketResponse:
        self.handshakes.append(request)
        sid = request.query.get("clientId", "minted")
        ws = web.WebSocketResponse(max_msg_size=0, protocols=("comfy.v1",))
        await ws.prepare(request)
        self.sockets[sid] = ws
        closed = self.closed_future(sid)
        self.event(sid).set()
        await ws.send_json({"type": "status", "data": {"sid": sid}})
        async for msg in ws:
            self.received.append((sid, msg.data))
        if not closed.done():
            closed.set_result((ws.close_code, ""))
        return ws


@pytest.fixture
async def scripted(aiohttp_server: AiohttpServer) -> ScriptedUpstream:
    upstream = ScriptedUpstream()
    app = web.Application()
    app.router.add_get("/ws", upstream.handler)
    app.router.add_get("/api/ws", upstream.handler)
    server = await aiohttp_server(app)
    upstream.url = str(server.make_url("")).rstrip("/")
    return upstream


def preview(kind: int, payload: bytes) -> bytes:
    """A ComfyUI binary frame: big-endian type, then (type 1) the image format, then bytes."""
    return struct.pack(">II", kind, 1) + payload


async def test_frames_relayed_both_ways_unmodified(
    make_proxy: ProxyFactory, scripted: ScriptedUpstream
) -> None:
    client = await make_proxy(scripted.url)
    ws = await client.ws_connect("/api/ws?clientId=abc", protocols=("comfy.v1",), max_msg_size=0)
    assert ws.protocol == "comfy.v1"
    assert await ws.receive_json() == {"type": "status", "data": {"sid": "abc"}}
    assert scripted.handshakes[0].path_qs == "/api/ws?clientId=abc"

    await ws.send_str('{"type":"feature_flags","data":{"supports_preview_metadata":true}}')
    await ws.send_bytes(b"\x00\x01binary-up")
    big = preview(1, os.urandom(6 * 1024 * 1024))  # above aiohttp's (and ComfyUI's) 4 MiB default
    meta = b'{"node_id":"3","prompt_id":"p","image_type":"image/png"}'
    with_meta = struct.pack(">II", 4, len(meta)) + meta + os.urandom(1000)
    text3 = struct.pack(">II", 3, 1) + b"5hello"
    upstream_ws = scripted.sockets["abc"]
    for frame in (big, with_meta, text3):
        await upstream_ws.send_bytes(frame)
    await upstream_ws.send_json({"type": "executing", "data": {"node": None, "prompt_id": "p"}})
    assert await ws.receive_bytes() == big
    assert await ws.receive_bytes() == with_meta
    assert await ws.receive_bytes() == text3
    assert (await ws.receive_json())["type"] == "executing"
    await ws.close()
    await scripted.closed_future("abc")
    assert scripted.received == [
        ("abc", '{"type":"feature_flags","data":{"supports_preview_metadata":true}}'),
        ("abc", b"\x00\x01binary-up"),
    ]


async def test_client_close_code_reaches_upstream(
    make_proxy: ProxyFactory, scripted: ScriptedUpstream
) -> None:
    client = await make_proxy(scripted.url)
    ws = await client.ws_connect("/ws?clientId=c1")
    await ws.receive_json()
    await ws.close(code=4001, message=b"tab closed")
    code, _ = await asyncio.wait_for(scripted.closed_future("c1"), 5)
    assert code == 4001


async def test_upstream_close_code_and_reason_reach_client(
    make_proxy: ProxyFactory, scripted: ScriptedUpstream
) -> None:
    client = await make_proxy(scripted.url)
    ws = await client.ws_connect("/ws?clientId=c2")
    await ws.receive_json()
    await scripted.sockets["c2"].send_json({"type": "last"})
    await scripted.sockets["c2"].close(code=4002, message=b"bye from comfy")
    assert (await ws.receive_json())["type"] == "last"  # queued events go out before the close
    msg = await ws.receive()
    assert msg.type is WSMsgType.CLOSE
    assert (msg.data, msg.extra) == (4002, "bye from comfy")


async def test_upstream_down_is_502_before_upgrade(make_proxy: ProxyFactory) -> None:
    from tests.integration.test_forward_errors import dead_port  # noqa: PLC0415

    client = await make_proxy(f"http://127.0.0.1:{dead_port()}")
    with pytest.raises(aiohttp.WSServerHandshakeError) as info:
        await client.ws_connect("/ws?clientId=x")
    assert info.value.status == 502
    resp = await client.get("/ws", headers={"Upgrade": "websocket", "Connection": "Upgrade"})
    assert resp.status == 502
    assert (await resp.json())["error"]["type"] == "upstream_unavailable"


async def test_upstream_handshake_refusal_status_passes(
    make_proxy: ProxyFactory, aiohttp_server: AiohttpServer
) -> None:
    async def refuse(request: web.Request) -> web.Response:
        return web.Response(status=403)

    app = web.Application()
    app.router.add_get("/ws", refuse)
    server = await aiohttp_server(app)
    client = await make_proxy(str(server.make_url("")).rstrip("/"))
    with pytest.raises(aiohttp.WSServerHandshakeError) as info:
        await client.ws_connect("/ws")
    assert info.value.status == 403


async def test_heartbeat_pings_the_client(
    make_proxy: ProxyFactory, scripted: ScriptedUpstream
) -> None:
    client = await make_proxy(scripted.url, websocket={"heartbeat_seconds": 0.05})
    ws = await client.ws_connect("/ws?clientId=hb", autoping=False)
    await ws.receive_json()
    msg = await asyncio.wait_for(ws.receive(), 5)
    assert msg.type is WSMsgType.PING
    await ws.pong(msg.data)
    await ws.close()


async def test_oversized_client_frame_closes_with_1009(
    make_proxy: ProxyFactory, scripted: ScriptedUpstream
) -> None:
    client = await make_proxy(scripted.url, websocket={"max_message_mb": 1})
    ws = await client.ws_connect("/ws?clientId=big")
    await ws.receive_json()
    await ws.send_bytes(b"x" * (2 * 1024 * 1024))
    msg = await ws.receive()
    assert msg.type is WSMsgType.CLOSE
    assert msg.data == 1009
    code, _ = await asyncio.wait_for(scripted.closed_future("big"), 5)
    assert code == 1009  # never a half-open upstream socket left behind


async def slow_client_run(
    make_proxy: ProxyFactory,
    scripted: ScriptedUpstream,
    frames: list[str | bytes],
    **websocket: Any,
) -> tuple[list[str | bytes], aiohttp.ClientWebSocketResponse, Any]:
    """Send ``frames`` upstream while the client reads nothing, then read all it gets."""
    client = await make_proxy(scripted.url, websocket={"send_queue_mb": 1, **websocket})
    # A small client read buffer: aiohttp stops reading the socket once it holds this much.
    ws = await client.ws_connect("/ws?clientId=slow", max_msg_size=0)
    await ws.receive_json()
    upstream = scripted.sockets["slow"]
    try:
        for frame in frames:
            if isinstance(frame, str):
                await upstream.send_str(frame)
            else:
                await upstream.send_bytes(frame)
        await upstream.send_json({"type": "marker"})
    except ConnectionResetError:
        pass  # the proxy gave up on the client and closed this side: what 1013 tests expect
    got: list[str | bytes] = []
    while True:
        msg = await asyncio.wait_for(ws.receive(), 10)
        if msg.type in (WSMsgType.CLOSE, WSMsgType.CLOSED, WSMsgType.CLOSING):
            return got, ws, msg
        got.append(msg.data)
        if msg.type is WSMsgType.TEXT and '"marker"' in msg.data:
            return got, ws, None


async def test_slow_client_loses_stale_previews_never_events(
    make_proxy: ProxyFactory, scripted: ScriptedUpstream
) -> None:
    frames: list[str | bytes] = []
    for i in range(120):
        frames.append(preview(1, bytes([i % 256]) * (256 * 1024)))
        frames.append(f'{{"type":"progress","data":{{"value":{i}}}}}')
    got, ws, closed = await slow_client_run(make_proxy, scripted, frames)
    assert closed is None
    events = [g for g in got if isinstance(g, str)]
    assert events[:-1] == [f for f in frames if isinstance(f, str)]  # every event, in order
    previews = [g for g in got if isinstance(g, bytes)]
    assert 0 < len(previews) < 120
    assert previews[-1] == frames[-2]  # the newest preview survives
    await ws.close()


async def test_slow_client_that_cannot_keep_up_with_events_gets_1013(
    make_proxy: ProxyFactory, scripted: ScriptedUpstream
) -> None:
    event = '{"type":"progress","data":{"pad":"' + "x" * 200_000 + '"}}'
    got, _, closed = await slow_client_run(make_proxy, scripted, [event] * 200)
    assert closed is not None
    assert closed.type is WSMsgType.CLOSE
    assert closed.data == 1013
    assert 0 < len(got) < 200
    code, _ = await asyncio.wait_for(scripted.closed_future("slow"), 5)
    assert code == 1013


async def test_previews_not_dropped_when_disabled_close_instead(
    make_proxy: ProxyFactory, scripted: ScriptedUpstream
) -> None:
    frames: list[str | bytes] = [preview(1, b"p" * (256 * 1024)) for _ in range(200)]
    _, _, closed = await slow_client_run(make_proxy, scripted, frames, drop_stale_previews=False)
    assert closed is not None
    assert closed.data == 1013
