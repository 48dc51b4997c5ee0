"""Who owns what on the upstream: prompts (with their upstream, client id and time) and files.

Shared by all proxy replicas through Redis; in process memory when no Redis is configured.
Entries expire after ``isolation.retention_seconds``, aligned with how long ComfyUI keeps
history (it keeps the newest 10,000 entries in memory until it restarts).

Files are recorded only as :mod:`proxy.tenancy.attribution` decides (previews ComfyUI named
itself, from a preview node of the owner's prompt; a user's folder needs no record), and the
first claim of a name wins: a node's UI output can never take a file from its owner.

Each owner also has a *view index*: their prompt ids in submission order (a Redis sorted set
scored by submission time; an ordered dict in memory), which the read guard pages through so a
tenant's ``/history`` and ``/api/jobs`` cost follows their own prompts, not everyone's
(:mod:`proxy.isolation.own_views`). It holds at most :data:`VIEW_INDEX_MAX` ids per owner (the
newest), expires with the records, and loses an id when its history entry is deleted through
the proxy (:meth:`OwnershipStore.unindex`) or when ComfyUI no longer knows it. The ownership
set (``prompts_of``, what isolation decides on) is not changed by either.

Recording a prompt is on the path of every ``POST /prompt``: in Redis it is one script that
claims the id and adds it to the owner's indexes together, and the claims that arrive together
share one round trip on a connection of the store's own (:mod:`proxy.redis.coalesce`, as the
rate limiter's checks do). On a Redis Cluster the two keys are in different slots: two round
trips per claim through the cluster client.
"""

from __future__ import annotations

import asyncio
import time
from collections import OrderedDict
from collections.abc import AsyncIterator, Callable, Iterable, Sequence
from typing import TYPE_CHECKING, Any, Protocol

import orjson
import redis.asyncio as redis
from aiohttp import web

from proxy.comfy.records import FileRef, PromptRecord
from proxy.redis.client import REDIS
from proxy.redis.coalesce import Coalescer, ScriptCall, ScriptPipe
from proxy.settings import SETTINGS
from proxy.tenancy.namespaces import FOLDERS, folder_names, warn_if_unstable

if TYPE_CHECKING:
    from proxy.redis.client import RedisClient


VIEW_INDEX_MAX = 20_000
"""Ids kept per owner in the view index (the newest). ComfyUI keeps the newest 10,000
finished prompts of everyone (``MAXIMUM_HISTORY_SIZE``) plus whatever is queued; twice that
covers a full history of one user's prompts with as many still queued."""

BACKFILLED_CACHE_SIZE = 100_000


class OwnershipStore(Protocol):
    async def record_prompt(self, record: PromptRecord) -> bool:
        """Record a new prompt; False (and nothing written) when the id is already known."""
        ...

    async def forget_prompt(self, prompt_id: str) -> None: ...

    async def prompt(self, prompt_id: str) -> PromptRecord | None: ...

    async def prompts_of(self, owner: str) -> set[str]:
        """Every live prompt id of ``owner``."""
        ...

    async def records(self, prompt_ids: Sequence[str]) -> list[PromptRecord | None]:
        """:meth:`prompt` of each id, in one round trip."""
        ...

    async def indexed(
        self, owner: str, *, newest_first: bool, skip: int = 0, count: int
    ) -> list[str]:
        """A slice of ``owner``'s view index: live ids in submission order (oldest first, or
        newest first), ``count`` of them after the first ``skip``."""
        ...

    async def indexed_count(self, owner: str) -> int:
        """How many live ids ``owner``'s view index holds."""
        ...

    async def unindex(self, owner: str, prompt_ids: Iterable[str]) -> None:
        """Drop ``prompt_ids`` from ``owner``'s view index (deleted from history, or gone from
        ComfyUI); their records and ownership stay."""
        ...

    async def record_files(self, owner: str, files: Iterable[FileRef]) -> None:
        """Claim ``files`` for ``owner``; a file someone else claimed first stays theirs."""
        ...

    async def file_owner(self, ref: FileRef) -> str | None: ...


