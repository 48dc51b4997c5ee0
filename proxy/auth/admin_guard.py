"""The guard of the proxy's own admin routes (``/admin/reload``, ``/admin/upstreams``...).

One class for every admin route: each route family is wired (``app.build_routes``, by route
name) with an instance naming the permission it needs; admins pass, and so does a role that
lists that permission in ``roles.<r>.allow_routes``. Everyone else is refused: default deny.
"""

from __future__ import annotations

from collections.abc import Mapping

from aiohttp import web

from proxy.errors import Forbidden
from proxy.settings.auth import RoleSettings
from proxy.state import RequestContext


class AdminGuard:
    """Only admins (or a role listing ``permission`` in ``allow_routes``) pass.

    SECURITY: the proxy's own routes run no guard unless wired; this one is wired after the
    authentication guards, so an anonymous caller gets 401 and a non-admin 403. A missing
    principal (a wiring mistake) is refused too, never let through.
    """

    name = "admin"

    def __init__(self, permission: str, action: str, roles: Mapping[str, RoleSettings]) -> None:
        """``permission``: the ``allow_routes`` entry granting access; ``action``: what the
        route does, for the refusal message ("reloading the policy"); ``roles``: the roles
        configured (``settings.roles``)."""
        self.permission = permission
        self._refusal = f"{action} is for admins"
        self._roles = roles

    async def check(self, request: web.Request, ctx: RequestContext) -> None:
        principal = ctx.principal
        if principal is None or not principal.may_use(self.permission, self._roles):
            raise Forbidden(self._refusal, error_type="forbidden_role")


__all__ = ["AdminGuard"]
