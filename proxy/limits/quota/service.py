"""Queue quotas on the request path: reserve a slot for a submission, refuse over quota, and
follow the submission's answer (see :mod:`proxy.limits.quota.model` for the design).

:class:`QueueQuota` lives under ``app[QUEUE_QUOTA]`` (created by :func:`queue_quota_context`,
which also runs the :class:`~proxy.limits.quota.reconciler.QuotaReconciler`). Where it is
called:

- ``POST /prompt`` with isolation on: ``isolation.submit_guard`` reserves once it has decided
  the prompt id (for admins too; their quota is 0 = unlimited by default, so nothing is
  counted unless ``upstream_max_pending`` is set).
- ``POST /prompt`` with isolation off: :class:`~proxy.limits.quota.guard.QueueQuotaGuard`
  reads the body itself and, when the client sent no ``prompt_id``, adds one (the id is what
  the end of the prompt is recognised by).

``rate_limits.enabled = false`` switches quotas off with the rate limits. Redis failing: the
``submit`` class's fail mode decides (default closed: 503 ``queue_quota_unavailable``; open:
the prompt goes ahead uncounted), with a log line and ``comfygate_redis_errors_total``.
"""

from __future__ import annotations

import asyncio
import math
import time
from collections.abc import Awaitable, Callable, Collection
from typing import TYPE_CHECKING, Final, Literal, TypeVar

import redis.asyncio as redis
import structlog
from aiohttp import web

from proxy.errors import BadRequest, RateLimited, ServiceUnavailable
from proxy.limits.guard import ip_identity
from proxy.limits.quota.model import QuotaStore, Reservation, queue_quota_for
from proxy.observability.metrics import Metrics
from proxy.principal import Principal
from proxy.settings import Settings
from proxy.state import RequestContext

if TYPE_CHECKING:
    from proxy.limits.quota.reconciler import QuotaReconciler

log = structlog.get_logger("comfygate.quota")

ResponseRewrite = Callable[[int, bytes], Awaitable[bytes]]
Failure = Literal["timeout", "connection", "error", "breaker_open"]
T = TypeVar("T")

QUOTA_TIMEOUT_SECONDS: Final = 1.0
"""Bound on one quota operation in Redis. Looser than the per-request rate-limit budget: it is
paid once per submission (GPU work), not on every request; a dead Redis (the rate limiter's
breaker open) skips it altogether."""
REDIS_OP: Final = "queue_quota"
MAX_PROMPT_ID_LENGTH: Final = 256


class QueueFull(RateLimited):
    """429 ``queue_full``: the user's quota or the upstream's cap is reached."""

    error_type = "queue_full"


class QuotaUnavailable(ServiceUnavailable):
    """503: the quota cannot be checked (Redis failing) and ``submit`` fails closed."""

    error_type = "queue_quota_unavailable"


class StoreFailed(Exception):
    """A quota operation could not reach Redis (or the rate limiter's breaker is open)."""

    def __init__(self, kind: Failure) -> None:
        super().__init__(kind)
        self.kind = kind


