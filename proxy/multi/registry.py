"""``cleanup_ctx`` of the instance registry: discovery, health checks, capabilities, drains.

Startup, with several instances or discovery (one static instance runs none of this):

1. the name is resolved once (discovery), so the proxy starts with its instances;
2. the drained set is read from Redis (other replicas' drains);
3. one round of health checks, then one read of every instance's capabilities, each bounded
   by :data:`STARTUP_BUDGET_SECONDS` (a slow instance is then learnt in the background);
4. the loops start: checks every ``upstream.health.interval_seconds``, DNS every
   ``upstream.discovery.interval_seconds``, capabilities every
   ``upstream.placement.capabilities_refresh_seconds`` and when an instance joins or comes up.

Tests drive the same objects without sleeping: ``app[REGISTRY].health.check_all()``,
``.discovery.resolve_once()``, ``.capabilities.refresh_all()``; a resolver is injected with
``app[RESOLVER] = ...`` before the app starts.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Mapping
from dataclasses import dataclass
from typing import Any

import aiohttp
import orjson
import structlog
from aiohttp import hdrs, web

from proxy.monitoring.upstreams import UPSTREAM_PROBE, probe_wanted
from proxy.multi.capabilities import OBJECT_INFO, CapabilityRefresher, ObjectInfoSource
from proxy.multi.discovery import DnsDiscovery, Resolver, resolve_dns
from proxy.observability.metrics import METRICS
from proxy.redis.client import REDIS
from proxy.settings import SETTINGS
from proxy.upstream.encoding import BACKGROUND_LIMIT, IDENTITY, read_client_answer
from proxy.upstream.health_checks import HealthChecker
from proxy.upstream.pool import POOL, Upstream, UpstreamPool

log = structlog.get_logger("comfygate.upstream.registry")

STARTUP_BUDGET_SECONDS = 10.0
OBJECT_INFO_TIMEOUT_SECONDS = 30.0


@dataclass(slots=True)
class Registry:
    """The registry's background workers (``discovery`` is None without a hostname)."""

    health: HealthChecker
    capabilities: CapabilityRefresher
    discovery: DnsDiscovery | None


REGISTRY = web.AppKey("comfygate.registry", Registry)
RESOLVER: web.AppKey[Resolver] = web.AppKey("comfygate.discovery_resolver")
"""Optional: the resolver discovery uses instead of the system's (tests, custom registries)."""


def catalog_source(app: web.Application) -> ObjectInfoSource:
    """``/object_info`` through the policy catalog's per-instance cache (``OBJECT_INFO``): one
    fetch serves the clients' ``/object_info`` and placement. Without the catalog, a direct
    fetch."""
    pool = app[POOL]

    async def from_catalog(name: str) -> tuple[object, Mapping[str, Any]] | None:
        upstream = pool.get(name)
        shared = app.get(OBJECT_INFO)
        if upstream is None:
            return None
        if shared is None:
            return await fetch_object_info(pool, upstream)
        return await shared(name)

    return from_catalog


async def fetch_object_info(
    pool: UpstreamPool, upstream: Upstream
) -> tuple[object, Mapping[str, Any]] | None:
    """One direct ``GET /object_info`` (no catalog)."""
    async with pool.session.get(
        upstream.url_for("/object_info"),
        headers={hdrs.HOST: upstream.host_header, hdrs.ACCEPT_ENCODING: IDENTITY},
        timeout=aiohttp.ClientTimeout(total=OBJECT_INFO_TIMEOUT_SECONDS),
    ) as resp:
        if resp.status != 200:
            return None
        body = await read_client_answer(
            resp, limit=BACKGROUND_LIMIT, upstream=upstream.name, metrics=pool.metrics
        )
        data = orjson.loads(body)
    return (None, data) if isinstance(data, dict) else None


async def registry_context(app: web.Application) -> AsyncIterator[None]:
    """``cleanup_ctx`` (after Redis and the catalog): see the module docstring."""
    pool = app[POOL]
    settings = app[SETTINGS].upstream
    pool.metrics = app[METRICS]
    pool.redis = app[REDIS]
    health = HealthChecker(pool, settings.health)
    if probe_wanted(app):  # the checks feed the upstream gauges (no probe of their own here)
        health.subscribe(app[UPSTREAM_PROBE].record)
    capabilities = CapabilityRefresher(
        pool.instances,
        catalog_source(app),
        interval=settings.placement.capabilities_refresh_seconds,
        failures=pool.metrics.task_failures,
    )
    discovery = None
    if settings.discovery.hostname:
        discovery = DnsDiscovery(pool, settings.discovery, app.get(RESOLVER, resolve_dns))
    app[REGISTRY] = Registry(health, capabilities, discovery)
    if not pool.managed:
        yield
        return

    async def on_event(event: str, upstream: Upstream) -> None:
        if event in ("joined", "up"):
            # A new or restarted instance may have other nodes and models.
            pool.spawn(capabilities.refresh(upstream.name))

    pool.subscribe(on_event)
    if discovery is not None:
        await discovery.resolve_once()
    await pool.sync_drained()
    for step in (health.check_all, capabilities.refresh_all):
        try:
            async with asyncio.timeout(STARTUP_BUDGET_SECONDS):
                await step()
        except TimeoutError:
            log.warning("registry_startup_slow", step=step.__name__)
    health.start()
    capabilities.start()
    if discovery is not None:
        discovery.start()
    yield
    if discovery is not None:
        await discovery.stop()
    await capabilities.stop()
    await health.stop()
