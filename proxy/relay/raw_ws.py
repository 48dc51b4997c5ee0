"""The ``/ws`` relay on raw transports: frames parsed and written by the proxy, no aiohttp socket.

Once the guards let an upgrade through (:func:`relay_raw`, called by
:func:`proxy.relay.websocket.relay_websocket`):

1. the upstream leg is opened on a plain asyncio connection (TLS for ``https`` instances) with
   the proxy's own handshake (a fresh ``Sec-WebSocket-Key``; the answer must be 101 with the
   matching ``Sec-WebSocket-Accept``, no extension and one of the offered subprotocols); a
   refusal is answered before the client's upgrade, exactly as the aiohttp relay does
   (ComfyUI's 4xx passed on, else 502; unreachable: 502/504);
2. the client's upgrade is answered through aiohttp's response (so ``on_response_prepare``
   adds the request id and the rate-limit headers) without ``Sec-WebSocket-Extensions``:
   no permessage-deflate, as the aiohttp relay (``compress=False``); previews are JPEG/PNG;
3. the client's transport is taken from aiohttp's ``RequestHandler`` (:func:`_detach`): the
   bytes it buffered after the request head are taken over, its keep-alive timer stopped, its
   ``transport`` cleared (so the handler's return, its shutdown and its keep-alive logic close
   nothing) and it is removed from the server's connection table; then ``set_protocol``.
   The handler returns the prepared 101 at once: no task stays per pair, and the request
   object is freed (its access-log line is written when the relay ends, ``ctx.finish_later``).

Frames: from ComfyUI, each message is counted, read by the generation tracker (text), decided
by the frame filters and written to the client with an unmasked header; with no filter a
binary message read in one piece is written as the very bytes received (a memoryview, no
copy). A filter that cannot decide synchronously (``quick`` UNDECIDED) sends that pair, and
only that pair, through an ordered async path: the undecided frame is awaited in a task and
every later read waits behind it (the upstream is paused meanwhile), so order is kept. From
the client, each message is unmasked, checked (text must be UTF-8) and sent on as one frame
masked with a fresh key (RFC 6455 5.3). Pings are answered on each leg, pongs absorbed.

Backpressure: a client that does not read gets frames queued in the proxy once its transport
passes its high-water mark; the queue is bounded (``send_queue_mb``), stale previews dropped
first and a client that cannot keep up with events closed with 1013, as before: pausing the
upstream instead would slow ComfyUI's messages to every other socket. Toward ComfyUI the
client is paused while the upstream transport is over its high-water mark. Pings from a client
that does not read are answered once (the newest) when it reads again (RFC 6455 5.5.3).

Close: both ways with the code and reason; the upstream leg first, then the client's (queued
frames first when ComfyUI ended it); each waits at most ``CLOSE_TIMEOUT_SECONDS`` for the
peer's close before aborting. A protocol error closes with 1002 (1007 for text that is not
UTF-8, 1009 past ``max_message_mb``).
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Final, cast
from weakref import WeakKeyDictionary

import structlog
from aiohttp import WSCloseCode, hdrs, web
from multidict import CIMultiDict

from proxy.errors import ProxyError, UpstreamUnavailable
from proxy.observability.metrics import METRICS, Metrics
from proxy.relay.outgoing import build_upstream_headers, map_client_error
from proxy.relay.ws_codec import (
    OP_BINARY,
    OP_CLOSE,
    OP_PING,
    OP_PONG,
    OP_TEXT,
    FrameReader,
    Payload,
    WsProtocolError,
    accept_key,
    client_frame,
    close_payload,
    new_client_key,
    parse_close,
    server_frame,
    server_header,
    valid_client_key,
)
from proxy.relay.ws_fast import UNDECIDED, quick_of
from proxy.settings import SETTINGS
from proxy.state import LIFECYCLE, FrameFilter, RequestContext, compose_frame_filters
from proxy.tasks import task_failed
from proxy.upstream.headers import WEBSOCKET_HANDSHAKE
from proxy.upstream.http1 import UpstreamConnectError, UpstreamHttpTimeout
from proxy.upstream.pool import POOL, Upstream

log = structlog.get_logger("comfygate.websocket")

CLOSE_TIMEOUT_SECONDS: Final = 5.0
MAX_HANDSHAKE_HEAD: Final = 64 * 1024
"""Largest 101 answer head read from ComfyUI."""
_JOIN_BELOW: Final = 16 * 1024
"""Below this, header and payload go in one write (one copy is cheaper than two writes)."""
_PREVIEW_TYPES: Final = (1, 4)
SLOW_CLIENT_REASON: Final = "client too slow to receive events"
_UNSENDABLE: Final = frozenset({1005, 1006, 1015})


def _sendable(code: int | None, fallback: int = WSCloseCode.OK) -> int:
    if code is None or code in _UNSENDABLE or not 1000 <= code <= 4999:
        return fallback
    return code


@dataclass(slots=True)
class _End:
    side: str
    code: int
    reason: str


class _Counters:
    """The relay's metric children, resolved once per :class:`Metrics` (not per socket)."""

    __slots__ = (
        "binary_bytes",
        "binary_frames",
        "preview_bytes",
        "preview_frames",
        "text_bytes",
        "text_frames",
        "up_binary_bytes",
        "up_binary_frames",
        "up_text_bytes",
        "up_text_frames",
    )

    def __init__(self, metrics: Metrics) -> None:
        frames, sizes = metrics.ws_frames, metrics.ws_bytes
        self.text_frames, self.text_bytes = (
            frames.labels("down", "text"),
            sizes.labels("down", "text"),
        )
        self.preview_frames = frames.labels("down", "preview")
        self.preview_bytes = sizes.labels("down", "preview")
        self.binary_frames = frames.labels("down", "binary")
        self.binary_bytes = sizes.labels("down", "binary")
        self.up_text_frames, self.up_text_bytes = (
            frames.labels("up", "text"),
            sizes.labels("up", "text"),
        )
        self.up_binary_frames = frames.labels("up", "binary")
        self.up_binary_bytes = sizes.labels("up", "binary")


