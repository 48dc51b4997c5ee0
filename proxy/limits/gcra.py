"""GCRA (the generic cell rate algorithm): one stored timestamp per limited key.

A limit of ``count`` requests per ``period`` with ``burst`` B admits one request every
``T = period / count`` in the steady state, and up to B at once from a full allowance. The state
of a key is its *theoretical arrival time* (TAT): when the allowance would be full again. A
request at ``now`` is admitted when ``max(TAT, now) + T - B*T <= now``; admitting it moves the
TAT forward by ``T``. Compared with a fixed window it needs no per-window counters and cannot be
doubled by a burst at a window edge; compared with a token bucket it stores one number.

The same arithmetic exists twice, kept identical on purpose and tested for parity:

- :func:`gcra` in Python, for the in-process limiter (no Redis configured);
- :data:`GCRA_LUA`, one atomic script per check on a single key (Redis Cluster-safe), with the
  time taken from Redis ``TIME`` so several proxies with skewed clocks agree.

All times are integer microseconds: Lua numbers are doubles, exact up to 2**53 (year 2255 in
microseconds since the epoch).
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Final

import redis.asyncio as redis
from redis.exceptions import NoScriptError

from proxy.redis.client import RedisClient
from proxy.redis.coalesce import ScriptPipe

MICROS: Final = 1_000_000


@dataclass(frozen=True, slots=True)
class Decision:
    """The outcome of one check against one limit."""

    allowed: bool
    remaining: int
    """Requests that could still be admitted at once, after this one."""
    retry_after: float
    """Seconds until the next request would be admitted (0 when this one was)."""
    reset: float
    """Seconds until the allowance is full again."""


def emission_micros(emission_seconds: float) -> int:
    """GCRA's ``T`` in whole microseconds (at least 1)."""
    return max(1, round(emission_seconds * MICROS))


def gcra(tat: int | None, now: int, emission: int, burst: int) -> tuple[int | None, Decision]:
    """One GCRA step: ``(the TAT to store or None when refused, the decision)``.

    ``tat`` is the stored TAT (None: never seen or expired = full allowance), ``now``, ``emission``
    (``T``) in microseconds.
    """
    base = now if tat is None or tat < now else tat
    new_tat = base + emission
    allow_at = new_tat - burst * emission
    if now < allow_at:
        return None, Decision(False, 0, (allow_at - now) / MICROS, (base - now) / MICROS)
    remaining = (now - allow_at) // emission
    return new_tat, Decision(True, remaining, 0.0, (new_tat - now) / MICROS)


def gcra_grant(
    tat: int | None, now: int, emission: int, burst: int, want: int
) -> tuple[int | None, int, Decision]:
    """:func:`gcra` asking for ``want`` tokens at once (a lease, :mod:`proxy.limits.lease`):
    ``(the TAT to store or None, tokens granted, the decision)``. ``want`` is granted only
    when at least ``2 * want`` tokens are available (a lease never takes a client's last
    tokens: near its limit every request is decided on its own), else one; 0 is a refusal.
    The decision's ``remaining`` and ``reset`` count the granted tokens as spent."""
    base = now if tat is None or tat < now else tat
    allow_at = base + emission - burst * emission
    if now < allow_at:
        return None, 0, Decision(False, 0, (allow_at - now) / MICROS, (base - now) / MICROS)
    available = (now - allow_at) // emission + 1
    granted = want if want > 1 and available >= 2 * want else 1
    new_tat = base + granted * emission
    return new_tat, granted, Decision(True, available - granted, 0.0, (new_tat - now) / MICROS)


GCRA_LUA: Final = """
-- GCRA on one key (Redis Cluster-safe). KEYS[1]: the key; ARGV[1]: emission interval T and
-- ARGV[2]: burst B, T in microseconds. ARGV[3], tests only: "now" in microseconds instead of
-- Redis TIME ('' or absent: TIME; the proxy never sends a value). ARGV[4]: tokens wanted at
-- once (a replica's lease, proxy.limits.lease; absent: 1), granted only when at least twice
-- as many are available, else one. Returns {granted, remaining, retry_after_us, reset_us}:
-- granted 0 is a refusal.
if redis.replicate_commands then redis.replicate_commands() end
local emission = tonumber(ARGV[1])
local burst = tonumber(ARGV[2])
local want = tonumber(ARGV[4] or '1')
local now
if ARGV[3] and ARGV[3] ~= '' then
  now = tonumber(ARGV[3])
else
  local t = redis.call('TIME')
  now = tonumber(t[1]) * 1000000 + tonumber(t[2])
end
local tat = tonumber(redis.call('GET', KEYS[1]) or now)
if tat < now then tat = now end
local allow_at = tat + emission - burst * emission
if now < allow_at then
  return {0, 0, allow_at - now, tat - now}
end
-- Tokens admissible now, this request's included.
local available = math.floor((now - allow_at) / emission) + 1
local granted = 1
if want > 1 and available >= 2 * want then granted = want end
local new_tat = tat + granted * emission
-- The key lives exactly as long as it holds information: once the TAT has passed, a missing
-- key and a stored one mean the same full allowance.
redis.call('SET', KEYS[1], string.format('%d', new_tat), 'PX',
  math.max(1, math.ceil((new_tat - now) / 1000)))
return {granted, available - granted, 0, new_tat - now}
"""

