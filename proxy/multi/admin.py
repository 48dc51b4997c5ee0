"""The instances' admin API: list their state, drain one for maintenance, undrain it.

=================================================  ==========================================
``GET {base}/admin/upstreams``                     every instance: health, drain, load,
                                                   capabilities (counts), weight and tags
``POST {base}/admin/upstreams/{name}/drain``       no new prompts there; its queue runs on,
                                                   its history, files and sockets stay served
``POST {base}/admin/upstreams/{name}/undrain``     takes prompts again
=================================================  ==========================================

Same mechanism as ``POST /admin/reload`` (``proxy.policy.reload``): named routes of the proxy's
own, registered before the catch-all, with the guards wired by route name in
``app.build_routes``: origin, authentication, CSRF, role, then :func:`upstream_admin_guard`
(one :class:`proxy.auth.admin_guard.AdminGuard`).
With Redis the drain is shared by every replica (each adopts it at its next health round).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from aiohttp import web

from proxy.auth.admin_guard import AdminGuard
from proxy.errors import NotFound
from proxy.settings.auth import RoleSettings
from proxy.upstream.pool import POOL, Instance, UpstreamPool

ADMIN_UPSTREAMS = "admin_upstreams"
"""Permission (``roles.<r>.allow_routes``) and route name of the listing."""
DRAIN_ROUTE = "admin_upstreams_drain"
UNDRAIN_ROUTE = "admin_upstreams_undrain"
ADMIN_UPSTREAM_ROUTES = (ADMIN_UPSTREAMS, DRAIN_ROUTE, UNDRAIN_ROUTE)
"""Route (and route-rule) names; ``app.build_guards`` wires the admin chain for each."""


def upstream_admin_guard(roles: Mapping[str, RoleSettings]) -> AdminGuard:
    """The admin guard of every ``/admin/upstreams`` route (permission ``admin_upstreams``)."""
    return AdminGuard(ADMIN_UPSTREAMS, "managing instances", roles)


def describe(pool: UpstreamPool, instance: Instance) -> dict[str, Any]:
    upstream = instance.upstream
    name = upstream.name
    capabilities = instance.capabilities
    return {
        "name": name,
        "url": upstream.base,
        "weight": upstream.weight,
        "tags": list(upstream.tags),
        "discovered": upstream.discovered,
        "state": instance.breaker.state.name.lower(),
        "drained": pool.is_drained(name),
        "routable": instance.breaker.closed and not pool.is_drained(name),
        "retry_in_seconds": round(instance.breaker.retry_in(), 3),
        "queue_remaining": instance.reported_queue,
        "outstanding": instance.outstanding,
        "last_checkpoints": sorted(instance.last_checkpoints),
        "capabilities": None
        if capabilities is None
        else {"nodes": len(capabilities.nodes), "model_lists": len(capabilities.models)},
    }


async def list_upstreams(request: web.Request) -> web.Response:
    pool = request.app[POOL]
    home = pool.home().name if pool.upstreams else None
    return web.json_response(
        {
            "home": home,
            "managed": pool.managed,
            "upstreams": [describe(pool, i) for i in pool.instances()],
        }
    )


async def _set_drained(request: web.Request, drained: bool) -> web.Response:
    pool = request.app[POOL]
    name = request.match_info["name"]
    instance = pool.instance(name)
    if instance is None:
        raise NotFound(f"no instance named {name!r}", error_type="unknown_upstream")
    await pool.set_drained(name, drained)
    return web.json_response(describe(pool, instance))


async def drain(request: web.Request) -> web.Response:
    return await _set_drained(request, True)


async def undrain(request: web.Request) -> web.Response:
    return await _set_drained(request, False)


def add_upstream_admin_routes(app: web.Application, *, base_path: str) -> None:
    """Register the routes (before the catch-all; the guards are wired by name)."""
    prefix = f"{base_path}/admin/upstreams"
    app.router.add_get(prefix, list_upstreams, name=ADMIN_UPSTREAMS, allow_head=False)
    app.router.add_post(prefix + "/{name}/drain", drain, name=DRAIN_ROUTE)
    app.router.add_post(prefix + "/{name}/undrain", undrain, name=UNDRAIN_ROUTE)
