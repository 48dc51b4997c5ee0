"""WebSocket fan-in: one client socket relayed to a socket on every reachable instance.

With several instances, a prompt's events come from the instance that runs it, addressed to the
``clientId`` the prompt was submitted with. So each client socket is relayed to one socket per
instance, all under the same (namespaced) ``clientId``, and their frames are merged into the
client's single send queue (:class:`~proxy.relay.websocket.ClientSendQueue`, with its
slow-client rules):

* The upstream sockets are connected first (in parallel); the client's upgrade is accepted
  once at least one is up (none: 502, or the instances' own 4xx, before the upgrade).
* ``status``: the first connect-time ``status`` (with ``sid``) is the one the client gets;
  every ``status`` carries ``queue_remaining`` summed over the instances (the last value
  seen from each; an instance whose socket is lost no longer counts), and a change of the sum
  caused by an instance connecting or going away is sent as a ``status`` without ``sid``.
* ``feature_flags``: the client's first frame (ComfyUI reads flags only from the first frame)
  is sent to every instance, and again first to each socket opened later; only the first
  answer reaches the client.
* Every other frame (events, binary previews) is passed on from whichever instance sends it,
  through a per-instance copy of the isolation filter (``ctx.frame_filters``): its "this user's
  prompt is executing" window, which gates binary previews, is per instance.
* An instance socket that ends is reconnected with exponential backoff (up to
  ``upstream.ws_reconnect_max_seconds``) while the instance is in the pool; the client stays
  connected. Instances joining later (``pool.subscribe``) get a socket too.
* Each instance's link is a supervised task (:func:`proxy.tasks.supervise`): whatever it
  fails on is logged and counted (``comfygate_task_failures_total{task="fanin_link"}``), its
  socket is closed (before another opens under the same ``clientId``: ComfyUI would drop the
  id when the older one closed) and the link starts again with a fresh filter, after the same
  backoff. A frame the filter cannot attribute (Redis down) is dropped, never the link.
* Takeover (docs/comfyui-protocol.md#connect-and-clientid-takeover) works as in the direct relay,
  per instance: a newer socket with the same ``clientId`` closes the older relay's upstream sockets
  before connecting its own, and the older client stays open and silent.

With one instance none of this runs: ``app.dispatch`` uses the direct relay.
"""

from __future__ import annotations

import asyncio
import contextlib
import copy
import functools
import time
import uuid
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING

import aiohttp
import orjson
import structlog
from aiohttp import WSCloseCode, web

from proxy.comfy import views
from proxy.comfy.frames import END_EVENTS
from proxy.errors import ProxyError, UpstreamUnavailable
from proxy.multi.merge import MERGED, queue_remaining
from proxy.observability.metrics import METRICS
from proxy.relay.websocket import (
    SLOW_CLIENT_REASON,
    ClientSendQueue,
    Ended,
    accept_client,
    client_protocols,
    connect_upstream,
    forget_client,
    pump_down,
    pump_up,
    quietly,
    relay_outcome,
    send_frame,
)
from proxy.settings import SETTINGS
from proxy.state import CONTEXT, LIFECYCLE, FrameFilter, RequestContext, compose_frame_filters
from proxy.tasks import Wake, supervise
from proxy.tenancy.events import SocketEventFilter
from proxy.upstream.pool import POOL, Upstream

if TYPE_CHECKING:
    from proxy.multi.sticky import FileLocations

log = structlog.get_logger("comfygate.fanin")

FIRST_BACKOFF_SECONDS = 0.25
STABLE_SECONDS = 10.0
"""A socket that lived this long resets the reconnect backoff."""
WATCHED_EVENTS = frozenset({"executed", *END_EVENTS})
"""Events the fan-in reads itself: output files (where they are) and prompt ends."""
_SNIFF_LIMIT = 4096


