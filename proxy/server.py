"""Serving: the runner, signal handling and the graceful shutdown sequence.

On SIGTERM (or SIGINT): ``/readyz`` turns 503 at once; after ``drain_seconds`` the listener
closes (new connections refused), WebSockets are closed with 1001, and in-flight HTTP gets up
to ``shutdown_grace_seconds`` to finish before the process exits.

On SIGHUP: the callbacks in ``app[RELOAD_HOOKS]`` run (configuration reloads); SIGHUP never
ends the process.

One process serves the main listener and, unless ``metrics.on_main_port``, the metrics
listener. As a worker of ``comfygate serve --workers N`` (:mod:`proxy.supervisor`) it shares
the port with its siblings (``SO_REUSEPORT``: the kernel spreads connections over the
workers' sockets) and leaves the metrics listener to the supervisor.
"""

from __future__ import annotations

import asyncio
import signal
import socket
from collections.abc import Callable, Coroutine
from typing import Any, Protocol

import structlog
from aiohttp import web

from proxy.app import create_app
from proxy.auth.authenticator import BOOTSTRAP_TOKEN
from proxy.banner import banner, print_banner, warn_unreachable
from proxy.errors import SettingsError
from proxy.gc_tuning import tune_collector
from proxy.monitoring.exposition import exposition_registry, start_metrics_listener
from proxy.observability.metrics import METRICS
from proxy.settings import Settings
from proxy.state import LIFECYCLE, RELOAD_HOOKS
from proxy.upstream.pool import POOL

log = structlog.get_logger("comfygate")


class Supervised(Protocol):
    """How a worker talks to its supervisor (see :mod:`proxy.supervisor`)."""

    index: int

    def ready(self) -> None:
        """The worker listens: tell the supervisor."""

    def on_orphaned(self, callback: Callable[[], None]) -> None:
        """Call ``callback`` if the supervisor goes away (then the worker shuts down)."""


def run(main: Coroutine[Any, Any, None]) -> None:
    """Run ``main`` on uvloop when available (the event loop comfygate is tuned for)."""
    try:
        import uvloop  # noqa: PLC0415
    except ImportError:  # pragma: no cover - uvloop is a dependency except on Windows
        asyncio.run(main)
    else:
        uvloop.run(main)


async def serve(
    settings: Settings,
    *,
    sock: socket.socket | None = None,
    worker: Supervised | None = None,
    config_path: str | None = None,
) -> None:
    """Run until SIGTERM/SIGINT (or the supervisor's end), then shut down gracefully.

    Once listening, a process of its own prints the console banner (:mod:`proxy.banner`),
    with the one-time admin token of a first run; a worker leaves it to its supervisor.

    Raises:
        SettingsError: a listener cannot be opened (address in use, not permitted).
    """
    app = create_app(settings)
    runner = web.AppRunner(
        app,
        handle_signals=False,
        access_log=None,  # the canonical request_finished line replaces it
        shutdown_timeout=settings.server.shutdown_grace_seconds,
    )
    loop = asyncio.get_running_loop()
    # Registered before startup, so that a component installing its own SIGHUP handler while
    # the app starts replaces this default rather than being replaced by it.
    loop.add_signal_handler(signal.SIGHUP, _reload, app)
    try:
        await runner.setup()
    except BaseException:
        # Close what the contexts that did start opened (client sessions, Redis), so a failed
        # start ends with its message alone.
        await runner.cleanup()
        loop.remove_signal_handler(signal.SIGHUP)
        raise
    tune_collector()  # after startup: what it built is frozen (proxy.gc_tuning)
    metrics_runner: web.AppRunner | None = None
    try:
        site = await _listen(runner, settings, sock, reuse_port=worker is not None)
        metrics = settings.metrics
        if worker is None and metrics.enabled and not metrics.on_main_port:
            registry = exposition_registry(metrics, app[METRICS])
            metrics_runner = await start_metrics_listener(metrics, registry)
    except BaseException:
        await runner.cleanup()
        loop.remove_signal_handler(signal.SIGHUP)
        raise
    log.info(
        "proxy_started",
        listen=site.name,
        base_path=settings.server.base_path or "/",
        upstreams=list(settings.upstream.urls),
        redis=settings.redis.mode if settings.redis.mode != "none" else "none (in-process state)",
        metrics=_metrics_where(settings, worker),
    )
    stop = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    if worker is None:
        upstreams = await _probe_upstreams(app)
        warn_unreachable(upstreams)
        text = banner(
            settings,
            upstreams=upstreams,
            config_path=config_path,
            bootstrap_token=app.get(BOOTSTRAP_TOKEN) or None,
        )
        print_banner(text)
    if worker is not None:
        worker.on_orphaned(stop.set)
        worker.ready()
    try:
        await stop.wait()
        log.info("shutdown_started", drain_seconds=settings.server.drain_seconds)
        app[LIFECYCLE].draining = True
        if settings.server.drain_seconds:
            await asyncio.sleep(settings.server.drain_seconds)  # let load balancers see 503
    finally:
        for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
            loop.remove_signal_handler(sig)
        if metrics_runner is not None:
            await metrics_runner.cleanup()
        await runner.cleanup()
        log.info("shutdown_finished")


async def _listen(
    runner: web.AppRunner, settings: Settings, sock: socket.socket | None, *, reuse_port: bool
) -> web.BaseSite:
    site: web.BaseSite
    if sock is not None:
        site = web.SockSite(runner, sock)
    else:
        server = settings.server
        # SECURITY: on Linux, SO_REUSEPORT only lets sockets of the same user join the port.
        site = web.TCPSite(
            runner, server.host, server.port, backlog=1024, reuse_port=reuse_port or None
        )
    try:
        await site.start()
    except OSError as exc:
        where = f"{settings.server.host}:{settings.server.port}"
        raise SettingsError([f"server: cannot listen on {where}: {exc.strerror or exc}"]) from None
    return site


async def _probe_upstreams(app: web.Application) -> dict[str, bool]:
    """Whether each ComfyUI answers now (the pool's cached probe, as ``/readyz`` uses)."""
    pool = app[POOL]
    upstreams = pool.upstreams
    results = await asyncio.gather(*(pool.probe(u) for u in upstreams))
    return {u.base: ok for u, ok in zip(upstreams, results, strict=True)}


def _metrics_where(settings: Settings, worker: Supervised | None) -> str:
    metrics = settings.metrics
    if not metrics.enabled:
        return "off"
    if metrics.on_main_port:
        return f"main port {metrics.path}"
    if worker is not None:
        return "supervisor"
    return f"http://{metrics.host}:{metrics.port}{metrics.path}"


def _reload(app: web.Application) -> None:
    """SIGHUP: run the reload hooks in the background (a signal handler must not block)."""
    hooks = list(app.get(RELOAD_HOOKS, ()))
    log.info("reload_requested", hooks=len(hooks))

    async def run_hooks() -> None:
        for hook in hooks:
            try:
                await hook()
            except Exception:  # a failed reload keeps the running configuration
                log.exception("reload_failed", hook=getattr(hook, "__qualname__", repr(hook)))

    task = asyncio.get_running_loop().create_task(run_hooks())
    _RELOADS.add(task)
    task.add_done_callback(_RELOADS.discard)


_RELOADS: set[asyncio.Task[None]] = set()
