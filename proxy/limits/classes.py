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

from proxy.routes import RULES_BY_NAME, RouteRule
from proxy.settings.limits import RouteClass


def route_class(
    rule: RouteRule | str, method: str, *, websocket: bool = False
) -> RouteClass | None:
    """The class a request spends, or None when it is not limited (the proxy's own routes).

    The classes of each rule are set where the rules are (``proxy.routes``); a name is
    looked up there (an unknown one spends ``read``, as every path no rule names).
    """
    if isinstance(rule, str):
        found = RULES_BY_NAME.get(rule)
        if found is None:
            return "read"
        rule = found
    if websocket and rule.limit_upgrade is not None:
        return rule.limit_upgrade
    if method == "POST" and rule.limit_post is not None:
        return rule.limit_post
    return rule.limit


def limited_rule(rule: RouteRule | str) -> bool:
    """Whether any request of this rule can spend a class (the guard is wired only there)."""
    found = RULES_BY_NAME.get(rule) if isinstance(rule, str) else rule
    if found is None:
        return True
    return any(c is not None for c in (found.limit, found.limit_post, found.limit_upgrade))


__all__ = ["limited_rule", "route_class"]