_COUNTERS: WeakKeyDictionary[Metrics, _Counters] = WeakKeyDictionary()


def _counters(metrics: Metrics) -> _Counters:
    found = _COUNTERS.get(metrics)
    if found is None:
        found = _COUNTERS[metrics] = _Counters(metrics)
    return found


class _Queued:
    """A frame waiting for a slow client (None payload: the close frame, always last)."""

    __slots__ = ("first", "payload", "preview")

    def __init__(self, first: int, payload: Payload | None, preview: bool) -> None:
        self.first = first
        self.payload = payload
        self.preview = preview


class _ClientProtocol(asyncio.Protocol):
    __slots__ = ("relay",)

    def __init__(self, relay: RawRelay) -> None:
        self.relay = relay

    def data_received(self, data: bytes) -> None:
        self.relay._client_data(data)

    def eof_received(self) -> bool | None:
        return None  # the transport closes; connection_lost follows

    def connection_lost(self, exc: Exception | None) -> None:
        self.relay._client_lost()

    def pause_writing(self) -> None:
        self.relay._client_paused = True

    def resume_writing(self) -> None:
        self.relay._client_resumed()


class _UpstreamProtocol(asyncio.Protocol):
    """The upstream leg: reads the 101 answer's head, then hands every read to the relay."""

    __slots__ = ("_head", "_waiter", "relay", "tail", "transport")

    def __init__(self) -> None:
        self.relay: RawRelay | None = None
        self.transport: asyncio.Transport | None = None
        self._head = bytearray()
        self._waiter: asyncio.Future[bytes] | None = asyncio.get_running_loop().create_future()
        self.tail = b""
        """What came after the head before the relay took over."""

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast("asyncio.Transport", transport)  # uvloop's is not a subclass

    async def head(self) -> bytes:
        assert self._waiter is not None
        return await self._waiter

    def data_received(self, data: bytes) -> None:
        if self.relay is not None:
            self.relay._upstream_data(data)
            return
        if self._waiter is None:
            self.tail += data
            return
        self._head += data
        end = self._head.find(b"\r\n\r\n")
        if end < 0:
            if len(self._head) > MAX_HANDSHAKE_HEAD:
                self._fail(ConnectionError("handshake answer head too large"))
            return
        head, self.tail = bytes(self._head[:end]), bytes(self._head[end + 4 :])
        self._head = bytearray()
        waiter, self._waiter = self._waiter, None
        if not waiter.done():
            waiter.set_result(head)
        if self.transport is not None:
            self.transport.pause_reading()  # until the relay takes over (see attach)

    def _fail(self, exc: Exception) -> None:
        waiter, self._waiter = self._waiter, None
        if waiter is not None and not waiter.done():
            waiter.set_exception(exc)

    def connection_lost(self, exc: Exception | None) -> None:
        if self.relay is not None:
            self.relay._upstream_lost()
        else:
            self._fail(ConnectionResetError("ComfyUI closed the connection during the handshake"))
            self._waiter = None

    def pause_writing(self) -> None:
        if self.relay is not None:
            self.relay._upstream_pause_writing()

    def resume_writing(self) -> None:
        if self.relay is not None:
            self.relay._upstream_resume_writing()


