"""Health of each ComfyUI instance: a circuit breaker fed by requests and by active checks.

::

    closed --(a refused connection, or failure_threshold consecutive 5xx / failed checks)--> open
    open --(open_seconds later, the next active check)--> half-open: that check is the probe
    half-open --probe succeeds--> closed          half-open --probe fails--> open, wait doubled

Only a closed instance takes new prompts (``pool.routable``) and counts as reachable for reads.
A refused connection opens the breaker at once (nothing listens there, and every retry would
cost a round trip); answers with 5xx and failed checks must repeat, so one bad request does not
eject a healthy instance. Each failed probe doubles the wait, up to ``max_open_seconds``.

:class:`HealthChecker` runs the active checks: ``GET /prompt`` on every instance each
``upstream.health.interval_seconds``. ComfyUI answers it from memory (``queue_remaining``), so
it is the cheapest call there is, and its answer feeds placement (the instance's queue length)
and, through :meth:`HealthChecker.subscribe`, the metrics' up/latency/queue gauges
(``proxy.monitoring.upstreams``), so each instance gets one probe, not two.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

import aiohttp
import orjson
import structlog
from aiohttp import hdrs

from proxy.errors import UpstreamError
from proxy.periodic import Periodic
from proxy.redis.breaker import BreakerState
from proxy.settings.upstreams import HealthSettings
from proxy.upstream.encoding import IDENTITY, read_client_answer

if TYPE_CHECKING:
    from proxy.upstream.pool import Instance, Upstream, UpstreamPool

log = structlog.get_logger("comfygate.upstream.health")

CHECK_PATH = "/prompt"
PROBE_LIMIT = 64 * 1024
"""``GET /prompt`` answers a few dozen bytes; a larger answer is not read."""


class Breaker:
    """The circuit breaker of one instance. Not thread-safe (one event loop); the methods
    return whether the state changed, so the pool emits ``up``/``down`` exactly once."""

    def __init__(self, settings: HealthSettings, clock: Callable[[], float]) -> None:
        self._settings = settings
        self._clock = clock
        self.state = BreakerState.CLOSED
        self.failures = 0
        """Consecutive failures while closed."""
        self.opened_at = 0.0
        self.open_for = settings.open_seconds

    @property
    def closed(self) -> bool:
        return self.state is BreakerState.CLOSED

    def failure(self, *, immediate: bool = False) -> bool:
        """Count a failure; True when the breaker opened because of it."""
        if self.state is BreakerState.OPEN:
            return False
        if self.state is BreakerState.HALF_OPEN:
            self.open_for = min(self.open_for * 2, self._settings.max_open_seconds)
            self._open()
            return False  # it was not routable already: no new "down"
        self.failures += 1
        if immediate or self.failures >= self._settings.failure_threshold:
            self.open_for = self._settings.open_seconds
            self._open()
            return True
        return False

    def success(self) -> bool:
        """Count a success; True when the breaker closed because of it."""
        self.failures = 0
        if self.state is BreakerState.CLOSED:
            return False
        if self.state is BreakerState.OPEN and not self.probe_due():
            # A late answer to a request sent before the breaker opened proves little.
            return False
        self.state = BreakerState.CLOSED
        self.open_for = self._settings.open_seconds
        return True

    def probe_due(self) -> bool:
        """Whether an open breaker has waited long enough; moves it to half-open if so."""
        if self.state is BreakerState.HALF_OPEN:
            return True
        if self.state is BreakerState.OPEN and self._clock() >= self.opened_at + self.open_for:
            self.state = BreakerState.HALF_OPEN
            return True
        return False

    def retry_in(self) -> float:
        """Seconds until this instance may be tried again (0 when closed or due)."""
        if self.state is not BreakerState.OPEN:
            return 0.0
        return max(0.0, self.opened_at + self.open_for - self._clock())

    def _open(self) -> None:
        self.state = BreakerState.OPEN
        self.opened_at = self._clock()
        self.failures = 0


def queue_remaining(body: bytes) -> int | None:
    """``exec_info.queue_remaining`` of a ``GET /prompt`` answer (pending + running)."""
    try:
        data = orjson.loads(body)
    except orjson.JSONDecodeError:
        return None
    info = data.get("exec_info") if isinstance(data, dict) else None
    value = info.get("queue_remaining") if isinstance(info, dict) else None
    return value if isinstance(value, int) and value >= 0 else None


@dataclass(frozen=True, slots=True)
class ProbeResult:
    """The outcome of one ``GET /prompt`` (:func:`probe`)."""

    up: bool
    """ComfyUI answered, below 500."""
    seconds: float
    queue_remaining: int | None = None
    """Pending + running, from a 200 answer."""
    failure: str = ""
    """timeout, refused, status, protocol (empty on a 200); the metrics' ``kind`` label."""
    error: str = ""
    """The exception's type name when nothing answered (for the log)."""
    refused: bool = False
    """Nothing listens there (a refused connection, not a TLS failure): eject at once."""


