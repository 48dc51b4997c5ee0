"""Moving a queue-quota reservation to the instance that accepted the prompt (placement failover).

A submission is counted (:meth:`~proxy.limits.quota.service.QueueQuota.reserve`) on the
instance placement chose first. When that instance refuses the connection or answers 5xx,
:class:`~proxy.multi.placement_guard.Submission` sends the same prompt to the next candidate;
the reservation must follow, or the first instance's ``rate_limits.upstream_max_pending`` cap and
``comfygate_queue_quota_tracked_prompts{upstream}`` count a prompt it never queued while the
instance running it undercounts.

:func:`move_reservation` is the call site's one entry point. The store operation is
:class:`~proxy.limits.quota.model.QuotaMover`: the memory store implements it; for Redis it is
:class:`RedisQuotaMover` here, one Lua script on the quota keys' single slot (same keys and
hash tag as :mod:`proxy.limits.quota.redis_store`), until the Redis store grows the method itself
(:func:`quota_mover` prefers the store's own).
"""

from __future__ import annotations

import hashlib
from typing import Any, Final

import structlog
from redis.exceptions import NoScriptError

from proxy.limits.quota.model import QuotaMover, QuotaStore
from proxy.limits.quota.redis_store import PREFIX
from proxy.limits.quota.service import QueueQuota, StoreFailed
from proxy.redis.client import RedisClient

log = structlog.get_logger("comfygate.quota")

MOVE_LUA: Final = """
-- KEYS[1]: the prompt's record. ARGV: key prefix, prompt id, new upstream. Returns 1 if the
-- prompt is counted on the new upstream now, 0 if it is not counted (released or expired).
if redis.replicate_commands then redis.replicate_commands() end
local old = redis.call('HGET', KEYS[1], 'upstream')
if not old then return 0 end
if old == ARGV[3] then return 1 end
local from = ARGV[1] .. 'up:' .. old
local to = ARGV[1] .. 'up:' .. ARGV[3]
local expiry = redis.call('ZSCORE', from, ARGV[2])
if not expiry then return 0 end
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
expiry = tonumber(expiry)
if expiry <= now then return 0 end
redis.call('ZREM', from, ARGV[2])
redis.call('ZADD', to, expiry, ARGV[2])
redis.call('HSET', KEYS[1], 'upstream', ARGV[3])
-- The upstream's set lives as long as its newest entry (as RESERVE_LUA keeps it).
if redis.call('PTTL', to) < expiry - now then redis.call('PEXPIRE', to, expiry - now) end
return 1
"""

_SHA: Final = hashlib.sha1(MOVE_LUA.encode(), usedforsecurity=False).hexdigest()


class RedisQuotaMover:
    """:class:`~proxy.limits.quota.model.QuotaMover` over the Redis store's keys."""

    def __init__(self, client: RedisClient) -> None:
        self._client = client

    async def move_upstream(self, prompt_id: str, upstream: str) -> bool:
        keys = [f"{PREFIX}p:{prompt_id}"]
        args: list[Any] = [PREFIX, prompt_id, upstream]
        try:
            moved = await self._client.evalsha(_SHA, len(keys), *keys, *args)
        except NoScriptError:  # first use, a Redis restart or failover, SCRIPT FLUSH
            await self._client.script_load(MOVE_LUA)
            moved = await self._client.evalsha(_SHA, len(keys), *keys, *args)
        return bool(int(moved))


def quota_mover(store: QuotaStore, client: RedisClient | None) -> QuotaMover | None:
    """The mover for ``store``: its own method when it has one, else the Redis script (a
    store that is not in memory is the Redis store); None if neither applies."""
    if isinstance(store, QuotaMover):
        return store
    return RedisQuotaMover(client) if client is not None else None


async def move_reservation(
    quota: QueueQuota, client: RedisClient | None, prompt_id: str, upstream: str
) -> bool:
    """Count ``prompt_id`` on ``upstream`` from now on, if it is counted at all. Failures are
    logged, not raised: the submission goes ahead (the reconciler reads every instance's queue,
    so the prompt is still released when it ends; only the per-upstream counts lag until then).
    """
    if not quota.enabled:
        return False
    mover = quota_mover(quota.store, client)
    if mover is None:
        return False
    try:
        moved = await quota.bounded(mover.move_upstream(prompt_id, upstream), "move")
    except StoreFailed as exc:
        log.warning("queue_quota_move_failed", error=exc.kind, upstream=upstream)
        return False
    if moved:
        log.debug("queue_quota_moved", upstream=upstream)
    return moved


__all__ = ["MOVE_LUA", "RedisQuotaMover", "move_reservation", "quota_mover"]
