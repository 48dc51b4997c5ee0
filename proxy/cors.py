"""CORS for API consumers on other web origins (``server.cors_origins``).

A page on a listed origin may call ComfyUI through the proxy and read the answers when it
authenticates with a bearer token (a query token works too; it is no more ambient):

- its preflights (``OPTIONS`` with ``Access-Control-Request-Method``) are answered here, 204,
  and never reach the guards or ComfyUI;
- every answer to it (errors too: a 401 or a 429 must be readable to be acted on) carries
  ``Access-Control-Allow-Origin: <its origin>`` and exposes the headers a client needs
  (``Retry-After``, the rate-limit headers, ``X-Request-ID``).

Credentials stay bearer-only: ``Access-Control-Allow-Credentials`` is never sent, so a browser
neither exposes an answer to a request that carried cookies or Basic credentials nor lets a page
send them by preflight. The origin check (``proxy.origin``) still refuses cookie and Basic
requests from these origins unless they are also in ``server.allowed_origins``.

Preflights from an origin not listed are refused (403 ``cors_origin_not_allowed``): there is
nothing a foreign page may do with an answer it cannot read.
"""

from __future__ import annotations

from collections.abc import Collection

from aiohttp import hdrs, web
from aiohttp.typedefs import Handler, Middleware

from proxy.errors import Forbidden
from proxy.state import CONTEXT

ALLOWED_METHODS = ("GET", "HEAD", "POST", "PUT", "PATCH", "DELETE")
ALLOWED_HEADERS = frozenset({"authorization", "content-type", "idempotency-key", "x-request-id"})
"""Request headers a page may send (what ComfyUI's API and the proxy read from a client)."""
EXPOSED_HEADERS = (
    "Retry-After",
    "X-Request-ID",
    "RateLimit",
    "RateLimit-Policy",
    "X-RateLimit-Limit",
    "X-RateLimit-Remaining",
    "X-RateLimit-Reset",
    "Comfygate-Degraded",
    "Content-Disposition",
)
PREFLIGHT_MAX_AGE_SECONDS = 600


def _requested_headers(request: web.Request) -> list[str]:
    raw = ",".join(request.headers.getall(hdrs.ACCESS_CONTROL_REQUEST_HEADERS, ()))
    return [h.strip().lower() for h in raw.split(",") if h.strip()]


def preflight_answer(request: web.Request, origin: str) -> web.Response:
    """The 204 answer to a listed origin's preflight. A method or header it may not use is left
    out, which makes the browser refuse the actual request."""
    method = request.headers.get(hdrs.ACCESS_CONTROL_REQUEST_METHOD, "").strip().upper()
    headers = {
        hdrs.ACCESS_CONTROL_ALLOW_ORIGIN: origin,
        hdrs.VARY: "Origin, Access-Control-Request-Method, Access-Control-Request-Headers",
        hdrs.ACCESS_CONTROL_MAX_AGE: str(PREFLIGHT_MAX_AGE_SECONDS),
    }
    if method in ALLOWED_METHODS:
        headers[hdrs.ACCESS_CONTROL_ALLOW_METHODS] = ", ".join(ALLOWED_METHODS)
    allowed = [h for h in _requested_headers(request) if h in ALLOWED_HEADERS]
    if allowed:
        headers[hdrs.ACCESS_CONTROL_ALLOW_HEADERS] = ", ".join(allowed)
    return web.Response(status=204, headers=headers)


def make_cors(origins: Collection[str], routes: Collection[str]) -> Middleware:
    """The CORS middleware for ``origins`` (already normalised by the settings: no trailing
    slash), on the routes named in ``routes`` (ComfyUI's surface and the proxy's API routes;
    not the login page). Runs after ``resolve_route`` and before the guards."""
    allowed = frozenset(o.lower() for o in origins)

    @web.middleware
    async def cors(request: web.Request, handler: Handler) -> web.StreamResponse:
        if not allowed or request.match_info.route.name not in routes:
            return await handler(request)
        origin = request.headers.get(hdrs.ORIGIN)
        listed = origin is not None and origin.lower() in allowed
        is_preflight = (
            request.method == hdrs.METH_OPTIONS
            and origin is not None
            and hdrs.ACCESS_CONTROL_REQUEST_METHOD in request.headers
        )
        if is_preflight:
            if not listed:
                raise Forbidden(
                    f"origin {origin!r} may not call this ComfyUI from a web page",
                    error_type="cors_origin_not_allowed",
                )
            assert origin is not None
            return preflight_answer(request, origin)
        extra = request[CONTEXT].response_headers
        extra.append((hdrs.VARY, "Origin"))  # the answer differs by Origin: caches must know
        if listed:
            assert origin is not None
            extra.append((hdrs.ACCESS_CONTROL_ALLOW_ORIGIN, origin))
            extra.append((hdrs.ACCESS_CONTROL_EXPOSE_HEADERS, ", ".join(EXPOSED_HEADERS)))
        return await handler(request)

    return cors


__all__ = ["ALLOWED_HEADERS", "EXPOSED_HEADERS", "make_cors", "preflight_answer"]