class FanInRegistry:
    """Every open fan-in relay, by the client id the instances see."""

    def __init__(self) -> None:
        self._relays: dict[str, set[FanInRelay]] = {}
        self.locations: FileLocations | None = None
        """Where output files are (learnt from ``executed`` events)."""
        self.on_finished: Callable[[str], None] | None = None
        """Told the id of every prompt whose end event was relayed."""

    def add(self, relay: FanInRelay) -> None:
        self._relays.setdefault(relay.client_id, set()).add(relay)

    def remove(self, relay: FanInRelay) -> None:
        relays = self._relays.get(relay.client_id)
        if relays is not None:
            relays.discard(relay)
            if not relays:
                del self._relays[relay.client_id]

    def relays(self) -> list[FanInRelay]:
        return [r for relays in self._relays.values() for r in relays]

    async def notify(self, client_id: str, frames: list[str]) -> int:
        """Queue ``frames`` to the open sockets of ``client_id``; how many got them."""
        told = 0
        for relay in list(self._relays.get(client_id, ())):
            if relay.send_local(frames):
                told += 1
        return told

    async def instance_available(self, upstream: Upstream) -> None:
        for relay in self.relays():
            relay.ensure_link(upstream)

    async def instance_gone(self, upstream: Upstream, *, left: bool) -> None:
        for relay in self.relays():
            await relay.instance_gone(upstream, left=left)

    async def close(self) -> None:
        self._relays.clear()


class _Link:
    """One relay's socket to one instance, reconnected while the relay lives."""

    def __init__(self, relay: FanInRelay, upstream: Upstream) -> None:
        self.relay = relay
        self.upstream = upstream
        self.ws: aiohttp.ClientWebSocketResponse | None = None
        self.filter = _link_filters(relay.ctx.frame_filters)
        self.kick = Wake()
        """Cuts a reconnection's backoff short (the pool says the instance is back)."""
        self.task: asyncio.Task[None] | None = None

    def start(self, ws: aiohttp.ClientWebSocketResponse | None) -> None:
        self.ws = ws  # at once: the client's first frame may come before the task runs
        first = [ws]

        async def run() -> None:
            # The socket opened by relay_fanin is the first run's; a restart connects anew.
            restarted = not first
            try:
                await self._run(first.pop() if first else None, reconnecting=restarted)
            except Exception:
                await self._failed()
                raise

        relay = self.relay
        self.task = asyncio.create_task(
            supervise(
                run,
                name="fanin_link",
                failures=relay.metrics.task_failures,
                logger=log,
                first_delay=FIRST_BACKOFF_SECONDS,
                max_delay=relay.max_backoff,
                stable_seconds=STABLE_SECONDS,
                wake=self.kick,
            )
        )

    async def _failed(self) -> None:
        """The link's run failed: its socket is closed before the restart opens another (two
        sockets under one ``clientId``, and ComfyUI drops the id when the older closes)."""
        stale, self.ws = self.ws, None
        if stale is not None:
            await quietly(stale.close())
        self.relay.link_lost(self)

    async def stop(self, message: bytes) -> None:
        if self.task is not None:
            self.task.cancel()
            await asyncio.gather(self.task, return_exceptions=True)
            self.task = None
        if self.ws is not None:
            await quietly(self.ws.close(code=WSCloseCode.OK, message=message))
            self.ws = None

    async def _run(
        self, ws: aiohttp.ClientWebSocketResponse | None, *, reconnecting: bool = False
    ) -> None:
        relay = self.relay
        backoff = FIRST_BACKOFF_SECONDS
        while True:
            if ws is None:
                try:
                    ws = await relay.open(self.upstream)
                except (ProxyError, TimeoutError, aiohttp.ClientError, OSError):
                    await self._pause(backoff)
                    backoff = min(backoff * 2, relay.max_backoff)
                    reconnecting = True
                    continue
                if reconnecting:
                    relay.metrics.ws_upstream_reconnects.labels(self.upstream.name).inc()
                    log.info(
                        "fanin_reconnected",
                        request_id=relay.ctx.request_id,
                        upstream=self.upstream.name,
                    )
                # No await between these two: a client frame either finds self.ws set (and
                # is sent by the client pump) or was kept as client_flags (sent here).
                self.ws = ws
                if relay.client_flags is not None:
                    await quietly(ws.send_str(relay.client_flags))
            self.ws = ws
            if reconnecting:
                # SECURITY: a new socket, a fresh filter: an execution window seen on the old
                # one must not let another user's unattributed previews through on this one.
                self.filter = _link_filters(relay.ctx.frame_filters)
            opened = time.monotonic()
            ended = await self._pump(ws)
            self.ws = None
            await quietly(ws.close())
            ws = None
            if ended is not None:  # the client cannot keep up: the whole relay ends
                relay.end(ended)
                return
            relay.link_lost(self)
            if relay.pool.get(self.upstream.name) is None:
                relay.links.pop(self.upstream.name, None)
                return  # the instance left the pool
            if time.monotonic() - opened >= STABLE_SECONDS:
                backoff = FIRST_BACKOFF_SECONDS
            reconnecting = True
            await self._pause(backoff)
            backoff = min(backoff * 2, relay.max_backoff)

    async def _pause(self, seconds: float) -> None:
        """Wait ``seconds``, or less when the pool says the instance is back."""
        await self.kick.pause(seconds)

    async def _pump(self, ws: aiohttp.ClientWebSocketResponse) -> Ended | None:
        """Frames from this instance to the client until its socket ends (None), or until the
        client's queue overflows (the relay's end)."""
        relay = self.relay
        ended = await pump_down(
            ws,
            functools.partial(relay.deliver, self),
            self.filter,
            self.upstream.name,
            relay.metrics,
            relay.ctx,
        )
        return ended if ended.side == "client" else None


