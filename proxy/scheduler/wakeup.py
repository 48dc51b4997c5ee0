"""Wake-ups across replicas: a feeder hears at once that another replica held a prompt.

Each instance is fed by one replica (the feed lease). A prompt held on another replica would
wait for that feeder's next poll (``poll_interval_ms``); a run ending frees room the other
feeders may now fill. So both are published on a Redis channel (``P:wake``, ``P`` the
scheduler's key prefix: the ``{hash tag}`` keeps it in the queue's slot for a sharded
deployment), and every replica's feeder subscribes and runs a round at once.

Best effort by design: the poll stays the fallback. A failed publish is counted and dropped;
the subscription runs supervised (``proxy.tasks``): a lost connection restarts it with
back-off, and every (re)subscription is followed by a round of its own, so nothing published
while it was away is waited for longer than one poll. Without Redis there is one replica and
the local wake is all there is.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any

import structlog
from prometheus_client import Counter
from redis.exceptions import RedisClusterException, RedisError

from proxy.redis.client import RedisClient
from proxy.scheduler.metrics import SchedulerMetrics
from proxy.scheduler.store import PREFIX
from proxy.tasks import Supervised, Wake

log = structlog.get_logger("comfygate.scheduler")

LISTEN_TIMEOUT_SECONDS = 1.0
"""How long one read of the subscription waits (a bound: the socket timeout would otherwise
end a quiet subscription with an error)."""
CLOSE_TIMEOUT_SECONDS = 1.0
FIRST_RETRY_SECONDS = 0.25
MAX_RETRY_SECONDS = 5.0
"""The longest back-off between two subscription attempts (each failure is logged with its
traceback). When the feeder's own round finds Redis back, :meth:`Wakeups.retry` cuts it
short."""
ERRORS = (RedisError, RedisClusterException, OSError)


def wake_channel(prefix: str = PREFIX) -> str:
    return f"{prefix}:wake"


class Wakeups:
    """Publish and hear wake-ups on ``P:wake`` (module doc). ``on_wake`` is the feeder's
    local wake; a replica ignores its own messages (it woke itself already)."""

    def __init__(
        self,
        client: RedisClient,
        replica: str,
        on_wake: Callable[[], None],
        metrics: SchedulerMetrics,
        *,
        prefix: str = PREFIX,
        failures: Counter | None = None,
    ) -> None:
        self.client = client
        self.replica = replica
        self.channel = wake_channel(prefix)
        self.on_wake = on_wake
        self.metrics = metrics
        self.subscribed = asyncio.Event()
        """Set while Redis has confirmed the subscription (tests wait for it)."""
        self.down = asyncio.Event()
        """Set while it has not: the poll alone feeds (tests wait for it)."""
        self.down.set()
        self._retry = Wake()
        self._confirmed = False
        # Supervised for what is not a Redis failure (a bug): logged with its traceback and
        # restarted. Redis failures are expected and retried in `_listen` itself.
        self._task = Supervised(
            self._listen, name="scheduler-wakeups", failures=failures, logger=log
        )

    def start(self) -> None:
        self._task.start()

    async def stop(self) -> None:
        """Ends the subscription task (``proxy.tasks.cancel_and_wait``) and its connection."""
        await self._task.stop()
        self._lost()

    async def publish(self) -> None:
        try:
            await self.client.publish(self.channel, self.replica)
        except ERRORS as exc:
            self.metrics.unavailable.labels("wake").inc()
            log.warning("scheduler_wake_unpublished", error=type(exc).__name__)

    def retry(self) -> None:
        """Redis answers again (the feeder's round succeeded after failing): subscribe now
        rather than at the end of the back-off."""
        if not self.subscribed.is_set():
            self._retry.set()

    def _lost(self) -> None:
        self.subscribed.clear()
        self.down.set()

    async def _listen(self) -> None:
        """Subscribe, and again with back-off (0.25 s doubling to :data:`MAX_RETRY_SECONDS`,
        from the start again once a subscription was confirmed) whenever Redis fails it. A
        failure is a warning, not a traceback: during an outage every replica would render
        one per attempt."""
        delay = FIRST_RETRY_SECONDS
        while True:
            try:
                await self._subscription()
            except ERRORS as exc:
                self.metrics.unavailable.labels("wake").inc()
                if self._confirmed:  # it had worked: a new outage starts over
                    delay = FIRST_RETRY_SECONDS
                    self._confirmed = False
                log.warning(
                    "scheduler_wakeups_lost",
                    error=type(exc).__name__,
                    detail=str(exc)[:200],
                    retry_in_seconds=delay,
                )
            await self._retry.pause(delay)  # the poll covers the gap
            delay = min(delay * 2, MAX_RETRY_SECONDS)

    async def _subscription(self) -> None:
        pubsub = self.client.pubsub()
        try:
            await pubsub.subscribe(self.channel)
            while True:
                message = await pubsub.get_message(timeout=LISTEN_TIMEOUT_SECONDS)
                if message is None:
                    continue
                kind = message.get("type")
                if kind == "subscribe":
                    # Confirmed, first or again: redis-py re-subscribes by itself after a
                    # short drop (its retries). Either way wake-ups published meanwhile were
                    # missed: a round of our own covers them.
                    self.subscribed.set()
                    self.down.clear()
                    self._confirmed = True
                    log.info("scheduler_wakeups_subscribed", channel=self.channel)
                    self.on_wake()
                    continue
                if kind != "message":
                    continue
                sender = message.get("data")
                if isinstance(sender, bytes):
                    sender = sender.decode("utf-8", "replace")
                if sender != self.replica:
                    self.on_wake()
        finally:
            self._lost()
            await _close(pubsub)


async def _close(pubsub: Any) -> None:
    """Bounded: a subscription cancelled mid-read must not hold up the feeder's stop."""
    try:
        async with asyncio.timeout(CLOSE_TIMEOUT_SECONDS):  # not wait_for: proxy.tasks.wait_event
            await pubsub.aclose()
    except (*ERRORS, TimeoutError):
        log.debug("scheduler_wake_close_failed")


__all__ = ["Wakeups", "wake_channel"]
