"""Per-user queue quotas: at most N unfinished (pending + running) prompts per user, and an
optional cap on the prompts the proxy lets queue on one ComfyUI instance.

The count is a set of *reservations*, one per prompt id, each tagged with its owner, its
upstream, an expiry and whether ComfyUI accepted it:

- **reserve** (``POST /prompt``, after the prompt id is known, before forwarding): purge the
  expired entries of the owner and of the upstream, count, then refuse or add - one atomic
  step, so concurrent submissions through any number of proxies never exceed the quota.
- **accepted** (ComfyUI answered 200): the entry becomes reconcilable. **release** (ComfyUI
  refused it) frees the slot at once.
- **release** when the prompt ends: from the WebSocket events the relays see
  (``execution_success``/``_error``/``_interrupted``, ``executing {node: null}``), and from the
  reconciler, which reads each ComfyUI's ``/queue`` and releases accepted entries no longer
  in it (API clients without a socket, ``/queue`` deletes, interrupts, a ComfyUI restart).
- **expiry** after ``rate_limits.quota_entry_ttl_seconds`` if every other path missed it.

Two stores with one behaviour (tested for parity): :class:`MemoryQuotaStore` (one process,
no Redis) and :class:`~proxy.limits.quota.redis_store.RedisQuotaStore` (shared by replicas).
Which limit applies to whom is decided here (:func:`queue_quota_for`); the request path is in
:mod:`proxy.limits.quota.service`.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Collection, Mapping
from dataclasses import dataclass
from typing import Literal, Protocol, runtime_checkable

from proxy.principal import Principal
from proxy.settings.auth import RoleSettings
from proxy.settings.limits import RateLimitSettings

Outcome = Literal["reserved", "user_quota", "upstream_cap", "duplicate"]


@dataclass(frozen=True, slots=True)
class Reservation:
    """The answer of one :meth:`QuotaStore.reserve`."""

    outcome: Outcome
    """``reserved``; refused by the owner's ``user_quota`` or by the ``upstream_cap``; or
    ``duplicate``: the prompt id is already counted (nothing changed)."""
    in_use: int
    """The owner's unfinished prompts (after this one when reserved); for ``upstream_cap``, the
    upstream's."""


@dataclass(frozen=True, slots=True)
class Snapshot:
    """What the reconciler may check against one upstream's queue."""

    candidates: tuple[str, ...]
    """Prompt ids confirmed accepted by ComfyUI (or reserved longer ago than the grace, whose
    answer was lost), as of the snapshot: if ComfyUI's queue does not list one, it ended."""
    in_use: int
    """Unfinished prompts counted on the upstream (after purging the expired)."""


class QuotaStore(Protocol):
    """Reservations of unfinished prompts (see the module doc). Every method is idempotent."""

    async def reserve(
        self, prompt_id: str, owner: str, upstream: str, *, limit: int, upstream_cap: int
    ) -> Reservation:
        """Count ``prompt_id`` for ``owner`` on ``upstream`` unless that would exceed ``limit``
        (0: none) or ``upstream_cap`` (0: none)."""
        ...

    async def accepted(self, prompt_id: str) -> None:
        """ComfyUI queued it (no effect if it was released meanwhile)."""
        ...

    async def release(self, prompt_ids: Collection[str]) -> int:
        """Stop counting these prompts; how many were counted."""
        ...

    async def snapshot(self, upstream: str, grace_seconds: float) -> Snapshot:
        """The reconcilable entries of ``upstream`` now (see :class:`Snapshot`)."""
        ...

    async def in_use(self, owner: str) -> int:
        """The owner's unfinished prompts (expired entries excluded)."""
        ...


@runtime_checkable
class QuotaMover(Protocol):
    """A store that can re-tag a reservation with another upstream (placement failover).

    Separate from :class:`QuotaStore` so that a store without it still satisfies that protocol;
    :class:`MemoryQuotaStore` has it, Redis gets it from
    :class:`~proxy.limits.quota.move.RedisQuotaMover` (see :func:`~proxy.limits.quota.move.
    quota_mover`)."""

    async def move_upstream(self, prompt_id: str, upstream: str) -> bool:
        """Count ``prompt_id`` on ``upstream`` instead of the upstream it was reserved on,
        keeping its owner, expiry and acceptance; True if it is counted there now. No cap is
        checked: the prompt was admitted once, and refusing it halfway through a failover would
        lose it (the new upstream may exceed its cap by the prompts moved onto it)."""
        ...


