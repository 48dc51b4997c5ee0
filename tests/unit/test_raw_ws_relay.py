"""The raw relay's frame path (``proxy.relay.raw_ws.RawRelay``) on in-memory transports: quick
decisions in the callback, the ordered async path for undecided frames (order kept, upstream
paused meanwhile), dropped and failed frames, and the close handshake's order."""

from __future__ import annotations

import asyncio
from typing import Any

from prometheus_client import CollectorRegistry

from proxy.observability.metrics import Metrics
from proxy.relay.raw_ws import RawRelay, _UpstreamProtocol
from proxy.relay.ws_codec import (
    OP_BINARY,
    OP_CLOSE,
    OP_TEXT,
    FrameReader,
    client_frame,
    close_payload,
    server_frame,
)
from proxy.state import UNDECIDED, RequestContext, Undecided, with_quick


class MemoryTransport(asyncio.Transport):
    """Records what is written; reading paused or not; closes by telling its protocol."""

    def __init__(self) -> None:
        super().__init__()
        self.written = bytearray()
        self.reading = True
        self.closed = False
        self.protocol: Any = None

    def set_protocol(self, protocol: asyncio.BaseProtocol) -> None:
        self.protocol = protocol

    def get_protocol(self) -> asyncio.BaseProtocol:
        return self.protocol  # type: ignore[no-any-return]

    def write(self, data: Any) -> None:
        assert not self.closed
        self.written += bytes(data)

    def pause_reading(self) -> None:
        self.reading = False

    def resume_reading(self) -> None:
        self.reading = True

    def is_closing(self) -> bool:
        return self.closed

    def get_write_buffer_size(self) -> int:
        return 0

    def get_write_buffer_limits(self) -> tuple[int, int]:
        return (16384, 65536)

    def close(self) -> None:
        if not self.closed:
            self.closed = True
            asyncio.get_running_loop().call_soon(self.protocol.connection_lost, None)

    def abort(self) -> None:
        self.close()

    def frames(self, *, masked: bool) -> list[tuple[int, bytes]]:
        reader = FrameReader(masked=masked, max_size=1 << 24)
        return [(op, bytes(p)) for op, p in reader.feed(bytes(self.written))]


async def settle(done: Any) -> None:
    """Let the loop run the relay's pending callbacks until ``done()`` (no timing involved)."""
    for _ in range(100):
        if done():
            return
        await asyncio.sleep(0)
    raise AssertionError("the relay did not get there")


def make_relay(frame_filter: Any) -> tuple[RawRelay, MemoryTransport, MemoryTransport, Any]:
    relay = RawRelay(
        ctx=RequestContext(request_id="r1"),
        metrics=Metrics(CollectorRegistry()),
        upstream="u",
        frame_filter=frame_filter,
        max_message=1 << 20,
        max_queue=1 << 20,
        drop_previews=True,
        heartbeat=0,
    )
    client, upstream = MemoryTransport(), MemoryTransport()
    up = _UpstreamProtocol()
    up.connection_made(upstream)
    upstream.set_protocol(up)
    relay.start(client, b"", up)
    return relay, client, upstream, up


async def test_undecided_frames_take_the_async_path_in_order() -> None:
    release = asyncio.Event()
    calls: list[str] = []

    async def full(frame: str | bytes) -> str | bytes | None:
        assert isinstance(frame, str)
        calls.append(frame)
        if frame.startswith("slow"):
            await release.wait()
            return frame + "!"
        return None if frame == "drop" else frame

    def quick(frame: str | bytes) -> str | bytes | Undecided | None:
        if isinstance(frame, str) and frame.startswith("slow"):
            return UNDECIDED
        return None if frame == "drop" else frame

    _relay, client, upstream, up = make_relay(with_quick(full, quick))
    words = ["a", "slow1", "drop", "b", "slow2", "c"]
    up.data_received(b"".join(server_frame(OP_TEXT, w.encode()) for w in words))
    assert client.frames(masked=False) == [(OP_TEXT, b"a")]  # decided at once
    assert not upstream.reading  # held behind the undecided frame
    up.data_received(server_frame(OP_BINARY, b"\x00\x00\x00\x09later"))  # waits in the backlog
    assert len(client.frames(masked=False)) == 1
    release.set()
    await settle(lambda: len(client.frames(masked=False)) == 6)
    assert client.frames(masked=False) == [
        (OP_TEXT, b"a"),
        (OP_TEXT, b"slow1!"),
        (OP_TEXT, b"b"),
        (OP_TEXT, b"slow2!"),
        (OP_TEXT, b"c"),
        (OP_BINARY, b"\x00\x00\x00\x09later"),
    ]
    assert upstream.reading
    assert calls == ["slow1", "slow2"]  # the full call only for what quick left undecided


async def test_a_failing_filter_drops_its_frame_and_the_relay_goes_on() -> None:
    async def full(frame: str | bytes) -> str | bytes | None:
        raise RuntimeError("store down")

    def quick(frame: str | bytes) -> str | bytes | Undecided | None:
        if frame == b"\x00\x00\x00\x04boom":
            raise RuntimeError("bug")
        return UNDECIDED if frame == "ask" else frame

    relay, client, _, up = make_relay(with_quick(full, quick))
    up.data_received(
        server_frame(OP_BINARY, b"\x00\x00\x00\x04boom")
        + server_frame(OP_TEXT, b"ask")
        + server_frame(OP_TEXT, b"ok")
    )
    await settle(lambda: client.frames(masked=False))
    assert client.frames(masked=False) == [(OP_TEXT, b"ok")]  # SECURITY: the failed ones: none
    assert not relay.closed


async def test_client_close_goes_upstream_first_then_is_answered() -> None:
    relay, client, upstream, up = make_relay(None)
    client.protocol.data_received(client_frame(OP_CLOSE, close_payload(4001, "tab closed")))
    assert upstream.frames(masked=True) == [(OP_CLOSE, close_payload(4001, "tab closed"))]
    assert client.frames(masked=False) == []  # answered once ComfyUI has answered
    up.data_received(server_frame(OP_CLOSE, close_payload(4001)))
    assert client.frames(masked=False) == [(OP_CLOSE, close_payload(4001, "tab closed"))]
    await asyncio.wait_for(relay.wait_closed(), 5)
    assert client.closed
    assert upstream.closed


async def test_upstream_close_lets_queued_frames_out_first() -> None:
    relay, client, upstream, up = make_relay(None)
    client.protocol.pause_writing()  # a client not reading: frames queue in the relay
    up.data_received(server_frame(OP_TEXT, b"last") + server_frame(OP_CLOSE, close_payload(4002)))
    assert upstream.frames(masked=True) == [(OP_CLOSE, close_payload(4002))]  # answered
    assert client.frames(masked=False) == []
    client.protocol.resume_writing()
    assert client.frames(masked=False) == [(OP_TEXT, b"last"), (OP_CLOSE, close_payload(4002))]
    client.protocol.data_received(client_frame(OP_CLOSE, close_payload(4002)))
    await asyncio.wait_for(relay.wait_closed(), 5)
