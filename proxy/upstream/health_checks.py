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
it is the cheapest call there is, and its answer feeds placement (the instance's queue length).
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Callable
from enum import IntEnum
from typing import TYPE_CHECKING

import aiohttp
import orjson
import structlog
from aiohttp import hdrs

from proxy.upstream.registry_settings import HealthSettings

if TYPE_CHECKING:
    from proxy.upstream.pool import Instance, UpstreamPool

log = structlog.get_logger("comfygate.upstream.health")

CHECK_PATH = "/prompt"


class BreakerState(IntEnum):
    """Values of the ``comfygate_upstream_state`` gauge."""

    CLOSED = 0
    HALF_OPEN = 1
    OPEN = 2


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


class HealthChecker:
    """Active checks of every instance (see the module docstring)."""

    def __init__(self, pool: UpstreamPool, settings: HealthSettings) -> None:
        self._pool = pool
        self._settings = settings
        self._task: asyncio.Task[None] | None = None

    async def check_all(self) -> None:
        """One round: every closed instance, and every open one whose wait is over."""
        due = [i for i in self._pool.instances() if i.breaker.closed or i.breaker.probe_due()]
        await asyncio.gather(*(self.check(i) for i in due))

    async def check(self, instance: Instance) -> bool:
        """``GET /prompt`` on one instance; the outcome goes to its breaker."""
        upstream = instance.upstream
        refused = False
        try:
            async with self._pool.session.get(
                upstream.url_for(CHECK_PATH),
                headers={hdrs.HOST: upstream.host_header, hdrs.ACCEPT_ENCODING: "identity"},
                timeout=aiohttp.ClientTimeout(total=self._settings.timeout_seconds),
            ) as resp:
                body = await resp.read()
                ok = resp.status < 500
        except (TimeoutError, aiohttp.ClientError, OSError) as exc:
            log.info("upstream_check_failed", upstream=upstream.name, error=type(exc).__name__)
            ok, body = False, b""
            # Refused: nothing listens there any more (ejected at once, like a refused request).
            refused = isinstance(exc, aiohttp.ClientConnectorError) and not isinstance(
                exc, aiohttp.ClientConnectorCertificateError
            )
        if instance.upstream.name not in self._pool.names():
            return ok  # it left while we asked
        if ok:
            instance.observe_queue(queue_remaining(body))
            await self._pool.record_success(instance)
        else:
            await self._pool.record_failure(instance, "refused" if refused else "check")
        return ok

    def start(self) -> None:
        if self._task is None:
            self._task = asyncio.create_task(self._run(), name="comfygate-health-checks")

    async def stop(self) -> None:
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task

    async def _run(self) -> None:
        interval = self._settings.interval_seconds
        next_at = time.monotonic()
        while True:
            next_at += interval
            await asyncio.sleep(max(0.0, next_at - time.monotonic()))
            try:
                await self._pool.sync_drained()
                await self.check_all()
            except Exception:  # a bug here must not stop the checks for good
                log.exception("upstream_checks_failed")