def _link_filters(filters: Sequence[FrameFilter]) -> FrameFilter | None:
    """The socket's frame filters for one instance: the isolation filter's "this user's prompt
    is executing" window is per instance, so each link gets its own (shallow) copy of it;
    caches and the other filters (observers) stay shared."""
    return compose_frame_filters([_link_filter(f) for f in filters])


def _link_filter(base: FrameFilter) -> FrameFilter:
    if not isinstance(base, SocketEventFilter):
        return base
    clone = copy.copy(base)
    clone.running = None
    return clone


def _event_type(frame: str) -> str | None:
    """The ``type`` of a JSON event without parsing it: ComfyUI writes ``{"type": ...`` first
    (and the isolation filter re-serialises with the same order)."""
    for prefix in ('{"type": "', '{"type":"'):
        if frame.startswith(prefix):
            end = frame.find('"', len(prefix))
            return frame[len(prefix) : end] if end > 0 else None
    if len(frame) <= _SNIFF_LIMIT and frame.startswith("{"):
        with contextlib.suppress(orjson.JSONDecodeError):
            message = orjson.loads(frame)
            kind = message.get("type") if isinstance(message, dict) else None
            return kind if isinstance(kind, str) else None
    return None


def _status_frame(total: int) -> str:
    return orjson.dumps(
        {"type": "status", "data": {"status": {"exec_info": {"queue_remaining": total}}}}
    ).decode()


