"""Token leases: a replica takes a few tokens of a busy allowance from Redis at once and admits
the next requests of that key locally, without a round trip, until they are spent or lapse.

Why: with rate limits in Redis every request waits for a script round trip (a syscall pair
and redis-py's packing and parsing on the proxy, ~100 µs of latency even on loopback), which
is most of what a small ``GET`` costs beyond forwarding. A lease turns N such round trips into
one for a client that sends many requests in a short time.

What stays exact:

* **Tokens are only ever taken from Redis.** A lease of N advances the key's GCRA state in
  Redis by N emission intervals, atomically, in the same script as a single check
  (:data:`~proxy.limits.gcra.GCRA_LUA`, ``want``): the long-run rate over every replica is the
  configured one, whatever the number of replicas.
* **Near the limit nothing is leased.** Redis grants N only when at least 2N tokens are
  available, else one: the last tokens of an allowance are spent request by request, so every
  refusal (429, ``Retry-After``) is Redis's own decision, as without leases.
* **Only fast classes that fail open lease** (``read``, ``view``, ``static``, ``ws_connect`` by
  default): a lease is at most ``rate_limits.lease_tokens``, at most ``burst // 16`` and at
  most what the allowance refills in ``rate_limits.lease_seconds`` (:func:`lease_size`; below
  2, none). Classes that fail closed (``submit``, ``upload``, ``login``) check Redis on every
  request, and fail closed, as before; so does a slow class (a few per minute).
* **Sparse clients are not leased.** A key's lease size starts at 1 (a plain check) and doubles
  only when the previous lease was spent before it lapsed; a lease that lapses with tokens left
  shrinks the next one to what was used. A client sending a request now and then never holds
  tokens it does not use.

What changes, the burst semantics: tokens held by a replica were spent in Redis when leased,
but the client uses them a little later (at most ``rate_limits.lease_seconds``). If the
allowance refills to full meanwhile, the held tokens come on top of it: a key may be admitted
at most ``burst + R * (N - 1)`` requests at once (R replicas holding a lease of N), never more
than the configured rate over time. With the defaults (N <= burst / 16, 32 at most) that is at
most 1/16 of the burst per replica. Unspent tokens of a lapsed lease are lost (the client's
allowance was charged for them): at most ``N - 1`` per lease, which the adaptive size keeps to
clients that were using them.

Redis failing: a held lease is spent (its tokens were granted); once it is gone, every request
checks Redis and gets the class's fail mode exactly as without leases. Redis Cluster: no
leases (checks are sent one by one through the cluster client).
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Final

from proxy.limits.gcra import MICROS, Decision
from proxy.limits.limiter import RedisLimiter

BURST_PER_LEASE_TOKEN: Final = 16
"""A lease is at most ``burst // 16`` tokens: what a replica holds stays a small part of the
burst (the most the burst can be exceeded by, per replica)."""
MAX_KEYS: Final = 65_536
"""Keys with lease state kept per process; beyond it, keys holding nothing are dropped."""
_ATTEMPTS: Final = 8
"""Times a request waits for another request's lease before asking Redis on its own."""


def lease_size(burst: int, emission: int, lease_tokens: int, lease_seconds: float) -> int:
    """The most tokens one lease of a class may take (0: no leases): ``lease_tokens``, at most
    ``burst // 16``, and at most what the allowance refills in ``lease_seconds`` (a held token
    is spent at most that long after Redis counted it: a slow class, say 5 per hour, never
    leases)."""
    size = min(
        lease_tokens, burst // BURST_PER_LEASE_TOKEN, int(lease_seconds * MICROS) // emission
    )
    return size if size >= 2 else 0


@dataclass(slots=True)
class _Lease:
    """One key's lease state in this process."""

    size: int = 1
    """Tokens the next request to Redis asks for."""
    tokens: int = 0
    """Held: granted by Redis, not yet spent."""
    used: int = 0
    """Tokens of the current lease spent (the request that took it included)."""
    until: int = 0
    """When the held tokens lapse (local clock, microseconds)."""
    tat: int = 0
    """The key's GCRA state right after the grant, on the local clock (microseconds): the
    held tokens are counted as spent in it."""
    pending: asyncio.Future[None] | None = None
    """A request of this key is asking Redis: others wait for it (it may lease for them)."""
    waiting: int = 0
    """Requests of this key waiting for :attr:`pending`: demand the next lease covers."""


