"""Serving ``/metrics``: which registry is exposed, who may read it, and where.

* One process: the app's own registry (plus the opt-in per-user collector).
* Several workers (``PROMETHEUS_MULTIPROC_DIR`` set by the supervisor): a fresh registry whose
  :class:`~prometheus_client.multiprocess.MultiProcessCollector` reads every worker's files, so
  whichever process answers, the numbers are the sum (or max, per gauge) over all workers.

Where: by default a listener of its own (``metrics.host:port``, loopback), served by the single
process or by the supervisor; with ``metrics.on_main_port`` a route on the main listener.

SECURITY: who: ``metrics.allowed_networks`` (the peer's address; on the main port the client
address as ``server.trusted_proxies`` allow it to be derived) and/or ``metrics.bearer_token``
(compared in constant time). Metrics name upstreams, routes and volumes: never public by
default, never on the main port without one of the two.
"""

from __future__ import annotations

import hmac
import ipaddress
import os
from collections.abc import Iterable
from pathlib import Path

import structlog
from aiohttp import hdrs, web
from prometheus_client import CollectorRegistry
from prometheus_client.exposition import choose_encoder
from prometheus_client.multiprocess import MultiProcessCollector
from prometheus_client.registry import Collector

from proxy.errors import ProxyError, SettingsError
from proxy.json_errors import json_error
from proxy.observability.metrics import METRICS, Metrics
from proxy.observability.users import UserCollector, UserCounter
from proxy.settings.metrics import IPNetwork, MetricsSettings
from proxy.state import CONTEXT

log = structlog.get_logger("comfygate.metrics")

MULTIPROC_ENV = "PROMETHEUS_MULTIPROC_DIR"
REGISTRY = web.AppKey("comfygate.metrics_registry", CollectorRegistry)


def multiprocess_dir() -> Path | None:
    """The shared directory of the workers' metric files, when running several workers."""
    value = os.environ.get(MULTIPROC_ENV)
    return Path(value) if value else None


def exposition_registry(
    settings: MetricsSettings,
    metrics: Metrics | None = None,
    *,
    extra: Iterable[Collector] = (),
) -> CollectorRegistry:
    """The registry ``/metrics`` serves (see the module doc). ``metrics`` is this process's
    collectors (unused when several workers share the multiprocess directory)."""
    directory = multiprocess_dir()
    if directory is None:
        if metrics is None:
            raise RuntimeError("single-process exposition needs the process's Metrics")
        registry = metrics.registry
        if settings.per_user_top_n and metrics.user_counter is not None:
            registry.register(UserCollector(settings.per_user_top_n, counter=metrics.user_counter))
    else:
        registry = CollectorRegistry()
        MultiProcessCollector(registry, path=str(directory))  # type: ignore[no-untyped-call]
        if settings.per_user_top_n:
            registry.register(UserCollector(settings.per_user_top_n, directory=directory))
    for collector in extra:
        registry.register(collector)
    return registry


def enable_user_counter(settings: MetricsSettings, metrics: Metrics) -> None:
    """Attach the opt-in per-user counter to ``metrics`` (the request path then feeds it)."""
    if settings.enabled and settings.per_user_top_n:
        metrics.user_counter = UserCounter(settings.per_user_top_n)


def refusal(settings: MetricsSettings, request: web.Request, client_ip: str) -> str | None:
    """Why this scrape may not read the metrics (``network``, ``token``), or None."""
    if settings.allowed_networks and not in_networks(client_ip, settings.allowed_networks):
        return "network"
    if settings.bearer_token:
        scheme, _, token = request.headers.get(hdrs.AUTHORIZATION, "").partition(" ")
        expected = settings.bearer_token.encode()
        if scheme.lower() != "bearer" or not hmac.compare_digest(token.strip().encode(), expected):
            return "token"
    return None


def in_networks(address: str, networks: Iterable[IPNetwork]) -> bool:
    try:
        ip = ipaddress.ip_address(address.split("%", 1)[0])
    except ValueError:
        return False  # a unix socket peer or garbage: not in any network
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped  # a dual-stack listener reports IPv4 peers as ::ffff:a.b.c.d
    return any(ip in net for net in networks)


def render(registry: CollectorRegistry, request: web.Request) -> web.Response:
    """The exposition in the format the scraper asked for (Prometheus text or OpenMetrics)."""
    encoder, content_type = choose_encoder(request.headers.get(hdrs.ACCEPT, ""))
    response = web.Response(body=encoder(registry))
    response.headers[hdrs.CONTENT_TYPE] = content_type
    response.headers[hdrs.CACHE_CONTROL] = "no-store"
    return response


class MetricsRefused(ProxyError):
    """401 (no or wrong bearer token) or 403 (not from an allowed network)."""


def _refused(reason: str, client_ip: str) -> MetricsRefused:
    log.warning("metrics_scrape_refused", client=client_ip, reason=reason)
    if reason == "token":
        return MetricsRefused(
            "a valid bearer token is required to read the metrics",
            error_type="metrics_unauthorized",
            status=401,
            headers={hdrs.WWW_AUTHENTICATE: 'Bearer realm="comfygate-metrics"'},
        )
    return MetricsRefused(
        "the metrics are not served to this network",
        error_type="metrics_forbidden",
        status=403,
    )


def metrics_app(settings: MetricsSettings, registry: CollectorRegistry) -> web.Application:
    """The separate metrics listener's application: ``GET settings.path`` only."""

    async def handle(request: web.Request) -> web.Response:
        client_ip = request.remote or ""
        reason = refusal(settings, request, client_ip)
        if reason is not None:
            exc = _refused(reason, client_ip)
            return json_error(exc.status, exc.error_type, exc.message, headers=exc.headers)
        return render(registry, request)

    app = web.Application()
    app[REGISTRY] = registry
    app.router.add_get(settings.path, handle, name="metrics", allow_head=False)
    return app


async def start_metrics_listener(
    settings: MetricsSettings, registry: CollectorRegistry
) -> web.AppRunner:
    """Open the separate metrics listener (``metrics.host:port``); the caller cleans it up.

    Raises:
        SettingsError: the address cannot be bound (in use, not permitted).
    """
    runner = web.AppRunner(metrics_app(settings, registry), handle_signals=False, access_log=None)
    await runner.setup()
    try:
        await web.TCPSite(runner, settings.host, settings.port).start()
    except OSError as exc:
        await runner.cleanup()
        where = f"{settings.host}:{settings.port}"
        raise SettingsError(
            [
                f"metrics: cannot listen on {where}: {exc.strerror or exc} "
                "(set metrics.port, or metrics.enabled = false)"
            ]
        ) from None
    return runner


def add_metrics_route(app: web.Application, settings: MetricsSettings) -> None:
    """``metrics.on_main_port``: serve ``settings.path`` on the main app (a proxy-own route,
    no guard chain; :func:`refusal` is its guard). The registry is built at startup."""

    async def handle(request: web.Request) -> web.Response:
        client_ip = request[CONTEXT].client_ip
        reason = refusal(settings, request, client_ip)
        if reason is not None:
            raise _refused(reason, client_ip)
        return render(request.app[REGISTRY], request)

    async def build_registry(app: web.Application) -> None:
        app[REGISTRY] = exposition_registry(settings, app[METRICS])

    app.on_startup.append(build_registry)
    app.router.add_get(settings.path, handle, name="metrics", allow_head=False)