class FanInRelay:
    """One client socket and its sockets to every instance (see the module doc)."""

    def __init__(
        self,
        request: web.Request,
        registry: FanInRegistry,
        client_id: str,
        protocols: tuple[str, ...],
    ) -> None:
        app = request.app
        self.request = request
        self.ctx: RequestContext = request[CONTEXT]
        self.registry = registry
        self.client_id = client_id
        self.protocols = protocols
        self.pool = app[POOL]
        self.metrics = app[METRICS]
        settings = app[SETTINGS]
        self.max_msg = int(settings.websocket.max_message_mb * 1024 * 1024)
        self.max_backoff = settings.upstream.ws_reconnect_max_seconds
        self.links: dict[str, _Link] = {}
        self.queue: ClientSendQueue | None = None
        self.ws: web.WebSocketResponse | None = None
        self.client_flags: str | None = None
        self.values: dict[str, int] = {}
        self.status_sent = False
        self.sent_total: int | None = None
        self.flags_answered = False
        self.superseded = asyncio.Event()
        self.done: asyncio.Future[Ended] = asyncio.get_running_loop().create_future()

    # -- upstream sockets ----------------------------------------------------------------
    async def open(self, upstream: Upstream) -> aiohttp.ClientWebSocketResponse:
        """Connect a socket to ``upstream`` under this relay's client id."""
        return await connect_upstream(
            self.request, self.ctx, upstream, self.protocols, self.max_msg
        )

    def ensure_link(self, upstream: Upstream) -> None:
        """A socket to ``upstream`` (joined or back): started, or retried now."""
        if self.superseded.is_set() or self.done.done() or self.ws is None:
            return
        self._claim(upstream)
        link = self.links.get(upstream.name)
        if link is not None:
            link.kick.set()
            return
        link = self.links[upstream.name] = _Link(self, upstream)
        link.start(None)

    async def instance_gone(self, upstream: Upstream, *, left: bool) -> None:
        link = self.links.get(upstream.name)
        if left and link is not None:
            del self.links[upstream.name]
            await link.stop(b"instance removed")
            self._release(upstream.name)
        if link is not None:
            self.link_lost(link)

    def _claim(self, upstream: Upstream) -> None:
        self.request.app[LIFECYCLE].relays[(upstream.name, self.client_id)] = self.supersede

    def _release(self, name: str) -> None:
        relays = self.request.app[LIFECYCLE].relays
        if relays.get((name, self.client_id)) == self.supersede:
            del relays[(name, self.client_id)]

    async def supersede(self) -> None:
        """A newer socket with this client id: drop every upstream socket, stay silent."""
        if self.superseded.is_set():
            return
        self.superseded.set()
        for link in list(self.links.values()):
            await link.stop(b"superseded")

    # -- frames toward the client ---------------------------------------------------------
    def deliver(self, link: _Link, frame: str | bytes) -> bool:
        """Pass one (filtered) frame from ``link``'s instance on; False: the client is too
        slow and the relay must end."""
        if isinstance(frame, str):
            kind = _event_type(frame)
            if kind == "status":
                merged = self._status(link, frame)
                if merged is None:
                    return True
                frame = merged
            elif kind == "feature_flags":
                if self.flags_answered:
                    return True  # every instance answers the client's flags: once is enough
                self.flags_answered = True
            elif kind in WATCHED_EVENTS:
                self._observe(link, frame)
        return self._put(frame)

    def _put(self, frame: str | bytes) -> bool:
        assert self.queue is not None
        if self.queue.put(frame):
            return True
        self.end(Ended("client", WSCloseCode.TRY_AGAIN_LATER, SLOW_CLIENT_REASON))
        return False

    def send_local(self, frames: list[str]) -> bool:
        """Frames the proxy itself tells this client (a lost prompt); False if not open."""
        if self.queue is None or self.superseded.is_set() or self.done.done():
            return False
        return all(self._put(frame) for frame in frames)

    def _status(self, link: _Link, frame: str) -> str | None:
        try:
            message = orjson.loads(frame)
        except orjson.JSONDecodeError:
            return frame
        data = message.get("data") if isinstance(message, dict) else None
        if not isinstance(data, dict):
            return frame
        remaining = queue_remaining(data.get("status"))
        if remaining is not None:
            self.values[link.upstream.name] = remaining
        total = sum(self.values.values())
        if "sid" in data and self.status_sent:
            # Another instance's (or a reconnected socket's) connect-time status: the client
            # had its own; only a changed sum is worth telling.
            return self._total_changed(total)
        self.status_sent = True
        self.sent_total = total
        status = data.get("status")
        if isinstance(status, dict) and isinstance(status.get("exec_info"), dict):
            status["exec_info"]["queue_remaining"] = total
            return orjson.dumps(message).decode()
        return frame

    def _total_changed(self, total: int) -> str | None:
        if total == self.sent_total:
            return None
        self.sent_total = total
        return _status_frame(total)

    def link_lost(self, link: _Link) -> None:
        """An instance's socket ended: its queue no longer counts in the sum."""
        if self.values.pop(link.upstream.name, None) is None or not self.status_sent:
            return
        frame = self._total_changed(sum(self.values.values()))
        if frame is not None and not self.done.done():
            self._put(frame)

    def _observe(self, link: _Link, frame: str) -> None:
        try:
            message = orjson.loads(frame)
        except orjson.JSONDecodeError:
            return
        data = message.get("data") if isinstance(message, dict) else None
        if not isinstance(data, dict):
            return
        if message.get("type") == "executed":
            if self.registry.locations is not None:
                # ComfyUI sends ``executed`` only to the submitter's (namespaced) client id:
                # this socket's principal owns the prompt (sticky /view prefers its copy).
                principal = self.ctx.principal
                self.registry.locations.record(
                    link.upstream.name,
                    views.node_files(data.get("output")),
                    principal.comfy_user if principal is not None else None,
                )
        elif isinstance(prompt_id := data.get("prompt_id"), str) and self.registry.on_finished:
            self.registry.on_finished(prompt_id)

    def end(self, ended: Ended) -> None:
        if not self.done.done():
            self.done.set_result(ended)

    # -- the client side ------------------------------------------------------------------
    async def pump_client(self) -> Ended:
        assert self.ws is not None
        first = True

        async def to_instances(data: str | bytes) -> None:
            nonlocal first
            if first and isinstance(data, str) and _event_type(data) == "feature_flags":
                self.client_flags = data  # replayed first to sockets opened later
            first = False
            for link in list(self.links.values()):
                upstream_ws = link.ws
                if upstream_ws is None or upstream_ws.closed:
                    continue
                with contextlib.suppress(ConnectionError, RuntimeError):
                    await send_frame(upstream_ws, data)

        return await pump_up(self.ws, to_instances, self.metrics, self.ctx)


