"""Origins and hosts: what the browser reached the proxy as, and whether an ``Origin`` is the
proxy's own (``proxy.auth.origin_guard`` refuses the others; login and CSRF checks compare).

ComfyUI refuses a request whose ``Origin`` does not match its ``Host``
(docs/comfyui-protocol.md#origin-and-host-check) - its only defence against other web sites driving
it from a visitor's browser. The proxy must send ComfyUI a consistent ``Host``/``Origin`` pair (else
every proxied POST and ``/ws`` would be 403), so the same check has to happen here, against the host
the browser actually used.
"""

from __future__ import annotations

from aiohttp import web
from yarl import URL

from proxy.settings import ServerSettings
from proxy.upstream.headers import forwarded_values

_DEFAULT_PORTS = {"http": 80, "https": 443}
_WEB_SCHEMES = frozenset(_DEFAULT_PORTS)


def origin_key(origin: str) -> tuple[str, int | None] | None:
    """``(host, port)`` of an origin such as ``https://comfy.example.com``; None if malformed.

    SECURITY: only an absolute http(s) URL names a site. A browser never sends anything else
    in ``Origin`` or ``Referer``; a scheme-relative ``//host:port/`` (or another scheme) would
    otherwise pass as this site's without naming how it was reached.
    """
    try:
        url = URL(origin)
    except ValueError:
        return None
    if url.scheme not in _WEB_SCHEMES or not url.host:
        return None
    return url.host.lower(), url.explicit_port or _DEFAULT_PORTS[url.scheme]


def host_key(host: str, scheme: str) -> tuple[str, int | None] | None:
    """``(host, port)`` of a ``Host`` header value, the scheme's default port when absent."""
    return origin_key(f"{scheme}://{host}") if host else None


def browser_origin(request: web.Request, server: ServerSettings) -> tuple[str, str]:
    """``(scheme, host)`` the browser used: the request's own, or a trusted proxy's
    ``X-Forwarded-Proto``/``-Host``."""
    _, proto, host = forwarded_values(
        request.remote or "",
        request.headers,
        scheme=request.scheme,
        host=request.host,
        trusted=server.trusted_proxies,
    )
    return proto, host


def is_own_origin(
    origin: str,
    request: web.Request,
    server: ServerSettings,
    *,
    also: frozenset[tuple[str, int | None]] = frozenset(),
) -> bool:
    """Whether ``origin`` (an Origin or Referer value) is the proxy's own: the host the browser
    used, ``server.public_url``, or one of ``also``."""
    key = origin_key(origin)
    if key is None:
        return False
    if key in also or (server.public_url and key == origin_key(server.public_url)):
        return True
    scheme, host = browser_origin(request, server)
    return key == host_key(host, scheme)
