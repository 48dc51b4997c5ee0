"""The proxy's own probes: ``/healthz`` (liveness) and ``/readyz`` (readiness)."""

from __future__ import annotations

import asyncio

from aiohttp import web

from proxy.state import LIFECYCLE, POOL


async def healthz(request: web.Request) -> web.Response:
    """Liveness: the event loop answers. Touches nothing else, so it never flaps with ComfyUI."""
    return web.json_response({"status": "ok"})


async def readyz(request: web.Request) -> web.Response:
    """Readiness: 503 while draining or until the primary ComfyUI answers."""
    if request.app[LIFECYCLE].draining:
        return web.json_response({"status": "draining"}, status=503)
    pool = request.app[POOL]
    results = await asyncio.gather(*(pool.probe(u) for u in pool.upstreams))
    upstreams = {
        u.name: "up" if ok else "down" for u, ok in zip(pool.upstreams, results, strict=True)
    }
    ready = results[0]
    return web.json_response(
        {"status": "ready" if ready else "not_ready", "upstreams": upstreams},
        status=200 if ready else 503,
    )