class RawRelay:
    """One relayed client and its ComfyUI socket (what ``Lifecycle`` holds for the relay:
    ``closed``, ``close``, ``send_str``)."""

    __slots__ = (
        "__weakref__",
        "_access",
        "_backlog",
        "_broken",
        "_busy",
        "_c_got_close",
        "_c_state",
        "_client_paused",
        "_counters",
        "_cr",
        "_ct",
        "_ctx",
        "_done",
        "_drop_previews",
        "_ended",
        "_filter",
        "_hb",
        "_heartbeat",
        "_last_seen",
        "_max_queue",
        "_metrics",
        "_on_finish",
        "_pending_pong",
        "_ping_out",
        "_queue",
        "_queued",
        "_quick",
        "_roles",
        "_task",
        "_timers",
        "_u_closed",
        "_u_state",
        "_upstream",
        "_ur",
        "_ut",
        "_vectored",
        "dropped",
        "superseded",
    )

    def __init__(
        self,
        *,
        ctx: RequestContext,
        metrics: Metrics,
        upstream: str,
        frame_filter: FrameFilter | None,
        max_message: int,
        max_queue: int,
        drop_previews: bool,
        heartbeat: float,
    ) -> None:
        self._ctx = ctx
        self._metrics = metrics
        self._counters = _counters(metrics)
        self._upstream = upstream
        self._filter = frame_filter
        self._quick = quick_of(frame_filter)
        self._roles = ctx.principal.roles if ctx.principal is not None else frozenset()
        self._cr = FrameReader(masked=True, max_size=max_message)
        self._ur = FrameReader(masked=False, max_size=max_message)
        self._ct: asyncio.Transport | None = None
        self._vectored = False
        """The client's transport writes a list in one system call (uvloop's does; asyncio's
        in Python 3.11 joins it first)."""
        self._ut: asyncio.Transport | None = None
        self._max_queue = max_queue
        self._drop_previews = drop_previews
        self._queue: deque[_Queued] | None = None
        self._queued = 0
        self._client_paused = False
        self._pending_pong: bytes | None = None
        self._busy = False
        self._backlog: deque[bytes] | None = None
        self._task: asyncio.Task[None] | None = None
        self._heartbeat = heartbeat
        self._hb: asyncio.TimerHandle | None = None
        self._last_seen = 0.0
        self._ping_out = False
        self._ended: _End | None = None
        self._c_state = 0  # 0 open, 1 our close sent (waiting for the peer's), 2 done
        self._u_state = 0
        self._c_got_close = False
        self._broken = 0
        """Legs whose reader failed (1 client, 2 upstream): their reads are discarded while
        their close is awaited (closing with unread bytes would reset the connection)."""
        self._u_closed: asyncio.Future[None] | None = None
        self._done: asyncio.Future[None] | None = None
        self._timers: list[asyncio.TimerHandle] = []
        self._on_finish: Callable[[RawRelay], None] | None = None
        self._access: Callable[[], None] | None = None
        self.dropped = 0
        self.superseded = False

    # -- the lifecycle's interface (shutdown, credential sweeps, scheduler pushes) -----------
    @property
    def closed(self) -> bool:
        return self._ended is not None

    async def close(self, *, code: int = WSCloseCode.OK, message: bytes = b"") -> bool:
        """End the relay (both sides get ``code``) and wait, bounded, until it has ended."""
        done = self._done_future()
        self._end(_End("proxy", code, message.decode(errors="replace")))
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(asyncio.shield(done), 2 * CLOSE_TIMEOUT_SECONDS + 1)
        return True

    async def send_str(self, data: str) -> None:
        """A frame of the proxy's own (the scheduler's status) toward the client."""
        self._to_client(data)

    async def supersede(self) -> None:
        """Takeover: drop the upstream socket (waiting, bounded, for ComfyUI to let it go);
        the client stays open and hears nothing more, as with ComfyUI."""
        self.superseded = True
        if self._u_state == 2:
            return
        if self._u_closed is None:
            self._u_closed = asyncio.get_running_loop().create_future()
        waiter = self._u_closed
        self._close_upstream(WSCloseCode.OK, "superseded")
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(asyncio.shield(waiter), CLOSE_TIMEOUT_SECONDS + 1)

    async def wait_closed(self) -> None:
        """Until both legs are closed and the relay accounted for."""
        await asyncio.shield(self._done_future())

    def _done_future(self) -> asyncio.Future[None]:
        if self._done is None:
            self._done = asyncio.get_running_loop().create_future()
            if self._c_state == 2 and self._u_state == 2:
                self._done.set_result(None)
        return self._done

    # -- start -----------------------------------------------------------------------------
    def start(self, client: asyncio.Transport, tail: bytes, up: _UpstreamProtocol) -> None:
        """Take both transports (``tail``: the client's bytes aiohttp read past the head)."""
        self._ct = client
        self._vectored = type(client).__module__.startswith("uvloop")
        self._ut = up.transport
        client.set_protocol(_ClientProtocol(self))
        up.relay = self
        self._last_seen = time.monotonic()
        if self._heartbeat > 0:
            self._hb = asyncio.get_running_loop().call_later(self._heartbeat, self._beat)
        if up.tail:
            self._upstream_data(up.tail)
        up.tail = b""
        if self._ut is not None and self._u_state != 2:
            self._ut.resume_reading()
        if tail:
            self._client_data(tail)

    # -- client -> upstream ------------------------------------------------------------------
    def _client_data(self, data: bytes) -> None:
        if self._c_state == 2 or self._broken & 1:
            return
        self._last_seen = time.monotonic()
        self._ping_out = False
        try:
            events = self._cr.feed(data)
        except WsProtocolError as exc:
            self._client_error(exc)
            return
        try:
            for op, payload in events:
                if op in (OP_TEXT, OP_BINARY):
                    self._up_message(op, payload)
                elif op == OP_PING:
                    self._pong_client(bytes(payload))
                elif op == OP_CLOSE:
                    self._client_close(payload)
                    return
                # OP_PONG: the heartbeat's answer (any read counts already)
        except WsProtocolError as exc:
            self._client_error(exc)
        except Exception:  # noqa: BLE001 - a bug must not leave the pair half-open
            self._failed()

    def _up_message(self, op: int, payload: Payload) -> None:
        counters, size = self._counters, len(payload)
        if op == OP_TEXT:
            try:
                str(payload, "utf-8")
            except UnicodeDecodeError:
                raise WsProtocolError(1007, "text message is not UTF-8") from None
            counters.up_text_frames.inc()
            counters.up_text_bytes.inc(size)
        else:
            counters.up_binary_frames.inc()
            counters.up_binary_bytes.inc(size)
        self._ctx.bytes_in += size
        if self._ended is not None or self.superseded or self._u_state != 0 or self._ut is None:
            return  # superseded (ComfyUI ignores it too) or closing
        self._ut.write(client_frame(op, payload))

    def _pong_client(self, payload: bytes) -> None:
        if self._ended is not None:
            return
        if self._client_paused or self._queue:
            self._pending_pong = payload  # answered when the client reads again (5.5.3)
            return
        self._write_client(server_frame(OP_PONG, payload))

    def _client_close(self, payload: Payload) -> None:
        self._c_got_close = True
        try:
            code, reason = parse_close(payload)
        except WsProtocolError as exc:
            self._client_error(exc)
            return
        if self._c_state == 1:  # the answer to our close
            self._client_done(close=True)
            return
        self._end(_End("client", _sendable(code), reason))

    def _client_error(self, exc: WsProtocolError) -> None:
        self._broken |= 1
        self._end(_End("client", exc.code, exc.reason[:100]))

    def _client_lost(self) -> None:
        if self._c_state == 2:
            return
        self._client_done(close=False)
        if self._ended is None:
            self._end(_End("client", WSCloseCode.GOING_AWAY, ""))

    def _upstream_pause_writing(self) -> None:
        if self._ct is not None and self._c_state == 0:
            with contextlib.suppress(RuntimeError):
                self._ct.pause_reading()

    def _upstream_resume_writing(self) -> None:
        if self._ct is not None and self._c_state == 0:
            with contextlib.suppress(RuntimeError):
                self._ct.resume_reading()

    # -- upstream -> client ------------------------------------------------------------------
    def _upstream_data(self, data: bytes) -> None:
        if self._u_state == 2 or self._broken & 2:
            return
        if self._busy:
            assert self._backlog is not None
            self._backlog.append(data)
            return
        try:
            events = self._ur.feed(data)
        except WsProtocolError as exc:
            self._upstream_error(exc)
            return
        self._down(events, 0)

    def _down(self, events: list[tuple[int, Payload]], i: int) -> None:
        """Relay ``events[i:]``; an undecided frame moves the rest to :meth:`_slow`."""
        try:
            n = len(events)
            while i < n:
                op, payload = events[i]
                i += 1
                if op in (OP_TEXT, OP_BINARY):
                    if self._ended is not None or self.superseded:
                        continue  # the relay is closing: frames still arriving go with it
                    frame = self._observe(op, payload)
                    if frame is None:
                        continue
                    if self._filter is None:
                        self._to_client(frame)
                        continue
                    assert not isinstance(frame, memoryview)  # filters read bytes (_observe)
                    try:
                        decided = UNDECIDED if self._quick is None else self._quick(frame)
                    except Exception:  # noqa: BLE001 - dropped, the relay goes on
                        self._frame_failed()
                        continue  # SECURITY: not passed by the filter, so never sent
                    if decided is UNDECIDED:
                        self._go_slow(frame, events, i)
                        return
                    if decided is not None:
                        self._to_client(decided)
                elif op == OP_PING:
                    if self._u_state == 0 and self._ut is not None:
                        self._ut.write(client_frame(OP_PONG, payload))
                elif op == OP_CLOSE:
                    self._upstream_close(payload)
                    return
        except WsProtocolError as exc:
            self._upstream_error(exc)
        except Exception:  # noqa: BLE001 - a bug must not leave the pair half-open
            self._failed()

    def _observe(self, op: int, payload: Payload) -> str | Payload | None:
        """Count the frame, show it to the generation tracker; the frame as filters take it.

        Raises:
            WsProtocolError: a text message that is not UTF-8 (1007).
        """
        counters, size = self._counters, len(payload)
        self._ctx.bytes_out += size
        if op == OP_TEXT:
            try:
                text = str(payload, "utf-8")
            except UnicodeDecodeError:
                raise WsProtocolError(1007, "text message is not UTF-8") from None
            counters.text_frames.inc()
            counters.text_bytes.inc(size)
            tracker = self._metrics.generation
            if tracker is not None:
                try:
                    tracker.observe_frame(text, self._roles, self._upstream)
                except Exception:  # noqa: BLE001 - metrics must never cost the relay
                    self._frame_failed()
            return text
        if size >= 4 and int.from_bytes(payload[:4], "big") in _PREVIEW_TYPES:
            counters.preview_frames.inc()
            counters.preview_bytes.inc(size)
        else:
            counters.binary_frames.inc()
            counters.binary_bytes.inc(size)
        if self._filter is None or isinstance(payload, bytes):
            return payload  # no filter reads it: the bytes as received, no copy
        return bytes(payload)  # filters read bytes

    def _go_slow(self, frame: str | Payload, events: list[tuple[int, Payload]], i: int) -> None:
        self._busy = True
        if self._backlog is None:
            self._backlog = deque()
        if self._ut is not None and self._u_state != 2:
            self._ut.pause_reading()
        self._task = asyncio.get_running_loop().create_task(self._slow(frame, events, i))

    async def _slow(self, frame: str | Payload, events: list[tuple[int, Payload]], i: int) -> None:
        """The ordered async path: the undecided frame, then what waited behind it."""
        assert self._filter is not None
        out: str | bytes | None = None
        try:
            out = await self._filter(bytes(frame) if isinstance(frame, memoryview) else frame)
        except Exception:  # noqa: BLE001 - dropped, the relay goes on
            self._frame_failed()
        if out is not None and self._ended is None and not self.superseded:
            self._to_client(out)
        self._busy = False
        self._task = None
        self._down(events, i)
        backlog = self._backlog
        while not self._busy and backlog:
            self._upstream_data(backlog.popleft())
        if not self._busy:
            self._backlog = None
            if self._ut is not None and self._u_state != 2:
                self._ut.resume_reading()

    def _frame_failed(self) -> None:
        task_failed(
            "ws_relay",
            self._metrics.task_failures,
            logger=log,
            event="relay_frame_failed",
            request_id=self._ctx.request_id,
            upstream=self._upstream,
        )

    def _to_client(self, frame: str | Payload) -> None:
        if self._ended is not None and self._ended.side != "upstream":
            return  # the relay is closing: frames still arriving go with the connection
        if self._c_state != 0 or self._ct is None:
            return
        if isinstance(frame, str):
            payload: Payload = frame.encode()
            first = 0x80 | OP_TEXT
        else:
            payload, first = frame, 0x80 | OP_BINARY
        if self._queue is None and not self._client_paused:
            self._write_frame(first, payload)
            return
        size = len(payload)
        preview = first != 0x80 | OP_TEXT and _is_preview(payload)
        if self._queued + size > self._max_queue:
            if self._drop_previews:
                self._drop_queued_previews()
            if self._queued + size > self._max_queue:
                if preview and self._drop_previews:
                    self._count_drop()
                    return
                self._metrics.ws_slow_clients.inc()
                self._queue = None
                self._queued = 0
                self._end(_End("client", WSCloseCode.TRY_AGAIN_LATER, SLOW_CLIENT_REASON))
                return
        if self._queue is None:
            self._queue = deque()
        self._queue.append(_Queued(first, payload, preview))
        self._queued += size

    def _write_frame(self, first: int, payload: Payload) -> None:
        assert self._ct is not None
        header = server_header(first, len(payload))
        try:
            if len(payload) < _JOIN_BELOW:
                self._ct.write(header + payload)
            elif self._vectored:  # the payload object itself, no copy; one writev
                self._ct.writelines((header, payload))
            else:  # asyncio's writelines would join (a copy): two writes instead
                self._ct.write(header)
                self._ct.write(payload)
        except (ConnectionError, RuntimeError):
            pass  # the client is gone: connection_lost follows

    def _write_client(self, data: bytes) -> None:
        if self._ct is not None and self._c_state != 2:
            with contextlib.suppress(ConnectionError, RuntimeError):
                self._ct.write(data)

    def _drop_queued_previews(self) -> None:
        kept: deque[_Queued] = deque()
        for queued in self._queue or ():
            if queued.preview:
                assert queued.payload is not None
                self._queued -= len(queued.payload)
                self._count_drop()
            else:
                kept.append(queued)
        self._queue = kept

    def _count_drop(self) -> None:
        self.dropped += 1
        self._metrics.ws_previews_dropped.inc()

    def _client_resumed(self) -> None:
        self._client_paused = False
        queue = self._queue
        while queue and not self._client_paused:
            queued = queue.popleft()
            if queued.payload is None:  # the close frame, after every queued frame
                self._queue = None
                self._send_client_close()
                return
            self._queued -= len(queued.payload)
            self._write_frame(queued.first, queued.payload)
        if not queue:
            self._queue = None
        if self._pending_pong is not None and not self._client_paused and self._ended is None:
            pong, self._pending_pong = self._pending_pong, None
            self._write_client(server_frame(OP_PONG, pong))

    # -- upstream close ------------------------------------------------------------------------
    def _upstream_close(self, payload: Payload) -> None:
        try:
            code, reason = parse_close(payload)
        except WsProtocolError as exc:
            self._upstream_error(exc)
            return
        if self._u_state == 1:  # the answer to our close
            self._upstream_done(close=True)
            return
        # ComfyUI ends it: answer, let go of the connection, then the client's side.
        self._write_upstream(client_frame(OP_CLOSE, close_payload(_sendable(code))))
        self._upstream_done(close=True)
        self._end(_End("upstream", _sendable(code), reason))

    def _upstream_error(self, exc: WsProtocolError) -> None:
        self._broken |= 2
        self._close_upstream(exc.code, exc.reason)  # its answer (or the timeout) ends the leg
        log.warning("relay_upstream_protocol_error", upstream=self._upstream, reason=exc.reason)
        self._end(_End("upstream", WSCloseCode.INTERNAL_ERROR, "upstream connection failed"))

    def _upstream_lost(self) -> None:
        if self._u_state == 2:
            return
        self._upstream_done(close=False)
        if self._ended is None:
            self._end(_End("upstream", WSCloseCode.INTERNAL_ERROR, "upstream connection lost"))

    def _write_upstream(self, data: bytes) -> None:
        if self._ut is not None and self._u_state != 2:
            with contextlib.suppress(ConnectionError, RuntimeError):
                self._ut.write(data)

    # -- ending ----------------------------------------------------------------------------
    def _failed(self) -> None:
        task_failed(
            "ws_relay",
            self._metrics.task_failures,
            logger=log,
            event="relay_failed",
            request_id=self._ctx.request_id,
        )
        self._end(_End("proxy", WSCloseCode.INTERNAL_ERROR, "relay failed"))

    def _end(self, ended: _End) -> None:
        """Start closing: the upstream leg first, then the client's (see the module doc)."""
        if self._ended is not None:
            return
        self._ended = ended
        if self._hb is not None:
            self._hb.cancel()
            self._hb = None
        if ended.side == "upstream":
            self._close_client(after_queue=True)
        else:
            if ended.side != "client" or ended.code == WSCloseCode.TRY_AGAIN_LATER:
                self._queue, self._queued = None, 0  # dropped with the connection
            if self._u_state == 2:
                self._close_client(after_queue=False)
            else:
                self._close_upstream(ended.code, ended.reason)

    def _close_upstream(self, code: int, reason: str) -> None:
        if self._u_state != 0:
            return
        self._write_upstream(client_frame(OP_CLOSE, close_payload(code, reason)))
        self._u_state = 1
        self._timers.append(
            asyncio.get_running_loop().call_later(CLOSE_TIMEOUT_SECONDS, self._upstream_timeout)
        )

    def _upstream_timeout(self) -> None:
        if self._u_state != 2 and self._ut is not None:
            self._ut.abort()
            self._upstream_done(close=False)

    def _upstream_done(self, *, close: bool) -> None:
        if self._u_state == 2:
            return
        self._u_state = 2
        if close and self._ut is not None:
            self._ut.close()
        if self._u_closed is not None and not self._u_closed.done():
            self._u_closed.set_result(None)
        if self._ended is not None and self._ended.side != "upstream":
            self._close_client(after_queue=False)
        self._maybe_finished()

    def _close_client(self, *, after_queue: bool) -> None:
        if self._c_state != 0:
            return
        self._c_state = 1
        if self._ct is None:
            self._client_done(close=False)
            return
        self._timers.append(
            asyncio.get_running_loop().call_later(CLOSE_TIMEOUT_SECONDS, self._client_timeout)
        )
        if after_queue and self._queue:
            self._queue.append(_Queued(0, None, False))
            return
        self._queue, self._queued = None, 0
        self._send_client_close()

    def _send_client_close(self) -> None:
        assert self._ended is not None
        self._write_client(
            server_frame(OP_CLOSE, close_payload(self._ended.code, self._ended.reason))
        )
        if self._c_got_close:  # we were answering the client's close
            self._client_done(close=True)

    def _client_timeout(self) -> None:
        if self._c_state != 2 and self._ct is not None:
            self._ct.abort()
            self._client_done(close=False)

    def _client_done(self, *, close: bool) -> None:
        if self._c_state == 2:
            return
        self._c_state = 2
        self._queue, self._queued = None, 0
        if close and self._ct is not None:
            self._ct.close()
        self._maybe_finished()

    def _maybe_finished(self) -> None:
        if self._c_state != 2 or self._u_state != 2:
            return
        for timer in self._timers:
            timer.cancel()
        self._timers = []
        if self._task is not None:
            self._task.cancel()
            self._task = None
        if self._hb is not None:
            self._hb.cancel()
            self._hb = None
        finish, self._on_finish = self._on_finish, None
        if finish is not None:
            finish(self)
        access, self._access = self._access, None
        if access is not None:
            access()
        self._ctx.finish_later = None
        if self._done is not None and not self._done.done():
            self._done.set_result(None)

    # -- heartbeat -------------------------------------------------------------------------
    def _beat(self) -> None:
        """Ping the client after ``heartbeat`` seconds of silence; no answer in half that:
        it is gone (as aiohttp's heartbeat: 1006 from the client, 1001 toward ComfyUI)."""
        self._hb = None
        if self._ended is not None or self._ct is None:
            return
        loop = asyncio.get_running_loop()
        if self._ping_out:
            self._ct.abort()  # connection_lost ends the relay
            return
        quiet = time.monotonic() - self._last_seen
        if quiet < self._heartbeat:
            self._hb = loop.call_later(self._heartbeat - quiet, self._beat)
            return
        self._ping_out = True
        self._write_client(server_frame(OP_PING, b""))
        self._hb = loop.call_later(self._heartbeat / 2, self._beat)

    # -- introspection (logs, tests, benches) -------------------------------------------------
    @property
    def client_transport(self) -> asyncio.Transport | None:
        return self._ct

    @property
    def ending(self) -> _End | None:
        """How the relay ended (who, code, reason); None while open."""
        return self._ended

    def defer(self, finish: Callable[[], None]) -> None:
        """Run ``finish`` when the relay has ended (at once if it has): ``ctx.finish_later``."""
        if self._c_state == 2 and self._u_state == 2 and self._on_finish is None:
            finish()
        else:
            self._access = finish


