"""Queue-quota reservations in Redis, shared by every proxy replica (see :mod:`.quota`).

Keys, all under one hash tag so that a user's set, the upstream's set and the prompt's record
are in ONE Redis Cluster slot and one script can check and change them together::

    {comfygate:queue}:u:<owner>       ZSET  prompt id -> expiry (ms)   the owner's unfinished
    {comfygate:queue}:up:<upstream>   ZSET  prompt id -> expiry (ms)   the upstream's unfinished
    {comfygate:queue}:p:<prompt id>   HASH  owner, upstream, reserved (ms), accepted (0/1)

Every change is one Lua script (``EVALSHA``, loaded again on ``NOSCRIPT``), with the time taken
from Redis ``TIME``: proxies with skewed clocks agree on expiries. Release and snapshot derive
the owner's and upstream's keys from the prompt's record inside the script; they are not in
``KEYS``, but share its hash tag and therefore its slot, which is what Redis Cluster requires.
The price of one slot: all quota traffic (one script per submission and per prompt end, one per
upstream and poll) goes to one node, which is far below what a node serves.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Collection
from typing import Any, Final

from redis.exceptions import NoScriptError

from proxy.limits.quota.model import Outcome, Reservation, Snapshot
from proxy.redis.client import RedisClient

PREFIX: Final = "{comfygate:queue}:"

_NOW = """
local now
if ARGV[#ARGV] ~= '' then
  now = tonumber(ARGV[#ARGV])
else
  local t = redis.call('TIME')
  now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
end
"""
"""The time in ms: Redis ``TIME``, or the script's last argument when a test injects a clock."""

RESERVE_LUA: Final = (
    """
-- KEYS: owner's zset, upstream's zset, prompt's record. ARGV: prompt id, limit, cap, ttl (ms),
-- owner, upstream, now (ms, tests only; '' = Redis TIME). Returns {outcome, in_use}; outcome
-- 0 reserved, 1 user_quota, 2 upstream_cap, 3 duplicate.
if redis.replicate_commands then redis.replicate_commands() end
"""
    + _NOW
    + """
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now)
local mine = redis.call('ZCARD', KEYS[1])
if redis.call('EXISTS', KEYS[3]) == 1 then return {3, mine} end
local limit = tonumber(ARGV[2])
if limit > 0 and mine >= limit then return {1, mine} end
redis.call('ZREMRANGEBYSCORE', KEYS[2], '-inf', now)
local cap = tonumber(ARGV[3])
if cap > 0 then
  local queued = redis.call('ZCARD', KEYS[2])
  if queued >= cap then return {2, queued} end
end
local ttl = tonumber(ARGV[4])
redis.call('ZADD', KEYS[1], now + ttl, ARGV[1])
redis.call('ZADD', KEYS[2], now + ttl, ARGV[1])
redis.call('HSET', KEYS[3], 'owner', ARGV[5], 'upstream', ARGV[6], 'reserved', now,
  'accepted', 0)
-- Each key lives as long as its newest entry: nothing is left behind.
redis.call('PEXPIRE', KEYS[1], ttl)
redis.call('PEXPIRE', KEYS[2], ttl)
redis.call('PEXPIRE', KEYS[3], ttl)
return {0, mine + 1}
"""
)

ACCEPT_LUA: Final = """
-- KEYS: prompt records. Each marked only if still there: a prompt may end (and be released
-- from its events) before ComfyUI's answer to the submission reaches the proxy. Returns how
-- many were marked.
local marked = 0
for _, key in ipairs(KEYS) do
  if redis.call('EXISTS', key) == 1 then
    redis.call('HSET', key, 'accepted', 1)
    marked = marked + 1
  end
end
return marked
"""

RELEASE_LUA: Final = """
-- KEYS: prompt records; ARGV[1]: key prefix, ARGV[i + 1]: the id of KEYS[i]. Returns how many
-- were counted.
local released = 0
for i, key in ipairs(KEYS) do
  local record = redis.call('HMGET', key, 'owner', 'upstream')
  if record[1] then
    redis.call('ZREM', ARGV[1] .. 'u:' .. record[1], ARGV[i + 1])
    redis.call('ZREM', ARGV[1] .. 'up:' .. record[2], ARGV[i + 1])
    redis.call('DEL', key)
    released = released + 1
  end
end
return released
"""

SNAPSHOT_LUA: Final = (
    """
-- KEYS[1]: an upstream's zset. ARGV: key prefix, grace (ms), now (tests only). Returns
-- {in_use, {reconcilable ids}}: accepted, or reserved before now - grace.
if redis.replicate_commands then redis.replicate_commands() end
"""
    + _NOW
    + """
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now)
local stale_before = now - tonumber(ARGV[2])
local out = {}
for _, id in ipairs(redis.call('ZRANGE', KEYS[1], 0, -1)) do
  local record = redis.call('HMGET', ARGV[1] .. 'p:' .. id, 'reserved', 'accepted')
  if not record[1] then
    redis.call('ZREM', KEYS[1], id)
  elseif record[2] == '1' or tonumber(record[1]) < stale_before then
    out[#out + 1] = id
  end
end
return {redis.call('ZCARD', KEYS[1]), out}
"""
)

IN_USE_LUA: Final = (
    """
-- KEYS[1]: an owner's zset. ARGV: now (tests only). Returns the unexpired count.
if redis.replicate_commands then redis.replicate_commands() end
"""
    + _NOW
    + """
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now)
return redis.call('ZCARD', KEYS[1])
"""
)

_OUTCOMES: Final[dict[int, Outcome]] = {
    0: "reserved",
    1: "user_quota",
    2: "upstream_cap",
    3: "duplicate",
}


class _Script:
    """One Lua script run by ``EVALSHA``; ``SCRIPT LOAD`` again on ``NOSCRIPT`` (first use, a
    Redis restart or failover, ``SCRIPT FLUSH``; in a cluster it loads on every primary)."""

    def __init__(self, source: str) -> None:
        self.source = source
        self.sha = hashlib.sha1(source.encode(), usedforsecurity=False).hexdigest()

    async def __call__(self, client: RedisClient, keys: list[str], args: list[Any]) -> Any:
        try:
            return await client.evalsha(self.sha, len(keys), *keys, *args)
        except NoScriptError:
            await client.script_load(self.source)
            return await client.evalsha(self.sha, len(keys), *keys, *args)


_RESERVE = _Script(RESERVE_LUA)
_ACCEPT = _Script(ACCEPT_LUA)
_RELEASE = _Script(RELEASE_LUA)
_SNAPSHOT = _Script(SNAPSHOT_LUA)
_IN_USE = _Script(IN_USE_LUA)

RELEASE_BATCH: Final = 256
"""Prompts released by one script call (bounds the time one script blocks its node)."""


def _text(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else value


class RedisQuotaStore:
    """:class:`~proxy.limits.quota.model.QuotaStore` in Redis. Raises ``redis.RedisError`` /
    ``OSError`` when Redis fails; the caller decides what that means (fail modes)."""

    def __init__(
        self, client: RedisClient, ttl_seconds: float, *, clock: Callable[[], float] | None = None
    ) -> None:
        self._client = client
        self._ttl_ms = max(1, round(ttl_seconds * 1000))
        self.clock = clock
        """Replaces Redis ``TIME`` (epoch seconds) when set: tests drive expiry with it."""

    def _now(self) -> str:
        return "" if self.clock is None else str(round(self.clock() * 1000))

    async def reserve(
        self, prompt_id: str, owner: str, upstream: str, *, limit: int, upstream_cap: int
    ) -> Reservation:
        keys = [f"{PREFIX}u:{owner}", f"{PREFIX}up:{upstream}", f"{PREFIX}p:{prompt_id}"]
        args = [prompt_id, limit, upstream_cap, self._ttl_ms, owner, upstream, self._now()]
        outcome, in_use = await _RESERVE(self._client, keys, args)
        return Reservation(_OUTCOMES[int(outcome)], int(in_use))

    async def accepted(self, prompt_id: str) -> None:
        await _ACCEPT(self._client, [f"{PREFIX}p:{prompt_id}"], [])

    async def accepted_many(self, prompt_ids: Collection[str]) -> None:
        """:meth:`accepted` for several prompts, one script call per :data:`RELEASE_BATCH`
        (the submissions answered while the previous call was in flight travel together)."""
        ids = list(dict.fromkeys(prompt_ids))
        for start in range(0, len(ids), RELEASE_BATCH):
            keys = [f"{PREFIX}p:{pid}" for pid in ids[start : start + RELEASE_BATCH]]
            await _ACCEPT(self._client, keys, [])

    async def release(self, prompt_ids: Collection[str]) -> int:
        ids = list(dict.fromkeys(prompt_ids))
        released = 0
        for start in range(0, len(ids), RELEASE_BATCH):
            batch = ids[start : start + RELEASE_BATCH]
            keys = [f"{PREFIX}p:{pid}" for pid in batch]
            released += int(await _RELEASE(self._client, keys, [PREFIX, *batch]))
        return released

    async def snapshot(self, upstream: str, grace_seconds: float) -> Snapshot:
        reply = await _SNAPSHOT(
            self._client,
            [f"{PREFIX}up:{upstream}"],
            [PREFIX, round(grace_seconds * 1000), self._now()],
        )
        in_use, ids = reply
        return Snapshot(tuple(_text(i) for i in ids), int(in_use))

    async def in_use(self, owner: str) -> int:
        return int(await _IN_USE(self._client, [f"{PREFIX}u:{owner}"], [self._now()]))


__all__ = ["PREFIX", "RELEASE_BATCH", "RedisQuotaStore"]
