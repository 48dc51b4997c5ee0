"""The generic middlewares: mechanism only. Decisions live in guards, wired in ``app.py``.

Order (outermost first), as ``create_app`` lists them:

1. :func:`observe` - request id and :class:`RequestContext`; one canonical log line and the
   request metrics in ``finally``, so it sees the final status of everything below.
2. :func:`render_errors` - every :class:`ProxyError` (and anything unexpected) becomes one JSON
   shape; the only place that catches bare ``Exception``.
3. :func:`resolve_route` - the canonical request target (``proxy.target``) and route rule, used
   by all that follows and sent upstream.
4. :func:`make_run_guards` - the matched rule's guards, in order; a guard raises to stop.

The route table (:class:`RouteTable`, built by ``app.build_routes`` once the resources exist)
is the router: one :class:`Endpoint` per rule holds its guards and its terminal handlers.

Response phase, in one documented order: the answer goes through ``ctx.response_filters`` in
list order (``RequestContext.filter_response``; guards append in the order they run, a
terminal handler that prepares the answer puts its step first), a relayed socket's frames
through ``ctx.frame_filters`` in list order (``compose_frame_filters``); then
``add_response_headers`` adds the request id and ``ctx.response_headers``.
"""

from __future__ import annotations

import os
import re
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from typing import Protocol
from urllib.parse import urlencode

import structlog
from aiohttp import hdrs, web
from aiohttp.typedefs import Handler, Middleware
from redis.exceptions import RedisClusterException, RedisError

from proxy.errors import (
    BadRequest,
    PayloadTooLarge,
    ProxyError,
    ServiceUnavailable,
    Unauthenticated,
)
from proxy.json_errors import json_error
from proxy.observability.logging import log_info
from proxy.observability.metrics import METRICS
from proxy.routes import OTHER, OWN_RULES, RouteRule, RuleName, classify
from proxy.settings import SETTINGS
from proxy.state import CONTEXT, RequestContext
from proxy.target import canonical_target, origin_form
from proxy.upstream.headers import client_address
from proxy.web.unreachable import is_unreachable, unreachable_page

log = structlog.get_logger("comfygate")

REQUEST_ID_HEADER = "X-Request-ID"
CLIENT_CLOSED_REQUEST = 499  # nginx's status for a request whose client went away
_REQUEST_ID_RE = re.compile(r"[A-Za-z0-9._:\-]{1,128}")
FORWARD_ROUTE = "forward"
"""Name of the catch-all route that forwards to ComfyUI; every other route is the proxy's own."""


class Guard(Protocol):
    """A decision about a request: returns to let it pass, raises a Rejection to stop it."""

    name: str

    async def check(self, request: web.Request, ctx: RequestContext) -> None: ...


@dataclass(frozen=True, slots=True)
class Endpoint:
    """One entry of the route table: a rule (its name, methods and paths: ``proxy.routes``),
    the guards that decide on its requests in order, and what answers them."""

    rule: RouteRule
    guards: tuple[Guard, ...] = ()
    handler: Handler | None = None
    """The terminal handler with one ComfyUI instance; None on the proxy's own routes (their
    aiohttp handler answers)."""
    multi_handler: Handler | None = None
    """The terminal handler with several instances (merged views, sticky reads); None: the
    same as ``handler``."""


class RouteTable:
    """Every endpoint by rule name; built once the resources exist (``app.build_routes``)."""

    def __init__(self, endpoints: Mapping[RuleName, Endpoint], *, multi: bool) -> None:
        self._endpoints = dict(endpoints)
        self.multi = multi
        """Several instances: the terminal handlers are the multi-instance ones."""

    def __getitem__(self, name: RuleName) -> Endpoint:
        return self._endpoints[name]

    def get(self, name: RuleName) -> Endpoint | None:
        return self._endpoints.get(name)

    def __iter__(self) -> Iterator[Endpoint]:
        return iter(self._endpoints.values())

    def guards(self, name: RuleName) -> tuple[Guard, ...]:
        endpoint = self._endpoints.get(name)
        return endpoint.guards if endpoint is not None else ()

    def terminal(self, name: RuleName) -> Handler:
        """What answers a request of rule ``name`` once its guards let it through."""
        endpoint = self._endpoints[name]
        handler = endpoint.multi_handler if self.multi else None
        handler = handler or endpoint.handler
        if handler is None:  # pragma: no cover - the proxy's own routes never get here
            raise LookupError(f"rule {name!r} has no terminal handler")
        return handler


ROUTE_TABLE = web.AppKey("comfygate.route_table", RouteTable)