class QueueQuota:
    """Quota decisions for submissions, and releases (see the module doc)."""

    def __init__(
        self,
        settings: Settings,
        store: QuotaStore,
        metrics: Metrics,
        *,
        degraded: Callable[[], bool] = lambda: False,
    ) -> None:
        self.settings = settings.rate_limits
        self.roles = settings.roles
        self.store = store
        self.enabled = settings.rate_limits.enabled
        self.upstream_cap = settings.rate_limits.upstream_max_pending
        self.retry_after = max(1, math.ceil(settings.rate_limits.quota_poll_seconds))
        """Seconds a refused client is told to wait: the reconciler notices ends that fast."""
        self._degraded = degraded
        self.metrics = metrics
        self._duration = metrics.redis_duration.labels(REDIS_OP)
        self._refusals = {
            r: metrics.quota_refusals.labels(r) for r in ("user_quota", "upstream_cap")
        }
        self.reconciler: QuotaReconciler | None = None
        """This process's reconciler (set by :func:`queue_quota_context`)."""
        self._to_accept: list[str] = []
        """Prompts ComfyUI accepted whose mark is not sent yet (see :meth:`accept_later`)."""
        self._accepting: asyncio.Task[None] | None = None

    # -- who is limited how ------------------------------------------------------------
    def limit_for(self, principal: Principal) -> int:
        """The principal's quota; 0 = unlimited."""
        return queue_quota_for(principal, self.settings, self.roles)

    def tracks(self, principal: Principal) -> bool:
        """Whether the principal's prompts are counted at all (a quota, or the upstream cap)."""
        return self.enabled and (self.upstream_cap > 0 or self.limit_for(principal) > 0)

    @staticmethod
    def owner_of(principal: Principal, ctx: RequestContext) -> str:
        """Whose quota a submission counts against: the user (every token and session of one
        subject share it); with auth off (the anonymous principal), the client address."""
        if principal.source == "anonymous":
            return ip_identity(ctx.client_ip)
        return f"u:{principal.comfy_user}"

    # -- request path ------------------------------------------------------------------
    async def reserve(
        self, ctx: RequestContext, principal: Principal, prompt_id: str, upstream: str
    ) -> bool:
        """Count ``prompt_id`` against the principal's quota before it is forwarded, and follow
        ComfyUI's answer: accepted (200) marks it reconcilable, a refusal releases it. False
        when nothing is counted (unlimited, quotas off, or Redis failing with fail-open).

        Raises:
            QueueFull: 429, over the quota or the upstream's cap.
            BadRequest: 400 ``prompt_id_taken``, the id is counted already.
            QuotaUnavailable: 503, Redis is failing and ``submit`` fails closed.
        """
        if not self.tracks(principal):
            return False
        if len(prompt_id) > MAX_PROMPT_ID_LENGTH:
            raise BadRequest(
                f"prompt_id is longer than {MAX_PROMPT_ID_LENGTH} characters",
                error_type="invalid_prompt_id",
            )
        limit = self.limit_for(principal)
        owner = self.owner_of(principal, ctx)
        try:
            reservation = await self.bounded(
                self.store.reserve(
                    prompt_id, owner, upstream, limit=limit, upstream_cap=self.upstream_cap
                ),
                "reserve",
            )
            # The user's prompts may have ended since the last poll (an API client without a
            # socket, one prompt at a time): the queues are read once more before refusing.
            if (
                reservation.outcome == "user_quota"
                and self.reconciler is not None
                and await self.reconciler.refresh()
            ):
                reservation = await self.bounded(
                    self.store.reserve(
                        prompt_id, owner, upstream, limit=limit, upstream_cap=self.upstream_cap
                    ),
                    "reserve",
                )
        except StoreFailed as exc:
            return self._failed(exc.kind)
        if reservation.outcome == "reserved":
            ctx.response_filters.append(self._follow_answer(prompt_id))
            return True
        if reservation.outcome == "duplicate":
            raise BadRequest(
                "prompt_id is already in use; omit it to get a new one",
                error_type="prompt_id_taken",
            )
        raise self._refusal(reservation, owner=owner, limit=limit, upstream=upstream)

    def _refusal(
        self, reservation: Reservation, *, owner: str, limit: int, upstream: str
    ) -> QueueFull:
        reason = reservation.outcome
        self._refusals[reason].inc()
        log.info(
            "queue_quota_refused",
            reason=reason,
            owner=owner,
            in_use=reservation.in_use,
            limit=limit if reason == "user_quota" else self.upstream_cap,
            upstream=upstream,
        )
        n = reservation.in_use
        if reason == "user_quota":
            message = (
                f"queue_full: you have {n} unfinished prompt{'s' if n != 1 else ''}, the limit "
                f"is {limit}; queue more when one has finished"
            )
        else:
            message = (
                f"queue_full: the GPU queue is full ({n} prompts waiting); "
                f"try again in {self.retry_after} s"
            )
        return QueueFull(message, retry_after=self.retry_after)

    def _failed(self, kind: Failure) -> bool:
        if self.settings.fail_mode("submit") == "open":
            log.warning("queue_quota_unavailable", error=kind, fail_mode="open")
            return False  # availability over exactness: this prompt goes uncounted
        log.warning("queue_quota_unavailable", error=kind, fail_mode="closed")
        # SECURITY: fail closed - without the count one script could fill the GPU queue.
        raise QuotaUnavailable(
            "the queue quota cannot be checked right now; please retry shortly",
            headers={"Retry-After": str(self.retry_after)},
        )

    def _follow_answer(self, prompt_id: str) -> ResponseRewrite:
        async def rewrite(status: int, body: bytes) -> bytes:
            if status == 200:
                self.accept_later(prompt_id)
            else:
                await self.release([prompt_id], reason="refused")  # not queued: not counted
            return body

        return rewrite

    # -- ends --------------------------------------------------------------------------
    def accept_later(self, prompt_id: str) -> None:
        """Mark ``prompt_id`` accepted in the background, batched with the other submissions
        answered meanwhile: the answer is not held for a Redis round trip, and N concurrent
        answers cost one script call, not N.

        Safe because the mark only makes an entry *reconcilable*: until it lands, a reconciler
        skips the entry (this process's first waits for it: :meth:`settle`; another replica's
        checks it one poll later), and a mark that never lands (Redis failing) is covered by the
        grace rule, as an awaited mark that failed always was. An entry released meanwhile (its
        end seen on a socket) is not recreated: the script marks existing records only.
        """
        self._to_accept.append(prompt_id)
        if self._accepting is None:
            self._accepting = asyncio.get_running_loop().create_task(self._accept_pending())

    async def _accept_pending(self) -> None:
        try:
            while batch := self._to_accept:
                self._to_accept = []
                await self._accept_batch(batch)
        finally:
            self._accepting = None

    async def _accept_batch(self, prompt_ids: list[str]) -> None:
        many = getattr(self.store, "accepted_many", None)
        try:
            if many is not None:
                await self.bounded(many(prompt_ids), "accept")
            else:  # the memory store: no round trips to save
                for prompt_id in prompt_ids:
                    await self.bounded(self.store.accepted(prompt_id), "accept")
        except StoreFailed as exc:
            log.warning("queue_quota_accept_failed", error=exc.kind, count=len(prompt_ids))

    async def settle(self) -> None:
        """Until every mark :meth:`accept_later` scheduled in this process is sent (or failed):
        the reconciler's snapshot and shutdown wait for it."""
        while (task := self._accepting) is not None:
            await asyncio.shield(task)

    async def accepted(self, prompt_id: str) -> None:
        """ComfyUI queued it. A failure only delays reconciliation (the grace covers it)."""
        try:
            await self.bounded(self.store.accepted(prompt_id), "accept")
        except StoreFailed as exc:
            log.warning("queue_quota_accept_failed", error=exc.kind)

    async def release(self, prompt_ids: Collection[str], *, reason: str) -> int:
        """Stop counting ``prompt_ids`` (idempotent); how many were counted. Failures are
        logged, not raised: the reconciler or the expiry catches up."""
        if not prompt_ids:
            return 0
        try:
            released = await self.bounded(self.store.release(prompt_ids), "release")
        except StoreFailed as exc:
            log.warning("queue_quota_release_failed", error=exc.kind, reason=reason)
            return 0
        if released:
            log.debug("queue_quota_released", count=released, reason=reason)
        return released

    async def bounded(self, operation: Awaitable[T], what: str) -> T:
        """One store operation, bounded and measured.

        Raises:
            StoreFailed: Redis failed, was too slow, or is known to be down (a memory store
                never fails).
        """
        if self._degraded():
            if asyncio.iscoroutine(operation):
                operation.close()  # never awaited: Redis is known to be down
            self.metrics.redis_errors.labels(REDIS_OP, "breaker_open").inc()
            raise StoreFailed("breaker_open")
        started = time.perf_counter()
        kind: Failure
        try:
            async with asyncio.timeout(QUOTA_TIMEOUT_SECONDS):
                result = await operation
        except redis.TimeoutError:
            kind = "timeout"
        except TimeoutError:
            kind = "timeout"
        except (redis.ConnectionError, OSError):
            kind = "connection"
        except redis.RedisError:
            kind = "error"
        else:
            self._duration.observe(time.perf_counter() - started)
            return result
        self.metrics.redis_errors.labels(REDIS_OP, kind).inc()
        log.debug("queue_quota_redis_failed", operation=what, error=kind)
        raise StoreFailed(kind)


QUEUE_QUOTA = web.AppKey("comfygate.queue_quota", QueueQuota)
"""Per-user queue quotas (in Redis when configured, else in memory) and their reconciler."""


__all__ = [
    "QUEUE_QUOTA",
    "QueueFull",
    "QueueQuota",
    "QuotaUnavailable",
    "StoreFailed",
]