def _is_preview(payload: Payload) -> bool:
    return len(payload) >= 4 and int.from_bytes(payload[:4], "big") in _PREVIEW_TYPES


# -- the handler side ------------------------------------------------------------------------
def raw_capable(request: web.Request) -> bool:
    """Whether this upgrade can take the raw path: a well-formed RFC 6455 handshake on a plain
    TCP transport of aiohttp's own server protocol (else the aiohttp relay takes it, which
    also answers malformed handshakes as before)."""
    transport, protocol = request.transport, request.protocol
    if transport is None or transport.is_closing() or request.method != hdrs.METH_GET:
        return False
    if transport.get_extra_info("sslcontext") is not None:
        return False  # TLS served by the proxy itself: the aiohttp relay
    if not isinstance(getattr(protocol, "_message_tail", None), bytes):
        return False  # not the aiohttp server protocol this module detaches from
    headers = request.headers
    if headers.get(hdrs.UPGRADE, "").strip().lower() != "websocket":
        return False
    connection = {t.strip().lower() for t in headers.get(hdrs.CONNECTION, "").split(",")}
    if "upgrade" not in connection or headers.get(hdrs.SEC_WEBSOCKET_VERSION, "").strip() != "13":
        return False
    return valid_client_key(headers.get(hdrs.SEC_WEBSOCKET_KEY, "").strip())


