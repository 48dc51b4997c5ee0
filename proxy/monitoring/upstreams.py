"""The upstream gauges: each ComfyUI's up/down, probe latency and queue depth.

They come from one ``GET /prompt`` per instance and period
(:func:`proxy.upstream.health_checks.probe`), the cheapest route ComfyUI has
(``{"exec_info": {"queue_remaining": N}}``, N = pending + running). ComfyUI executes one
prompt at a time, so ``running = min(N, 1)`` and the rest is pending. An exact split from a
component that reads ``GET /queue`` anyway (the queue-quota reconciler) takes precedence through
:meth:`UpstreamProbe.queue_observed`.

Who probes: with one instance, this module, every ``metrics.upstream_poll_seconds``; with
several instances (or discovery), the registry's health checks, every
``upstream.health.interval_seconds``, which publish each result here (one probe feeds the
breaker, placement and the metrics). ``upstream_poll_seconds = 0`` turns the gauges off in both
cases.

With several workers every worker probes (a probe is a few hundred bytes); the gauges combine
as "most recent value of any live worker".
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator

import structlog
from aiohttp import web

from proxy.observability.metrics import METRICS, Metrics
from proxy.periodic import Periodic
from proxy.settings import SETTINGS
from proxy.upstream.health_checks import ProbeResult, probe
from proxy.upstream.pool import POOL, UpstreamPool

log = structlog.get_logger("comfygate.metrics")

EXACT_QUEUE_VALID_SECONDS = 30.0
"""How long an exact queue split reported by another component overrides the inferred one."""
JITTER = 0.2
"""Workers started together do not probe in lockstep."""


class UpstreamProbe:
    """Sets the upstream gauges from probe results; probes by itself with one instance."""

    def __init__(
        self, pool: UpstreamPool, metrics: Metrics, interval: float, timeout_seconds: float
    ) -> None:
        self._pool = pool
        self._metrics = metrics
        self._timeout = timeout_seconds
        self._exact_until: dict[str, float] = {}
        self._loop = Periodic(
            self.probe_all,
            interval,
            name="comfygate-upstream-probe",
            log=log,
            event="upstream_probe_failed",
            failures=metrics.task_failures,
            jitter=JITTER,
            immediately=True,
        )

    def queue_observed(self, upstream: str, *, pending: int, running: int) -> None:
        """An exact queue split seen by another component (e.g. from ``GET /queue``)."""
        self._exact_until[upstream] = time.monotonic() + EXACT_QUEUE_VALID_SECONDS
        self._set_queue(upstream, pending, running)

    def _set_queue(self, upstream: str, pending: int, running: int) -> None:
        self._metrics.upstream_queue.labels(upstream, "pending").set(pending)
        self._metrics.upstream_queue.labels(upstream, "running").set(running)

    async def probe_all(self) -> None:
        session = self._pool.session
        upstreams = self._pool.upstreams
        results = await asyncio.gather(*(probe(session, u, self._timeout) for u in upstreams))
        for upstream, result in zip(upstreams, results, strict=True):
            self.record(upstream.name, result)

    def record(self, name: str, result: ProbeResult) -> None:
        """One probe's outcome into the gauges (a :data:`ProbeListener` of the health checks)."""
        metrics = self._metrics
        metrics.upstream_up.labels(name).set(1 if result.up else 0)
        metrics.upstream_probe_duration.labels(name).observe(result.seconds)
        if result.failure:
            metrics.upstream_probe_failures.labels(name, result.failure).inc()
        if self._exact_until.get(name, 0.0) > time.monotonic():
            return
        if not result.up:
            self._set_queue(name, 0, 0)  # unknown; a restarted ComfyUI has lost its queue
        elif result.queue_remaining is not None:
            total = result.queue_remaining
            self._set_queue(name, max(total - 1, 0), min(total, 1))

    @property
    def running(self) -> bool:
        """Whether it probes by itself (one instance), rather than being fed by the checks."""
        return self._loop.running

    def start(self) -> None:
        """Probe by itself every interval: only when nothing else feeds :meth:`record`."""
        self._loop.start()

    async def stop(self) -> None:
        await self._loop.stop()


UPSTREAM_PROBE = web.AppKey("comfygate.upstream_probe", UpstreamProbe)


async def upstream_probe(app: web.Application) -> AsyncIterator[None]:
    """``cleanup_ctx``: the background probe (after the pool, whose session it uses).

    With several instances (or discovery) the registry's health checks already probe each one:
    ``registry_context`` subscribes :meth:`UpstreamProbe.record` to them when
    :func:`probe_wanted` says the gauges are wanted, and no second loop runs here."""

    settings = app[SETTINGS]
    pool = app[POOL]
    prober = UpstreamProbe(
        pool,
        app[METRICS],
        settings.metrics.upstream_poll_seconds,
        settings.upstream.health.timeout_seconds,
    )
    app[UPSTREAM_PROBE] = prober
    if not probe_wanted(app) or pool.managed:
        yield
        return
    prober.start()
    yield
    await prober.stop()


def probe_wanted(app: web.Application) -> bool:
    """Whether the upstream gauges are kept (``metrics.upstream_poll_seconds`` 0 = off)."""

    settings = app[SETTINGS].metrics
    return settings.enabled and settings.upstream_poll_seconds > 0


__all__ = [
    "UPSTREAM_PROBE",
    "ProbeResult",
    "UpstreamProbe",
    "probe_wanted",
    "upstream_probe",
]
