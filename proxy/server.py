"""Serving: the runner, signal handling and the graceful shutdown sequence.

On SIGTERM (or SIGINT): ``/readyz`` turns 503 at once; after ``drain_seconds`` the listener
closes (new connections refused), WebSockets are closed with 1001, and in-flight HTTP gets up
to ``shutdown_grace_seconds`` to finish before the process exits.
"""

from __future__ import annotations

import asyncio
import signal
import socket

import structlog
from aiohttp import web

from proxy.app import create_app
from proxy.settings import Settings
from proxy.state import LIFECYCLE

log = structlog.get_logger("comfygate")


async def serve(settings: Settings, *, sock: socket.socket | None = None) -> None:
    """Run until SIGTERM/SIGINT, then shut down gracefully."""
    app = create_app(settings)
    runner = web.AppRunner(
        app,
        handle_signals=False,
        access_log=None,  # the canonical request_finished line replaces it
        shutdown_timeout=settings.server.shutdown_grace_seconds,
    )
    await runner.setup()
    site: web.BaseSite
    if sock is not None:
        site = web.SockSite(runner, sock)
    else:
        site = web.TCPSite(runner, settings.server.host, settings.server.port, backlog=1024)
    await site.start()
    log.info(
        "proxy_started",
        listen=site.name,
        base_path=settings.server.base_path or "/",
        upstreams=list(settings.upstream.urls),
        redis="configured" if settings.redis.url else "none (in-process state)",
    )
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    try:
        await stop.wait()
        log.info("shutdown_started", drain_seconds=settings.server.drain_seconds)
        app[LIFECYCLE].draining = True
        if settings.server.drain_seconds:
            await asyncio.sleep(settings.server.drain_seconds)  # let load balancers see 503
    finally:
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.remove_signal_handler(sig)
        await runner.cleanup()
        log.info("shutdown_finished")
