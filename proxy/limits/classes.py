"""Which rate-limit class a request spends: decided from its route rule, method and whether it
is a WebSocket upgrade (the rule is resolved on the normalised path, so ``/prompt``,
``/api/prompt`` and ``/api/%70rompt`` spend the same allowance).

==============  ==========================================================================
class           requests
==============  ==========================================================================
``submit``      ``POST /prompt``: queues GPU work, the scarcest thing behind the proxy
``read``        every other ComfyUI API family: history, queue (also its delete/clear),
                jobs, interrupt, object info, models, settings, user data, system stats,
                ``GET /prompt``, users, internal, assets, Manager, ...
``view``        ``/view`` (images, videos) and ``/view_metadata``
``upload``      ``/upload/image``, ``/upload/mask``
``ws_connect``  the ``/ws`` upgrade (open sockets are not limited, only new ones)
``login``       ``POST /login``, keyed by client IP (nobody is known yet)
==============  ==========================================================================

Not limited: the frontend's static files (rule ``static`` and anything unmatched, ``other``):
the stock UI loads hundreds of them at start, and they cost ComfyUI nothing worth protecting.
The proxy's own routes other than the login form (health checks, logout, its stylesheet) are
not limited either.
"""

from __future__ import annotations

from typing import Final

from proxy.limits.settings import RouteClass

UNLIMITED_RULES: Final = frozenset({"static", "other"})
"""ComfyUI route rules never limited (frontend files)."""

_BY_RULE: Final[dict[str, RouteClass]] = {"view": "view", "upload": "upload"}


def route_class(rule: str, method: str, *, websocket: bool = False) -> RouteClass | None:
    """The class a request spends, or None when it is not limited."""
    if rule in UNLIMITED_RULES:
        return None
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
    return rule not in UNLIMITED_RULES and rule not in _OWN_RULES


__all__ = ["UNLIMITED_RULES", "limited_rule", "route_class"]
