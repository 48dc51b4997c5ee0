"""Where the GCRA state lives: Redis (shared by every proxy replica) or this process's memory.

Both answer ``check(key, emission, burst) -> Decision`` with the same arithmetic
(:mod:`proxy.limits.gcra`). The Redis limiter runs one ``EVALSHA`` per check (the checks that
arrive together share one round trip, :mod:`proxy.redis.coalesce`), each bounded by
``rate_limits.redis_budget_ms`` (:mod:`proxy.limits.deadline`: a busy proxy is not taken for a
slow Redis), behind a :class:`~proxy.redis.breaker.CircuitBreaker`. Any failure surfaces as
:class:`LimiterUnavailable` and the caller applies the class's fail mode.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Final, Literal, Protocol

import redis.asyncio as redis
import structlog
from redis.exceptions import MaxConnectionsError

from proxy.limits.deadline import Deadline
from proxy.limits.gcra import MICROS, Decision, GcraPipe, GcraScript, gcra
from proxy.observability.metrics import Metrics
from proxy.redis.breaker import BreakerState, CircuitBreaker
from proxy.redis.client import RedisClient
from proxy.settings.limits import RateLimitSettings

log = structlog.get_logger("comfygate.ratelimit")

FailureKind = Literal["timeout", "connection", "error", "breaker_open", "pool_exhausted"]
REDIS_OP: Final = "ratelimit"
"""The ``op`` label of this module's Redis metrics."""


class LimiterUnavailable(Exception):
    """The limit could not be checked; ``retry_in`` is when it may work again (seconds)."""

    def __init__(self, kind: FailureKind, retry_in: float) -> None:
        super().__init__(kind)
        self.kind = kind
        self.retry_in = retry_in


class Limiter(Protocol):
    """A GCRA store. ``emission`` is the interval between requests in microseconds."""

    @property
    def degraded(self) -> bool:
        """True while checks cannot be made as configured (Redis failing)."""
        ...

    async def check(self, key: str, emission: int, burst: int) -> Decision: ...


class MemoryLimiter:
    """GCRA in process memory: exact for one process, the default without Redis.

    Several processes (or replicas) each keep their own allowance, so each admits the full
    limit: configure ``redis.url`` to share it. ``clock`` returns seconds (injectable for tests).
    """

    degraded = False

    def __init__(
        self, clock: Callable[[], float] = time.monotonic, *, sweep_above: int = 100_000
    ) -> None:
        self._clock = clock
        self._tats: dict[str, int] = {}
        self._sweep_above = sweep_above
        self._next_sweep = sweep_above

    async def check(self, key: str, emission: int, burst: int) -> Decision:
        now = int(self._clock() * MICROS)
        new_tat, decision = gcra(self._tats.get(key), now, emission, burst)
        if new_tat is not None:
            self._tats[key] = new_tat
            if len(self._tats) > self._next_sweep:
                self._sweep(now)
        return decision

    def _sweep(self, now: int) -> None:
        # A TAT in the past means a full allowance, the same as no entry: forget it. When most
        # keys are live, the next sweep waits until the table has doubled (amortised O(1)).
        self._tats = {k: tat for k, tat in self._tats.items() if tat > now}
        self._next_sweep = max(self._sweep_above, 2 * len(self._tats))


@dataclass(slots=True)
class _Queued:
    key: str
    emission: int
    burst: int
    future: asyncio.Future[tuple[int, Decision]]
    queued_at: float
    want: int = 1
    """Tokens asked for at once (a lease, :mod:`proxy.limits.lease`)."""


def _fail(batch: list[_Queued], error: LimiterUnavailable) -> None:
    for queued in batch:
        if not queued.future.done():  # done: its caller was cancelled
            queued.future.set_exception(LimiterUnavailable(error.kind, error.retry_in))


