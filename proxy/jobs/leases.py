"""A set of due items that replicas take turns on: a sorted set of due times with claims.

Used twice: the webhook outbox (messages due for an attempt) and the job watcher (unfinished
jobs due for a look). ``claim`` atomically takes the items due now and moves each one's due
time to ``now + lease``: no other replica sees it due until then, and if the claimer dies
the item is due again when the lease ends (the work is at least once, one claimer at a
time). Each claim gets a fresh token; finishing or rescheduling an item checks it, so a
claimer whose lease ran out (another replica took the item over) changes nothing.

In Redis the three keys share one hash tag (one cluster slot), so the Lua scripts are atomic
on a cluster too; without Redis the same is done in process memory.
"""

from __future__ import annotations

import secrets
import time
from typing import TYPE_CHECKING, Any, Protocol

if TYPE_CHECKING:
    from proxy.redis.client import RedisClient

_CLAIM = """
local ids = redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', ARGV[1], 'LIMIT', 0, tonumber(ARGV[3]))
local out = {}
for _, id in ipairs(ids) do
  local raw = redis.call('HGET', KEYS[2], id)
  if raw then
    redis.call('ZADD', KEYS[1], tonumber(ARGV[1]) + tonumber(ARGV[2]), id)
    local token = ARGV[4] .. ':' .. id
    redis.call('HSET', KEYS[3], id, token)
    table.insert(out, id)
    table.insert(out, raw)
    table.insert(out, token)
  else
    redis.call('ZREM', KEYS[1], id)
  end
end
return out
"""
_FINISH = """
if redis.call('HGET', KEYS[3], ARGV[1]) ~= ARGV[2] then return 0 end
redis.call('ZREM', KEYS[1], ARGV[1])
redis.call('HDEL', KEYS[2], ARGV[1])
redis.call('HDEL', KEYS[3], ARGV[1])
return 1
"""
_RESCHEDULE = """
if redis.call('HGET', KEYS[3], ARGV[1]) ~= ARGV[2] then return 0 end
redis.call('ZADD', KEYS[1], tonumber(ARGV[3]), ARGV[1])
redis.call('HSET', KEYS[2], ARGV[1], ARGV[4])
redis.call('HDEL', KEYS[3], ARGV[1])
return 1
"""
_ADD = """
if ARGV[4] == '1' then
  if not redis.call('SET', KEYS[4], '1', 'NX', 'PX', tonumber(ARGV[5])) then return 0 end
end
redis.call('HSET', KEYS[2], ARGV[1], ARGV[2])
redis.call('ZADD', KEYS[1], tonumber(ARGV[3]), ARGV[1])
return 1
"""


class DueSet(Protocol):
    async def add(
        self, item: str, payload: bytes, due: float, *, once: str = "", once_ttl: float = 0
    ) -> bool:
        """Add (or replace) ``item``; with ``once``: only if that marker was not set yet
        (the marker is kept ``once_ttl`` seconds; it and the add are one atomic step)."""
        ...

    async def claim(self, now: float, lease: float, limit: int) -> list[tuple[str, bytes, str]]:
        """Up to ``limit`` items due at ``now``: ``(item, payload, token)``."""
        ...

    async def finish(self, item: str, token: str) -> bool: ...

    async def reschedule(self, item: str, token: str, due: float, payload: bytes) -> bool: ...

    async def remove(self, item: str) -> bool:
        """Drop ``item`` whoever holds it; True for the one call that removed it."""
        ...

    async def next_due(self) -> float | None: ...

    async def depth(self) -> int: ...


def _token() -> str:
    return secrets.token_hex(8)


class RedisDueSet:
    def __init__(self, client: RedisClient, name: str) -> None:
        self._redis = client
        tag = "{comfygate:" + name + "}"
        self.keys = (f"{tag}:due", f"{tag}:items", f"{tag}:claims")
        self.tag = tag

    async def add(
        self, item: str, payload: bytes, due: float, *, once: str = "", once_ttl: float = 0
    ) -> bool:
        marker = f"{self.tag}:once:{once}"
        ttl = max(1, int(once_ttl * 1000))
        reply: Any = await self._redis.eval(
            _ADD, 4, *self.keys, marker, item, payload, int(due * 1000), "1" if once else "", ttl
        )
        return bool(reply)

    async def claim(self, now: float, lease: float, limit: int) -> list[tuple[str, bytes, str]]:
        reply: Any = await self._redis.eval(
            _CLAIM, 3, *self.keys, int(now * 1000), int(lease * 1000), limit, _token()
        )
        out: list[tuple[str, bytes, str]] = []
        for i in range(0, len(reply), 3):
            item, payload, token = reply[i : i + 3]
            out.append(
                (
                    _text(item),
                    payload if isinstance(payload, bytes) else payload.encode(),
                    _text(token),
                )
            )
        return out

    async def finish(self, item: str, token: str) -> bool:
        return bool(await self._redis.eval(_FINISH, 3, *self.keys, item, token))

    async def reschedule(self, item: str, token: str, due: float, payload: bytes) -> bool:
        reply: Any = await self._redis.eval(
            _RESCHEDULE, 3, *self.keys, item, token, int(due * 1000), payload
        )
        return bool(reply)

    async def remove(self, item: str) -> bool:
        removed: Any = await self._redis.zrem(self.keys[0], item)
        await self._redis.hdel(self.keys[1], item)
        return bool(removed)

    async def next_due(self) -> float | None:
        first: Any = await self._redis.zrange(self.keys[0], 0, 0, withscores=True)
        return float(first[0][1]) / 1000 if first else None

    async def depth(self) -> int:
        return int(await self._redis.zcard(self.keys[0]))


def _text(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else value


class MemoryDueSet:
    """One process's (no Redis): nothing survives a restart, nothing is shared."""

    def __init__(self) -> None:
        self._due: dict[str, float] = {}
        self._items: dict[str, bytes] = {}
        self._claims: dict[str, str] = {}
        self._once: dict[str, float] = {}

    async def add(
        self, item: str, payload: bytes, due: float, *, once: str = "", once_ttl: float = 0
    ) -> bool:
        if once:
            now = time.time()
            if self._once.get(once, 0) > now:
                return False
            self._once = {k: v for k, v in self._once.items() if v > now}
            self._once[once] = now + once_ttl
        self._items[item] = payload
        self._due[item] = due
        return True

    async def claim(self, now: float, lease: float, limit: int) -> list[tuple[str, bytes, str]]:
        due = sorted((t, i) for i, t in self._due.items() if t <= now)[:limit]
        out: list[tuple[str, bytes, str]] = []
        for _, item in due:
            token = f"{_token()}:{item}"
            self._due[item] = now + lease
            self._claims[item] = token
            out.append((item, self._items[item], token))
        return out

    async def finish(self, item: str, token: str) -> bool:
        if self._claims.get(item) != token:
            return False
        self._claims.pop(item, None)
        self._due.pop(item, None)
        self._items.pop(item, None)
        return True

    async def reschedule(self, item: str, token: str, due: float, payload: bytes) -> bool:
        if self._claims.get(item) != token:
            return False
        del self._claims[item]
        self._due[item] = due
        self._items[item] = payload
        return True

    async def remove(self, item: str) -> bool:
        self._items.pop(item, None)
        self._claims.pop(item, None)
        return self._due.pop(item, None) is not None

    async def next_due(self) -> float | None:
        return min(self._due.values(), default=None)

    async def depth(self) -> int:
        return len(self._due)


__all__ = ["DueSet", "MemoryDueSet", "RedisDueSet"]
