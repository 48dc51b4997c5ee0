"""Job records: who submitted which prompt through the jobs API, and how to tell them.

A record is written once ComfyUI accepted the prompt (its id is the job id), kept for
``jobs.retention_seconds``: in Redis when configured (every replica answers for every job),
else in process memory (bounded). Each owner's jobs are listed newest first from a sorted set.
The job's *state* is never stored here: it is read from ComfyUI (``proxy.jobs.status``).
"""

from __future__ import annotations

import time
from collections import OrderedDict
from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING, Any, Protocol

import orjson

if TYPE_CHECKING:
    from proxy.redis.client import RedisClient

KEY_PREFIX = "comfygate:job:"
OWNER_PREFIX = "comfygate:jobs:"
MAX_LOCAL = 100_000


@dataclass(frozen=True, slots=True)
class JobRecord:
    id: str
    owner: str
    upstream: str
    created_at: float
    template: str = ""
    cache_key: str = ""
    cache_hit_of: str = ""
    """A result-cache hit: the earlier job whose outputs this one returns (nothing ran)."""
    cache_ttl: float = 0.0
    """The template's cache TTL when the job was submitted (its result is stored on success)."""
    webhook: str = ""
    """The URL notified when the job ends (checked at submit, and again at each attempt)."""
    extra: dict[str, Any] = field(default_factory=dict)

    def dump(self) -> bytes:
        return orjson.dumps(asdict(self))

    @classmethod
    def load(cls, raw: bytes | str) -> JobRecord | None:
        try:
            data = orjson.loads(raw)
            return cls(**data)
        except (orjson.JSONDecodeError, TypeError):
            return None


class JobStore(Protocol):
    async def put(self, record: JobRecord, ttl: float) -> None: ...

    async def get(self, job_id: str) -> JobRecord | None: ...

    async def page(self, owner: str, before: float | None, limit: int) -> list[JobRecord]: ...


class MemoryJobStore:
    def __init__(self, max_records: int = MAX_LOCAL) -> None:
        self._records: OrderedDict[str, tuple[float, JobRecord]] = OrderedDict()
        self._max = max_records

    async def put(self, record: JobRecord, ttl: float) -> None:
        self._records[record.id] = (time.time() + ttl, record)
        self._records.move_to_end(record.id)
        while len(self._records) > self._max:
            self._records.popitem(last=False)

    async def get(self, job_id: str) -> JobRecord | None:
        known = self._records.get(job_id)
        if known is None or known[0] < time.time():
            return None
        return known[1]

    async def page(self, owner: str, before: float | None, limit: int) -> list[JobRecord]:
        now = time.time()
        mine = [
            r
            for expires, r in self._records.values()
            if r.owner == owner and expires >= now and (before is None or r.created_at < before)
        ]
        mine.sort(key=lambda r: (r.created_at, r.id), reverse=True)
        return mine[:limit]


class RedisJobStore:
    def __init__(self, client: RedisClient) -> None:
        self._redis = client

    async def put(self, record: JobRecord, ttl: float) -> None:
        ms = max(1, int(ttl * 1000))
        owner_key = OWNER_PREFIX + record.owner
        # Two keys (different slots on a cluster): written one after the other; a record
        # without its index entry is still readable by id, the reverse is skipped when listed.
        await self._redis.set(KEY_PREFIX + record.id, record.dump(), px=ms)
        await self._redis.zadd(owner_key, {record.id: record.created_at})
        await self._redis.zremrangebyscore(owner_key, "-inf", time.time() - ttl)
        await self._redis.pexpire(owner_key, ms)

    async def get(self, job_id: str) -> JobRecord | None:
        raw = await self._redis.get(KEY_PREFIX + job_id)
        return JobRecord.load(raw) if raw is not None else None

    async def page(self, owner: str, before: float | None, limit: int) -> list[JobRecord]:
        top = f"({before}" if before is not None else "+inf"
        ids = await self._redis.zrevrangebyscore(
            OWNER_PREFIX + owner, top, "-inf", start=0, num=limit
        )
        records: list[JobRecord] = []
        for raw_id in ids:
            job_id = raw_id.decode() if isinstance(raw_id, bytes) else str(raw_id)
            record = await self.get(job_id)
            if record is not None and record.owner == owner:
                records.append(record)
        return records


__all__ = ["JobRecord", "JobStore", "MemoryJobStore", "RedisJobStore"]
