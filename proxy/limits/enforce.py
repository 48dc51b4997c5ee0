"""Rate limits as the request path sees them: which limit applies, spending it, and what a
refusal or a Redis outage looks like.

:class:`RateLimits` lives under ``app[RATE_LIMITS]`` (created by :func:`rate_limits_context`
once Redis is connected). The guard (:mod:`proxy.limits.guard`) and the login page call
:meth:`RateLimits.spend`; ``/readyz`` reads :attr:`RateLimits.degraded`.

Per class, a principal's limit is the most generous over its roles: a role's own
``rate_limits.<class>``, else ``[rate_limits.default]``; ``unlimited`` wins, then the higher
long-run rate, then the larger burst. An unlimited class never touches Redis.
"""

from __future__ import annotations

import asyncio
import math
from collections.abc import AsyncIterator, Iterable, Mapping
from dataclasses import dataclass
from typing import Final

import structlog
from aiohttp import web
from prometheus_client import Counter

from proxy.errors import RateLimited, ServiceUnavailable
from proxy.limits.gcra import emission_micros, whole_seconds
from proxy.limits.headers import Headers, LimitHeaders
from proxy.limits.lease import TokenLeases, lease_size
from proxy.limits.limiter import (
    Limiter,
    LimiterUnavailable,
    MemoryLimiter,
    RedisLimiter,
)
from proxy.observability.metrics import METRICS, Metrics
from proxy.redis.client import REDIS
from proxy.settings import SETTINGS, Settings
from proxy.settings.auth import RoleSettings
from proxy.settings.limits import ROUTE_CLASSES, Limit, RateLimitSettings, RouteClass

log = structlog.get_logger("comfygate.ratelimit")

KEY_PREFIX: Final = "comfygate:rl:"
OUTCOMES: Final = ("allowed", "limited", "failed_open", "failed_closed", "unlimited")
MAX_CACHED_ROLE_SETS: Final = 1024
STARTUP_TIMEOUT_SECONDS: Final = 2.0

_REFUSALS: Final[dict[RouteClass, str]] = {
    "submit": "Too many prompts queued in a short time",
    "read": "Too many requests",
    "view": "Too many image and file requests",
    "upload": "Too many uploads in a short time",
    "ws_connect": "Too many WebSocket connections opened in a short time",
    "login": "Too many sign-in attempts",
    "static": "Too many requests for the interface's files",
}


def limit_key(route_class: RouteClass, identity: str) -> str:
    """The Redis key of one allowance. The hash tag (``{...}``) covers class and identity, so the
    key has its own cluster slot; ``identity`` never contains braces (see callers)."""
    return f"{KEY_PREFIX}{{{route_class}:{identity}}}"


@dataclass(frozen=True, slots=True)
class ClassLimit:
    """One class's resolved limit, with what a check needs precomputed."""

    route_class: RouteClass
    limit: Limit
    unlimited: bool
    emission: int
    """GCRA's ``T`` in microseconds (0 when unlimited)."""
    headers: LimitHeaders
    lease: int = 0
    """Most tokens one lease may take (:mod:`proxy.limits.lease`; 0: every request checks)."""


def most_generous(limits: Iterable[Limit]) -> Limit:
    """Unlimited first, then the higher long-run rate, then the larger burst."""
    return max(limits, key=_generosity)


def _generosity(limit: Limit) -> tuple[bool, float, int]:
    rate = limit.count / limit.period_seconds if limit.count else 0.0
    return limit.unlimited, rate, limit.burst


