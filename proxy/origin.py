"""``OriginGuard``: ComfyUI's own origin check, done at the proxy's public edge.

ComfyUI refuses a request whose ``Origin`` does not match its ``Host`` (protocol doc 6.1) - its
only defence against other web sites driving it from a visitor's browser. The proxy must send
ComfyUI a consistent ``Host``/``Origin`` pair (else every proxied POST and ``/ws`` would be 403),
so the same check has to happen here, against the host the browser actually used.
"""

from __future__ import annotations

from aiohttp import hdrs, web
from yarl import URL

from proxy.errors import Forbidden
from proxy.settings import ServerSettings
from proxy.state import RequestContext
from proxy.upstream.headers import forwarded_values

_DEFAULT_PORTS = {"http": 80, "https": 443, "ws": 80, "wss": 443}


def origin_key(origin: str) -> tuple[str, int | None] | None:
    """``(host, port)`` of an origin such as ``https://comfy.example.com``; None if malformed."""
    try:
        url = URL(origin)
    except ValueError:
        return None
    if not url.host:
        return None
    return url.host.lower(), url.explicit_port or _DEFAULT_PORTS.get(url.scheme)


def host_key(host: str, scheme: str) -> tuple[str, int | None] | None:
    """``(host, port)`` of a ``Host`` header value, the scheme's default port when absent."""
    return origin_key(f"{scheme}://{host}") if host else None


class OriginGuard:
    """Refuses a request whose ``Origin`` is neither the proxy's own origin nor allowed."""

    name = "origin"

    def __init__(self, server: ServerSettings) -> None:
        self._server = server
        allowed = [server.public_url, *server.allowed_origins]
        self._allowed = frozenset(k for k in map(origin_key, filter(None, allowed)) if k)

    async def check(self, request: web.Request, ctx: RequestContext) -> None:
        origin = request.headers.get(hdrs.ORIGIN)
        if origin is None or origin == "null":
            return  # not a browser cross-origin request (ComfyUI lets "null" through too)
        key = origin_key(origin)
        if key is not None and key in self._allowed:
            return
        _, proto, host = forwarded_values(
            request.remote or "",
            request.headers,
            scheme=request.scheme,
            host=request.host,
            trusted=self._server.trusted_proxies,
        )
        if key is not None and key == host_key(host, proto):
            return
        raise Forbidden(
            f"origin {origin!r} is not allowed to use this ComfyUI",
            error_type="origin_not_allowed",
        )
