"""The rate-limit guard (after the role guard, before isolation) and the login page's check.

Keyed per principal (its stable ComfyUI user id, derived from the subject: every token and
session of one user share one allowance), per class (:mod:`proxy.limits.classes`). Requests of
the anonymous principal (``auth.enabled = false``) and login attempts are keyed by client IP.
"""

from __future__ import annotations

import hashlib
import re
from typing import Final

from aiohttp import web

from proxy.limits.classes import route_class
from proxy.limits.enforce import RATE_LIMITS, RateLimits
from proxy.request.websocket import is_websocket
from proxy.routes import RouteRule
from proxy.state import CONTEXT, RequestContext

_SAFE_IP: Final = re.compile(r"[0-9A-Za-z.:%_-]{1,64}")


def ip_identity(client_ip: str) -> str:
    """The identity of a client address in a limit key (hashed if it is anything but a plain
    address, so a key never holds braces or unbounded text)."""
    if _SAFE_IP.fullmatch(client_ip):
        return f"ip:{client_ip}"
    return f"ip#{hashlib.sha256(client_ip.encode(errors='surrogatepass')).hexdigest()[:24]}"


class RateLimitGuard:
    """Spends one request of the caller's allowance for the request's class; over the limit:
    429 (ComfyUI's error shape on ``/prompt``), a WebSocket handshake before the upgrade."""

    name = "ratelimit"

    def __init__(self, rule: RouteRule, limits: RateLimits) -> None:
        self._rule = rule
        self._limits = limits

    async def check(self, request: web.Request, ctx: RequestContext) -> None:
        cls = route_class(self._rule, request.method, websocket=is_websocket(request))
        principal = ctx.principal
        if cls is None or principal is None:  # principal: always set after the auth guard
            return
        limits = self._limits
        limit = limits.limit_for(principal.roles, cls)
        if principal.source == "anonymous":
            identity = ip_identity(ctx.client_ip)
        else:
            # SECURITY: per user, never per token - minting more tokens buys no more requests.
            identity = f"u:{principal.comfy_user}"
        await limits.spend(limit, identity, ctx.response_headers)


async def limit_login(request: web.Request) -> None:
    """The ``login`` class for one ``POST /login``, keyed by client IP. A no-op when limits are
    off or the app has none (a login page mounted on its own, as in tests).

    Raises:
        RateLimited: over the limit.
        ServiceUnavailable: Redis is failing and ``login`` fails closed (the default).
    """
    limits = request.config_dict.get(RATE_LIMITS)
    ctx = request.get(CONTEXT)
    if limits is None or not limits.enabled or ctx is None:
        return
    limit = limits.limit_for(frozenset(), "login")  # nobody is known yet: the default
    identity = ip_identity(ctx.client_ip or request.remote or "")
    await limits.spend(limit, identity, ctx.response_headers)


__all__ = ["RateLimitGuard", "ip_identity", "limit_login"]