def _client_protocols(request: web.Request) -> tuple[str, ...]:
    return tuple(
        p.strip()
        for value in request.headers.getall(hdrs.SEC_WEBSOCKET_PROTOCOL, ())
        for p in value.split(",")
        if p.strip()
    )


def _handshake_request(
    target: str, headers: CIMultiDict[str], key: str, protocols: tuple[str, ...]
) -> bytes:
    lines = [
        f"GET {target} HTTP/1.1",
        *(f"{name}: {value}" for name, value in headers.items()),
        "Upgrade: websocket",
        "Connection: Upgrade",
        f"Sec-WebSocket-Key: {key}",
        "Sec-WebSocket-Version: 13",
    ]
    if protocols:
        lines.append(f"Sec-WebSocket-Protocol: {', '.join(protocols)}")
    # Header values as aiohttp's parser read them (UTF-8, undecodable bytes kept as surrogates).
    return ("\r\n".join(lines) + "\r\n\r\n").encode("utf-8", "surrogateescape")


def parse_handshake_answer(head: bytes) -> tuple[int, CIMultiDict[str]]:
    """Status and headers of ComfyUI's answer head.

    Raises:
        ValueError: not an HTTP/1.1 response head.
    """
    status_line, *header_lines = head.decode("latin-1").split("\r\n")
    version, _, rest = status_line.partition(" ")
    code = rest[:3]
    if version not in ("HTTP/1.1", "HTTP/1.0") or not code.isdigit() or len(code) != 3:
        raise ValueError(f"not a response status line: {status_line[:60]!r}")
    headers: CIMultiDict[str] = CIMultiDict()
    for line in header_lines:
        name, sep, value = line.partition(":")
        if not sep or not name or name != name.strip():
            raise ValueError("malformed header line in the handshake answer")
        headers.add(name, value.strip())
    return int(code), headers


