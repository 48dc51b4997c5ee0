"""``OriginGuard``: ComfyUI's own origin check, done at the proxy's public edge.

ComfyUI refuses a request whose ``Origin`` does not match its ``Host``
(docs/comfyui-protocol.md#origin-and-host-check) - its only defence against other web sites driving
it from a visitor's browser. The proxy must send ComfyUI a consistent ``Host``/``Origin`` pair (else
every proxied POST and ``/ws`` would be 403), so the same check has to happen here, against the host
the browser actually used (``proxy.origin``).

The check exists for credentials a browser attaches by itself - the session cookie and HTTP
Basic - and for the unauthenticated mode (``auth.enabled = false``: being on the network is the
credential). A request whose credential is a bearer or query token, which a foreign page could
only send if it already knew the token, is not refused for its ``Origin``: API consumers on other
origins (``server.cors_origins``, ``proxy.cors``) use the proxy that way.
"""

from __future__ import annotations

from aiohttp import hdrs, web

from proxy.auth.authenticator import presented_credential
from proxy.errors import Forbidden
from proxy.origin import is_own_origin, origin_key
from proxy.settings import ServerSettings
from proxy.settings.auth import AuthSettings
from proxy.state import RequestContext


class OriginGuard:
    """Refuses a request whose ``Origin`` is neither the proxy's own origin nor allowed, when its
    credential is one a browser attaches by itself (see the module docstring)."""

    name = "origin"

    def __init__(self, server: ServerSettings, auth: AuthSettings | None = None) -> None:
        self._server = server
        self._auth = auth
        allowed = (origin_key(o) for o in server.allowed_origins)
        self._allowed = frozenset(k for k in allowed if k)

    async def check(self, request: web.Request, ctx: RequestContext) -> None:
        origin = request.headers.get(hdrs.ORIGIN)
        if origin is None or origin == "null":
            return  # not a browser cross-origin request (ComfyUI lets "null" through too)
        if is_own_origin(origin, request, self._server, also=self._allowed):
            return
        if self._auth is not None and self._auth.enabled:
            # The credential that will decide, in the authenticator's order (a query token is
            # no more ambient than none at all, so whether it counts here does not matter).
            kind = presented_credential(request, self._auth, query_token=False).kind
            if kind not in ("cookie", "basic", "forward"):
                return  # a foreign page cannot make a browser send it: authentication decides
        raise Forbidden(
            f"origin {origin!r} is not allowed to use this ComfyUI",
            error_type="origin_not_allowed",
        )
