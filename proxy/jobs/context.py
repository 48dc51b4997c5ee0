"""Installing the jobs API on the app: templates (loaded at start, reloaded with the policy),
routes, and the shared state with a lifetime (``cleanup_ctx``)."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Awaitable, Callable

import structlog
from aiohttp import web

from proxy.jobs import api
from proxy.jobs.api import JOBS, Jobs
from proxy.jobs.cache import ResultCache
from proxy.jobs.events import job_events, job_preview
from proxy.jobs.leases import MemoryDueSet, RedisDueSet
from proxy.jobs.live import LiveWatcher
from proxy.jobs.live_store import LiveJobs
from proxy.jobs.metrics import JobMetrics
from proxy.jobs.store import JobStore, MemoryJobStore, RedisJobStore
from proxy.jobs.templates import TemplateError, TemplateStore
from proxy.jobs.watcher import JobWatcher
from proxy.jobs.webhooks.delivery import Dispatcher
from proxy.jobs.webhooks.destinations import Destinations
from proxy.jobs.webhooks.outbox import Outbox
from proxy.observability.metrics import METRICS
from proxy.policy.reload import RELOADERS
from proxy.redis.client import REDIS
from proxy.settings import SETTINGS as SETTINGS_KEY
from proxy.settings import Settings
from proxy.state import RELOAD_HOOKS
from proxy.tasks import Supervised
from proxy.upstream.pool import POOL

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
    """Needs Redis and the pool (both started before): records, cache, outbox and watched
    jobs shared by replicas; the watcher, the webhook dispatcher and the live sockets run
    as supervised tasks for the app's lifetime."""
    settings = app[SETTINGS_KEY]
    client = app[REDIS]
    pool = app[POOL]
    jobs_settings = settings.jobs
    hooks = jobs_settings.webhooks
    metrics = JobMetrics(app[METRICS].registry)
    failures = app[METRICS].task_failures
    store: JobStore = RedisJobStore(client) if client is not None else MemoryJobStore()
    cache = ResultCache(client)
    outbox = Outbox(
        RedisDueSet(client, "jobs:webhooks") if client is not None else MemoryDueSet(),
        marker_ttl=jobs_settings.retention_seconds,
    )
    destinations = Destinations(hooks)
    dispatcher = (
        Dispatcher(hooks, outbox, destinations, metrics, failures=failures)
        if hooks.enabled and hooks.secret.get_secret_value()
        else None
    )
    watcher = JobWatcher(
        jobs_settings,
        base_path=settings.server.base_path,
        pool=pool,
        store=store,
        cache=cache,
        metrics=metrics,
        due=RedisDueSet(client, "jobs:watched") if client is not None else MemoryDueSet(),
        outbox=outbox,
        dispatcher=dispatcher,
    )
    live = LiveJobs(client)
    live_watcher = LiveWatcher(
        pool=pool,
        live=live,
        watcher=watcher,
        metrics=metrics,
        failures=failures,
        isolation=settings.isolation.enabled,
        preview_max_bytes=jobs_settings.preview_max_bytes,
    )
    app[JOBS] = Jobs(
        settings=jobs_settings,
        templates=app[TEMPLATES],
        store=store,
        metrics=metrics,
        cache=cache,
        counted_ends=set(),
        watcher=watcher,
        destinations=destinations,
        live=live,
        live_watcher=live_watcher,
    )
    tasks = [Supervised(watcher.run, name="jobs_watcher", failures=failures, logger=log)]
    if dispatcher is not None:
        tasks.append(
            Supervised(dispatcher.run, name="jobs_webhooks", failures=failures, logger=log)
        )
    for task in tasks:
        task.start()
    try:
        yield
    finally:
        watcher.close()
        if dispatcher is not None:
            dispatcher.close()
        for task in tasks:
            await task.stop()
        await live_watcher.close()


def add_jobs_routes(app: web.Application, *, base_path: str) -> None:
    """The jobs API's routes (before the catch-all; guards wired by route name)."""
    root = f"{base_path}{api.API_PREFIX}"
    app.router.add_get(f"{root}/openapi.json", api.openapi, name=api.OPENAPI_ROUTE)
    app.router.add_get(f"{root}/templates", api.list_templates, name="jobs_api_templates")
    app.router.add_get(f"{root}/templates/{{name}}", api.get_template, name="jobs_api_template")
    app.router.add_route("*", f"{root}/jobs", api.jobs_collection, name="jobs_api_jobs")
    app.router.add_route("*", f"{root}/jobs/{{id}}", api.job_item, name="jobs_api_job")
    app.router.add_get(f"{root}/jobs/{{id}}/events", job_events, name="jobs_api_events")
    app.router.add_get(f"{root}/jobs/{{id}}/preview", job_preview, name="jobs_api_preview")


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
