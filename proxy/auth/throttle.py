"""Login throttling: at most ``max_failures`` failed logins per client IP and per username
within a sliding window of ``window_seconds``.

Per IP stops one client guessing many passwords (or spraying one password over many names);
per username stops a distributed guess at one account (at the price that someone can lock an
account out for one window - the usual trade-off, bounded by the window).

Each key keeps a log of its recent failure times (a Redis sorted set written by one script,
or a deque in memory), trimmed to the last ``max_failures`` entries. This is an exact sliding
window - unlike INCR + EXPIRE, a burst at the edge of two windows cannot double the allowance -
and the times come from the injected clock, so the window is testable without sleeping, against
Redis too.
A key is throttled while it holds ``max_failures`` failures younger than the window; it is free
again when the oldest of them ages out.
"""

from __future__ import annotations

import hashlib
import secrets
import time
from collections import deque
from collections.abc import Callable
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from proxy.redis.client import RedisClient

KEY_PREFIX = "comfygate:login-failures:"
MAX_MEMORY_KEYS = 100_000
"""Memory backend: above this many tracked keys, expired ones are swept on the next failure."""

# KEYS[1] the failure log; ARGV: cutoff, member, now, max_failures, ttl. Only the newest
# max_failures entries matter for the decision: bounded memory per key.
_RECORD_SCRIPT = """
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', ARGV[1])
redis.call('ZADD', KEYS[1], ARGV[3], ARGV[2])
redis.call('ZREMRANGEBYRANK', KEYS[1], 0, -(tonumber(ARGV[4]) + 1))
redis.call('EXPIRE', KEYS[1], ARGV[5])
return 1
"""


class LoginThrottle:
    """Counts failed logins; ``allowed`` says how long a client or a name must wait."""

    def __init__(
        self,
        max_failures: int,
        window_seconds: float,
        redis: RedisClient | None = None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        if max_failures < 1 or window_seconds <= 0:
            raise ValueError("max_failures must be >= 1 and window_seconds > 0")
        self.max_failures = max_failures
        self.window_seconds = window_seconds
        self._redis = redis
        self._clock = clock
        self._memory: dict[str, deque[float]] = {}

    async def allowed(self, ip: str, username: str = "") -> float:
        """0 when a login attempt may go ahead, else the seconds until one may."""
        keys = self._keys(ip, username)
        now = self._clock()
        if self._redis is not None:
            until = await self._redis_until(self._redis, keys, now)
        else:
            until = max((self._memory_until(k, now) for k in keys), default=0.0)
        return max(0.0, until - now) if until else 0.0

    async def failed(self, ip: str, username: str = "") -> None:
        """Record one failed attempt against the IP and the (lowercased) username."""
        keys = self._keys(ip, username)
        now = self._clock()
        if self._redis is not None:
            await self._redis_record(self._redis, keys, now)
            return
        if len(self._memory) > MAX_MEMORY_KEYS:
            self._sweep(now)
        for key in keys:
            log = self._memory.setdefault(key, deque(maxlen=self.max_failures))
            log.append(now)

    async def succeeded(self, ip: str, username: str = "") -> None:
        """Forget the username's failures. The IP's stay: a client holding one valid account must
        not be able to reset its counter between guesses at other accounts."""
        if not username:
            return
        key = self._user_key(username)
        if self._redis is not None:
            await self._redis.delete(key)
        else:
            self._memory.pop(key, None)

    # ------------------------------------------------------------------------------ helpers

    def _keys(self, ip: str, username: str) -> list[str]:
        keys = [f"{KEY_PREFIX}ip:{ip}"]
        if username:
            keys.append(self._user_key(username))
        return keys

    @staticmethod
    def _user_key(username: str) -> str:
        # Hashed: the name is whatever the client typed, of any length and content.
        digest = hashlib.sha256(username.lower().encode("utf-8", "surrogatepass")).hexdigest()
        return f"{KEY_PREFIX}user:{digest[:32]}"

    async def _redis_until(self, client: RedisClient, keys: list[str], now: float) -> float:
        # Read-only, so no transaction: a failure recorded meanwhile is seen by the next check.
        cutoff = now - self.window_seconds
        async with client.pipeline(transaction=False) as pipe:
            for key in keys:
                pipe.zrangebyscore(key, f"({cutoff!r}", "+inf", withscores=True)
            results: list[list[tuple[bytes, float]]] = await pipe.execute()
        until = 0.0
        for entries in results:
            if len(entries) >= self.max_failures:
                oldest = entries[len(entries) - self.max_failures][1]
                until = max(until, oldest + self.window_seconds)
        return until

    async def _redis_record(self, client: RedisClient, keys: list[str], now: float) -> None:
        # One script per key: trim, add and expire apply together, so a key never loses its
        # TTL. Per key rather than one MULTI/EXEC over both: the IP's and the name's keys may
        # live on different Redis Cluster nodes (the pipeline is split per node).
        cutoff = now - self.window_seconds
        ttl = int(self.window_seconds) + 1  # cleanup only; the window itself uses the clock
        member = f"{now!r}:{secrets.token_hex(4)}"  # unique: two failures in one tick both count
        async with client.pipeline(transaction=False) as pipe:
            for key in keys:
                pipe.eval(
                    _RECORD_SCRIPT, 1, key, repr(cutoff), member, repr(now), self.max_failures, ttl
                )
            await pipe.execute()

    def _memory_until(self, key: str, now: float) -> float:
        log = self._memory.get(key)
        if log is None:
            return 0.0
        cutoff = now - self.window_seconds
        while log and log[0] <= cutoff:
            log.popleft()
        if not log:
            del self._memory[key]
            return 0.0
        if len(log) < self.max_failures:
            return 0.0
        return log[0] + self.window_seconds

    def _sweep(self, now: float) -> None:
        cutoff = now - self.window_seconds
        for key in [k for k, log in self._memory.items() if not log or log[-1] <= cutoff]:
            del self._memory[key]


__all__ = ["LoginThrottle"]
