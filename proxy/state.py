"""Typed keys for everything stored on the application and on each request.

Shared objects live under ``web.AppKey``s and are created in ``app.create_app`` (resources with
a lifetime in ``cleanup_ctx``); per-request state lives in one :class:`RequestContext` under
:data:`CONTEXT`. Nothing is stored under string keys.
"""

from __future__ import annotations

import enum
import time
import weakref
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from typing import Final, Protocol

from aiohttp import web
from multidict import istr

from proxy.principal import Principal
from proxy.routes import OTHER, RouteRule
from proxy.upstream.http1 import UpstreamResponse
from proxy.upstream.pool import Upstream

Body = bytes | AsyncIterator[bytes] | None


class Serialisable(Protocol):
    """A parsed request body that writes its own serialisation (``Submission``)."""

    def dump(self) -> bytes: ...


class Failover(Protocol):
    """What ``forward_http`` calls instead of sending once (``ctx.failover``)."""

    async def send(
        self, request: web.Request, first: Upstream, body: Body
    ) -> tuple[UpstreamResponse, Upstream]:
        """The response head, and the instance that gave it.

        Raises:
            ProxyError: no instance could be reached (mapped like a single failure).
        """
        ...


ResponseFilter = Callable[[int, bytes], Awaitable[bytes]]
"""A rewrite of an answer: its status and body in, the body to send out."""
FrameFilter = Callable[[str | bytes], Awaitable[str | bytes | None]]
"""A WebSocket frame from ComfyUI in, the frame to relay (or None: dropped) out."""


class Undecided(enum.Enum):
    UNDECIDED = "undecided"


UNDECIDED: Final = Undecided.UNDECIDED
"""A frame filter's ``quick`` answer when the frame needs the filter's full (async) call."""
Quick = Callable[[str | bytes], "str | bytes | Undecided | None"]
"""A frame filter's optional synchronous decision (``proxy.relay.ws_fast``): the frame to
send, None to drop it, or UNDECIDED. It must be free of effects the full call would repeat."""


def quick_of(frame_filter: object) -> Quick | None:
    """The filter's ``quick`` decision, if it offers one."""
    quick = getattr(frame_filter, "quick", None)
    return quick if callable(quick) else None


class QuickFilter:
    """A closure-style frame filter with a ``quick`` decision attached (see :func:`with_quick`)."""

    __slots__ = ("_full", "quick")

    def __init__(self, full: FrameFilter, quick: Quick) -> None:
        self._full = full
        self.quick = quick

    def __call__(self, frame: str | bytes) -> Awaitable[str | bytes | None]:
        return self._full(frame)


def with_quick(full: FrameFilter, quick: Quick) -> QuickFilter:
    """``full`` as a frame filter that also decides quickly with ``quick``."""
    return QuickFilter(full, quick)


