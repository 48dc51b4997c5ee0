"""Who owns what on the upstream: prompts (with their upstream, client id and time) and files.

Shared by all proxy replicas through Redis; in process memory when no Redis is configured.
Entries expire after ``isolation.retention_seconds``, aligned with how long ComfyUI keeps
history (it keeps the newest 10,000 entries in memory until it restarts).

Files are recorded only as :mod:`proxy.isolation.attribution` decides (previews ComfyUI named
itself, from a preview node of the owner's prompt; a user's folder needs no record), and the
first claim of a name wins: a node's UI output can never take a file from its owner.

Recording a prompt is on the path of every ``POST /prompt``: in Redis it is one script that
claims the id and adds it to the owner's index together, and the claims that arrive together
share one round trip on a connection of the store's own (:mod:`proxy.limits.coalesce`, as the
rate limiter's checks do). On a Redis Cluster the two keys are in different slots: two round
trips per claim through the cluster client.
"""

from __future__ import annotations

import asyncio
import time
from collections import OrderedDict
from collections.abc import AsyncIterator, Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol

import orjson
import redis.asyncio as redis
from aiohttp import web

from proxy.isolation.namespaces import FOLDERS, folder_names, warn_if_unstable
from proxy.limits.coalesce import Coalescer, ScriptCall, ScriptPipe

if TYPE_CHECKING:
    from proxy.redis_store import RedisClient


@dataclass(frozen=True, slots=True)
class PromptRecord:
    prompt_id: str
    owner: str
    """The principal's ``comfy_user`` (stable, ComfyUI-safe)."""
    upstream: str
    client_id: str
    """The namespaced client id ComfyUI saw."""
    created_at: float
    role: str = ""
    """The submitter's role label (``metrics.role_label``), for the generation metrics: they
    read it from here instead of writing a record of their own on every submission."""
    previews: tuple[str, ...] = ()
    """Ids of the forwarded graph's preview nodes (``isolation.preview_nodes``): the only
    nodes whose UI output may name files of the submitter outside its folder
    (:mod:`proxy.isolation.attribution`)."""


FileRef = tuple[str, str, str]
"""``(type, subfolder, filename)`` as ComfyUI names a file (``type``: output/temp/input)."""


class OwnershipStore(Protocol):
    async def record_prompt(self, record: PromptRecord) -> bool:
        """Record a new prompt; False (and nothing written) when the id is already known."""
        ...

    async def forget_prompt(self, prompt_id: str) -> None: ...

    async def prompt(self, prompt_id: str) -> PromptRecord | None: ...

    async def prompts_of(self, owner: str) -> set[str]:
        """Every live prompt id of ``owner``."""
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

    def _now(self) -> float:
        return self._clock()

    def _live(self, expires: float) -> bool:
        return expires > self._now()

    async def record_prompt(self, record: PromptRecord) -> bool:
        known = self._prompts.get(record.prompt_id)
        if known is not None and self._live(known[0]):
            return False
        self._prompts[record.prompt_id] = (self._now() + self._retention, record)
        while len(self._prompts) > self._max:
            self._prompts.popitem(last=False)
        return True

    async def forget_prompt(self, prompt_id: str) -> None:
        self._prompts.pop(prompt_id, None)

    async def prompt(self, prompt_id: str) -> PromptRecord | None:
        known = self._prompts.get(prompt_id)
        return known[1] if known is not None and self._live(known[0]) else None

    async def prompts_of(self, owner: str) -> set[str]:
        now = self._now()
        return {
            pid for pid, (exp, rec) in self._prompts.items() if exp > now and rec.owner == owner
        }

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


# KEYS: the prompt's record, its owner's index. ARGV: record (JSON), ttl (s), prompt id, the
# entry's expiry and now (epoch s). The index entry is added only when the id was claimed: a
# taken id must never appear among another owner's prompts, not even for a moment.
RECORD_PROMPT_LUA = """
if not redis.call('SET', KEYS[1], ARGV[1], 'EX', ARGV[2], 'NX') then return 0 end
redis.call('ZADD', KEYS[2], ARGV[4], ARGV[3])
redis.call('ZREMRANGEBYSCORE', KEYS[2], '-inf', ARGV[5])
redis.call('EXPIRE', KEYS[2], ARGV[2])
return 1
"""


class RedisOwnershipStore:
    """Store shared by replicas. Keys: ``<p>prompt:<id>`` (JSON record), ``<p>owner:<owner>``
    (sorted set of prompt ids by expiry), ``<p>file:<type>:<subfolder>:<name>`` (owner)."""

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
                "previews": list(record.previews),
            }
        )
        now = time.time()
        args = (value, ttl, record.prompt_id, now + self._retention, now)
        if self._claims is not None:
            created = await self._claims.submit(((key, index), args))
            if isinstance(created, Exception):  # an error reply (OOM, READONLY, ...)
                raise created
            return bool(created)
        if not await self._redis.set(key, value, ex=ttl, nx=True):
            return False
        async with self._redis.pipeline(transaction=False) as pipe:
            pipe.zadd(index, {record.prompt_id: now + self._retention})
            pipe.zremrangebyscore(index, "-inf", now)
            pipe.expire(index, ttl)
            await pipe.execute()
        return True

    async def forget_prompt(self, prompt_id: str) -> None:
        record = await self.prompt(prompt_id)
        if record is None:
            await self._redis.delete(f"{self._prefix}prompt:{prompt_id}")
            return
        async with self._redis.pipeline(transaction=False) as pipe:
            pipe.delete(f"{self._prefix}prompt:{prompt_id}")
            pipe.zrem(f"{self._prefix}owner:{record.owner}", prompt_id)
            await pipe.execute()

    async def prompt(self, prompt_id: str) -> PromptRecord | None:
        raw = await self._redis.get(f"{self._prefix}prompt:{prompt_id}")
        if raw is None:
            return None
        data = orjson.loads(raw)
        return PromptRecord(
            prompt_id=prompt_id,
            owner=str(data["owner"]),
            upstream=str(data["upstream"]),
            client_id=str(data["client_id"]),
            created_at=float(data["created_at"]),
            role=str(data.get("role", "")),  # absent in records written before it was added
            previews=_previews(data.get("previews")),
        )

    async def prompts_of(self, owner: str) -> set[str]:
        ids = await self._redis.zrangebyscore(f"{self._prefix}owner:{owner}", time.time(), "+inf")
        return {i.decode() if isinstance(i, bytes) else str(i) for i in ids}

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
    from proxy.state import OWNERSHIP, REDIS, SETTINGS  # noqa: PLC0415 - state imports this

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


def _previews(value: object) -> tuple[str, ...]:
    """A record's preview node ids (absent in records written before they were kept: none)."""
    if not isinstance(value, list):
        return ()
    return tuple(v for v in value if isinstance(v, str))


def _abandoned() -> redis.ConnectionError:
    """What the other claims of a batch get when its sender was cancelled (shutdown)."""
    return redis.ConnectionError("ownership claim abandoned")
