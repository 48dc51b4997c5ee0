"""Configuration of rate limits and queue quotas: ``[rate_limits]`` and the per-role
``[roles.<name>.rate_limits]`` / ``queue_quota`` keys.

A limit is a rate (``"30/minute"``) and a burst: ``burst`` requests may arrive at once, after
which they are admitted one per ``period / count`` (GCRA). ``"unlimited"`` switches a class off.
"""

from __future__ import annotations

import re
from typing import Literal, get_args

from pydantic import BaseModel, ConfigDict, Field, field_validator

RouteClass = Literal["submit", "read", "view", "upload", "ws_connect", "login", "static"]
ROUTE_CLASSES: tuple[RouteClass, ...] = get_args(RouteClass)

UNLIMITED = "unlimited"
_PERIODS = {"second": 1.0, "minute": 60.0, "hour": 3600.0, "day": 86400.0}
_RATE = re.compile(r"^\s*(\d+)\s*/\s*(\d+)?\s*(second|minute|hour|day)s?\s*$")


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class Limit(_Section):
    """One class's allowance: ``rate`` (``"<count>/<period>"``, period ``second``, ``minute``,
    ``hour``, ``day``, optionally with a multiplier such as ``"100/10minutes"``; or
    ``"unlimited"``) and ``burst`` (requests admitted at once from a full allowance)."""

    rate: str
    """``"<count>/<period>"`` (e.g. ``"5/second"``, ``"100/10minutes"``) or ``"unlimited"``."""
    burst: int = Field(default=1, ge=1)
    """Requests admitted at once from a full allowance."""

    @field_validator("rate")
    @classmethod
    def _rate(cls, value: str) -> str:
        if value.strip() == UNLIMITED:
            return UNLIMITED
        match = _RATE.match(value)
        if match is None or int(match.group(1)) < 1 or int(match.group(2) or 1) < 1:
            raise ValueError(
                f"{value!r}: use '<count>/<period>' such as '30/minute', '5/second', "
                "'100/10minutes', or 'unlimited'"
            )
        return value.strip()

    @property
    def unlimited(self) -> bool:
        return self.rate == UNLIMITED

    @property
    def count(self) -> int:
        """Requests per period (0 when unlimited)."""
        match = _RATE.match(self.rate)
        return int(match.group(1)) if match else 0

    @property
    def period_seconds(self) -> float:
        match = _RATE.match(self.rate)
        if match is None:
            return 0.0
        return int(match.group(2) or 1) * _PERIODS[match.group(3)]

    @property
    def emission_seconds(self) -> float:
        """The steady-state spacing between two admitted requests (GCRA's ``T``)."""
        return self.period_seconds / self.count if self.count else 0.0


UNLIMITED_LIMIT = Limit(rate=UNLIMITED)

FailMode = Literal["open", "closed"]


def _default_limits() -> dict[RouteClass, Limit]:
    return {
        # A client running one prompt at a time on a fast model submits several a second and
        # never has more than one queued; the queue quota is what bounds the queue. This only
        # bounds the cost of the submissions themselves (parsing, policy, validation).
        "submit": Limit(rate="5/second", burst=20),
        "read": Limit(rate="20/second", burst=100),
        "view": Limit(rate="50/second", burst=200),
        "upload": Limit(rate="60/minute", burst=20),
        "ws_connect": Limit(rate="30/minute", burst=10),
        "login": Limit(rate="10/minute", burst=5),
        # The stock UI loads some 500 files at start: generous, but a flood of them (each a
        # file read or a directory glob in ComfyUI) is still bounded.
        "static": Limit(rate="100/second", burst=1000),
    }


class RateLimitSettings(_Section):
    """``[rate_limits]``: what every role gets unless its own section says otherwise."""

    enabled: bool = True
    """Rate limits and queue quotas on; false switches both off."""
    default: dict[RouteClass, Limit] = Field(default_factory=_default_limits)
    """Per-class limits of a role that does not set the class itself (and of ``login``, which
    is keyed by client IP before anyone is known)."""
    queue_quota: int = Field(default=10, ge=0)
    """Unfinished prompts (pending + running) one user may have; 0 = unlimited. A role's
    ``queue_quota`` overrides it."""
    upstream_max_pending: int = Field(default=0, ge=0)
    """Cap on unfinished prompts the proxy lets queue on one ComfyUI instance; 0 = no cap."""
    quota_poll_seconds: float = Field(default=2.0, gt=0)
    """How often each ComfyUI's ``/queue`` is read to notice prompts that ended without the
    proxy seeing their events (API clients without a WebSocket, interrupts, deletes)."""
    quota_entry_ttl_seconds: float = Field(default=24 * 3600.0, gt=0)
    """A prompt still counted after this long is dropped from the count (missed its end)."""
    fail_closed: tuple[RouteClass, ...] = ("submit", "upload", "login")
    """Classes refused (503) while Redis is unreachable; every other class is let through."""
    # 250 ms: a loaded host (GC pauses, a busy event loop) answers slower than 50 ms now and
    # then; a spurious 503 on a submission costs more than a slower refusal during an outage
    # (the breaker makes refusals instant after breaker_failures anyway).
    redis_budget_ms: float = Field(default=250.0, gt=0)
    """Longest a limit check may wait on Redis before it counts as a failure."""
    lease_tokens: int = Field(default=32, ge=0)
    """Most tokens of a busy allowance a replica takes from Redis at once and spends locally
    (one round trip for several requests): only classes that fail open, at most burst / 16
    and what refills in ``lease_seconds``, granted only while twice as many are left (see
    ``proxy.limits.lease`` for the burst semantics). Below 2: every request checks Redis."""
    lease_seconds: float = Field(default=0.5, gt=0, le=10)
    """How long leased tokens may be spent; unspent ones then lapse (they were counted)."""
    breaker_failures: int = Field(default=3, ge=1)
    """Consecutive Redis failures that open the circuit breaker (checks then skip Redis)."""
    breaker_open_seconds: float = Field(default=5.0, gt=0)
    """How long the breaker stays open before one probe request tries Redis again."""
    ietf_headers: bool = True
    """``RateLimit-Policy`` and ``RateLimit`` (draft-ietf-httpapi-ratelimit-headers)."""
    legacy_headers: bool = True
    """``X-RateLimit-Limit``, ``X-RateLimit-Remaining``, ``X-RateLimit-Reset``."""

    @field_validator("default")
    @classmethod
    def _complete(cls, value: dict[RouteClass, Limit]) -> dict[RouteClass, Limit]:
        # A partial [rate_limits.default] keeps the built-in values of the classes it omits.
        return {**_default_limits(), **value}

    def fail_mode(self, route_class: RouteClass) -> FailMode:
        return "closed" if route_class in self.fail_closed else "open"


__all__ = [
    "ROUTE_CLASSES",
    "UNLIMITED",
    "UNLIMITED_LIMIT",
    "FailMode",
    "Limit",
    "RateLimitSettings",
    "RouteClass",
]