class TokenLeases:
    """Lease state per key, in front of a :class:`RedisLimiter` (see the module doc)."""

    def __init__(
        self,
        limiter: RedisLimiter,
        lease_seconds: float,
        *,
        clock: Callable[[], float] = time.monotonic,
        max_keys: int = MAX_KEYS,
    ) -> None:
        self._limiter = limiter
        self._lifetime = max(1, round(lease_seconds * MICROS))
        self._clock = clock
        self._max_keys = max_keys
        self._leases: dict[str, _Lease] = {}

    def held(self, key: str) -> int:
        """Tokens of ``key`` this process holds and may still spend (tests, metrics)."""
        lease = self._leases.get(key)
        if lease is None or lease.until <= self._now():
            return 0
        return lease.tokens

    async def check(self, key: str, emission: int, burst: int, most: int) -> Decision:
        """Admit one request of ``key`` from a held lease, or ask Redis (for a lease of up to
        ``most`` tokens when this key's recent use asks for one).

        Raises:
            LimiterUnavailable: Redis was needed and failed (the caller applies the fail mode).
        """
        lease = self._leases.get(key)
        if lease is None:
            if len(self._leases) >= self._max_keys:
                self._sweep()
            lease = self._leases[key] = _Lease()
        for attempt in range(_ATTEMPTS + 1):
            now = self._now()
            if lease.tokens and now < lease.until:
                lease.tokens -= 1
                lease.used += 1
                return self._local(lease, now, emission, burst)
            if lease.pending is None or attempt == _ATTEMPTS:
                break
            # Another request of this key is asking Redis: its lease may cover this one too.
            # Shielded: a waiter that goes away must not cancel the asker's future.
            lease.waiting += 1
            try:
                await asyncio.shield(lease.pending)
            finally:
                lease.waiting -= 1
        return await self._ask(lease, key, emission, burst, most)

    async def _ask(self, lease: _Lease, key: str, emission: int, burst: int, most: int) -> Decision:
        if lease.pending is not None:
            # Waited long enough for others' leases: one token of its own (one lease in flight
            # per key).
            return (await self._limiter.grant(key, emission, burst, 1))[1]
        now = self._now()
        if lease.used:
            # Spent before it lapsed: this key is busy, lease more. Lapsed with tokens left (or
            # idle): lease what was used, down to a plain check.
            lease.size = (
                min(most, lease.size * 2) if now < lease.until else min(lease.size, lease.used)
            )
        lease.size = max(1, min(lease.size, most))
        lease.tokens = lease.used = 0
        # Requests already waiting for this key are demand now: the lease covers them.
        want = min(most, max(lease.size, lease.waiting + 1))
        # This request asks for the key (a lease, or a plain check that counts as a lease of
        # one); requests of the key arriving meanwhile wait for it rather than ask Redis too.
        done: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        lease.pending = done
        try:
            granted, decision = await self._limiter.grant(key, emission, burst, want)
        finally:
            lease.pending = None
            done.set_result(None)
        if granted < want:
            # Near the limit (or over it): Redis decides request by request, concurrently
            # (nobody waits for a lease that would not come), until a lease fits again.
            lease.size = 1
        if granted:
            now = self._now()
            lease.tokens, lease.used = granted - 1, 1
            lease.until = now + self._lifetime
            lease.tat = now + round(decision.reset * MICROS)
            if granted > 1:
                return self._local(lease, now, emission, burst)
        return decision

    @staticmethod
    def _local(lease: _Lease, now: int, emission: int, burst: int) -> Decision:
        """The decision a single-replica GCRA would give, the held tokens counted as unspent
        (what the rate-limit headers report)."""
        tat = max(lease.tat - lease.tokens * emission, now + emission)
        remaining = min(burst - 1, (now - tat + burst * emission) // emission)
        return Decision(True, max(0, remaining), 0.0, (tat - now) / MICROS)

    def _now(self) -> int:
        return int(self._clock() * MICROS)

    def _sweep(self) -> None:
        """Drop keys that hold nothing and wait for nothing (their size restarts at 1)."""
        now = self._now()
        self._leases = {
            k: lease
            for k, lease in self._leases.items()
            if lease.pending is not None or (lease.tokens and now < lease.until)
        }


__all__ = ["BURST_PER_LEASE_TOKEN", "TokenLeases", "lease_size"]
