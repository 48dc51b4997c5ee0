"""Sending the outbox's messages: signed POSTs to checked, pinned addresses, with retries.

One :class:`Dispatcher` per replica (a supervised task): it claims the messages due now (up
to ``concurrency`` in flight), attempts each, and sleeps until the next due time, the next
``poll_seconds`` (other replicas' enqueues) or a :meth:`wake` (its own), whichever is first.

An attempt: the URL is checked again and resolved (:mod:`.destinations`), the body signed
with the attempt's timestamp (:mod:`.signing`), and POSTed through a connector whose
resolver only knows the checked addresses; redirects are not followed (a 3xx is a failure),
at most ``max_response_bytes`` of the answer are read, the whole attempt is bounded by
``timeout_seconds``. A 2xx answer delivers; anything else is retried after an exponential
back-off with jitter (:class:`Backoff`) until ``retry_period_seconds`` after the first
attempt, then dropped (logged, counted). A destination no longer allowed is dropped at once.
"""

from __future__ import annotations

import asyncio
import contextlib
import random
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Final

import aiohttp
import structlog
from aiohttp import hdrs
from prometheus_client import Counter

from proxy.jobs.metrics import JobMetrics
from proxy.jobs.webhooks import signing
from proxy.jobs.webhooks.destinations import Destinations, PinnedResolver, WebhookRefused
from proxy.jobs.webhooks.outbox import Message, Outbox
from proxy.settings.jobs import WebhookSettings
from proxy.tasks import task_failed

log = structlog.get_logger("comfygate.webhooks")

USER_AGENT: Final = "comfygate-webhooks/1"


@dataclass(frozen=True, slots=True)
class Backoff:
    """Delay before attempt ``n + 1`` after ``n`` failures: ``first * 2**(n-1)``, capped,
    times a random factor in ``[1 - jitter, 1]`` (``rand`` is injectable for tests)."""

    first: float
    cap: float
    jitter: float
    rand: Callable[[], float] = random.random

    def delay(self, failures: int) -> float:
        exponent = min(max(0, failures - 1), 64)  # 2**64 * first is past any cap
        base = min(self.cap, self.first * 2.0**exponent)
        return float(base * (1 - self.jitter * self.rand()))


