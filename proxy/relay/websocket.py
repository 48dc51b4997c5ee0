"""``relay_websocket``: ComfyUI's ``/ws`` relayed frame by frame, in both directions.

By default on the raw transports (:mod:`proxy.relay.raw_ws`, same behaviour as below, without
aiohttp's socket objects); this module's aiohttp relay takes what the raw one does not (TLS
served by the proxy itself, ``websocket.raw_relay = false``), and its pumps and send queue
serve the fan-in over several instances (``proxy.multi.fanin``).

Order matters: the upstream socket is connected first, and only then is the client's upgrade
accepted, so an unreachable ComfyUI is a plain 502 before the handshake (never an accepted socket
that closes at once). Close codes and reasons travel both ways; when one side ends, the other
is closed at once, so there are never two upstream sockets for one ``clientId`` (ComfyUI's
takeover race, docs/comfyui-protocol.md#connect-and-clientid-takeover).

Toward the client, frames go through :class:`ClientSendQueue`: ComfyUI writes to its sockets
one after another, so a relay that waited on a slow client would slow ComfyUI's messages to
everyone. The queue is bounded in bytes; when full, stale binary previews are dropped (a newer
one supersedes them), JSON events never are, and a client that cannot keep up with events is
closed with 1013.

A frame the proxy fails to handle (the generation tracker or the frame filter raised: a bug,
or a store the filter's own fail mode did not cover) is dropped, logged and counted in
``comfygate_task_failures_total{task="ws_relay"}``; the relay goes on (issue 14: a relay that
dies on one frame leaves its socket deaf). Dropping is the default-deny answer: a frame the
filter did not pass is never sent.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections import deque
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass
from typing import TYPE_CHECKING

import aiohttp
import structlog
from aiohttp import WebSocketError, WSCloseCode, WSMsgType, hdrs, web
from yarl import URL

from proxy.errors import ProxyError, UpstreamUnavailable
from proxy.observability.metrics import METRICS, Metrics
from proxy.relay.outgoing import build_upstream_headers, map_client_error
from proxy.relay.raw_ws import RawRelay, forget, raw_capable, relay_raw
from proxy.relay.ws_fast import UNDECIDED, DirectWriter, quick_of
from proxy.settings import SETTINGS
from proxy.state import CONTEXT, LIFECYCLE, FrameFilter, RequestContext, compose_frame_filters
from proxy.tasks import task_failed
from proxy.upstream.headers import WEBSOCKET_HANDSHAKE
from proxy.upstream.pool import POOL, Upstream

if TYPE_CHECKING:
    from proxy.settings import WebSocketSettings

log = structlog.get_logger("comfygate.websocket")

PREVIEW_TYPES = (1, 4)
"""Binary event types that are image previews (docs/comfyui-protocol.md#binary-frames); type 3 is
progress text."""
CLOSE_TIMEOUT_SECONDS = 5.0
_UNSENDABLE_CODES = frozenset({1005, 1006, 1015})  # reserved: never put on the wire (RFC 6455 7.4)
SLOW_CLIENT_REASON = "client too slow to receive events"


def is_preview(frame: bytes) -> bool:
    return len(frame) >= 4 and int.from_bytes(frame[:4], "big") in PREVIEW_TYPES


def sendable_close_code(code: int | None, fallback: int = WSCloseCode.OK) -> int:
    if code is None or code in _UNSENDABLE_CODES or not 1000 <= code <= 4999:
        return fallback
    return code


class ClientSendQueue:
    """Frames on their way to one client, bounded in bytes, drained by a lazily started writer."""

    def __init__(
        self,
        ws: web.WebSocketResponse,
        *,
        max_bytes: int,
        drop_stale_previews: bool,
        metrics: Metrics,
        transport: asyncio.Transport | None = None,
    ) -> None:
        self._ws = ws
        # Nothing queued and the transport below its high-water mark: the frame is written at
        # once (what send_bytes would do), without a writer task (proxy.relay.ws_fast).
        self._direct = DirectWriter(ws, transport) if transport is not None else None
        self._max_bytes = max_bytes
        self._drop_previews = drop_stale_previews
        self._metrics = metrics
        self._frames: deque[str | bytes] | None = None
        """Created on the first frame that must wait (a deque holds a 760-byte block even
        empty, and most sockets are idle or written directly)."""
        self._bytes = 0
        self._writer: asyncio.Task[None] | None = None
        self.overflowed = False
        self.dropped = 0
        self._closed = False

    @classmethod
    def for_client(
        cls,
        ws: web.WebSocketResponse,
        settings: WebSocketSettings,
        metrics: Metrics,
        transport: asyncio.Transport | None = None,
    ) -> ClientSendQueue:
        """The queue of one relayed client, sized by ``[websocket]``; frames are written
        directly on ``transport`` (the client's) when nothing waits before them."""
        return cls(
            ws,
            max_bytes=int(settings.send_queue_mb * 1024 * 1024),
            drop_stale_previews=settings.drop_stale_previews,
            metrics=metrics,
            transport=transport,
        )

    def put(self, frame: str | bytes) -> bool:
        """Queue a frame; False when the client cannot keep up and must be closed."""
        if self._closed:
            return True  # the relay is closing: frames still arriving go with the connection
        if self._writer is None and self._direct is not None and not self._frames:
            try:
                if self._direct.write(frame):
                    return True
            except (ConnectionError, RuntimeError):
                return True  # the client is gone; the relay notices on its next receive
        size = len(frame)
        if self._bytes + size > self._max_bytes:
            preview = isinstance(frame, bytes) and is_preview(frame)
            if self._drop_previews:
                self._drop_queued_previews()
            if self._bytes + size > self._max_bytes:
                if preview and self._drop_previews:
                    self._count_drop()
                    return True
                self.overflowed = True
                self._metrics.ws_slow_clients.inc()
                return False
        if self._frames is None:
            self._frames = deque()
        self._frames.append(frame)
        self._bytes += size
        if self._writer is None:
            self._writer = asyncio.create_task(self._drain())
        return True

    def _drop_queued_previews(self) -> None:
        kept: deque[str | bytes] = deque()
        for queued in self._frames or ():
            if isinstance(queued, bytes) and is_preview(queued):
                self._bytes -= len(queued)
                self._count_drop()
            else:
                kept.append(queued)
        self._frames = kept

    def _count_drop(self) -> None:
        self.dropped += 1
        self._metrics.ws_previews_dropped.inc()

    async def _drain(self) -> None:
        try:
            while self._frames:
                frame = self._frames.popleft()
                self._bytes -= len(frame)
                if not self._frames:
                    self._frames = None  # drained: the block goes until frames wait again
                if isinstance(frame, str):
                    await self._ws.send_str(frame)
                else:
                    await self._ws.send_bytes(frame)
        except (ConnectionError, RuntimeError):
            self._frames = None  # the client is gone; the relay notices on its next receive
            self._bytes = 0
        except Exception:  # noqa: BLE001 - anything else: logged, counted, the queue starts over
            task_failed("ws_send", self._metrics.task_failures, logger=log)
            self._frames = None
            self._bytes = 0
        finally:
            self._writer = None

    async def flush(self, within: float) -> None:
        """Wait, at most ``within`` seconds, until queued frames are written."""
        if self._writer is not None:
            await asyncio.wait((self._writer,), timeout=within)

    async def close(self) -> None:
        """Stop the writer (frames still queued are dropped with the connection)."""
        self._closed = True
        if self._writer is not None:
            self._writer.cancel()
            await asyncio.gather(self._writer, return_exceptions=True)


@dataclass(slots=True)
class Ended:
    """How one direction of a relay ended."""

    side: str
    """``client``, ``upstream`` or ``proxy``: who ended it."""
    code: int
    reason: str


async def pump_down(  # noqa: PLR0917 - the relay's hot path: plain positional arguments
    upstream_ws: aiohttp.ClientWebSocketResponse,
    put: Callable[[str | bytes], bool],
    frame_filter: FrameFilter | None,
    upstream: str,
    metrics: Metrics,
    ctx: RequestContext,
) -> Ended:
    """Frames from one ComfyUI socket toward the client until it ends: counted, read by the
    generation tracker, filtered (``frame_filter``: isolation; None drops a frame), then
    ``put`` (False: the client cannot keep up and the relay ends with 1013). Shared by the
    direct relay and each instance socket of the fan-in."""
    frames, sizes = metrics.ws_frames, metrics.ws_bytes
    text_frames, text_bytes = frames.labels("down", "text"), sizes.labels("down", "text")
    preview_frames = frames.labels("down", "preview")
    preview_bytes = sizes.labels("down", "preview")
    binary_frames, binary_bytes = frames.labels("down", "binary"), sizes.labels("down", "binary")
    # Generation metrics read ComfyUI's execution events as they pass (before the filter).
    tracker = metrics.generation
    roles = ctx.principal.roles if ctx.principal is not None else frozenset()
    # Frames the filter decides from what it knows already (an admin's, a preview of a prompt
    # whose owner this socket looked up) cost a call, not a coroutine chain (ws_fast).
    quick = quick_of(frame_filter)
    while True:
        msg = await upstream_ws.receive()
        if msg.type is WSMsgType.TEXT or msg.type is WSMsgType.BINARY:
            data = msg.data
            size = len(data)
            if msg.type is WSMsgType.TEXT:
                text_frames.inc()
                text_bytes.inc(size)
                if tracker is not None:
                    try:
                        tracker.observe_frame(data, roles, upstream)
                    except Exception:  # noqa: BLE001 - metrics must never cost the relay
                        task_failed(
                            "ws_relay",
                            metrics.task_failures,
                            logger=log,
                            event="relay_frame_failed",
                            request_id=ctx.request_id,
                            upstream=upstream,
                        )
            elif is_preview(data):
                preview_frames.inc()
                preview_bytes.inc(size)
            else:
                binary_frames.inc()
                binary_bytes.inc(size)
            ctx.bytes_out += size
            if frame_filter is not None:
                try:
                    decided = UNDECIDED if quick is None else quick(data)
                    filtered = await frame_filter(data) if decided is UNDECIDED else decided
                except Exception:  # noqa: BLE001 - the frame is dropped, the relay goes on
                    task_failed(
                        "ws_relay",
                        metrics.task_failures,
                        logger=log,
                        event="relay_frame_failed",
                        request_id=ctx.request_id,
                        upstream=upstream,
                    )
                    continue  # SECURITY: not passed by the filter, so never sent
                if filtered is None:
                    continue  # not this user's to see
                data = filtered
            if not put(data):
                return Ended("client", WSCloseCode.TRY_AGAIN_LATER, SLOW_CLIENT_REASON)
        elif msg.type is WSMsgType.CLOSE:
            return Ended("upstream", sendable_close_code(msg.data), msg.extra or "")
        elif msg.type is WSMsgType.ERROR:
            return Ended("upstream", WSCloseCode.INTERNAL_ERROR, "upstream connection failed")
        elif msg.type in (WSMsgType.CLOSING, WSMsgType.CLOSED):
            return Ended("upstream", WSCloseCode.INTERNAL_ERROR, "upstream connection lost")


async def pump_up(
    ws: web.WebSocketResponse,
    forward: Callable[[str | bytes], Awaitable[None]],
    metrics: Metrics,
    ctx: RequestContext,
) -> Ended:
    """Frames from the client toward ComfyUI until the client ends: counted, then ``forward``
    (to one socket, or to every instance's). Shared by the direct relay and the fan-in."""
    frames, sizes = metrics.ws_frames, metrics.ws_bytes
    text_frames, text_bytes = frames.labels("up", "text"), sizes.labels("up", "text")
    binary_frames, binary_bytes = frames.labels("up", "binary"), sizes.labels("up", "binary")
    while True:
        msg = await ws.receive()
        if msg.type is WSMsgType.TEXT or msg.type is WSMsgType.BINARY:
            if msg.type is WSMsgType.TEXT:
                text_frames.inc()
                text_bytes.inc(len(msg.data))
            else:
                binary_frames.inc()
                binary_bytes.inc(len(msg.data))
            ctx.bytes_in += len(msg.data)
            await forward(msg.data)
        elif msg.type is WSMsgType.CLOSE:
            return Ended("client", sendable_close_code(msg.data), msg.extra or "")
        elif msg.type is WSMsgType.ERROR and isinstance(msg.data, WebSocketError):
            # A protocol violation by the client (e.g. a frame over max_message_mb: 1009).
            return Ended("client", sendable_close_code(msg.data.code), str(msg.data)[:100])
        elif msg.type in (WSMsgType.CLOSING, WSMsgType.CLOSED, WSMsgType.ERROR):
            code = ws.close_code or WSCloseCode.GOING_AWAY
            return Ended("client", sendable_close_code(code, WSCloseCode.GOING_AWAY), "")


async def send_frame(ws: aiohttp.ClientWebSocketResponse, data: str | bytes) -> None:
    """Send a text (str) or binary (bytes) frame on as it came."""
    if isinstance(data, str):
        await ws.send_str(data)
    else:
        await ws.send_bytes(data)


def client_protocols(request: web.Request) -> tuple[str, ...]:
    """The subprotocols the client offered (``Sec-WebSocket-Protocol``), for ComfyUI."""
    return tuple(
        p.strip()
        for value in request.headers.getall(hdrs.SEC_WEBSOCKET_PROTOCOL, ())
        for p in value.split(",")
        if p.strip()
    )


async def connect_upstream(
    request: web.Request,
    ctx: RequestContext,
    upstream: Upstream,
    protocols: tuple[str, ...],
    max_msg: int,
) -> aiohttp.ClientWebSocketResponse:
    """Open the socket to ``upstream`` for ``ctx.upstream_path``.

    Raises:
        ProxyError: ComfyUI answered the handshake with an HTTP status (its own 4xx passed on,
            else 502), or could not be reached (``map_client_error``).
    """
    app = request.app
    headers = build_upstream_headers(request, ctx, upstream)
    for name in WEBSOCKET_HANDSHAKE:
        headers.pop(name, None)
    try:
        return await app[POOL].session.ws_connect(
            upstream.ws_url_for(ctx.upstream_path),
            headers=headers,
            protocols=protocols,
            max_msg_size=max_msg,
            autoclose=False,
            autoping=True,
            compress=0,
            timeout=aiohttp.ClientWSTimeout(ws_receive=None, ws_close=CLOSE_TIMEOUT_SECONDS),
        )
    except aiohttp.WSServerHandshakeError as exc:
        # ComfyUI answered the handshake with an HTTP status (its 403 origin check, a 404):
        # pass the status on, as ComfyUI would have answered the client directly.
        app[METRICS].upstream_errors.labels(upstream.name, "ws_handshake").inc()
        status = exc.status if 400 <= exc.status < 500 else 502
        raise ProxyError(
            f"ComfyUI refused the WebSocket handshake ({exc.status})",
            error_type="upstream_ws_refused",
            status=status,
        ) from None
    except (TimeoutError, aiohttp.ClientError, OSError) as exc:
        raise map_client_error(exc, upstream, request) from None


async def accept_client(
    request: web.Request,
    protocol: str | None,
    max_msg: int,
    upstream_sockets: Iterable[aiohttp.ClientWebSocketResponse],
) -> web.WebSocketResponse:
    """Accept the client's upgrade (once the upstream sockets are up) and account for it
    (undone by :func:`forget_client`).

    Raises:
        UpstreamUnavailable: the client went away during the handshake (``upstream_sockets``
            are closed first).
    """
    app = request.app
    ws = web.WebSocketResponse(
        protocols=(protocol,) if protocol else (),
        max_msg_size=max_msg,
        heartbeat=app[SETTINGS].websocket.heartbeat_seconds or None,
        autoclose=False,
        autoping=True,
        compress=False,  # previews are JPEG/PNG already; deflate would cost CPU and ~300 KB/socket
        timeout=CLOSE_TIMEOUT_SECONDS,
    )
    try:
        await ws.prepare(request)
    except (ConnectionError, RuntimeError) as exc:
        for upstream_ws in upstream_sockets:
            await quietly(upstream_ws.close())
        raise UpstreamUnavailable(f"client went away during the handshake: {exc}") from None
    ctx = request[CONTEXT]
    ctx.upgraded = True  # its status is 101 from here on, however it ends (chain.observe)
    lifecycle = app[LIFECYCLE]
    if ctx.principal is not None:
        lifecycle.relay_principals[ws] = ctx.principal
    lifecycle.websockets.add(ws)
    app[METRICS].ws_open.inc()
    return ws


def forget_client(app: web.Application, ws: web.WebSocketResponse) -> None:
    """Undo :func:`accept_client`'s accounting (the client's socket is closed)."""
    app[LIFECYCLE].websockets.discard(ws)
    app[LIFECYCLE].relay_principals.pop(ws, None)
    app[METRICS].ws_open.dec()


def relay_outcome(
    pumps: Iterable[asyncio.Future[Ended]],
    request_id: str,
    *,
    event: str = "relay_failed",
    metrics: Metrics | None = None,
) -> Ended:
    """How a relay ended: the first of ``pumps`` (in order of precedence) that finished, a
    failed one as 1011 (logged as ``event``, counted in ``task_failures{task="ws_relay"}``),
    else the client went away (handler cancelled)."""
    for pump in pumps:
        if not pump.done() or pump.cancelled():
            continue
        if (error := pump.exception()) is not None:
            log.error(event, request_id=request_id, error=type(error).__name__, exc_info=error)
            if metrics is not None:
                metrics.task_failures.labels("ws_relay").inc()
            return Ended("proxy", WSCloseCode.INTERNAL_ERROR, "relay failed")
        return pump.result()
    return Ended("client", WSCloseCode.GOING_AWAY, "client went away")


async def quietly(closing: Awaitable[object]) -> None:
    """Await a close or a send whose failure only means the peer is gone already."""
    with contextlib.suppress(ConnectionError, RuntimeError, asyncio.TimeoutError):
        await closing


async def relay_websocket(request: web.Request) -> web.StreamResponse:
    """Relay one ComfyUI WebSocket; the upstream is connected before the client is accepted."""
    ctx = request[CONTEXT]
    app = request.app
    settings = app[SETTINGS].websocket
    pool, metrics = app[POOL], app[METRICS]
    upstream = ctx.target or pool.home()
    ctx.upstream = upstream.name
    max_msg = int(settings.max_message_mb * 1024 * 1024)

    lifecycle = app[LIFECYCLE]
    # ComfyUI's takeover (docs/comfyui-protocol.md#connect-and-clientid-takeover): a second socket
    # with the same clientId replaces the first, and the first one's close later unregisters the id
    # altogether. So an older relay for this clientId drops its upstream socket *before* the new one
    # connects: ComfyUI never sees two sockets for one id, and the older client, like with ComfyUI,
    # hears nothing more. The id ComfyUI will see (guards may have namespaced it per user): keying
    # the takeover on the client's own id would let one user's socket supersede another's.
    client_id = URL(ctx.upstream_path, encoded=True).query.get("clientId", "")
    takeover_key = (upstream.name, client_id)
    if client_id and (older := lifecycle.relays.get(takeover_key)) is not None:
        await older()

    if settings.raw_relay and raw_capable(request):  # the default: the raw transports
        return await _relay_raw(request, ctx, upstream, takeover_key)
    upstream_ws = await connect_upstream(request, ctx, upstream, client_protocols(request), max_msg)
    ws = await accept_client(request, upstream_ws.protocol, max_msg, (upstream_ws,))

    superseded = False  # a flag, not an asyncio.Event: nothing waits on it (and an Event
    # holds a 760-byte deque per idle socket)

    async def supersede() -> None:
        nonlocal superseded
        superseded = True
        await quietly(upstream_ws.close(code=WSCloseCode.OK, message=b"superseded"))

    if client_id:
        lifecycle.relays[takeover_key] = supersede
    queue = ClientSendQueue.for_client(ws, settings, metrics, request.transport)

    async def to_upstream(data: str | bytes) -> None:
        if upstream_ws.closed:
            return  # superseded by a newer socket with this clientId: ComfyUI ignores it too
        await send_frame(upstream_ws, data)

    down = asyncio.create_task(
        pump_down(
            upstream_ws,
            queue.put,
            compose_frame_filters(ctx.frame_filters),
            upstream.name,
            metrics,
            ctx,
        )
    )
    up = asyncio.ensure_future(pump_up(ws, to_upstream, metrics, ctx))
    try:
        await asyncio.wait((down, up), return_when=asyncio.FIRST_COMPLETED)
        if superseded and not up.done():
            # Taken over: stay open and silent until this client leaves, as ComfyUI does.
            await asyncio.wait((up,))
    finally:
        if lifecycle.relays.get(takeover_key) is supersede:
            del lifecycle.relays[takeover_key]
        # Also reached when the client's disconnect cancels this handler: the upstream socket
        # must still be closed (shielded), or ComfyUI would keep routing this clientId's events
        # to a dead relay.
        # The client pump first: it is the last to end in a takeover.
        ended = relay_outcome((up, down), ctx.request_id, metrics=metrics)
        await asyncio.shield(_finish(request, ws, upstream_ws, queue, ended, (down, up)))
    return ws


async def _finish(  # noqa: PLR0917 - private, called once
    request: web.Request,
    ws: web.WebSocketResponse,
    upstream_ws: aiohttp.ClientWebSocketResponse,
    queue: ClientSendQueue,
    ended: Ended,
    pumps: tuple[asyncio.Future[Ended], ...],
) -> None:
    """Close both sides (upstream first), stop the pumps, account for the relay."""
    reason = ended.reason.encode()[:123]  # a close frame's reason fits in 123 bytes
    if ended.side == "upstream":
        # ComfyUI ended it: let the events already queued reach the client before the close.
        await queue.flush(within=CLOSE_TIMEOUT_SECONDS)
    await queue.close()
    # Upstream first: closing the client's side ends its connection, and with it this handler.
    await quietly(upstream_ws.close(code=ended.code, message=reason))
    await quietly(ws.close(code=ended.code, message=reason))
    for pump in pumps:
        pump.cancel()
    await asyncio.gather(*pumps, return_exceptions=True)
    forget_client(request.app, ws)
    ctx = request[CONTEXT]
    log.info(
        "relay_closed",
        request_id=ctx.request_id,
        upstream=ctx.upstream,
        ended_by=ended.side,
        code=ended.code,
        previews_dropped=queue.dropped,
    )


async def _relay_raw(
    request: web.Request, ctx: RequestContext, upstream: Upstream, takeover_key: tuple[str, str]
) -> web.StreamResponse:
    """The raw relay (``proxy.relay.raw_ws``); its end is accounted for as this module's."""
    app = request.app

    def finished(relay: RawRelay) -> None:
        forget(app, relay, takeover_key)
        ended = relay.ending
        log.info(
            "relay_closed",
            request_id=ctx.request_id,
            upstream=ctx.upstream,
            ended_by=ended.side if ended else "proxy",
            code=ended.code if ended else WSCloseCode.INTERNAL_ERROR,
            previews_dropped=relay.dropped,
        )

    return await relay_raw(request, ctx, upstream, takeover_key, finished)
