"""Which rate-limit class a request spends: decided from its route rule, method and whether it
is a WebSocket upgrade (the rule is resolved on the canonical path, so ``/prompt``,
``/api/prompt`` and ``/api/%70rompt`` spend the same allowance).

Every request forwarded to ComfyUI spends one class: there is no unlimited family.

==============  ==========================================================================
class           requests
==============  ==========================================================================
``submit``      ``POST /prompt``: queues GPU work, the scarcest thing behind the proxy
``read``        every other ComfyUI API family: history, queue (also its delete/clear),
                jobs, interrupt, object info, models, settings, user data, system stats,
                ``GET /prompt``, users, internal, assets, Manager, ... and every path no
                rule names (``other``: ``/api/i18n``, custom nodes' routes, ...)
``view``        ``/view`` (images, videos) and ``/view_metadata``
``upload``      ``/upload/image``, ``/upload/mask``
``ws_connect``  the ``/ws`` upgrade (open sockets are not limited, only new ones)
``static``      the frontend's files (rule ``static``): a generous allowance of its own, as
                the stock UI loads hundreds of them at start
``login``       ``POST /login``, keyed by client IP (nobody is known yet)
==============  ==========================================================================

The proxy's own routes other than the login form (health checks, logout, its stylesheet) are
not limited: nothing of them reaches ComfyUI.
"""

from __future__ import annotations

from typing import Final

from proxy.settings.limits import RouteClass

_BY_RULE: Final[dict[str, RouteClass]] = {"view": "view", "upload": "upload", "static": "static"}


def route_class(rule: str, method: str, *, websocket: bool = False) -> RouteClass | None:
    """The class a request spends, or None when it is not limited (the proxy's own routes)."""
    if rule == "prompt":
        return "submit" if method == "POST" else "read"
    if rule == "ws":
        return "ws_connect" if websocket else "read"
    if rule == "login":
        return "login" if method == "POST" else None
    if rule in _OWN_RULES:
        return None
    return _BY_RULE.get(rule, "read")


_OWN_RULES: Final = frozenset(
    {"healthz", "readyz", "logout", "login_static", "base_redirect", "metrics"}
)
"""The proxy's own routes (see ``app.create_app``): not ComfyUI's, never limited."""


def limited_rule(rule: str) -> bool:
    """Whether any request of this rule can spend a class (the guard is wired only there)."""
    return rule not in _OWN_RULES


__all__ = ["limited_rule", "route_class"]