async def relay_fanin(request: web.Request, registry: FanInRegistry) -> web.StreamResponse:
    """Relay one client socket to every reachable instance (see the module doc)."""
    ctx = request[CONTEXT]
    app = request.app
    pool, metrics = app[POOL], app[METRICS]
    ws_settings = app[SETTINGS].websocket
    upstreams = pool.reachable()
    if not upstreams:
        raise UpstreamUnavailable("no ComfyUI instance is available")
    client_id = views.query_value(ctx.upstream_path, "clientId") or ""
    if not client_id:
        # Every instance must know the socket by the same id: mint it here (ComfyUI would
        # mint a different one on each instance).
        client_id = uuid.uuid4().hex
        ctx.upstream_path = views.with_query_param(ctx.upstream_path, "clientId", client_id)
    ctx.upstream = MERGED
    lifecycle = app[LIFECYCLE]
    olders = {
        id(older): older
        for u in pool.upstreams
        if (older := lifecycle.relays.get((u.name, client_id))) is not None
    }
    for older in olders.values():
        await older()  # takeover: the older relay's upstream sockets close first
    relay = FanInRelay(request, registry, client_id, client_protocols(request))
    started = time.perf_counter()
    results = await asyncio.gather(*(relay.open(u) for u in upstreams), return_exceptions=True)
    ctx.upstream_seconds = time.perf_counter() - started
    opened = [
        (u, r)
        for u, r in zip(upstreams, results, strict=True)
        if isinstance(r, aiohttp.ClientWebSocketResponse)
    ]
    if not opened:
        errors = [r for r in results if isinstance(r, BaseException)]
        refused = [e for e in errors if isinstance(e, ProxyError) and 400 <= e.status < 500]
        first = refused[0] if refused else errors[0]
        raise first if isinstance(first, Exception) else UpstreamUnavailable("no instance")

    ws = await accept_client(
        request, opened[0][1].protocol, relay.max_msg, (upstream_ws for _, upstream_ws in opened)
    )
    relay.ws = ws
    relay.queue = ClientSendQueue.for_client(ws, ws_settings, metrics, request.transport)
    for upstream in pool.upstreams:
        relay._claim(upstream)
    registry.add(relay)
    connected = dict(opened)
    for upstream in upstreams:
        link = relay.links[upstream.name] = _Link(relay, upstream)
        link.start(connected.get(upstream))  # not connected yet: retried with backoff

    client = asyncio.ensure_future(relay.pump_client())
    try:
        await asyncio.wait((client, relay.done), return_when=asyncio.FIRST_COMPLETED)
        if relay.superseded.is_set() and not client.done() and not relay.done.done():
            await asyncio.wait((client,))  # taken over: open and silent until the client leaves
    finally:
        ended = relay_outcome(
            (client, relay.done), ctx.request_id, event="fanin_failed", metrics=metrics
        )
        await asyncio.shield(_finish(relay, ended, client))
    return ws


async def _finish(relay: FanInRelay, ended: Ended, client: asyncio.Future[Ended]) -> None:
    """Close every upstream socket first, then the client; account for the relay."""
    reason = ended.reason.encode()[:123]
    relay.end(ended)
    relay.registry.remove(relay)
    for name in list(relay.links):
        relay._release(name)
    for upstream in relay.pool.upstreams:
        relay._release(upstream.name)
    links = list(relay.links.values())
    relay.links.clear()
    await asyncio.gather(*(link.stop(reason) for link in links), return_exceptions=True)
    if relay.queue is not None:
        await relay.queue.close()
    assert relay.ws is not None
    await quietly(relay.ws.close(code=ended.code, message=reason))
    client.cancel()
    await asyncio.gather(client, return_exceptions=True)
    forget_client(relay.request.app, relay.ws)
    log.info(
        "relay_closed",
        request_id=relay.ctx.request_id,
        upstream=MERGED,
        ended_by=ended.side,
        code=ended.code,
        previews_dropped=relay.queue.dropped if relay.queue is not None else 0,
    )


__all__ = ["FanInRegistry", "FanInRelay", "relay_fanin"]
