"""The relay's direct writes (``proxy.relay.ws_fast.DirectWriter``): every payload length
class of RFC 6455's header, text and binary, in order with frames that took the queued path."""

from __future__ import annotations

import asyncio
import os

import pytest
from aiohttp import WSMsgType

from proxy.relay import websocket
from proxy.relay.ws_fast import DirectWriter, frame_header
from tests.conftest import ProxyFactory
from tests.integration.test_websocket_relay import (  # noqa: F401 - fixtures
    ScriptedUpstream,
    make_proxy,
    scripted,
)

SIZES = (0, 1, 125, 126, 16383, 16384, 65535, 65536, 70000, 1 << 20)


async def test_every_length_class_relayed_intact_and_in_order(
    make_proxy: ProxyFactory,  # noqa: F811
    scripted: ScriptedUpstream,  # noqa: F811
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    direct = 0
    write = DirectWriter.write

    def counted(self: DirectWriter, frame: str | bytes) -> bool:
        nonlocal direct
        written = write(self, frame)
        direct += written
        return written

    monkeypatch.setattr(DirectWriter, "write", counted)
    # DirectWriter belongs to the aiohttp relay, now the fallback of the raw one (the same
    # length classes through the raw relay: tests/integration/test_raw_ws_relay.py).
    monkeypatch.setattr(websocket, "raw_capable", lambda request: False)
    client = await make_proxy(scripted.url)
    ws = await client.ws_connect("/ws?clientId=sizes", max_msg_size=0)
    await ws.receive_json()
    upstream = scripted.sockets["sizes"]
    sent: list[str | bytes] = []
    for size in SIZES:
        payload = os.urandom(size)
        # A multi-byte character: the text frame's length is its UTF-8 length, not len(str).
        text = "é" * (size // 2)
        sent += [payload, text]
        await upstream.send_bytes(payload)
        await upstream.send_str(text)
    got: list[str | bytes] = []
    for _ in sent:
        msg = await asyncio.wait_for(ws.receive(), 10)
        assert msg.type in (WSMsgType.BINARY, WSMsgType.TEXT)
        got.append(msg.data)
    assert got == sent
    assert direct > 0  # the direct path was taken (the rest queued behind a full transport)
    await ws.close()


def test_frame_header_lengths() -> None:
    assert frame_header(0x82, 0) == b"\x82\x00"
    assert frame_header(0x82, 125) == b"\x82\x7d"
    assert frame_header(0x81, 126) == b"\x81\x7e\x00\x7e"
    assert frame_header(0x82, 65535) == b"\x82\x7e\xff\xff"
    assert frame_header(0x82, 65536) == b"\x82\x7f" + (65536).to_bytes(8, "big")