def queue_quota_for(
    principal: Principal, settings: RateLimitSettings, roles: Mapping[str, RoleSettings]
) -> int:
    """The principal's quota (0 = unlimited): per role its ``queue_quota``, else
    ``rate_limits.queue_quota``; over several roles the most generous (0 wins)."""
    quotas = [
        settings.queue_quota if roles[r].queue_quota is None else roles[r].queue_quota
        for r in principal.roles
        if r in roles
    ]
    if not quotas:
        return settings.queue_quota
    return 0 if 0 in quotas else max(q for q in quotas if q is not None)


@dataclass(slots=True)
class _Entry:
    owner: str
    upstream: str
    reserved_at: float
    expires_at: float
    accepted: bool = False


class MemoryQuotaStore:
    """Reservations in process memory (no Redis: one proxy process). Bounded by the quotas
    themselves: every entry belongs to an owner under its limit, and expires."""

    def __init__(self, ttl_seconds: float, *, clock: Callable[[], float] = time.time) -> None:
        self._ttl = ttl_seconds
        self.clock = clock
        """Epoch seconds; tests replace it to drive expiry."""
        self._entries: dict[str, _Entry] = {}
        self._by_owner: dict[str, set[str]] = {}
        self._by_upstream: dict[str, set[str]] = {}

    async def reserve(
        self, prompt_id: str, owner: str, upstream: str, *, limit: int, upstream_cap: int
    ) -> Reservation:
        now = self.clock()
        mine = self._purge(self._by_owner, owner, now)
        if prompt_id in self._entries:
            return Reservation("duplicate", len(mine))
        if limit and len(mine) >= limit:
            return Reservation("user_quota", len(mine))
        queued = self._purge(self._by_upstream, upstream, now)
        if upstream_cap and len(queued) >= upstream_cap:
            return Reservation("upstream_cap", len(queued))
        self._entries[prompt_id] = _Entry(owner, upstream, now, now + self._ttl)
        self._by_owner.setdefault(owner, set()).add(prompt_id)
        self._by_upstream.setdefault(upstream, set()).add(prompt_id)
        return Reservation("reserved", len(mine) + 1)

    async def accepted(self, prompt_id: str) -> None:
        entry = self._entries.get(prompt_id)
        if entry is not None:
            entry.accepted = True

    async def release(self, prompt_ids: Collection[str]) -> int:
        released = 0
        for prompt_id in prompt_ids:
            entry = self._entries.pop(prompt_id, None)
            if entry is None:
                continue
            released += 1
            self._discard(self._by_owner, entry.owner, prompt_id)
            self._discard(self._by_upstream, entry.upstream, prompt_id)
        return released

    async def snapshot(self, upstream: str, grace_seconds: float) -> Snapshot:
        now = self.clock()
        queued = self._purge(self._by_upstream, upstream, now)
        candidates = tuple(
            pid
            for pid in queued
            if self._entries[pid].accepted or self._entries[pid].reserved_at < now - grace_seconds
        )
        return Snapshot(candidates, len(queued))

    async def in_use(self, owner: str) -> int:
        return len(self._purge(self._by_owner, owner, self.clock()))

    async def move_upstream(self, prompt_id: str, upstream: str) -> bool:
        entry = self._entries.get(prompt_id)
        if entry is None:
            return False
        if entry.expires_at <= self.clock():
            self._purge(self._by_upstream, entry.upstream, self.clock())
            return False
        if entry.upstream != upstream:
            self._discard(self._by_upstream, entry.upstream, prompt_id)
            entry.upstream = upstream
            self._by_upstream.setdefault(upstream, set()).add(prompt_id)
        return True

    def _purge(self, index: dict[str, set[str]], name: str, now: float) -> set[str]:
        """``index[name]`` without expired entries (which are dropped everywhere)."""
        ids = index.get(name)
        if not ids:
            return set()
        expired = [pid for pid in ids if self._entries[pid].expires_at <= now]
        if expired:
            for pid in expired:
                entry = self._entries.pop(pid)
                self._discard(self._by_owner, entry.owner, pid)
                self._discard(self._by_upstream, entry.upstream, pid)
            ids = index.get(name, set())
        return ids

    @staticmethod
    def _discard(index: dict[str, set[str]], name: str, prompt_id: str) -> None:
        ids = index.get(name)
        if ids is not None:
            ids.discard(prompt_id)
            if not ids:
                del index[name]


__all__ = [
    "MemoryQuotaStore",
    "Outcome",
    "QuotaMover",
    "QuotaStore",
    "Reservation",
    "Snapshot",
    "queue_quota_for",
]
