"""The raw relay (``proxy.relay.raw_ws``) through the proxy: the default path for ``/ws``, every
length class, fragments and control frames both ways, protocol errors, the handshake's edges
(client gone during it, upstream refusing or answering wrongly), a ping flood, the accounting."""

from __future__ import annotations

import asyncio
import contextlib
import gc
import os
import struct
from typing import Any

import aiohttp
import pytest
from aiohttp import WSMsgType

from proxy.relay.raw_ws import RawRelay
from proxy.state import LIFECYCLE
from tests.conftest import ProxyFactory
from tests.integration.support import sample
from tests.integration.test_websocket_relay import (  # noqa: F401 - fixtures
    ScriptedUpstream,
    make_proxy,
    scripted,
)
from tests.support.raw_ws_peers import (
    RawUpstream,
    close_code,
    fragments,
    frame,
    raw_client,
    read_frame,
)

SIZES = (0, 1, 125, 126, 16383, 16384, 65535, 65536, 70000, 1 << 20)


@pytest.fixture
async def raw_upstream() -> Any:
    upstream = await RawUpstream().start()
    yield upstream
    await upstream.stop()


def relays(client: Any) -> list[Any]:
    return list(client.app[LIFECYCLE].websockets)


def open_sockets(client: Any) -> float:
    return sample(client, "comfygate_websocket_connections")


async def connect_raw(client: Any, path: str) -> Any:
    server = client.server
    headers = dict(client.session.headers)
    return await raw_client(server.host, server.port, path, headers)


