"""Installing the jobs API on the app: templates (loaded at start, reloaded with the policy),
routes, and the shared state with a lifetime (``cleanup_ctx``)."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Awaitable, Callable

import structlog
from aiohttp import web

from proxy.jobs.api import JOBS, Jobs, add_jobs_routes
from proxy.jobs.cache import ResultCache
from proxy.jobs.metrics import JobMetrics
from proxy.jobs.store import JobStore, MemoryJobStore, RedisJobStore
from proxy.jobs.templates import TemplateError, TemplateStore
from proxy.policy.reload import RELOADERS
from proxy.settings import Settings
from proxy.state import METRICS, REDIS, RELOAD_HOOKS
from proxy.state import SETTINGS as SETTINGS_KEY

log = structlog.get_logger("comfygate.jobs")

TEMPLATES: web.AppKey[TemplateStore] = web.AppKey("comfygate.job_templates")


async def reload_templates(app: web.Application, *, trigger: str) -> int:
    """Read the template files again (in a thread); a bad set keeps the one in force.

    Raises:
        TemplateError: the files are invalid (logged).
    """
    store = app[TEMPLATES]
    try:
        version = await asyncio.to_thread(store.reload)
    except TemplateError as exc:
        log.error("templates_reload_failed", trigger=trigger, problems=exc.problems)
        raise
    log.info("templates_reloaded", trigger=trigger, version=version, sources=list(store.sources))
    return version


def _reload_hook(app: web.Application) -> Callable[[], Awaitable[None]]:
    async def hook() -> None:
        with contextlib.suppress(TemplateError):  # logged; the old set stays in force
            await reload_templates(app, trigger="sighup")

    return hook


async def _http_reload(app: web.Application) -> int:
    return await reload_templates(app, trigger="http")


async def _jobs_context(app: web.Application) -> AsyncIterator[None]:
    """Needs Redis (``redis_client`` runs before): records and cache shared by replicas."""
    settings = app[SETTINGS_KEY]
    client = app[REDIS]
    store: JobStore = RedisJobStore(client) if client is not None else MemoryJobStore()
    app[JOBS] = Jobs(
        settings=settings.jobs,
        templates=app[TEMPLATES],
        store=store,
        metrics=JobMetrics(app[METRICS].registry),
        cache=ResultCache(client),
        counted_ends=set(),
    )
    yield


def install_jobs_api(app: web.Application, settings: Settings) -> None:
    """Called by ``create_app``: a bad template file fails the start (every problem listed)."""
    if not settings.jobs.enabled:
        return
    app[TEMPLATES] = TemplateStore(settings.jobs.templates_dir)
    app[RELOAD_HOOKS].append(_reload_hook(app))
    if settings.jobs.templates_dir:  # POST /admin/reload: answers {"templates": {"version"}}
        app.setdefault(RELOADERS, {})["templates"] = _http_reload
    app.cleanup_ctx.append(_jobs_context)
    add_jobs_routes(app, base_path=settings.server.base_path)


__all__ = ["TEMPLATES", "install_jobs_api", "reload_templates"]