GCRA_SHA: Final = hashlib.sha1(GCRA_LUA.encode(), usedforsecurity=False).hexdigest()


class GcraScript:
    """:data:`GCRA_LUA` run by ``EVALSHA``; loaded with ``SCRIPT LOAD`` when Redis does not know
    it (first use, a restart, ``SCRIPT FLUSH``, a failover to a replica without it)."""

    def __init__(self, client: RedisClient) -> None:
        self._client = client

    async def load(self) -> None:
        """``SCRIPT LOAD`` (on every primary of a cluster)."""
        sha = await self._client.script_load(GCRA_LUA)
        if sha != GCRA_SHA:  # pragma: no cover - would mean a different SHA-1
            raise redis.RedisError(f"SCRIPT LOAD returned {sha}, expected {GCRA_SHA}")

    async def run(self, key: str, emission: int, burst: int, now: int | None = None) -> Decision:
        """One check. ``now`` (microseconds) replaces Redis ``TIME``: for tests only.

        Raises:
            redis.RedisError, OSError: Redis failed; the caller decides what that means.
        """
        args = (key, emission, burst) if now is None else (key, emission, burst, now)
        try:
            reply = await self._client.evalsha(GCRA_SHA, 1, *args)
        except NoScriptError:
            await self.load()
            reply = await self._client.evalsha(GCRA_SHA, 1, *args)
        return _decision(reply)


def whole_seconds(seconds: float) -> int:
    """Seconds for a header: rounded up, so a client that waits this long is admitted."""
    return math.ceil(seconds) if seconds > 0 else 0


Check = tuple[str, int, int]
"""``(key, emission, burst)``: the arguments of one GCRA check."""
Grant = tuple[str, int, int, int]
"""``(key, emission, burst, want)``: a check asking for ``want`` tokens at once."""


class GcraPipe(ScriptPipe):
    """:class:`ScriptPipe` of the GCRA script: batches of checks, a decision for each."""

    def __init__(self, pool: redis.ConnectionPool) -> None:
        super().__init__(pool, GCRA_LUA)
        assert self.sha == GCRA_SHA

    async def run(self, checks: Sequence[Check]) -> list[Decision]:
        """One round trip (two when the script must be loaded first).

        Raises:
            redis.RedisError, OSError: the batch failed as a whole; nothing is known of it.
        """
        replies = await self.exchange(
            [((key,), (emission, burst)) for key, emission, burst in checks]
        )
        return [_decision(r) for r in replies]

    async def grants(self, checks: Sequence[Grant]) -> list[tuple[int, Decision]]:
        """:meth:`run` for checks that may ask for several tokens (leases): the tokens granted
        and the decision of each. A check asking for one is the same call as :meth:`run`'s.

        Raises:
            redis.RedisError, OSError: the batch failed as a whole; nothing is known of it.
        """
        replies = await self.exchange(
            [
                ((key,), (emission, burst) if want <= 1 else (emission, burst, "", want))
                for key, emission, burst, want in checks
            ]
        )
        return [_grant(r) for r in replies]


def _decision(reply: Any) -> Decision:
    return _grant(reply)[1]


def _grant(reply: Any) -> tuple[int, Decision]:
    if isinstance(reply, Exception):
        raise reply  # an error other than NOSCRIPT (OOM, READONLY, ...): the batch failed
    granted, remaining, retry_after, reset = (int(v) for v in reply)
    return granted, Decision(granted > 0, remaining, retry_after / MICROS, reset / MICROS)


__all__ = [
    "GCRA_LUA",
    "GCRA_SHA",
    "MICROS",
    "Check",
    "Decision",
    "GcraPipe",
    "GcraScript",
    "Grant",
    "emission_micros",
    "gcra",
    "gcra_grant",
    "whole_seconds",
]