async def test_raw_relay_is_the_default_and_every_length_class_arrives_intact(
    make_proxy: ProxyFactory,  # noqa: F811
    scripted: ScriptedUpstream,  # noqa: F811
) -> None:
    client = await make_proxy(scripted.url)
    ws = await client.ws_connect("/ws?clientId=sizes", max_msg_size=0)
    await ws.receive_json()
    [relay] = relays(client)
    assert isinstance(relay, RawRelay)
    upstream = scripted.sockets["sizes"]
    sent: list[str | bytes] = []
    for size in SIZES:
        payload = os.urandom(size)
        text = "é" * (size // 2)  # a text frame's length is its UTF-8 length
        sent += [payload, text]
        await upstream.send_bytes(payload)
        await upstream.send_str(text)
    got = []
    for _ in sent:
        msg = await asyncio.wait_for(ws.receive(), 10)
        got.append(msg.data)
    assert got == sent
    for size in SIZES:  # and upward, re-masked
        await ws.send_bytes(b"u" * size)
    await ws.send_str("done")
    await ws.close()
    await asyncio.wait_for(scripted.closed_future("sizes"), 5)
    assert [d for _, d in scripted.received] == [b"u" * s for s in SIZES] + ["done"]


async def test_the_upgrade_answer_carries_the_proxys_headers_and_no_extension(
    make_proxy: ProxyFactory,  # noqa: F811
    scripted: ScriptedUpstream,  # noqa: F811
) -> None:
    client = await make_proxy(scripted.url)
    peer = await connect_raw(client, "/ws?clientId=h")
    assert " 101 " in peer.status
    assert "x-request-id" in peer.headers  # on_response_prepare ran for the 101
    assert peer.headers["upgrade"].lower() == "websocket"
    # Offered by the client, never negotiated: ComfyUI's traffic is JPEG/PNG already.
    assert "sec-websocket-extensions" not in peer.headers
    op, _, payload, masked = await peer.next()
    assert (op, masked) == (0x1, False)
    assert b'"status"' in payload
    [relay] = relays(client)
    peer.close()  # gone without a close frame: ComfyUI's socket is closed at once (1001)
    code, _ = await asyncio.wait_for(scripted.closed_future("h"), 5)
    assert code == 1001
    await asyncio.wait_for(relay.wait_closed(), 5)


async def test_fragmented_upstream_message_with_a_ping_between_arrives_whole(
    make_proxy: ProxyFactory,  # noqa: F811
    raw_upstream: RawUpstream,
) -> None:
    client = await make_proxy(raw_upstream.url)
    ws = await client.ws_connect("/ws?clientId=f", max_msg_size=0)
    reader, writer = await raw_upstream.next_socket()
    text = '{"type":"progress","data":{"value":1,"max":2}}'
    parts = fragments(0x1, text.encode(), 4)
    writer.write(parts[0] + frame(0x9, b"are you there") + b"".join(parts[1:]))
    binary = os.urandom(200_000)
    for part in fragments(0x2, binary, 5):
        writer.write(part)
        await writer.drain()
    assert await ws.receive_str() == text
    assert await ws.receive_bytes() == binary
    op, fin, payload, masked = await read_frame(reader)
    assert (op, fin, payload, masked) == (0xA, True, b"are you there", True)  # ponged, masked
    closing = asyncio.create_task(ws.close())
    op, _, payload, masked = await read_frame(reader)
    assert (op, close_code(payload), masked) == (0x8, 1000, True)
    writer.write(frame(0x8, payload))  # ComfyUI answers; then the client gets its answer
    await asyncio.wait_for(closing, 10)


async def test_fragmented_client_message_and_interleaved_ping(
    make_proxy: ProxyFactory,  # noqa: F811
    scripted: ScriptedUpstream,  # noqa: F811
) -> None:
    client = await make_proxy(scripted.url)
    peer = await connect_raw(client, "/ws?clientId=cf")
    await peer.next()  # status
    parts = fragments(0x1, b'{"type":"feature_flags","data":{}}', 3, mask=True)
    peer.send(parts[0] + frame(0x9, b"ping!", mask=True) + b"".join(parts[1:]))
    op, _, payload, masked = await peer.next(skip_pings=False)
    assert (op, payload, masked) == (0xA, b"ping!", False)
    peer.send(frame(0x8, struct.pack("!H", 4000) + b"done", mask=True))
    op, _, payload, _ = await peer.next()
    assert (op, close_code(payload)) == (0x8, 4000)
    code, _ = await asyncio.wait_for(scripted.closed_future("cf"), 5)
    assert code == 4000
    assert scripted.received == [("cf", '{"type":"feature_flags","data":{}}')]


@pytest.mark.parametrize(
    ("garbage", "code"),
    [
        (frame(0x2, b"x", rsv=0x40, mask=True), 1002),  # RSV1 without permessage-deflate
        (frame(0x2, b"unmasked"), 1002),
        (frame(0x3, b"x", mask=True), 1002),  # reserved opcode
        (frame(0x1, b"\xff\xfe", mask=True), 1007),  # text that is not UTF-8
        (frame(0x0, b"x", mask=True), 1002),  # continuation of nothing
    ],
    ids=["rsv1", "unmasked", "reserved_opcode", "text_not_utf8", "lone_continuation"],
)
async def test_client_protocol_errors_close_both_sides_with_their_code(
    garbage: bytes,
    code: int,
    make_proxy: ProxyFactory,  # noqa: F811
    scripted: ScriptedUpstream,  # noqa: F811
) -> None:
    client = await make_proxy(scripted.url)
    peer = await connect_raw(client, "/ws?clientId=g")
    await peer.next()
    peer.send(garbage)
    op, _, payload, _ = await peer.next()
    assert (op, close_code(payload)) == (0x8, code)
    upstream_code, _ = await asyncio.wait_for(scripted.closed_future("g"), 5)
    assert upstream_code == code
    assert scripted.received == []  # nothing of it reached ComfyUI


async def test_upstream_protocol_error_and_oversize_close_the_client_with_1011(
    make_proxy: ProxyFactory,  # noqa: F811
    raw_upstream: RawUpstream,
) -> None:
    client = await make_proxy(raw_upstream.url, websocket={"max_message_mb": 1})
    for bad, upstream_code in (
        (frame(0x2, b"masked", mask=True), 1002),
        (frame(0x2, b"x" * (2 * 1024 * 1024)), 1009),  # refused from its header
    ):
        ws = await client.ws_connect("/ws?clientId=u")
        [relay] = relays(client)
        reader, writer = await raw_upstream.next_socket()
        writer.write(bad)
        msg = await asyncio.wait_for(ws.receive(), 10)
        assert (msg.type, msg.data) == (WSMsgType.CLOSE, 1011)
        op, _, payload, _ = await asyncio.wait_for(read_frame(reader), 10)
        assert (op, close_code(payload)) == (0x8, upstream_code)
        writer.close()  # ComfyUI lets go after the close
        await asyncio.wait_for(relay.wait_closed(), 10)
    assert open_sockets(client) == 0


async def test_upstream_connection_dropped_closes_the_client_with_1011(
    make_proxy: ProxyFactory,  # noqa: F811
    raw_upstream: RawUpstream,
) -> None:
    client = await make_proxy(raw_upstream.url)
    ws = await client.ws_connect("/ws?clientId=d")
    [relay] = relays(client)
    _, writer = await raw_upstream.next_socket()
    writer.write(frame(0x1, b'{"type":"last"}'))
    writer.close()
    assert await ws.receive_str() == '{"type":"last"}'
    msg = await asyncio.wait_for(ws.receive(), 10)
    assert (msg.type, msg.data) == (WSMsgType.CLOSE, 1011)
    await asyncio.wait_for(relay.wait_closed(), 10)
    assert relays(client) == []


async def test_client_gone_during_the_handshake_leaves_no_upstream_socket(
    make_proxy: ProxyFactory,  # noqa: F811
    raw_upstream: RawUpstream,
) -> None:
    client = await make_proxy(raw_upstream.url)
    answer, asked = asyncio.Event(), asyncio.Event()

    async def hold() -> None:
        asked.set()
        await answer.wait()

    raw_upstream.before_answer = hold
    server = client.server
    reader, writer = await asyncio.open_connection(server.host, server.port)
    auth = client.session.headers["Authorization"]
    writer.write(
        (
            "GET /ws?clientId=gone HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\n"
            "Connection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n"
            f"Sec-WebSocket-Version: 13\r\nAuthorization: {auth}\r\n\r\n"
        ).encode()
    )
    await asyncio.wait_for(asked.wait(), 10)
    writer.close()  # the client leaves while ComfyUI is still answering
    await writer.wait_closed()
    answer.set()
    up_reader, _ = await raw_upstream.next_socket()
    # The proxy let go of it (aborted: nothing was ever relayed on it).
    with contextlib.suppress(ConnectionResetError):
        assert await asyncio.wait_for(up_reader.read(), 10) == b""
    assert relays(client) == []
    assert open_sockets(client) == 0
    del reader


@pytest.mark.parametrize(
    "answer",
    [
        lambda key: (
            b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\n"
            b"Connection: Upgrade\r\nSec-WebSocket-Accept: d3Jvbmc=\r\n\r\n"
        ),
        lambda key: b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n",
        lambda key: b"garbage\r\n\r\n",
    ],
    ids=["wrong_accept", "not_101", "garbage"],
)
async def test_upstream_wrong_answer_is_502_before_the_upgrade(
    answer: Any,
    make_proxy: ProxyFactory,  # noqa: F811
    raw_upstream: RawUpstream,
) -> None:
    raw_upstream.answer = answer
    client = await make_proxy(raw_upstream.url)
    with pytest.raises(aiohttp.WSServerHandshakeError) as info:
        await client.ws_connect("/ws?clientId=w")
    assert info.value.status == 502
    assert relays(client) == []


async def test_ping_flood_is_answered_without_unbounded_buffering(
    make_proxy: ProxyFactory,  # noqa: F811
    scripted: ScriptedUpstream,  # noqa: F811
) -> None:
    client = await make_proxy(scripted.url)
    peer = await connect_raw(client, "/ws?clientId=flood")
    await peer.next()
    [relay] = relays(client)
    transport = relay.client_transport
    assert transport is not None
    high = transport.get_write_buffer_limits()[1]
    ping = frame(0x9, b"p" * 125, mask=True)
    for _ in range(50):  # 50 x 200 pings of 125 bytes, never reading the pongs
        peer.send(ping * 200)
        await peer.writer.drain()
        # Pongs stop once the transport is over its mark: at most one more pong over it.
        assert transport.get_write_buffer_size() <= high + 256 * 1024
    await scripted.sockets["flood"].send_str("after")
    while True:  # the pongs, then the relay still works
        op, _, payload, _ = await peer.next(skip_pings=False)
        if op == 0x1:
            assert payload == b"after"
            break
        assert op == 0xA
    peer.close()
    await asyncio.wait_for(relay.wait_closed(), 10)


async def test_the_access_line_and_gauge_come_at_the_end(
    make_proxy: ProxyFactory,  # noqa: F811
    scripted: ScriptedUpstream,  # noqa: F811
) -> None:
    client = await make_proxy(scripted.url)
    ws = await client.ws_connect("/ws?clientId=acct")
    await ws.receive_json()
    assert open_sockets(client) == 1
    key = ("comfygate_http_requests_total", {"rule": "ws", "method": "GET", "status": "101"})
    assert sample(client, key[0], **key[1]) == 0  # counted when it ends
    await scripted.sockets["acct"].send_str("x" * 100)
    assert len(await ws.receive_str()) == 100
    [relay] = relays(client)
    await ws.close()
    await asyncio.wait_for(relay.wait_closed(), 10)
    assert open_sockets(client) == 0
    assert sample(client, key[0], **key[1]) == 1
    assert relays(client) == []


async def test_ended_relays_leave_nothing_behind(
    make_proxy: ProxyFactory,  # noqa: F811
    scripted: ScriptedUpstream,  # noqa: F811
) -> None:
    client = await make_proxy(scripted.url)
    for i in range(20):
        ws = await client.ws_connect(f"/ws?clientId=leak{i}")
        await ws.receive_json()
        [relay] = relays(client)
        await ws.close()
        await asyncio.wait_for(relay.wait_closed(), 10)
        del relay
    gc.collect()
    assert [o for o in gc.get_objects() if isinstance(o, RawRelay)] == []
    assert client.app[LIFECYCLE].relays == {}
    assert client.app[LIFECYCLE].relay_principals == {}
    assert open_sockets(client) == 0


async def test_a_comfyui_that_does_not_read_pauses_the_client(
    make_proxy: ProxyFactory,  # noqa: F811
    raw_upstream: RawUpstream,
) -> None:
    client = await make_proxy(raw_upstream.url, websocket={"max_message_mb": 2})
    peer = await connect_raw(client, "/ws?clientId=bp")
    reader, writer = await raw_upstream.next_socket()  # ComfyUI reads nothing for now
    [relay] = relays(client)
    transport = relay.client_transport
    assert transport is not None
    message = os.urandom(1024 * 1024)
    wire = frame(0x2, message, mask=True)
    for _ in range(32):  # 32 MiB: far more than the sockets' buffers hold
        peer.send(wire)
    for _ in range(10_000):  # the loop turns it takes the proxy to fill the upstream socket
        if not transport.is_reading():
            break
        await asyncio.sleep(0)
    assert not transport.is_reading()  # the client is held back, not buffered in the proxy
    for _ in range(32):  # ComfyUI reads again: everything arrives, re-masked, in one piece
        op, fin, payload, masked = await asyncio.wait_for(read_frame(reader), 30)
        assert (op, fin, masked) == (0x2, True, True)
        assert payload == message
    assert transport.is_reading()
    peer.send(frame(0x8, struct.pack("!H", 1000), mask=True))
    op, _, payload, _ = await asyncio.wait_for(read_frame(reader), 10)
    assert (op, close_code(payload)) == (0x8, 1000)
    writer.write(frame(0x8, payload))
    await asyncio.wait_for(relay.wait_closed(), 10)