async def probe(
    session: aiohttp.ClientSession, upstream: Upstream, timeout_seconds: float
) -> ProbeResult:
    """One ``GET /prompt``: whether the instance answers, how fast, and its queue size.

    The one probe of an instance: the health checks run it for the breaker and placement and
    publish the result to the metrics; without them (one instance) the metrics run it."""
    started = time.perf_counter()
    try:
        async with session.get(
            upstream.url_for(CHECK_PATH),
            headers={
                hdrs.HOST: upstream.host_header,
                hdrs.ACCEPT: "application/json",
                hdrs.ACCEPT_ENCODING: IDENTITY,
            },
            timeout=aiohttp.ClientTimeout(total=timeout_seconds),
        ) as resp:
            try:
                body = await read_client_answer(resp, limit=PROBE_LIMIT, upstream=upstream.name)
            except UpstreamError:
                body = b""  # it answered (alive); its queue size is unknown
            seconds = time.perf_counter() - started
            if resp.status != 200:
                return ProbeResult(resp.status < 500, seconds, failure="status")
    except (TimeoutError, aiohttp.ClientError, OSError) as exc:
        return _no_answer(exc, time.perf_counter() - started)
    return ProbeResult(True, seconds, queue_remaining=queue_remaining(body))


def _no_answer(exc: BaseException, seconds: float) -> ProbeResult:
    if isinstance(exc, TimeoutError):
        failure = "timeout"
    elif isinstance(exc, aiohttp.ClientConnectorError | ConnectionRefusedError):
        failure = "refused"
    else:
        failure = "protocol"
    refused = isinstance(exc, aiohttp.ClientConnectorError) and not isinstance(
        exc, aiohttp.ClientConnectorCertificateError
    )
    return ProbeResult(False, seconds, failure=failure, error=type(exc).__name__, refused=refused)


ProbeListener = Callable[[str, ProbeResult], None]
"""Told every check's outcome (instance name, result): the metrics' up/latency/queue gauges."""


class HealthChecker:
    """Active checks of every instance (see the module docstring)."""

    def __init__(self, pool: UpstreamPool, settings: HealthSettings) -> None:
        self._pool = pool
        self._settings = settings
        self._listeners: list[ProbeListener] = []
        self._loop = Periodic(
            self._round,
            settings.interval_seconds,
            name="comfygate-health-checks",
            log=log,
            event="upstream_checks_failed",
            fixed_rate=True,
            failures=pool.metrics.task_failures if pool.metrics is not None else None,
        )

    def subscribe(self, listener: ProbeListener) -> None:
        """Publish every check's result to ``listener`` (one probe feeds health and metrics)."""
        self._listeners.append(listener)

    async def check_all(self) -> None:
        """One round: every closed instance, and every open one whose wait is over."""
        due = [i for i in self._pool.instances() if i.breaker.closed or i.breaker.probe_due()]
        await asyncio.gather(*(self.check(i) for i in due))

    async def check(self, instance: Instance) -> bool:
        """``GET /prompt`` on one instance; the outcome goes to its breaker and the listeners."""
        name = instance.upstream.name
        result = await probe(self._pool.session, instance.upstream, self._settings.timeout_seconds)
        if result.error:
            log.info("upstream_check_failed", upstream=name, error=result.error)
        if name not in self._pool.names():
            return result.up  # it left while we asked
        for listener in self._listeners:
            listener(name, result)
        if result.up:
            instance.observe_queue(result.queue_remaining)
            await self._pool.record_success(instance)
        else:
            await self._pool.record_failure(instance, "refused" if result.refused else "check")
        return result.up

    def start(self) -> None:
        self._loop.start()

    async def stop(self) -> None:
        await self._loop.stop()

    async def _round(self) -> None:
        await self._pool.sync_drained()
        await self.check_all()