def check_upgrade(
    status: int, headers: CIMultiDict[str], key: str, offered: tuple[str, ...]
) -> str | None:
    """The subprotocol ComfyUI chose, once its 101 is found to be a valid answer to ``key``.

    Raises:
        ValueError: not a valid acceptance (RFC 6455 4.1, the client's checks).
    """
    if status != 101:
        raise ValueError(f"status {status}")
    if headers.get(hdrs.UPGRADE, "").strip().lower() != "websocket":
        raise ValueError("no Upgrade: websocket")
    if "upgrade" not in {t.strip().lower() for t in headers.get(hdrs.CONNECTION, "").split(",")}:
        raise ValueError("no Connection: upgrade")
    if headers.get(hdrs.SEC_WEBSOCKET_ACCEPT, "").strip() != accept_key(key):
        raise ValueError("wrong Sec-WebSocket-Accept")
    if hdrs.SEC_WEBSOCKET_EXTENSIONS in headers:
        raise ValueError("an extension nobody offered")
    chosen = headers.get(hdrs.SEC_WEBSOCKET_PROTOCOL, "").strip() or None
    if chosen is not None and chosen not in offered:
        raise ValueError("a subprotocol nobody offered")
    return chosen


class _Refused(Exception):
    def __init__(self, status: int) -> None:
        super().__init__(status)
        self.status = status