class RateLimits:
    """Limits per principal and class, spent against a :class:`Limiter`."""

    def __init__(
        self,
        settings: RateLimitSettings,
        roles: Mapping[str, RoleSettings],
        limiter: Limiter,
        metrics: Metrics,
    ) -> None:
        self.settings = settings
        self.enabled = settings.enabled
        self.limiter = limiter
        self._roles = roles
        self._leases = (
            TokenLeases(limiter, settings.lease_seconds)
            if isinstance(limiter, RedisLimiter) and limiter.leases and settings.lease_tokens >= 2
            else None
        )
        self._resolved: dict[tuple[frozenset[str], RouteClass], ClassLimit] = {}
        self._decisions: dict[tuple[RouteClass, str], Counter] = {
            (c, o): metrics.ratelimit_decisions.labels(c, o)
            for c in ROUTE_CLASSES
            for o in OUTCOMES
        }

    @property
    def degraded(self) -> bool:
        """Redis is failing (the breaker is not closed): limits follow their fail modes."""
        return self.limiter.degraded

    def limit_for(self, roles: frozenset[str], route_class: RouteClass) -> ClassLimit:
        """The most generous limit of ``route_class`` over ``roles`` (cached per role set)."""
        cached = self._resolved.get((roles, route_class))
        if cached is not None:
            return cached
        default = self.settings.default[route_class]
        known = [self._roles[r] for r in sorted(roles) if r in self._roles]
        limit = most_generous([r.rate_limits.get(route_class, default) for r in known] or [default])
        resolved = ClassLimit(
            route_class,
            limit,
            limit.unlimited,
            0 if limit.unlimited else emission_micros(limit.emission_seconds),
            LimitHeaders.build(
                route_class,
                limit,
                ietf=self.settings.ietf_headers,
                legacy=self.settings.legacy_headers,
            ),
            # Only classes that fail open lease: a fail-closed class asks Redis every time.
            0
            if limit.unlimited or self.settings.fail_mode(route_class) == "closed"
            else lease_size(
                limit.burst,
                emission_micros(limit.emission_seconds),
                self.settings.lease_tokens,
                self.settings.lease_seconds,
            ),
        )
        if len(self._resolved) >= MAX_CACHED_ROLE_SETS:  # role sets come from tokens: bounded
            self._resolved.clear()
        self._resolved[(roles, route_class)] = resolved
        return resolved

    def count(self, route_class: RouteClass, outcome: str) -> None:
        self._decisions[(route_class, outcome)].inc()

    async def spend(self, limit: ClassLimit, identity: str, headers: Headers) -> None:
        """Spend one request of ``identity``'s allowance; on success the rate-limit headers are
        appended to ``headers`` (the response's).

        Raises:
            RateLimited: 429, over the limit (with the headers and ``Retry-After``).
            ServiceUnavailable: 503 ``rate_limit_unavailable``: Redis is failing and the class
                fails closed.
        """
        cls = limit.route_class
        if limit.unlimited:
            self.count(cls, "unlimited")
            return
        try:
            if limit.lease and self._leases is not None:
                decision = await self._leases.check(
                    limit_key(cls, identity), limit.emission, limit.limit.burst, limit.lease
                )
            else:
                decision = await self.limiter.check(
                    limit_key(cls, identity), limit.emission, limit.limit.burst
                )
        except LimiterUnavailable as exc:
            if self.settings.fail_mode(cls) == "open":
                # Availability over exactness for cheap classes: the request goes ahead
                # uncounted (and without headers: there is nothing true to say).
                self.count(cls, "failed_open")
                return
            self.count(cls, "failed_closed")
            # SECURITY: fail closed - without the limiter a script could flood the GPU queue or
            # brute-force the login.
            raise ServiceUnavailable(
                "rate limiting is temporarily unavailable; please retry shortly",
                error_type="rate_limit_unavailable",
                headers={"Retry-After": str(max(1, math.ceil(exc.retry_in)))},
            ) from None
        headers.extend(limit.headers.headers(decision))
        if decision.allowed:
            self.count(cls, "allowed")
            return
        self.count(cls, "limited")
        wait = max(1, whole_seconds(decision.retry_after))
        # Said in words too: many clients show the message and never read Retry-After.
        raise RateLimited(
            f"{_REFUSALS[cls]}: limit {limit.limit.rate} (burst {limit.limit.burst}). "
            f"Try again in {in_words(wait)}.",
            retry_after=wait,
        )


def in_words(seconds: int) -> str:
    """A wait as a person would say it: ``1 second``, ``90 seconds``, ``2 minutes 30 seconds``,
    ``1 hour 5 minutes`` (under two minutes in seconds: a client retrying soon wants them)."""

    def unit(count: int, name: str) -> str:
        return f"{count} {name}{'s' if count != 1 else ''}"

    if seconds < 120:
        return unit(seconds, "second")
    if seconds < 3600:
        minutes, rest = divmod(seconds, 60)
        return unit(minutes, "minute") + (f" {unit(rest, 'second')}" if rest else "")
    hours, rest = divmod(seconds, 3600)
    minutes = math.ceil(rest / 60)
    if minutes == 60:
        hours, minutes = hours + 1, 0
    return unit(hours, "hour") + (f" {unit(minutes, 'minute')}" if minutes else "")


def build_rate_limits(app: web.Application) -> RateLimits:
    """The limits of ``app``: in Redis when one is configured, else in this process."""

    settings: Settings = app[SETTINGS]
    client = app[REDIS]
    limiter: Limiter
    if client is not None:
        limiter = RedisLimiter(client, settings.rate_limits, app[METRICS])
    else:
        limiter = MemoryLimiter()
    return RateLimits(settings.rate_limits, settings.roles, limiter, app[METRICS])


async def rate_limits_context(app: web.Application) -> AsyncIterator[None]:
    """``cleanup_ctx`` (after the Redis client): ``app[RATE_LIMITS]``. When Redis answers, the
    limiter connects and loads the GCRA script now, so the first request does not pay for it
    (else on first use)."""

    limits = build_rate_limits(app)
    app[RATE_LIMITS] = limits
    if limits.enabled and isinstance(limits.limiter, RedisLimiter):
        try:
            async with asyncio.timeout(STARTUP_TIMEOUT_SECONDS):
                await limits.limiter.warm_up()
        except Exception as exc:  # noqa: BLE001 - best effort; EVALSHA reloads on NOSCRIPT
            log.warning("ratelimit_script_not_loaded", error=type(exc).__name__)
    elif limits.enabled:
        # With --workers N, the CLI warns (warn_if_process_local) that each process counts alone.
        log.info("ratelimit_in_memory", detail="limits are kept in this process (no redis.url)")
    yield
    if isinstance(limits.limiter, RedisLimiter):
        await limits.limiter.close()


RATE_LIMITS = web.AppKey("comfygate.rate_limits", RateLimits)
"""Rate limits (in Redis when configured, else in memory); created after :data:`REDIS`."""


__all__ = [
    "KEY_PREFIX",
    "RATE_LIMITS",
    "ClassLimit",
    "RateLimits",
    "build_rate_limits",
    "limit_key",
    "most_generous",
    "rate_limits_context",
]
