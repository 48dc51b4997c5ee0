"""Identity toward ComfyUI (docs/comfyui-protocol.md#multi-user-mode).

ComfyUI believes whatever ``Comfy-User`` a client sends, and ``GET /users`` lists everyone. So
client-sent identity headers and the proxy's own credentials never reach ComfyUI; the proxy sets
``Comfy-User`` from the authenticated principal, answers ``/users`` itself with the single-user
shape (the stock UI then never shows its user picker) and refuses ``POST /users``.
"""

from __future__ import annotations

from aiohttp import hdrs, web
from multidict import istr

from proxy.principal import Principal

COMFY_USER = "Comfy-User"

# SECURITY: identity claims from the client (ComfyUI trusts Comfy-User blindly) and the proxy's
# own credentials are never forwarded.
IDENTITY_HEADERS: frozenset[istr] = frozenset(
    istr(h)
    for h in (
        COMFY_USER,
        "X-Forwarded-User",
        "X-Forwarded-Email",
        "X-Forwarded-Groups",
        "X-Forwarded-Preferred-Username",
        "X-Auth-Request-User",
        "X-Auth-Request-Email",
        "Remote-User",
        hdrs.AUTHORIZATION,
    )
)


def identity_headers(principal: Principal, forward_user_headers: bool) -> dict[str, str]:
    """The identity ComfyUI receives for this principal."""
    headers = {COMFY_USER: principal.comfy_user}
    if forward_user_headers:
        headers["X-Forwarded-User"] = principal.subject
        headers["X-Forwarded-Groups"] = ",".join(sorted(principal.roles))
    return headers


async def users_endpoint(request: web.Request) -> web.Response:
    """``GET /users``: the single-user answer, so the stock UI skips its user picker."""
    return web.json_response({"storage": "server", "migrated": True})