def _request_id(request: web.Request) -> str:
    incoming = request.headers.get(REQUEST_ID_HEADER)
    if incoming is not None and _REQUEST_ID_RE.fullmatch(incoming):
        return incoming
    # 128 random bits as 32 hex digits, as uuid4().hex gave, without building a UUID (a
    # quarter of the cost).
    return os.urandom(16).hex()


@web.middleware
async def observe(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Context, then the wrapped chain, then exactly one log line and the request metrics."""
    ctx = RequestContext(request_id=_request_id(request))
    request[CONTEXT] = ctx
    ctx.client_ip = client_address(
        request.remote or "", request.headers, request.app[SETTINGS].server.trusted_proxies
    )
    status = 500
    deferred = False
    try:
        response = await handler(request)
        status = response.status
        if ctx.finish_later is not None and status == 101:
            # A relay that outlives its handler (proxy.relay.raw_ws): counted and logged when it
            # ends, from a snapshot (the request object is not kept for the socket's life).
            ctx.finish_later(_finisher(request, ctx, status))
            deferred = True
        return response
    except web.HTTPException as exc:  # aiohttp's own (e.g. 405 on a proxy route)
        status = exc.status
        raise
    except BaseException:
        # Cancelled: the client went away mid-request; a relayed WebSocket ends that way after
        # its upgrade, which is what its status says.
        status = 101 if ctx.upgraded else CLIENT_CLOSED_REQUEST
        raise
    finally:
        if not deferred:
            _finish(request, ctx, status)


@dataclass(frozen=True, slots=True)
class _RequestLine:
    """What ``_finish`` reads of a request, kept by a relay that outlives its handler."""

    app: web.Application
    method: str
    path: str
    query: Mapping[str, str]


def _finisher(request: web.Request, ctx: RequestContext, status: int) -> Callable[[], None]:
    line = _RequestLine(request.app, request.method, request.path, {})
    return lambda: _finish(line, ctx, status)


_BODILESS_METHODS = frozenset({hdrs.METH_GET, hdrs.METH_HEAD})


@web.middleware
async def resolve_route(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Which ComfyUI rule the request falls under (or which of the proxy's own routes it is).

    The request target is read once (``proxy.target``): a forwarded request is decided on its
    canonical form and ComfyUI is sent that form. The proxy's own routes take the same target
    forms (aiohttp routed them on the path of an absolute-form target too).
    """
    ctx = request[CONTEXT]
    server = request.app[SETTINGS].server
    host = request.headers.get(hdrs.HOST)
    route = request.match_info.route.name
    if route == FORWARD_ROUTE:
        if (
            request.method in _BODILESS_METHODS
            and request.body_exists
            and request.content_length != 0
        ):
            # SECURITY: content on GET/HEAD has no meaning (RFC 9110 9.3.1) and readers disagree
            # on it: some ignore the length and read the bytes as the next request. Nothing the
            # proxy decides on is in it, so nothing of it is forwarded either.
            raise BadRequest(
                f"a {request.method} request must not have a body", error_type="body_not_allowed"
            )
        target = canonical_target(
            request.method,
            request.raw_path,
            host=host,
            public_url=server.public_url,
            base_path=server.base_path,
        )
        ctx.path, ctx.upstream_path = target.path, target.upstream
        ctx.rule = classify(request.method, target.path, prefixed=target.prefixed)
        return await handler(request)
    origin_form(request.method, request.raw_path, host=host, public_url=server.public_url)
    if route is not None:
        # An unnamed or unknown route stays "other" (test_routes checks every named one is known).
        ctx.rule = OWN_RULES.get(route, OTHER)
    return await handler(request)


def _finish(request: web.Request | _RequestLine, ctx: RequestContext, status: int) -> None:
    duration = time.perf_counter() - ctx.started
    rule = ctx.rule.name
    request.app[METRICS].request_finished(request, ctx, status, duration)
    if not request.app[SETTINGS].logging.access_log:
        return
    log_info(
        "request_finished",
        {
            "request_id": ctx.request_id,
            "client": ctx.client_ip,
            "method": request.method,
            "path": request.path,  # no query string: it may carry tokens or file names of others
            "rule": rule,
            "status": status,
            "upstream": ctx.upstream or None,
            "bytes_in": ctx.bytes_in,
            "bytes_out": ctx.bytes_out,
            "duration_ms": round(duration * 1000, 3),
            "upstream_ms": round(ctx.upstream_seconds * 1000, 3),
            "proxy_ms": round((duration - ctx.upstream_seconds) * 1000, 3),
            "rejected_by": ctx.rejected_by or None,
            "error": ctx.error_type or None,
        },
    )


@web.middleware
async def render_errors(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Turn every error into a JSON response; never a traceback to the client."""
    ctx = request[CONTEXT]
    try:
        return await handler(request)
    except ProxyError as exc:
        return _render(request, ctx, exc)
    except web.HTTPRequestEntityTooLarge as exc:
        return _render(request, ctx, PayloadTooLarge(exc.text or "request body too large"))
    except web.HTTPException as exc:
        if exc.status < 400 or exc.empty_body:
            raise
        return _render(
            request, ctx, ProxyError(exc.reason, error_type=f"http_{exc.status}"), exc.status
        )
    except ConnectionError:
        # The client went away mid-response (aiohttp's ClientConnectionResetError is one):
        # nothing went wrong on our side. The placeholder is never sent (aiohttp sees the
        # closed transport and drops it quietly); 499 is what the log line records.
        ctx.error_type = "client_disconnected"
        return web.Response(status=CLIENT_CLOSED_REQUEST)
    except (RedisError, RedisClusterException) as exc:
        # Shared state (ownership, quotas, sessions...) could not be read or written: the
        # request cannot be decided safely, and nothing was half-done that a retry would repeat
        # (writes are single scripts or undone on refusal). A 503 the client may retry, not a 500.
        log.warning(
            "state_store_unavailable",
            request_id=ctx.request_id,
            rule=ctx.rule.name,
            error=type(exc).__name__,
        )
        request.app[METRICS].redis_errors.labels(op="request", kind="unavailable").inc()
        return _render(
            request,
            ctx,
            ServiceUnavailable(
                "the proxy's shared state store (Redis) is unavailable; try again shortly",
                error_type="state_unavailable",
                headers={hdrs.RETRY_AFTER: "1"},
            ),
        )
    except Exception:
        log.exception("request_failed", request_id=ctx.request_id, rule=ctx.rule.name)
        return _render(
            request, ctx, ProxyError("internal proxy error", error_type="internal_error")
        )


def wants_login_page(request: web.Request) -> bool:
    """A browser navigating to a page (not an API call, not a WebSocket)."""
    return (
        request.method in ("GET", "HEAD")
        and "text/html" in request.headers.get(hdrs.ACCEPT, "")
        and request.headers.get(hdrs.UPGRADE, "").lower() != "websocket"
    )


def _render(
    request: web.Request, ctx: RequestContext, exc: ProxyError, status: int | None = None
) -> web.Response:
    ctx.error_type = exc.error_type
    request.app[METRICS].rejections.labels(exc.error_type).inc()
    if isinstance(exc, Unauthenticated) and wants_login_page(request):
        base = request.app[SETTINGS].server.base_path
        # The canonical target (a refused one never gets here: its 400 is not Unauthenticated).
        location = f"{base}/login?{urlencode({'next': base + ctx.upstream_path})}"
        return web.Response(status=302, headers={hdrs.LOCATION: location, **exc.headers})
    if wants_login_page(request) and is_unreachable(exc):
        # A person opening ComfyUI while it is down: a retrying page, not raw JSON.
        return unreachable_page(request, exc, status or exc.status)
    if exc.empty_body:  # e.g. isolation's HiddenNotFound: ComfyUI's empty 404
        return web.Response(status=status or exc.status, headers=exc.headers)
    return json_error(
        status or exc.status,
        exc.error_type,
        exc.message,
        details=exc.details,
        extra=exc.extra,
        headers=exc.headers,
        comfy_prompt=ctx.rule.name == "prompt",
        node_errors=exc.node_errors,
        fields=exc.fields,
    )


def make_run_guards() -> Middleware:
    """The middleware that runs the guards of the request's endpoint (:data:`ROUTE_TABLE`)."""

    @web.middleware
    async def run_guards(request: web.Request, handler: Handler) -> web.StreamResponse:
        ctx = request[CONTEXT]
        for guard in request.app[ROUTE_TABLE].guards(ctx.rule.name):
            try:
                await guard.check(request, ctx)
            except ProxyError:
                ctx.rejected_by = guard.name
                raise
        return await handler(request)

    return run_guards


async def add_response_headers(request: web.Request, response: web.StreamResponse) -> None:
    """``on_response_prepare``: the request id and the headers guards asked for (a renewed
    session cookie). It runs before headers go out, so streamed responses get them too."""
    ctx = request.get(CONTEXT)
    if ctx is not None:
        response.headers[REQUEST_ID_HEADER] = ctx.request_id
        for name, value in ctx.response_headers:
            response.headers.add(name, value)


__all__ = [
    "FORWARD_ROUTE",
    "ROUTE_TABLE",
    "BadRequest",
    "Endpoint",
    "Guard",
    "RouteTable",
    "add_response_headers",
    "make_run_guards",
    "observe",
    "render_errors",
    "resolve_route",
]
