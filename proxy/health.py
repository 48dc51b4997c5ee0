"""The proxy's own probes: ``/healthz`` (liveness) and ``/readyz`` (readiness)."""

from __future__ import annotations

import asyncio

from aiohttp import web

from proxy.redis_store import redis_ready
from proxy.state import LIFECYCLE, POOL, REDIS


async def healthz(request: web.Request) -> web.Response:
    """Liveness: the event loop answers. Touches nothing else, so it never flaps with ComfyUI."""
    return web.json_response({"status": "ok"})


async def readyz(request: web.Request) -> web.Response:
    """Readiness: 503 while draining, until the primary ComfyUI answers, and while a configured
    Redis does not."""
    app = request.app
    if app[LIFECYCLE].draining:
        return web.json_response({"status": "draining"}, status=503)
    pool, client = app[POOL], app[REDIS]
    results = await asyncio.gather(*(pool.probe(u) for u in pool.upstreams))
    body: dict[str, object] = {
        "upstreams": {
            u.name: "up" if ok else "down" for u, ok in zip(pool.upstreams, results, strict=True)
        }
    }
    ready = results[0]
    if client is not None:
        redis_ok = await redis_ready(client)
        body["redis"] = "up" if redis_ok else "down"
        ready = ready and redis_ok
    body["status"] = "ready" if ready else "not_ready"
    return web.json_response(body, status=200 if ready else 503)
