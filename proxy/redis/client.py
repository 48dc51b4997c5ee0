"""The Redis connection shared by everything that keeps state across proxy replicas.

Optional: with no Redis configured the proxy keeps its state in process memory. The client is
created in the app's cleanup context; nothing connects at import time (the pools connect
lazily, so the proxy starts while Redis is down and ``/readyz`` says so).

Three deployments, one client type for the code that uses it (:data:`RedisClient`):

- ``redis.url``: one server over TCP (``redis://``), TLS (``rediss://``) or a Unix socket.
- ``redis.sentinels`` + ``redis.sentinel_master``: the master the Sentinels name, looked up
  again whenever a connection is (re)made, so a failover costs the commands in flight only.
- ``redis.cluster_nodes``: a Redis Cluster. Every user of the client touches one key per
  command or script, or keys sharing a ``{hash tag}``; a non-transactional pipeline over
  several keys is split per node by redis-py.

Timeouts are bounded (``socket_timeout_seconds``, ``connect_timeout_seconds``) and retries
few: a Redis that refuses connections costs a request milliseconds, one that hangs at most the
timeout (the rate limiter adds its own, tighter budget and circuit breaker on top). Timeouts
are measured on the event loop, so they keep slack for a busy process.
"""

from __future__ import annotations

import asyncio
import ssl
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import redis.asyncio as redis
import structlog
from aiohttp import web
from redis.asyncio.cluster import ClusterNode, ClusterPipeline
from redis.asyncio.retry import Retry
from redis.asyncio.sentinel import Sentinel
from redis.backoff import ExponentialWithJitterBackoff
from redis.exceptions import RedisClusterException

from proxy.settings import SETTINGS, RedisSettings, parse_host_port

log = structlog.get_logger("comfygate.redis")

RedisClient = redis.Redis | redis.RedisCluster
"""Any client the proxy may hold: standalone/Sentinel-managed (``Redis``) or ``RedisCluster``.
Code that runs against it uses single-key commands (or keys sharing a hash tag) only."""
REDIS: web.AppKey[RedisClient | None] = web.AppKey("comfygate.redis")
"""None when no Redis is configured (state kept in process memory); otherwise a
:data:`RedisClient` (standalone, Sentinel-managed or cluster)."""

# redis-py < 8 leaves ``Sentinel.__init__`` untyped (a strict "untyped call" there), 8.x types it.
# Calling it through a typed alias works with both without a version-dependent ignore.
_SENTINEL: Callable[..., Sentinel] = Sentinel

PING_TIMEOUT_SECONDS = 1.0
RETRY_BACKOFF_BASE_SECONDS = 0.01
RETRY_BACKOFF_CAP_SECONDS = 0.1

_TLS_VERIFY = {"required": ssl.CERT_REQUIRED, "optional": ssl.CERT_OPTIONAL, "none": ssl.CERT_NONE}


@dataclass(frozen=True, slots=True)
class RedisConnection:
    """A client and what closes it (a Sentinel setup also holds connections to the Sentinels)."""

    client: RedisClient
    close: Callable[[], Awaitable[None]]


def _unreachable(exc: RedisClusterException) -> redis.ConnectionError:
    error = redis.ConnectionError(f"Redis Cluster: {exc}")
    error.__cause__ = exc
    return error


class ClusterClient(redis.RedisCluster):
    """``RedisCluster`` whose failures are in redis-py's ``RedisError`` tree like every other
    client's. redis-py raises ``RedisClusterException`` (a bare ``Exception``) when no node can
    be reached or a slot has no owner; every user of the shared client handles Redis outages
    by catching ``redis.RedisError`` (fail modes, breakers, 503s), so those become
    ``redis.ConnectionError`` here, once, instead of in each caller."""

    async def execute_command(self, *args: Any, **kwargs: Any) -> Any:
        try:
            return await super().execute_command(*args, **kwargs)
        except RedisClusterException as exc:
            raise _unreachable(exc) from exc

    def pipeline(
        self, transaction: Any | None = None, shard_hint: Any | None = None
    ) -> ClusterPipeline:
        # Wrapped per instance rather than subclassed: ClusterPipeline's constructor differs
        # between redis-py 5.x and 8.x, redis-py's own pipeline() builds it right for each.
        pipe = super().pipeline(transaction, shard_hint)
        execute = pipe.execute

        async def execute_mapped(
            raise_on_error: bool = True, allow_redirections: bool = True
        ) -> list[Any]:
            try:
                return await execute(raise_on_error, allow_redirections)
            except RedisClusterException as exc:
                raise _unreachable(exc) from exc

        pipe.execute = execute_mapped  # type: ignore[method-assign]
        return pipe


