"""The Redis connection shared by everything that keeps state across proxy replicas.

Optional: with no ``redis.url`` the proxy keeps its state in process memory. The client is
created in the app's cleanup context; nothing connects at import time.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import redis.asyncio as redis
import structlog
from aiohttp import web

from proxy.state import REDIS, SETTINGS

log = structlog.get_logger("comfygate.redis")

RedisClient = redis.Redis | redis.RedisCluster
"""Any client the proxy may hold: standalone/Sentinel-managed (``Redis``) or ``RedisCluster``.
Code that runs against it uses single-key commands (or keys sharing a hash tag) only."""

PING_TIMEOUT_SECONDS = 1.0


async def redis_client(app: web.Application) -> AsyncIterator[None]:
    """``cleanup_ctx``: a pooled client when Redis is configured, else None."""
    url = app[SETTINGS].redis.url
    client = (
        redis.Redis.from_url(url, socket_timeout=1.0, health_check_interval=30) if url else None
    )
    app[REDIS] = client
    yield
    if client is not None:
        await client.aclose()


async def redis_ready(client: redis.Redis) -> bool:
    """Whether Redis answers a PING in time."""
    try:
        async with asyncio.timeout(PING_TIMEOUT_SECONDS):
            return bool(await client.ping())
    except (redis.RedisError, OSError, TimeoutError) as exc:
        log.warning("redis_unavailable", error=type(exc).__name__)
        return False
