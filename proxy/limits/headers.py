"""Rate-limit response headers, on allowed and refused responses alike.

IETF (draft-ietf-httpapi-ratelimit-headers-11, structured fields; one policy per route class)::

    RateLimit-Policy: "submit";q=10;w=20     quota q = the burst, refilled in full in w seconds
    RateLimit: "submit";r=3;t=4              r requests left now; t seconds until full again

Legacy (what most clients already read)::

    X-RateLimit-Limit: 10                    the burst
    X-RateLimit-Remaining: 3
    X-RateLimit-Reset: 4                     seconds until the allowance is full again

A refusal adds ``Retry-After`` (the time until the next admission, rounded up). There the
``RateLimit`` field's ``t`` is that same delay: the draft says ``Retry-After`` must not point
before the end of the effective window, and until then the client can indeed spend nothing.

GCRA refills one request every ``w / q`` seconds, so ``q`` per ``w`` is the allowance from a
standing start, not a cap on any window; the long-run rate is the configured ``rate``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Final

from proxy.limits.gcra import Decision, whole_seconds
from proxy.settings.limits import Limit, RouteClass

RATELIMIT_POLICY: Final = "RateLimit-Policy"
RATELIMIT: Final = "RateLimit"
X_LIMIT: Final = "X-RateLimit-Limit"
X_REMAINING: Final = "X-RateLimit-Remaining"
X_RESET: Final = "X-RateLimit-Reset"

Headers = list[tuple[str, str]]


@dataclass(frozen=True, slots=True)
class LimitHeaders:
    """Builds the headers of one (class, limit); the static parts are formatted once."""

    route_class: RouteClass
    limit: Limit
    ietf: bool
    legacy: bool
    _policy: str = ""
    _quota: str = ""

    @classmethod
    def build(
        cls, route_class: RouteClass, limit: Limit, *, ietf: bool, legacy: bool
    ) -> LimitHeaders:
        window = max(1, whole_seconds(limit.burst * limit.emission_seconds))
        return cls(
            route_class,
            limit,
            ietf,
            legacy,
            _policy=f'"{route_class}";q={limit.burst};w={window}',
            _quota=str(limit.burst),
        )

    def headers(self, decision: Decision) -> Headers:
        """The headers for one decision (empty when both families are switched off)."""
        out: Headers = []
        if decision.allowed:
            remaining, until = decision.remaining, whole_seconds(decision.reset)
        else:
            remaining, until = 0, max(1, whole_seconds(decision.retry_after))
        if self.ietf:
            out.append((RATELIMIT_POLICY, self._policy))
            out.append((RATELIMIT, f'"{self.route_class}";r={remaining};t={until}'))
        if self.legacy:
            out.append((X_LIMIT, self._quota))
            out.append((X_REMAINING, str(remaining)))
            out.append((X_RESET, str(whole_seconds(decision.reset))))
        return out


__all__ = [
    "RATELIMIT",
    "RATELIMIT_POLICY",
    "X_LIMIT",
    "X_REMAINING",
    "X_RESET",
    "Headers",
    "LimitHeaders",
]