def _retry(settings: RedisSettings) -> Retry:
    backoff = ExponentialWithJitterBackoff(
        base=RETRY_BACKOFF_BASE_SECONDS, cap=RETRY_BACKOFF_CAP_SECONDS
    )
    return Retry(backoff, settings.retries)


def _common(settings: RedisSettings) -> dict[str, Any]:
    """Connection options every mode shares."""
    return {
        "socket_timeout": settings.socket_timeout_seconds,
        "socket_connect_timeout": settings.connect_timeout_seconds,
        "health_check_interval": settings.health_check_interval_seconds,
        "retry": _retry(settings),
    }


def tls_options(settings: RedisSettings) -> dict[str, Any]:
    """redis-py's ``ssl_*`` keyword arguments (only for TLS connections: a plain connection
    class refuses them)."""
    if not settings.uses_tls:
        return {}
    options: dict[str, Any] = {
        "ssl_cert_reqs": _TLS_VERIFY[settings.tls_verify],
        # SECURITY: a hostname check without a certificate check means nothing; with
        # tls_verify = none both are off (documented as lab-only).
        "ssl_check_hostname": settings.tls_check_hostname and settings.tls_verify != "none",
    }
    if settings.tls_ca_certs:
        options["ssl_ca_certs"] = settings.tls_ca_certs
    if settings.tls_certfile:
        options["ssl_certfile"] = settings.tls_certfile
    if settings.tls_keyfile:
        options["ssl_keyfile"] = settings.tls_keyfile
    return options


def _credentials(settings: RedisSettings) -> dict[str, Any]:
    return {"username": settings.username or None, "password": settings.password or None}


def _address(raw: str) -> tuple[str, int]:
    parsed = parse_host_port(raw)
    if parsed is None:  # pragma: no cover - settings validated it
        raise ValueError(f"not host:port: {raw!r}")
    return parsed


def connect(settings: RedisSettings) -> RedisConnection | None:
    """A pooled client for the configured mode, or None without Redis (nothing connects yet)."""
    mode = settings.mode
    if mode == "none":
        return None
    common = _common(settings)
    tls = tls_options(settings)
    if mode == "standalone":
        client: RedisClient = redis.Redis.from_url(
            settings.url, max_connections=settings.max_connections, **common, **tls
        )
        return RedisConnection(client, client.aclose)
    if mode == "sentinel":
        sentinel_kwargs: dict[str, Any] = {
            **common,
            **({"ssl": True, **tls} if tls else {}),
            "password": settings.sentinel_password or None,
        }
        sentinel = _SENTINEL(
            [_address(a) for a in settings.sentinels], sentinel_kwargs=sentinel_kwargs
        )
        master = sentinel.master_for(
            settings.sentinel_master,
            db=settings.db,
            max_connections=settings.max_connections,
            **({"ssl": True, **tls} if tls else {}),
            **_credentials(settings),
            **common,
        )

        async def close_sentinel() -> None:
            await master.aclose()
            for node in sentinel.sentinels:
                await node.aclose()

        return RedisConnection(master, close_sentinel)
    cluster = ClusterClient(
        startup_nodes=[ClusterNode(*_address(a)) for a in settings.cluster_nodes],
        max_connections=settings.max_connections,
        **({"ssl": True, **tls} if tls else {}),
        **_credentials(settings),
        **common,
    )
    return RedisConnection(cluster, cluster.aclose)


async def redis_client(app: web.Application) -> AsyncIterator[None]:
    """``cleanup_ctx``: a pooled client when Redis is configured, else None."""
    settings = app[SETTINGS].redis
    connection = connect(settings)
    app[REDIS] = connection.client if connection is not None else None
    if connection is not None:
        log.info("redis_configured", mode=settings.mode, tls=settings.uses_tls)
    yield
    if connection is not None:
        await connection.close()


async def redis_ready(client: RedisClient) -> bool:
    """Whether Redis answers a PING in time (in a cluster: every primary)."""
    try:
        async with asyncio.timeout(PING_TIMEOUT_SECONDS):
            if isinstance(client, redis.RedisCluster):
                # A ping goes to one node; readiness means every slot owner answers.
                result = await client.ping(target_nodes=redis.RedisCluster.PRIMARIES)
            else:
                result = await client.ping()
            return bool(result)
    except (redis.RedisError, OSError, TimeoutError) as exc:
        log.warning("redis_unavailable", error=type(exc).__name__)
        return False