@dataclass(slots=True)
class RequestContext:
    """What the middlewares, guards and handlers of one request share."""

    request_id: str
    started: float = field(default_factory=time.perf_counter)
    rule: RouteRule = OTHER
    upstream_path: str = "/"
    """Origin-form path and query to send upstream: the proxy's own encoding of the canonical
    target (``proxy.target``) that routing decided on, base path removed."""
    path: str = "/"
    """Normalised path (decoded, ``/api`` removed): what decisions are made on."""
    client_ip: str = ""
    upstream: str = ""
    upstream_seconds: float = 0.0
    """Time spent waiting on the upstream (connect, headers, body reads)."""
    bytes_in: int = 0
    bytes_out: int = 0
    rejected_by: str = ""
    error_type: str = ""
    principal: Principal | None = None
    """Set by the auth guard; None only on the proxy's own public routes."""
    _body: bytes | None = None
    _due: Serialisable | None = None
    """A parse whose serialisation is due (:meth:`serialise_later`); ``body`` writes it."""
    _sealed: bool = False
    """The due serialisation was written and read: no guard may change the parse any more."""
    parsed_body: tuple[bytes, object] | None = None
    """``(body, parsed)``: ``body`` parsed once for every guard that inspects it (on
    ``POST /prompt`` a ``proxy.comfy.submission.Submission``, see
    ``proxy.request.prompt.read_prompt``); stale as soon as ``body`` is replaced. Read it
    through :meth:`current_parse` (which also sees a parse whose serialisation is due)."""
    body_stream: AsyncIterator[bytes] | None = None
    """A rewritten request body too large to hold (a re-encoded upload); streamed upstream with
    chunked framing (its Content-Type goes in ``upstream_headers``)."""
    upstream_headers: dict[str, str] = field(default_factory=dict)
    """Headers the guards want ComfyUI to receive (identity), set after filtering the client's."""
    response_headers: list[tuple[str, str]] = field(default_factory=list)
    """Headers for the client's response (e.g. a renewed session cookie), added before prepare."""
    response_filters: list[ResponseFilter] = field(default_factory=list)
    """Rewrites of the answer (any status but 204/304), applied in list order by
    :meth:`filter_response`, each given the previous one's output. Guards append in their
    order on the route (``app.build_routes``); a terminal handler that prepares the answer
    (a sticky read's merge) inserts its step first. Any filter makes the answer read: asked
    for in identity, decoded or refused (``proxy.upstream.encoding``), HEAD sent as GET."""
    frame_filters: list[FrameFilter] = field(default_factory=list)
    """On a WebSocket relay: each frame from ComfyUI goes through these in list order
    (:func:`compose_frame_filters`); a None from one drops the frame. Guards append in their
    order on ``/ws``: the queue quota's observer (sees every frame), then isolation's filter."""
    upgraded: bool = False
    """The WebSocket handshake was answered (101): the request's status from then on."""
    finish_later: Callable[[Callable[[], None]], None] | None = None
    """Set by a relay that outlives its handler (``proxy.relay.raw_ws``): ``chain.observe``
    gives it the request's log line and metrics to run when the relay ends."""
    target: Upstream | None = None
    """The instance this request must go to (sticky routing, placement); None: the home one."""
    answer: Callable[[web.Request], Awaitable[web.StreamResponse]] | None = None
    """The terminal handler's stand-in, set (once) by a guard that builds the answer itself
    from several upstream reads (a tenant's history and jobs views): the terminal handler
    calls it instead of forwarding."""
    failover: Failover | None = None
    """How the forward sends (set once), by placement on ``POST /prompt``: sends the
    submission, moving it to the next candidate instance when one refuses it
    (``proxy.multi.placement_guard``)."""

    @property
    def body(self) -> bytes | None:
        """The request body when a guard had to read it; forwarded instead of the stream.

        A parse handed to :meth:`serialise_later` is serialised here, on the first read, once:
        whoever reads the bytes (a guard, the forwarder) gets the serialisation of the parse as
        the guards left it, and from then on the parse is sealed (module doc of
        ``proxy.request.prompt``)."""
        due = self._due
        if due is not None:
            body = due.dump()
            self._due = None
            self._body = body
            self._sealed = True
            self.parsed_body = (body, due)
        return self._body

    @body.setter
    def body(self, value: bytes | None) -> None:
        self._due = None
        self._sealed = False
        self._body = value

    def serialise_later(self, parsed: Serialisable) -> None:
        """Make ``parsed`` what is forwarded, serialised when ``body`` is first read (after the
        last guard that edits it, so a request is serialised once however many guards edit it).

        Raises:
            RuntimeError: the serialisation of the current parse was already read (a guard
                decided on bytes that would no longer be forwarded): a bug, never forwarded.
        """
        if self._sealed:
            raise RuntimeError("the request body was read before a guard changed it")
        self._due = parsed
        self._body = None
        self.parsed_body = None

    def current_parse(self) -> object | None:
        """The parse of what is forwarded (due or written), without writing it; None when the
        body was replaced since it was parsed."""
        due = self._due
        if due is not None:
            return due
        parsed = self.parsed_body
        return parsed[1] if parsed is not None and parsed[0] is self._body else None

    @property
    def filters_response(self) -> bool:
        """Whether the answer is read and rewritten (not streamed through)."""
        return bool(self.response_filters)

    async def filter_response(self, status: int, body: bytes) -> bytes:
        """The one place answers are rewritten: every filter, in list order."""
        for rewrite in self.response_filters:
            body = await rewrite(status, body)
        return body


