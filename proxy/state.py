"""Typed keys for everything stored on the application and on each request.

Shared objects live under ``web.AppKey``s and are created in ``app.create_app`` (resources with
a lifetime in ``cleanup_ctx``); per-request state lives in one :class:`RequestContext` under
:data:`CONTEXT`. Nothing is stored under string keys.
"""

from __future__ import annotations

import time
import weakref
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

import redis.asyncio as redis
from aiohttp import web

from proxy.observability.metrics import Metrics
from proxy.routes import OTHER, RouteRule
from proxy.settings import Settings
from proxy.upstream.pool import UpstreamPool


@dataclass(slots=True)
class RequestContext:
    """What the middlewares, guards and handlers of one request share."""

    request_id: str
    started: float = field(default_factory=time.perf_counter)
    rule: RouteRule = OTHER
    upstream_path: str = "/"
    """Raw path and query to send upstream: byte-exact, base path removed."""
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


@dataclass(slots=True)
class Lifecycle:
    """Process-wide state of the serving lifecycle."""

    draining: bool = False
    """Set on SIGTERM: /readyz answers 503 while in-flight work finishes."""
    websockets: weakref.WeakSet[web.WebSocketResponse] = field(default_factory=weakref.WeakSet)
    """Client sockets of open relays, closed with 1001 on shutdown."""
    relays: dict[tuple[str, str], Callable[[], Awaitable[None]]] = field(default_factory=dict)
    """Open relays by (upstream, clientId): calling one drops its upstream socket (takeover)."""


CONTEXT = web.RequestKey("comfygate.context", RequestContext)
SETTINGS = web.AppKey("comfygate.settings", Settings)
POOL = web.AppKey("comfygate.upstream_pool", UpstreamPool)
LIFECYCLE = web.AppKey("comfygate.lifecycle", Lifecycle)
METRICS = web.AppKey("comfygate.metrics", Metrics)
REDIS: web.AppKey[redis.Redis | None] = web.AppKey("comfygate.redis")
"""None when no Redis is configured (state kept in process memory)."""