async def open_upstream(
    request: web.Request, ctx: RequestContext, upstream: Upstream, protocols: tuple[str, ...]
) -> tuple[_UpstreamProtocol, str | None]:
    """The upstream leg, handshake done (its reads paused until the relay starts).

    Raises:
        ProxyError: as :func:`proxy.relay.websocket.connect_upstream`.
    """
    app = request.app
    pool = app[POOL]
    url = upstream.url_for(ctx.upstream_path)
    secure = url.scheme == "https"
    headers = build_upstream_headers(request, ctx, upstream)
    for name in WEBSOCKET_HANDSHAKE:
        headers.pop(name, None)
    key = new_client_key()
    loop = asyncio.get_running_loop()
    settings = pool.settings
    proto: _UpstreamProtocol | None = None
    try:
        try:
            async with asyncio.timeout(settings.connect_timeout_seconds):
                _, proto = await loop.create_connection(
                    _UpstreamProtocol,
                    url.raw_host or "",
                    url.port or (443 if secure else 80),
                    ssl=_tls_context() if secure else None,
                    server_hostname=url.raw_host if secure else None,
                )
        except TimeoutError as exc:
            raise UpstreamHttpTimeout(f"connecting to {upstream.name} timed out") from exc
        except OSError as exc:
            raise UpstreamConnectError(f"cannot connect to {upstream.name}: {exc}") from exc
        assert proto.transport is not None
        proto.transport.write(_handshake_request(url.raw_path_qs, headers, key, protocols))
        try:
            async with asyncio.timeout(settings.read_timeout_seconds):
                head = await proto.head()
        except TimeoutError as exc:
            raise UpstreamHttpTimeout(f"{upstream.name} did not answer the handshake") from exc
        status, answer = parse_handshake_answer(head)
        if status != 101:
            raise _Refused(status)
        try:
            chosen = check_upgrade(status, answer, key, protocols)
        except ValueError:
            raise _Refused(status) from None
        return proto, chosen
    except _Refused as refused:
        _abort(proto)
        # ComfyUI answered the handshake with an HTTP status (its 403 origin check, a 404):
        # pass the status on, as ComfyUI would have answered the client directly.
        app[METRICS].upstream_errors.labels(upstream.name, "ws_handshake").inc()
        status = refused.status if 400 <= refused.status < 500 else 502
        raise ProxyError(
            f"ComfyUI refused the WebSocket handshake ({refused.status})",
            error_type="upstream_ws_refused",
            status=status,
        ) from None
    except (UpstreamHttpTimeout, UpstreamConnectError) as exc:
        _abort(proto)
        raise map_client_error(exc, upstream, request) from None
    except (ConnectionError, ValueError) as exc:
        _abort(proto)
        raise map_client_error(exc, upstream, request) from None
    except BaseException:
        _abort(proto)
        raise