class MemoryOwnershipStore:
    """Single-process store (bounded; oldest entries go first)."""

    def __init__(
        self,
        retention_seconds: float,
        *,
        max_entries: int = 200_000,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self._retention = retention_seconds
        self._max = max_entries
        self._clock = clock
        self._prompts: OrderedDict[str, tuple[float, PromptRecord]] = OrderedDict()
        self._files: OrderedDict[FileRef, tuple[float, str]] = OrderedDict()
        self._owned: dict[str, dict[str, None]] = {}
        """Owner -> their ids (the ownership set, in submission order)."""
        self._views: dict[str, OrderedDict[str, None]] = {}
        """Owner -> their view index (submission order, newest last)."""

    def _now(self) -> float:
        return self._clock()

    def _live(self, expires: float) -> bool:
        return expires > self._now()

    async def record_prompt(self, record: PromptRecord) -> bool:
        known = self._prompts.get(record.prompt_id)
        if known is not None and self._live(known[0]):
            return False
        if known is not None:  # an expired record of the id: drop it from its owner's sets
            self._drop(record.prompt_id, known[1].owner)
        self._prompts[record.prompt_id] = (self._now() + self._retention, record)
        self._owned.setdefault(record.owner, {})[record.prompt_id] = None
        view = self._views.setdefault(record.owner, OrderedDict())
        view[record.prompt_id] = None
        while len(view) > VIEW_INDEX_MAX:
            view.popitem(last=False)
        while len(self._prompts) > self._max:
            evicted, (_, old) = self._prompts.popitem(last=False)
            self._drop(evicted, old.owner)
        return True

    def _drop(self, prompt_id: str, owner: str) -> None:
        for sets in (self._owned, self._views):
            ids = sets.get(owner)
            if ids is not None:
                ids.pop(prompt_id, None)
                if not ids:
                    del sets[owner]

    async def forget_prompt(self, prompt_id: str) -> None:
        known = self._prompts.pop(prompt_id, None)
        if known is not None:
            self._drop(prompt_id, known[1].owner)

    async def prompt(self, prompt_id: str) -> PromptRecord | None:
        known = self._prompts.get(prompt_id)
        return known[1] if known is not None and self._live(known[0]) else None

    async def prompts_of(self, owner: str) -> set[str]:
        return set(self._live_ids(self._owned.get(owner)))

    def _live_ids(self, ids: dict[str, None] | None) -> list[str]:
        """``ids`` that are still live (expired ones are dropped on the way: O(own))."""
        if not ids:
            return []
        now = self._now()
        live: list[str] = []
        for pid in list(ids):
            known = self._prompts.get(pid)
            if known is not None and known[0] > now:
                live.append(pid)
            elif known is not None:
                self._prompts.pop(pid, None)
                self._drop(pid, known[1].owner)
            else:
                ids.pop(pid, None)
        return live

    async def records(self, prompt_ids: Sequence[str]) -> list[PromptRecord | None]:
        return [await self.prompt(pid) for pid in prompt_ids]

    async def indexed(
        self, owner: str, *, newest_first: bool, skip: int = 0, count: int
    ) -> list[str]:
        ids = self._live_ids(self._views.get(owner))
        if newest_first:
            ids.reverse()
        return ids[skip : skip + max(count, 0)]

    async def indexed_count(self, owner: str) -> int:
        return len(self._live_ids(self._views.get(owner)))

    async def unindex(self, owner: str, prompt_ids: Iterable[str]) -> None:
        view = self._views.get(owner)
        if view is None:
            return
        for pid in prompt_ids:
            view.pop(pid, None)
        if not view:
            del self._views[owner]

    async def record_files(self, owner: str, files: Iterable[FileRef]) -> None:
        expires = self._now() + self._retention
        for ref in files:
            known = self._files.get(ref)
            if known is not None and self._live(known[0]) and known[1] != owner:
                continue  # SECURITY: first claim wins (see OwnershipStore.record_files)
            self._files[ref] = (expires, owner)
            self._files.move_to_end(ref)
        while len(self._files) > self._max:
            self._files.popitem(last=False)

    async def file_owner(self, ref: FileRef) -> str | None:
        known = self._files.get(ref)
        return known[1] if known is not None and self._live(known[0]) else None


# KEYS: the prompt's record, its owner's index, its owner's view index. ARGV: record (JSON),
# ttl (s), prompt id, the entry's expiry, now (epoch s), the view index's cap. The index entries
# are added only when the id was claimed: a taken id must never appear among another owner's
# prompts, not even for a moment.
RECORD_PROMPT_LUA = """
if not redis.call('SET', KEYS[1], ARGV[1], 'EX', ARGV[2], 'NX') then return 0 end
redis.call('ZADD', KEYS[2], ARGV[4], ARGV[3])
redis.call('ZREMRANGEBYSCORE', KEYS[2], '-inf', ARGV[5])
redis.call('EXPIRE', KEYS[2], ARGV[2])
redis.call('ZADD', KEYS[3], ARGV[5], ARGV[3])
redis.call('ZREMRANGEBYSCORE', KEYS[3], '(0', ARGV[5] - ARGV[2])
local first = redis.call('ZSCORE', KEYS[3], '') and 1 or 0
redis.call('ZREMRANGEBYRANK', KEYS[3], first, -(tonumber(ARGV[6]) + 1))
redis.call('EXPIRE', KEYS[3], ARGV[2])
return 1
"""

# KEYS: the owner's index, their view index. ARGV: now, retention (s), the view index's cap,
# ttl (whole s).
# Fills the view index of an owner whose prompts were recorded before view indexes existed,
# once (the ``""`` member at score 0 marks it done; real entries score their submission time).
BACKFILL_VIEW_LUA = """
if redis.call('ZSCORE', KEYS[2], '') then return 0 end
local owned = redis.call('ZRANGEBYSCORE', KEYS[1], ARGV[1], '+inf', 'WITHSCORES')
for i = 1, #owned, 2 do
  redis.call('ZADD', KEYS[2], 'NX', owned[i + 1] - ARGV[2], owned[i])
end
redis.call('ZADD', KEYS[2], 0, '')
redis.call('ZREMRANGEBYRANK', KEYS[2], 1, -(tonumber(ARGV[3]) + 1))
redis.call('EXPIRE', KEYS[2], ARGV[4])
return 1
"""


class RedisOwnershipStore:
    """Store shared by replicas. Keys: ``<p>prompt:<id>`` (JSON record), ``<p>owner:<owner>``
    (sorted set of prompt ids by expiry), ``<p>view:<owner>`` (the view index: prompt ids by
    submission time, and ``""`` at 0 once backfilled), ``<p>file:<type>:<subfolder>:<name>``
    (owner)."""

    def __init__(
        self, client: RedisClient, retention_seconds: float, prefix: str = "comfygate:own:"
    ) -> None:
        self._redis = client
        self._retention = retention_seconds
        self._prefix = prefix
        # A cluster keeps a prompt's record and its owner's index in different slots, which
        # one script may not touch together: there, the claim and the index are two steps.
        self._claims: Coalescer[ScriptCall, Any] | None = None
        if isinstance(client, redis.Redis):
            pool = client.connection_pool
            self._pipe = ScriptPipe(pool, RECORD_PROMPT_LUA)
            timeout = pool.connection_kwargs.get("socket_timeout")
            self._timeout: float | None = timeout
            self._claims = Coalescer(self._send_claims, _abandoned)
        self._backfilled: OrderedDict[str, None] = OrderedDict()
        """Owners whose view index this process saw backfilled (bounded)."""

    async def _send_claims(self, calls: list[ScriptCall]) -> Sequence[Any]:
        """One round trip for every claim queued, bounded like one command of the shared
        client (``redis.socket_timeout_seconds``). Every failure is a ``redis.RedisError``, so
        a request answers 503 state_unavailable whatever went wrong."""
        try:
            if not self._pipe.connected:
                await self._pipe.connect()  # bounded by the connect timeout, not the budget
            async with asyncio.timeout(self._timeout):
                return await self._pipe.exchange(calls)
        except redis.RedisError:
            raise
        except TimeoutError as exc:  # before OSError: TimeoutError is one
            raise redis.TimeoutError("ownership claim timed out") from exc
        except OSError as exc:
            raise redis.ConnectionError(f"ownership claim failed: {exc}") from exc

    async def aclose(self) -> None:
        """Stop the claims' pump and drop the store's own connection (app cleanup)."""
        if self._claims is not None:
            await self._claims.close()
            await self._pipe.close()

    async def record_prompt(self, record: PromptRecord) -> bool:
        ttl = max(1, int(self._retention))
        key = f"{self._prefix}prompt:{record.prompt_id}"
        index = f"{self._prefix}owner:{record.owner}"
        value = orjson.dumps(
            {
                "owner": record.owner,
                "upstream": record.upstream,
                "client_id": record.client_id,
                "created_at": record.created_at,
                "role": record.role,
                "sent_client_id": record.sent_client_id,
                "previews": list(record.previews),
            }
        )
        view = self._view_key(record.owner)
        now = time.time()
        args = (value, ttl, record.prompt_id, now + self._retention, now, VIEW_INDEX_MAX)
        if self._claims is not None:
            created = await self._claims.submit(((key, index, view), args))
            if isinstance(created, Exception):  # an error reply (OOM, READONLY, ...)
                raise created
            return bool(created)
        if not await self._redis.set(key, value, ex=ttl, nx=True):
            return False
        async with self._redis.pipeline(transaction=False) as pipe:
            pipe.zadd(index, {record.prompt_id: now + self._retention})
            pipe.zremrangebyscore(index, "-inf", now)
            pipe.expire(index, ttl)
            pipe.zadd(view, {record.prompt_id: now})
            pipe.zremrangebyscore(view, "(0", now - self._retention)
            # Rank 0 is the backfill mark once there is one; without it one extra id stays.
            pipe.zremrangebyrank(view, 1, -(VIEW_INDEX_MAX + 1))
            pipe.expire(view, ttl)
            await pipe.execute()
        return True

    def _view_key(self, owner: str) -> str:
        return f"{self._prefix}view:{owner}"

    async def forget_prompt(self, prompt_id: str) -> None:
        record = await self.prompt(prompt_id)
        if record is None:
            await self._redis.delete(f"{self._prefix}prompt:{prompt_id}")
            return
        async with self._redis.pipeline(transaction=False) as pipe:
            pipe.delete(f"{self._prefix}prompt:{prompt_id}")
            pipe.zrem(f"{self._prefix}owner:{record.owner}", prompt_id)
            pipe.zrem(self._view_key(record.owner), prompt_id)
            await pipe.execute()

    async def prompt(self, prompt_id: str) -> PromptRecord | None:
        raw = await self._redis.get(f"{self._prefix}prompt:{prompt_id}")
        return None if raw is None else _record(prompt_id, raw)

    async def prompts_of(self, owner: str) -> set[str]:
        ids = await self._redis.zrangebyscore(f"{self._prefix}owner:{owner}", time.time(), "+inf")
        return {_text(i) for i in ids}

    async def records(self, prompt_ids: Sequence[str]) -> list[PromptRecord | None]:
        if not prompt_ids:
            return []
        async with self._redis.pipeline(transaction=False) as pipe:
            for pid in prompt_ids:
                pipe.get(f"{self._prefix}prompt:{pid}")
            raws = await pipe.execute()
        return [
            None if raw is None else _record(pid, raw)
            for pid, raw in zip(prompt_ids, raws, strict=True)
        ]

    async def _backfill(self, owner: str) -> None:
        """Owners whose prompts were recorded before view indexes existed get one from their
        ownership index (submission time = expiry - retention), once; deletions made before
        cannot be known, so such ids are looked up and found gone like any other."""
        if owner in self._backfilled:
            return
        index, view = f"{self._prefix}owner:{owner}", self._view_key(owner)
        now, ttl = time.time(), max(1, int(self._retention))
        if isinstance(self._redis, redis.Redis):
            await self._redis.eval(
                BACKFILL_VIEW_LUA, 2, index, view, now, self._retention, VIEW_INDEX_MAX, ttl
            )
        elif await self._redis.zscore(view, "") is None:  # a cluster: two slots, two steps
            owned = await self._redis.zrangebyscore(index, now, "+inf", withscores=True)
            async with self._redis.pipeline(transaction=False) as pipe:
                if owned:
                    scores = {_text(m[0]): float(m[1]) - self._retention for m in owned}
                    pipe.zadd(view, scores, nx=True)
                pipe.zadd(view, {"": 0})
                pipe.zremrangebyrank(view, 1, -(VIEW_INDEX_MAX + 1))
                pipe.expire(view, ttl)
                await pipe.execute()
        self._backfilled[owner] = None
        while len(self._backfilled) > BACKFILLED_CACHE_SIZE:
            self._backfilled.popitem(last=False)

    async def indexed(
        self, owner: str, *, newest_first: bool, skip: int = 0, count: int
    ) -> list[str]:
        if count <= 0:
            return []
        await self._backfill(owner)
        view, oldest = self._view_key(owner), f"({time.time() - self._retention}"
        if newest_first:
            ids = await self._redis.zrevrangebyscore(view, "+inf", oldest, start=skip, num=count)
        else:
            ids = await self._redis.zrangebyscore(view, oldest, "+inf", start=skip, num=count)
        return [_text(i) for i in ids]

    async def indexed_count(self, owner: str) -> int:
        await self._backfill(owner)
        oldest = f"({time.time() - self._retention}"
        return int(await self._redis.zcount(self._view_key(owner), oldest, "+inf"))

    async def unindex(self, owner: str, prompt_ids: Iterable[str]) -> None:
        ids = [pid for pid in prompt_ids if pid]  # never the backfill mark
        if ids:
            await self._backfill(owner)  # else a later backfill would bring them back
            await self._redis.zrem(self._view_key(owner), *ids)

    def _file_key(self, ref: FileRef) -> str:
        kind, subfolder, name = ref
        return f"{self._prefix}file:{kind}:{subfolder}:{name}"

    async def record_files(self, owner: str, files: Iterable[FileRef]) -> None:
        ttl = max(1, int(self._retention))
        async with self._redis.pipeline(transaction=False) as pipe:
            for ref in files:
                # SECURITY: NX, first claim wins (see OwnershipStore.record_files); the owner's
                # own claim is not refreshed, its retention runs from the first one.
                pipe.set(self._file_key(ref), owner, ex=ttl, nx=True)
            await pipe.execute()

    async def file_owner(self, ref: FileRef) -> str | None:
        raw = await self._redis.get(self._file_key(ref))
        if raw is None:
            return None
        return raw.decode() if isinstance(raw, bytes) else str(raw)


async def ownership_store(app: web.Application) -> AsyncIterator[None]:
    """``cleanup_ctx``: Redis-backed when Redis is configured, else in memory."""

    isolation = app[SETTINGS].isolation
    retention = isolation.retention_seconds
    client = app[REDIS]
    names = folder_names(isolation.folder_secret)
    warn_if_unstable(names, isolation=isolation.enabled, shared_state=client is not None)
    app[FOLDERS] = names
    store: OwnershipStore = (
        RedisOwnershipStore(client, retention)
        if client is not None
        else MemoryOwnershipStore(retention)
    )
    app[OWNERSHIP] = store
    yield
    if isinstance(store, RedisOwnershipStore):
        await store.aclose()


def _record(prompt_id: str, raw: bytes | str) -> PromptRecord:
    data = orjson.loads(raw)
    return PromptRecord(
        prompt_id=prompt_id,
        owner=str(data["owner"]),
        upstream=str(data["upstream"]),
        client_id=str(data["client_id"]),
        created_at=float(data["created_at"]),
        role=str(data.get("role", "")),  # absent in records written before it was added
        sent_client_id=_optional_text(data.get("sent_client_id")),
        previews=_previews(data.get("previews")),
    )


def _optional_text(value: object) -> str | None:
    return value if isinstance(value, str) else None


def _text(value: object) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def _previews(value: object) -> tuple[str, ...]:
    """A record's preview node ids (absent in records written before they were kept: none)."""
    if not isinstance(value, list):
        return ()
    return tuple(v for v in value if isinstance(v, str))


def _abandoned() -> redis.ConnectionError:
    """What the other claims of a batch get when its sender was cancelled (shutdown)."""
    return redis.ConnectionError("ownership claim abandoned")


OWNERSHIP = web.AppKey("comfygate.ownership", OwnershipStore)
