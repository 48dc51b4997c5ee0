"""The proxy's own probes: ``/healthz`` (liveness) and ``/readyz`` (readiness)."""

from __future__ import annotations

import asyncio

from aiohttp import web

from proxy.limits.enforce import RATE_LIMITS
from proxy.redis.client import REDIS, redis_ready
from proxy.state import LIFECYCLE
from proxy.upstream.pool import POOL


async def healthz(request: web.Request) -> web.Response:
    """Liveness: the event loop answers. Touches nothing else, so it never flaps with ComfyUI."""
    return web.json_response({"status": "ok"})


async def readyz(request: web.Request) -> web.Response:
    """Readiness: 503 while draining, until at least one ComfyUI instance answers and takes
    prompts (healthy, not drained), and while a configured Redis does not.

    ``rate_limiter`` is ``degraded`` while its circuit breaker is not closed (Redis failed or was
    too slow recently; classes follow their fail modes). That alone does not make the proxy
    not-ready: every replica shares the Redis, so taking them all out of the load balancer would
    turn a degraded service (fail-open classes still served) into an outage. A Redis that is
    down fails the PING above anyway."""
    app = request.app
    if app[LIFECYCLE].draining:
        return web.json_response({"status": "draining"}, status=503)
    pool, client = app[POOL], app[REDIS]
    upstreams = pool.upstreams  # a snapshot: discovery may change the pool meanwhile
    results = await asyncio.gather(*(pool.probe(u) for u in upstreams))
    # Each instance: up, down, drained (answers, takes no new prompts) or ejected (answers,
    # its breaker still open). Ready when at least one instance can take a prompt now.
    states = pool.readiness(dict(zip((u.name for u in upstreams), results, strict=True)))
    body: dict[str, object] = {"upstreams": states}
    ready = "up" in states.values()
    if client is not None:
        redis_ok = await redis_ready(client)
        body["redis"] = "up" if redis_ok else "down"
        ready = ready and redis_ok
    limits = app.get(RATE_LIMITS)
    if limits is not None and limits.enabled:
        body["rate_limiter"] = "degraded" if limits.degraded else "ok"
    body["status"] = "ready" if ready else "not_ready"
    return web.json_response(body, status=200 if ready else 503)