class RedisLimiter:
    """GCRA in Redis: one ``EVALSHA`` per check on one key, time from Redis ``TIME``.

    Standalone or Sentinel-managed Redis: the checks that arrive together are sent as one
    pipeline on the limiter's own connection (:mod:`proxy.redis.coalesce`), one batch at a
    time; every check still waits at most ``redis_budget_ms`` from its arrival. Redis Cluster:
    one ``EVALSHA`` per check through the cluster client (keys live on different nodes).
    """

    def __init__(
        self,
        client: RedisClient,
        settings: RateLimitSettings,
        metrics: Metrics,
        *,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.script = GcraScript(client)
        self._pipe = GcraPipe(client.connection_pool) if isinstance(client, redis.Redis) else None
        self._queue: list[_Queued] = []
        self._busy = False
        """A batch is in flight (sent by a caller or by the pump)."""
        self._pump: asyncio.Task[None] | None = None
        self._budget = settings.redis_budget_ms / 1000
        self._duration = metrics.redis_duration.labels(REDIS_OP)
        self._errors = {
            kind: metrics.redis_errors.labels(REDIS_OP, kind)
            for kind in ("timeout", "connection", "error", "breaker_open", "pool_exhausted")
        }
        self._state_gauge = metrics.redis_breaker_state
        self._state_gauge.set(BreakerState.CLOSED)
        self.breaker = CircuitBreaker(
            settings.breaker_failures,
            settings.breaker_open_seconds,
            clock=clock,
            on_change=self._breaker_changed,
        )

    @property
    def degraded(self) -> bool:
        return self.breaker.state is not BreakerState.CLOSED

    @property
    def leases(self) -> bool:
        """Several tokens can be granted at once (:meth:`grant`): standalone or Sentinel Redis,
        whose checks go through the limiter's pipe; Redis Cluster checks one at a time."""
        return self._pipe is not None

    async def check(self, key: str, emission: int, burst: int) -> Decision:
        """One GCRA check in Redis.

        Raises:
            LimiterUnavailable: Redis failed or was too slow, or the breaker is open.
        """
        return (await self.grant(key, emission, burst, 1))[1]

    async def grant(self, key: str, emission: int, burst: int, want: int) -> tuple[int, Decision]:
        """One GCRA check taking up to ``want`` tokens (:func:`~proxy.limits.gcra.gcra_grant`):
        the tokens granted (0: refused) and the decision. Without :attr:`leases`, one token.

        Raises:
            LimiterUnavailable: Redis failed or was too slow, or the breaker is open.
        """
        breaker = self.breaker
        if not breaker.allow():
            self._errors["breaker_open"].inc()
            raise LimiterUnavailable("breaker_open", breaker.retry_in())
        pipe = self._pipe
        if pipe is None:
            decision = await self._check_one(key, emission, burst)
            return int(decision.allowed), decision
        loop = asyncio.get_running_loop()
        queued = _Queued(key, emission, burst, loop.create_future(), loop.time(), want)
        self._queue.append(queued)
        if self._busy:
            # A batch is in flight: this check goes in the next one. A cancelled caller leaves
            # it there (the request was made).
            return await queued.future
        # Idle: this task sends the batch itself (no task hop when requests come one by one).
        # Checks that arrive meanwhile are sent by a pump task once it is done.
        self._busy = True
        try:
            await self._run_batch(pipe)
        except BaseException:
            if not queued.future.cancelled():
                queued.future.exception()  # this caller is going away: mark it retrieved
            raise
        finally:
            if self._queue:
                self._pump = loop.create_task(self._run_batches(pipe))
            else:
                self._busy = False
        return queued.future.result()

    async def warm_up(self) -> None:
        """Connect and load the script before the first request (startup, best effort)."""
        if self._pipe is not None:
            await self._pipe.load()
        else:
            await self.script.load()

    async def close(self) -> None:
        """Stop the batch pump and drop the limiter's connection (app cleanup)."""
        if self._pump is not None:
            self._pump.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._pump
        if self._pipe is not None:
            await self._pipe.close()

    async def _run_batches(self, pipe: GcraPipe) -> None:
        """The pump: while checks are queued, send them all as one batch, then the next."""
        try:
            while self._queue:
                await self._run_batch(pipe)
        finally:
            self._pump = None
            self._busy = False

    async def _run_batch(self, pipe: GcraPipe) -> None:
        """Every queued check in one round trip; each future gets its decision or the error."""
        batch, self._queue = self._queue, []
        if self.breaker.state is BreakerState.OPEN:  # a previous batch has just opened it
            self._errors["breaker_open"].inc()
            _fail(batch, LimiterUnavailable("breaker_open", self.breaker.retry_in()))
            return
        started = time.perf_counter()
        kind: FailureKind
        # The oldest check's deadline bounds the batch: nobody waits past the budget...
        deadline = batch[0].queued_at + self._budget
        try:
            if not pipe.connected:
                # ...except for a (re)connection, bounded by the connect timeout instead; the
                # exchange then gets a whole budget.
                await pipe.connect()
                deadline = asyncio.get_running_loop().time() + self._budget
            async with Deadline(deadline):
                decisions = await pipe.grants([(q.key, q.emission, q.burst, q.want) for q in batch])
        except redis.TimeoutError:
            kind = "timeout"
        except TimeoutError:
            kind = "timeout"
        except (redis.ConnectionError, OSError):
            kind = "connection"
        except redis.RedisError:
            kind = "error"
        except BaseException:  # cancelled (the sending client went away, or shutdown)
            self.breaker.abandoned()
            _fail(batch, LimiterUnavailable("error", 0.0))
            raise
        else:
            self._duration.observe(time.perf_counter() - started)
            self.breaker.succeeded()
            for queued, decision in zip(batch, decisions, strict=True):
                if not queued.future.done():
                    queued.future.set_result(decision)
            return
        _fail(batch, self._failed(kind))

    async def _check_one(self, key: str, emission: int, burst: int) -> Decision:
        """One ``EVALSHA`` through the client (Redis Cluster)."""
        started = time.perf_counter()
        kind: FailureKind
        try:
            async with Deadline(asyncio.get_running_loop().time() + self._budget):
                decision = await self.script.run(key, emission, burst)
        except MaxConnectionsError:
            # This process is out of pooled connections (a load spike): Redis itself is fine,
            # so the breaker must not open and fail every check for breaker_open_seconds.
            self.breaker.abandoned()
            self._errors["pool_exhausted"].inc()
            raise LimiterUnavailable("pool_exhausted", 0.0) from None
        except redis.TimeoutError:
            kind = "timeout"
        except TimeoutError:  # the budget (before OSError: TimeoutError is one)
            kind = "timeout"
        except (redis.ConnectionError, OSError):
            kind = "connection"
        except redis.RedisError:
            kind = "error"
        except BaseException:
            self.breaker.abandoned()  # cancelled: neither a success nor Redis's fault
            raise
        else:
            self._duration.observe(time.perf_counter() - started)
            self.breaker.succeeded()
            return decision
        raise self._failed(kind)

    def _failed(self, kind: FailureKind) -> LimiterUnavailable:
        """Count one failed round trip; the error each waiting check gets."""
        self._errors[kind].inc()
        self.breaker.failed()
        if self.breaker.consecutive_failures == 1:  # the first of a streak; then transitions
            log.warning("ratelimit_redis_failed", error=kind, budget_ms=self._budget * 1000)
        return LimiterUnavailable(kind, self.breaker.retry_in())

    def _breaker_changed(self, old: BreakerState, new: BreakerState) -> None:
        self._state_gauge.set(new)
        event = {
            BreakerState.OPEN: "ratelimit_breaker_open",
            BreakerState.HALF_OPEN: "ratelimit_breaker_half_open",
            BreakerState.CLOSED: "ratelimit_breaker_closed",
        }[new]
        fields = {"previous": old.name.lower(), "failures": self.breaker.consecutive_failures}
        if new is BreakerState.OPEN:
            log.warning(event, open_seconds=self.breaker.open_seconds, **fields)
        else:
            log.info(event, **fields)


def warn_if_process_local(*, redis_configured: bool, enabled: bool, workers: int) -> bool:
    """Startup warning: without Redis every process keeps its own allowance, so N worker
    processes admit N times the configured limits. Returns whether it warned. Called by
    ``comfygate serve --workers N`` (and due from any other multi-process launcher)."""
    if redis_configured or not enabled or workers <= 1:
        return False
    log.warning(
        "ratelimit_not_shared",
        workers=workers,
        detail="rate limits are kept in each process's memory: with several workers each "
        "admits the full limit; set redis.url to share them",
    )
    return True


__all__ = [
    "REDIS_OP",
    "FailureKind",
    "Limiter",
    "LimiterUnavailable",
    "MemoryLimiter",
    "RedisLimiter",
    "warn_if_process_local",
]
