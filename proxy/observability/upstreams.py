"""The upstream probe: each ComfyUI's up/down, probe latency and queue depth, in the background.

Every ``metrics.upstream_poll_seconds`` each process sends ``GET /prompt`` to each instance:
the cheapest route ComfyUI has (``{"exec_info": {"queue_remaining": N}}``, N = pending +
running). ComfyUI executes one prompt at a time, so ``running = min(N, 1)`` and the rest is
pending. An exact split from a component that reads ``GET /queue`` anyway (the queue-quota
reconciler) takes precedence through :meth:`UpstreamProbe.queue_observed`.

With several workers every worker probes (a probe is a few hundred bytes); the gauges combine
as "most recent value of any live worker".
"""

from __future__ import annotations

import asyncio
import contextlib
import random
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass

import aiohttp
import orjson
import structlog
from aiohttp import hdrs, web

from proxy.observability.metrics import Metrics
from proxy.upstream.pool import Upstream, UpstreamPool

log = structlog.get_logger("comfygate.metrics")

PROBE_PATH = "/prompt"
PROBE_TIMEOUT_SECONDS = 2.0
EXACT_QUEUE_VALID_SECONDS = 30.0
"""How long an exact queue split reported by another component overrides the inferred one."""


@dataclass(frozen=True, slots=True)
class ProbeResult:
    up: bool
    seconds: float
    queue_remaining: int | None = None
    failure: str = ""
    """timeout, refused, status, protocol (empty when up)."""


async def probe(session: aiohttp.ClientSession, upstream: Upstream) -> ProbeResult:
    """One ``GET /prompt``: whether the instance answers, how fast, and its queue size."""
    started = time.perf_counter()
    try:
        async with session.get(
            upstream.url_for(PROBE_PATH),
            headers={hdrs.HOST: upstream.host_header, hdrs.ACCEPT: "application/json"},
            timeout=aiohttp.ClientTimeout(total=PROBE_TIMEOUT_SECONDS),
        ) as resp:
            body = await resp.read()
            seconds = time.perf_counter() - started
            if resp.status != 200:
                return ProbeResult(resp.status < 500, seconds, failure="status")
    except TimeoutError:
        return ProbeResult(False, time.perf_counter() - started, failure="timeout")
    except (aiohttp.ClientConnectorError, ConnectionRefusedError):
        return ProbeResult(False, time.perf_counter() - started, failure="refused")
    except (aiohttp.ClientError, OSError):
        return ProbeResult(False, time.perf_counter() - started, failure="protocol")
    return ProbeResult(True, seconds, queue_remaining=_queue_remaining(body))


def _queue_remaining(body: bytes) -> int | None:
    try:
        data = orjson.loads(body)
        value = data["exec_info"]["queue_remaining"]
    except (orjson.JSONDecodeError, KeyError, TypeError):
        return None
    return value if isinstance(value, int) and value >= 0 else None


class UpstreamProbe:
    """Probes every upstream periodically and sets the upstream gauges."""

    def __init__(self, pool: UpstreamPool, metrics: Metrics, interval: float) -> None:
        self._pool = pool
        self._metrics = metrics
        self._interval = interval
        self._exact_until: dict[str, float] = {}

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
        results = await asyncio.gather(*(probe(session, u) for u in upstreams))
        for upstream, result in zip(upstreams, results, strict=True):
            self.record(upstream.name, result)

    def record(self, name: str, result: ProbeResult) -> None:
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

    async def run(self) -> None:
        while True:
            try:
                await self.probe_all()
            except Exception:  # the probe must outlive any surprise (logged)
                log.exception("upstream_probe_failed")
            # A period, not a synchronisation; jittered so that workers started together do
            # not probe in lockstep.
            await asyncio.sleep(self._interval * random.uniform(0.8, 1.2))  # noqa: S311


UPSTREAM_PROBE = web.AppKey("comfygate.upstream_probe", UpstreamProbe)


async def upstream_probe(app: web.Application) -> AsyncIterator[None]:
    """``cleanup_ctx``: the background probe (after the pool, whose session it uses)."""
    from proxy.state import METRICS, POOL, SETTINGS  # noqa: PLC0415 - state imports metrics

    settings = app[SETTINGS].metrics
    prober = UpstreamProbe(app[POOL], app[METRICS], settings.upstream_poll_seconds)
    app[UPSTREAM_PROBE] = prober
    if not settings.enabled or not settings.upstream_poll_seconds:
        yield
        return
    task = asyncio.create_task(prober.run())
    yield
    task.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await task