_TLS: list[Any] = []


def _tls_context() -> Any:
    import ssl  # noqa: PLC0415 - only for https instances

    if not _TLS:
        _TLS.append(ssl.create_default_context())
    return _TLS[0]


def _abort(proto: _UpstreamProtocol | None) -> None:
    if proto is not None and proto.transport is not None:
        proto.transport.abort()


def _detach(request: web.Request) -> tuple[asyncio.Transport, bytes]:
    """Take the client's transport from aiohttp's ``RequestHandler`` (see the module doc).

    Raises:
        ConnectionResetError: the client went away during the handshake.
    """
    handler: Any = request.protocol
    transport = request.transport
    if transport is None or transport.is_closing():
        raise ConnectionResetError("the client went away during the handshake")
    tail: bytes = handler._message_tail  # bytes read past the upgrade request's head
    handler._message_tail = b""
    handler.keep_alive(False)  # its keep-alive timer stopped; start() ends after the 101
    paused = bool(getattr(handler, "_buffer_paused", False))
    handler._buffer_paused = False
    handler.transport = None  # what it would close on return, shutdown or keep-alive expiry
    manager = handler._manager
    if manager is not None:
        manager.connection_lost(handler, None)  # out of the server's table once it returns
    if paused:
        transport.resume_reading()
    return transport, tail


async def relay_raw(
    request: web.Request,
    ctx: RequestContext,
    upstream: Upstream,
    takeover_key: tuple[str, str],
    on_finish: Callable[[RawRelay], None],
) -> web.StreamResponse:
    """Open the upstream leg, answer the client's upgrade and relay on the raw transports."""
    app = request.app
    settings = app[SETTINGS].websocket
    metrics = app[METRICS]
    max_msg = int(settings.max_message_mb * 1024 * 1024)
    offered = _client_protocols(request)
    proto, chosen = await open_upstream(request, ctx, upstream, offered)
    relay = RawRelay(
        ctx=ctx,
        metrics=metrics,
        upstream=upstream.name,
        frame_filter=compose_frame_filters(ctx.frame_filters),
        max_message=max_msg,
        max_queue=int(settings.send_queue_mb * 1024 * 1024),
        drop_previews=settings.drop_stale_previews,
        heartbeat=settings.heartbeat_seconds,
    )
    response = web.StreamResponse(
        status=101,
        headers={
            hdrs.UPGRADE: "websocket",
            hdrs.CONNECTION: "upgrade",
            hdrs.SEC_WEBSOCKET_ACCEPT: accept_key(request.headers[hdrs.SEC_WEBSOCKET_KEY].strip()),
        },
    )
    if chosen is not None:
        response.headers[hdrs.SEC_WEBSOCKET_PROTOCOL] = chosen
    response.force_close()  # aiohttp's handler ends after it: the connection is the relay's
    try:
        writer: Any = await response.prepare(request)
        writer.send_headers()
        await response.write_eof()  # nothing more from aiohttp on this connection
        transport, tail = _detach(request)
    except (ConnectionError, RuntimeError) as exc:
        _abort(proto)
        raise UpstreamUnavailable(f"client went away during the handshake: {exc}") from None
    except BaseException:
        _abort(proto)
        raise
    ctx.upgraded = True  # its status is 101 from here on, however it ends (chain.observe)
    lifecycle = app[LIFECYCLE]
    if ctx.principal is not None:
        lifecycle.relay_principals[relay] = ctx.principal
    lifecycle.websockets.add(relay)
    metrics.ws_open.inc()
    if takeover_key[1]:
        lifecycle.relays[takeover_key] = relay.supersede
    relay._on_finish = on_finish
    ctx.finish_later = relay.defer
    relay.start(transport, tail, proto)
    return response


def forget(app: web.Application, relay: RawRelay, takeover_key: tuple[str, str]) -> None:
    """Undo :func:`relay_raw`'s accounting once the relay has ended."""
    lifecycle = app[LIFECYCLE]
    lifecycle.websockets.discard(relay)
    lifecycle.relay_principals.pop(relay, None)
    if lifecycle.relays.get(takeover_key) == relay.supersede:
        del lifecycle.relays[takeover_key]
    app[METRICS].ws_open.dec()
