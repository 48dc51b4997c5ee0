"""The queue quota of one app and the reconciler of this process (a ``cleanup_ctx``), built
after Redis, the upstream pool and the rate limits. Above the service and the reconciler it
wires, so neither imports the other for its construction."""

from __future__ import annotations

from collections.abc import AsyncIterator

from aiohttp import web

from proxy.limits.enforce import RATE_LIMITS
from proxy.limits.quota.model import MemoryQuotaStore, QuotaStore
from proxy.limits.quota.reconciler import QuotaReconciler
from proxy.limits.quota.redis_store import RedisQuotaStore
from proxy.limits.quota.service import QUEUE_QUOTA, QueueQuota
from proxy.observability.metrics import METRICS
from proxy.redis.client import REDIS
from proxy.settings import SETTINGS, Settings
from proxy.upstream.pool import POOL


def build_queue_quota(app: web.Application) -> QueueQuota:
    """The quota of ``app``: in Redis when one is configured, else in this process."""
    settings: Settings = app[SETTINGS]
    client = app[REDIS]
    ttl = settings.rate_limits.quota_entry_ttl_seconds
    store: QuotaStore = (
        RedisQuotaStore(client, ttl) if client is not None else MemoryQuotaStore(ttl)
    )
    limits = app.get(RATE_LIMITS)
    degraded = (lambda: limits.degraded) if limits is not None else (lambda: False)
    return QueueQuota(settings, store, app[METRICS], degraded=degraded)


async def queue_quota_context(app: web.Application) -> AsyncIterator[None]:
    """``cleanup_ctx`` (after Redis, the pool and the rate limits): ``app[QUEUE_QUOTA]`` and,
    while quotas are on, the reconciler of this process."""
    quota = app[QUEUE_QUOTA] = build_queue_quota(app)
    reconciler = quota.reconciler = QuotaReconciler(quota, app[POOL], app[SETTINGS])
    if quota.enabled:
        reconciler.start()
    yield
    await reconciler.stop()
    await quota.settle()  # accepts in flight: a replica's reconciler may rely on them
