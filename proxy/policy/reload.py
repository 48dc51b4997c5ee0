"""Reloading the policy files: ``POST /admin/reload`` (admins) and SIGHUP.

Both read the files in a worker thread and swap the compiled policy in one assignment, so no
connection is dropped and no request sees half a policy. A bad file changes nothing: the old
policy stays in force, the problems are logged, and ``/admin/reload`` answers 422 with them
(the same ``file: key: rule`` lines as a failed start).
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Awaitable, Callable, Mapping
from typing import Any, Literal

import structlog
from aiohttp import web

from proxy.auth.admin_guard import AdminGuard
from proxy.errors import ProxyError, SettingsError
from proxy.policy.loader import PolicyError
from proxy.policy.store import POLICY
from proxy.settings.auth import RoleSettings

log = structlog.get_logger("comfygate.policy")

RELOAD_ROUTE = "admin_reload"
"""Route (and route-rule) name of ``POST /admin/reload``; guards are wired for it in ``app``."""
RELOAD_PATH = "/admin/reload"

Trigger = Literal["http", "sighup"]

Reloader = Callable[[web.Application], Awaitable[int]]
"""Another set of files ``POST /admin/reload`` reloads after the policy (the job templates):
returns its new version, raises :class:`~proxy.errors.SettingsError` (old set kept)."""
RELOADERS: web.AppKey[dict[str, Reloader]] = web.AppKey("comfygate.http_reloaders")
"""Name -> reloader, filled at ``create_app`` by the features that have files of their own."""


class PolicyInvalid(ProxyError):
    """A reload found the policy files invalid (422); the problems are in the body."""

    status = 422
    error_type = "policy_invalid"


def reload_guard(roles: Mapping[str, RoleSettings]) -> AdminGuard:
    """The admin guard of ``POST /admin/reload`` (permission ``admin_reload``)."""
    return AdminGuard(RELOAD_ROUTE, "reloading the policy", roles)


async def reload_policy(app: web.Application, *, trigger: Trigger) -> int:
    """Reload the policy files; returns the new version.

    Raises:
        PolicyError: the files are invalid; the policy in force is unchanged.
    """
    store = app[POLICY]
    try:
        version = await asyncio.to_thread(store.reload)
    except PolicyError as exc:
        log.error("policy_reload_failed", trigger=trigger, problems=exc.problems)
        raise
    log.info("policy_reloaded", trigger=trigger, version=version, sources=list(store.sources))
    return version


async def admin_reload(request: web.Request) -> web.Response:
    """``POST /admin/reload``: 200 ``{"reloaded": true, "version", "sources"}`` or 422 with the
    problems (``error.details`` one per line, ``error.extra_info.problems`` as a list)."""
    if request.method != "POST":
        raise web.HTTPMethodNotAllowed(request.method, ["POST"])
    store = request.app[POLICY]
    try:
        version = await reload_policy(request.app, trigger="http")
    except PolicyError as exc:
        raise PolicyInvalid(
            f"the policy files are invalid; policy version {store.version} stays in force",
            details="\n".join(exc.problems),
            extra={"problems": exc.problems, "version": store.version},
        ) from None
    answer: dict[str, Any] = {"reloaded": True, "version": version, "sources": store.sources}
    for name, reloader in request.app.get(RELOADERS, {}).items():
        try:
            answer[name] = {"version": await reloader(request.app)}
        except SettingsError as exc:
            # The policy above is reloaded; this set keeps the one in force (logged by it).
            raise ProxyError(
                f"the {name} files are invalid; the ones in force stay",
                error_type=f"{name}_invalid",
                status=422,
                details="\n".join(exc.problems),
                extra={"problems": exc.problems, "policy_version": version},
            ) from None
    return web.json_response(answer)


def add_reload_route(app: web.Application, *, base_path: str) -> None:
    """``POST {base}/admin/reload`` (before the catch-all; the guards are wired by name). Every
    method is routed here, so that another one gets 405 rather than reaching ComfyUI."""
    app.router.add_route("*", f"{base_path}{RELOAD_PATH}", admin_reload, name=RELOAD_ROUTE)


def policy_reload_hook(app: web.Application) -> Callable[[], Awaitable[None]]:
    """The SIGHUP reload (for ``app[RELOAD_HOOKS]``): reload, log the outcome, never raise
    (a bad file keeps the old policy in force)."""

    async def hook() -> None:
        with contextlib.suppress(PolicyError):  # logged by reload_policy
            await reload_policy(app, trigger="sighup")

    return hook


__all__ = [
    "RELOADERS",
    "RELOAD_PATH",
    "RELOAD_ROUTE",
    "PolicyInvalid",
    "Reloader",
    "add_reload_route",
    "admin_reload",
    "policy_reload_hook",
    "reload_guard",
    "reload_policy",
]
