"""The relay's own per-frame work, without sockets: ``python -m bench.ws_relay_micro``.

``pump_down`` (metrics, the isolation filter of a regular user whose prompt's owner is cached,
the client's send queue) driven by an upstream stand-in that hands over ready messages, writing
into a transport stand-in whose ``write`` only counts. What is left is exactly what the proxy
adds per frame in Python: no kernel copies, no frame parsing. Meant for instruction counts,
which hold on a shared machine:

    valgrind --tool=callgrind --callgrind-out-file=/dev/null \
        .venv/bin/python -m bench.ws_relay_micro --frames 2000 --path direct

and the same with ``--frames 0`` (start-up only); the difference over the frames is the cost of
one frame. ``--path queued --no-quick`` is the relay before ``proxy.relay.ws_fast``:
``--path queued`` takes the send queue's writer task and aiohttp's ``send_bytes``
(what every frame took before the direct writes); ``--admin`` relays as an admin.
``--path raw`` is the raw relay (``proxy.relay.raw_ws``), parse of the frame included.
"""

from __future__ import annotations

import argparse
import asyncio
import struct
import time
from types import SimpleNamespace
from typing import Any, cast

from aiohttp import WSMessage, WSMsgType
from aiohttp._websocket.writer import WebSocketWriter
from aiohttp.base_protocol import BaseProtocol

from proxy.comfy.records import PromptRecord
from proxy.observability.metrics import Metrics
from proxy.relay.raw_ws import RawRelay, _UpstreamProtocol
from proxy.relay.websocket import ClientSendQueue, pump_down
from proxy.relay.ws_codec import OP_BINARY, server_frame
from proxy.tenancy.events import SocketEventFilter
from proxy.tenancy.ownership import MemoryOwnershipStore

PROMPT = "00000000-0000-4000-8000-000000000000"
OWNER = "bench_user"


def preview_frame(size: int) -> bytes:
    meta = b'{"node_id":"3","prompt_id":"%s","image_type":"image/jpeg"}' % PROMPT.encode()
    head = struct.pack(">II", 4, len(meta)) + meta
    return head + b"\xff" * (size - len(head))


class CountingTransport:
    """``asyncio.Transport``'s writing half, counting instead of sending."""

    def __init__(self) -> None:
        self.written = 0

    def write(self, data: bytes) -> None:
        self.written += len(data)

    def writelines(self, data: Any) -> None:
        for chunk in data:
            self.written += len(chunk)

    def is_closing(self) -> bool:
        return False

    def get_write_buffer_size(self) -> int:
        return 0

    def get_write_buffer_limits(self) -> tuple[int, int]:
        return (16384, 65536)


class Upstream:
    """``ClientWebSocketResponse.receive`` over prepared messages, then a close."""

    def __init__(self, frame: bytes, count: int) -> None:
        self._message = WSMessage(WSMsgType.BINARY, frame, None)
        self._left = count

    async def receive(self) -> WSMessage:
        # Each frame arrives in its own turn of the loop, as from a socket (the same constant
        # cost for every path measured).
        await asyncio.sleep(0)
        if self._left:
            self._left -= 1
            return self._message
        return WSMessage(WSMsgType.CLOSE, 1000, "")


class ClientSocket:
    """The parts of ``WebSocketResponse`` the send queue uses, on aiohttp's real writer."""

    closed = False
    compress = False

    def __init__(self, transport: CountingTransport) -> None:
        loop = asyncio.get_running_loop()
        self._writer = WebSocketWriter(BaseProtocol(loop), cast(Any, transport))

    async def send_bytes(self, data: bytes) -> None:
        await self._writer.send_frame(data, WSMsgType.BINARY)

    async def send_str(self, data: str) -> None:
        await self._writer.send_frame(data.encode(), WSMsgType.TEXT)


async def owner_filter(admin: bool) -> SocketEventFilter:
    """The isolation filter of the prompt owner's socket (the prompt recorded as theirs)."""
    store = MemoryOwnershipStore(3600)
    await store.record_prompt(PromptRecord(PROMPT, OWNER, "u", "ns", 0.0))
    return SocketEventFilter(
        owner=OWNER,
        client_id="c",
        upstream_client_id="ns",
        ownership=store,
        passed_types=("status",),
        admin=admin,
    )


async def run(frames: int, size: int, path: str, admin: bool, *, quick: bool) -> tuple[float, int]:
    events = await owner_filter(admin)
    frame = preview_frame(size)
    await events(frame)  # the owner looked up once, as on a socket that saw the prompt start
    metrics = Metrics()
    transport = CountingTransport()
    ws = ClientSocket(transport)
    queue = ClientSendQueue(
        cast(Any, ws),
        max_bytes=64 << 20,
        drop_stale_previews=True,
        metrics=metrics,
        transport=cast(Any, transport) if path == "direct" else None,
    )
    ctx = SimpleNamespace(principal=None, request_id="micro", bytes_out=0)

    async def full_only(frame: str | bytes) -> str | bytes | None:
        return await events(frame)

    frame_filter = events if quick else full_only
    started = time.process_time()
    await pump_down(
        cast(Any, Upstream(frame, frames)), queue.put, frame_filter, "u", metrics, cast(Any, ctx)
    )
    await queue.flush(within=60)
    return time.process_time() - started, transport.written


async def run_raw(frames: int, size: int, admin: bool) -> tuple[float, int]:
    """The raw relay (``proxy.relay.raw_ws``) fed the frame's wire bytes, one read per frame
    (the frame header parse and the payload view included, which the aiohttp paths above
    leave to aiohttp's reader and do not count)."""
    events = await owner_filter(admin)
    frame = preview_frame(size)
    await events(frame)
    metrics = Metrics()
    relay = RawRelay(
        ctx=cast(Any, SimpleNamespace(principal=None, request_id="micro", bytes_out=0)),
        metrics=metrics,
        upstream="u",
        frame_filter=events,
        max_message=64 << 20,
        max_queue=64 << 20,
        drop_previews=True,
        heartbeat=0,
    )
    client, upstream = CountingTransport(), CountingTransport()
    up = _UpstreamProtocol()
    up.transport = cast(Any, upstream)
    cast(Any, client).set_protocol = lambda protocol: None
    cast(Any, upstream).resume_reading = lambda: None
    relay.start(cast(Any, client), b"", up)
    wire = server_frame(OP_BINARY, frame)
    started = time.process_time()
    for _ in range(frames):
        await asyncio.sleep(0)  # one loop turn per read, as for the paths above
        up.data_received(wire)
    return time.process_time() - started, client.written


def main() -> None:
    p = argparse.ArgumentParser(prog="python -m bench.ws_relay_micro", description=__doc__)
    p.add_argument("--frames", type=int, default=20000)
    p.add_argument("--size", type=int, default=128 * 1024)
    p.add_argument("--path", choices=("direct", "queued", "raw"), default="direct")
    p.add_argument("--admin", action="store_true")
    p.add_argument("--no-quick", action="store_true", help="the filter's full call per frame")
    args = p.parse_args()
    if args.path == "raw":
        cpu, written = asyncio.run(run_raw(args.frames, args.size, args.admin))
    else:
        cpu, written = asyncio.run(
            run(args.frames, args.size, args.path, args.admin, quick=not args.no_quick)
        )
    per = cpu / args.frames * 1e6 if args.frames else 0.0
    print(f"{args.path}: {args.frames} frames, {written} bytes written, {per:.2f} us CPU/frame")


if __name__ == "__main__":
    main()