def compose_frame_filters(filters: Sequence[FrameFilter]) -> FrameFilter | None:
    """The one place frames are filtered: ``filters`` in order, stopping at a dropped frame;
    None when there is none (the relay then passes frames untouched). The composition decides
    quickly (``quick``) only when every filter does; else the relay makes the full call."""
    if not filters:
        return None
    if len(filters) == 1:
        return filters[0]
    chain = tuple(filters)
    quicks = tuple(quick_of(f) for f in chain)

    async def filtered(frame: str | bytes) -> str | bytes | None:
        result: str | bytes | None = frame
        for step in chain:
            result = await step(frame)
            if result is None:
                return None
            frame = result
        return frame

    if any(q is None for q in quicks):
        return filtered

    def quick(frame: str | bytes) -> str | bytes | Undecided | None:
        for decide in quicks:
            assert decide is not None  # checked above
            out = decide(frame)
            if out is None or out is UNDECIDED:
                return out
            frame = out
        return frame

    return with_quick(filtered, quick)


class RelaySocket(Protocol):
    """An open relay's client side as the lifecycle uses it (an aiohttp ``WebSocketResponse``
    or a raw relay, ``proxy.relay.raw_ws.RawRelay``)."""

    @property
    def closed(self) -> bool: ...

    async def close(self, *, code: int = ..., message: bytes = ...) -> bool: ...

    async def send_str(self, data: str) -> None: ...


@dataclass(slots=True)
class Lifecycle:
    """Process-wide state of the serving lifecycle."""

    draining: bool = False
    """Set on SIGTERM: /readyz answers 503 while in-flight work finishes."""
    websockets: weakref.WeakSet[RelaySocket] = field(default_factory=weakref.WeakSet)
    """Client sockets of open relays, closed with 1001 on shutdown."""
    relays: dict[tuple[str, str], Callable[[], Awaitable[None]]] = field(default_factory=dict)
    """Open relays by (upstream, clientId): calling one drops its upstream socket (takeover)."""
    relay_principals: dict[RelaySocket, Principal] = field(default_factory=dict)
    """Who each open relay belongs to, so a revoked or expired credential ends its sockets."""

    async def close_relays(self, token_id: str, *, reason: str) -> int:
        """Close every relay opened with ``token_id`` (1008: the credential is no longer valid)."""
        doomed = [ws for ws, p in self.relay_principals.items() if p.token_id == token_id]
        for ws in doomed:
            await ws.close(code=POLICY_VIOLATION, message=reason.encode()[:123])
        return len(doomed)


@dataclass(frozen=True, slots=True)
class HeaderPolicy:
    """What of the client's request never reaches ComfyUI, beyond hop-by-hop headers."""

    dropped: frozenset[istr] = frozenset()
    dropped_cookies: frozenset[str] = frozenset()


POLICY_VIOLATION = 1008


CONTEXT = web.RequestKey("comfygate.context", RequestContext)
HEADER_POLICY = web.AppKey("comfygate.header_policy", HeaderPolicy)
LIFECYCLE = web.AppKey("comfygate.lifecycle", Lifecycle)
RELOAD_HOOKS: web.AppKey[list[Callable[[], Awaitable[None]]]] = web.AppKey("comfygate.reload")
"""Run on SIGHUP by ``proxy.server`` (in every worker: the supervisor forwards it); append a
reload coroutine function (e.g. from a ``cleanup_ctx``). A failing hook is logged, not fatal."""