class Dispatcher:
    def __init__(
        self,
        settings: WebhookSettings,
        outbox: Outbox,
        destinations: Destinations,
        metrics: JobMetrics,
        *,
        backoff: Backoff | None = None,
        clock: Callable[[], float] = time.time,
        failures: Counter | None = None,
    ) -> None:
        self.failures = failures
        self.settings = settings
        self.outbox = outbox
        self.destinations = destinations
        self.metrics = metrics
        self.backoff = backoff or Backoff(
            settings.first_retry_seconds, settings.max_retry_seconds, settings.jitter
        )
        self.clock = clock
        secret = settings.secret.get_secret_value()
        self._key = signing.secret_key(secret) if secret else b""
        self._wake = asyncio.Event()
        self._in_flight: set[asyncio.Task[None]] = set()
        self._closing = False
        self._settled = asyncio.Condition()
        self._depth: int | None = None

    async def wait_settled(self) -> None:
        """Until no attempt is in flight here and the outbox was last seen empty (tests and
        a graceful drain use it; delivery never waits on it)."""
        async with self._settled:
            await self._settled.wait_for(lambda: not self._in_flight and self._depth == 0)

    async def _notify(self) -> None:
        async with self._settled:
            self._settled.notify_all()

    def wake(self) -> None:
        """A message was just enqueued here: look at the outbox now."""
        self._wake.set()

    def close(self) -> None:
        """Stop after the current round. Besides cancelling the task: a cancellation that
        arrives while a Redis command runs can be lost inside the client library, and the
        loop would go on forever (seen with redis-py's asyncio client)."""
        self._closing = True
        self._wake.set()

    async def run(self) -> None:
        """Claim and attempt due messages until cancelled (in-flight attempts are cancelled
        too: their leases run out and another replica, or this one restarted, retries)."""
        try:
            while not self._closing:
                self._wake.clear()
                free = self.settings.concurrency - len(self._in_flight)
                if free > 0:
                    now = self.clock()
                    for message, token in await self.outbox.claim(
                        now, self.settings.lease_seconds, free
                    ):
                        task = asyncio.create_task(self._attempt_logged(message, token))
                        self._in_flight.add(task)
                        task.add_done_callback(self._attempt_done)
                self._depth = await self.outbox.due.depth()
                self.metrics.webhook_outbox.set(self._depth)
                await self._notify()
                await self._pause()
        finally:
            for task in list(self._in_flight):
                task.cancel()
            await asyncio.gather(*self._in_flight, return_exceptions=True)

    def _attempt_done(self, task: asyncio.Task[None]) -> None:
        self._in_flight.discard(task)
        self._wake.set()  # a slot is free

    async def _pause(self) -> None:
        wait = self.settings.poll_seconds
        if len(self._in_flight) < self.settings.concurrency:
            nxt = await self.outbox.due.next_due()
            if nxt is not None:
                wait = min(wait, max(0.0, nxt - self.clock()))
        if wait <= 0:
            await asyncio.sleep(0)  # due now: go round (yield to the attempts first)
            return
        # asyncio.timeout, not wait_for: on Python 3.11 wait_for can swallow the cancellation
        # that stops the dispatcher when an attempt's end sets the event at the same moment.
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(wait):
                await self._wake.wait()

    async def _attempt_logged(self, message: Message, token: str) -> None:
        try:
            await self.attempt(message, token)
        except Exception:  # noqa: BLE001 - the message is retried when its lease ends
            task_failed("jobs_webhook_attempt", self.failures, logger=log, id=message.id)

    async def attempt(self, message: Message, token: str) -> None:
        started = time.monotonic()
        number = message.attempts + 1
        status: int | None = None
        error: str | None = None
        try:
            status = await self._send(message)
        except WebhookRefused as exc:
            # The allowlist changed (or the name now resolves elsewhere): never sent there.
            self.metrics.webhook_attempts.labels("refused").inc()
            log.warning("webhook_refused", id=message.id, job=message.job, reason=exc.message)
            await self.outbox.delivered(message, token)
            return
        except (aiohttp.ClientError, OSError, TimeoutError) as exc:
            error = type(exc).__name__
        seconds = time.monotonic() - started
        self.metrics.webhook_seconds.observe(seconds)
        if status is not None and 200 <= status < 300:
            self.metrics.webhook_attempts.labels("delivered").inc()
            log.info(
                "webhook_delivered",
                id=message.id,
                job=message.job,
                attempt=number,
                status=status,
                ms=round(seconds * 1000, 1),
            )
            await self.outbox.delivered(message, token)
            return
        now = self.clock()
        delay = self.backoff.delay(number)
        if now + delay > message.first_at + self.settings.retry_period_seconds:
            self.metrics.webhook_attempts.labels("dropped").inc()
            log.warning(
                "webhook_dropped", id=message.id, job=message.job, attempts=number, status=status
            )
            await self.outbox.delivered(message, token)
            return
        self.metrics.webhook_attempts.labels("failed").inc()
        log.info(
            "webhook_failed",
            id=message.id,
            job=message.job,
            attempt=number,
            status=status,
            error=error,
            retry_in_seconds=round(delay, 3),
        )
        again = Message(
            message.id, message.job, message.url, message.body, message.first_at, number
        )
        await self.outbox.retry(again, token, now + delay)

    async def _send(self, message: Message) -> int:
        """POST the message once; the receiver's status."""
        destination = await self.destinations.resolve(self.destinations.check_url(message.url))
        body = message.body.encode()
        headers = {
            **signing.headers(self._key, message.id, int(self.clock()), body),
            hdrs.CONTENT_TYPE: "application/json",
            hdrs.USER_AGENT: USER_AGENT,
        }
        connector = aiohttp.TCPConnector(
            resolver=PinnedResolver(destination), use_dns_cache=False, force_close=True, limit=1
        )
        timeout = aiohttp.ClientTimeout(total=self.settings.timeout_seconds)
        async with (
            aiohttp.ClientSession(
                connector=connector, timeout=timeout, trust_env=False, auto_decompress=False
            ) as session,
            session.post(
                destination.url, data=body, headers=headers, allow_redirects=False
            ) as resp,
        ):
            # Bounded: a receiver answering forever does not hold the attempt (or memory).
            await resp.content.read(self.settings.max_response_bytes)
            return resp.status


__all__ = ["Backoff", "Dispatcher"]
