"""Where the gateway queue lives: in Redis, shared by every replica, or in process memory.

What is kept (Redis keys, all under the hash tag ``{comfygate:sched}`` so scripts may touch
several of them on a cluster; ``P`` = ``comfygate:sched:{q}``):

==========================  ==================================================================
``P:seq``                   arrival counter (``INCR``): each held prompt's ``seq``
``P:items``                 hash ``prompt_id`` -> the held prompt (JSON: :class:`Held` + headers)
``P:bodies``                hash ``prompt_id`` -> the body ComfyUI will receive, as decided on
``P:q:<owner>``             sorted set: the owner's held prompts, scored in run order
``P:users``                 set: owners with held prompts
``P:tags``                  hash ``owner`` -> finish tag; ``\\x00last`` -> last start tag given
``P:flight``                hash ``prompt_id`` -> a claimed or released prompt (JSON
                            :class:`Flight`): ``releasing`` under a replica's lease until
                            ``until``, then ``released`` until it is seen to end
``P:feed:<instance>``       the replica feeding that instance (``SET NX PX``, renewed)
``P:est``                   hash ``instance|shape`` -> execution-time estimate
``P:failed``                hash ``prompt_id`` -> a prompt ComfyUI refused at release time
                            (owner + its failed history entry); ``P:failedq`` keeps the
                            newest :data:`FAILED_KEEP` ids
==========================  ==================================================================

The lease protocol (exactly one release per prompt, none lost):

1. *claim*: one script moves the prompt from its owner's queue to ``P:flight`` as
   ``releasing`` with ``replica`` and ``until = now + lease``, and advances the owner's finish
   tag, but only if the prompt is still held and the tag is the one the choice was made on
   (another replica's concurrent claim makes this one fail and choose again). The body stays.
2. the replica POSTs the body to ComfyUI (its ``prompt_id`` fixed by the proxy);
3. *released* (200) or *drop* (ComfyUI refused it: 4xx) or *unclaim* (nothing was sent: the
   instance could not be reached) ends the lease.

A replica killed between 1 and 3 leaves a ``releasing`` record whose lease lapses. Whoever
feeds that instance next *retakes* it (a script: only a lapsed lease) and asks ComfyUI whether
it has the prompt (queue or history): if so it is marked released, else it is sent again. The
lease outlives any answer ComfyUI takes to a submission, so a send of the dead replica cannot
still land after the check.
"""

from __future__ import annotations

import asyncio
import time
from collections import defaultdict
from collections.abc import Collection
from dataclasses import asdict, dataclass, replace
from typing import Any, Literal, Protocol

import orjson

from proxy.redis.client import RedisClient
from proxy.scheduler.fair import Choice, Held, InFlight, run_order

FRONT_OFFSET = 1e15
"""Score offset of ``front`` prompts in an owner's queue (they run before the others)."""
LAST = "\x00last"
FAILED_KEEP = 1000
"""Refused prompts remembered (their failed history entries), newest first."""

State = Literal["releasing", "released"]


@dataclass(frozen=True, slots=True)
class Flight:
    """A prompt claimed for release or released, until it is seen ending on its instance."""

    prompt_id: str
    owner: str
    role: str
    instance: str
    start: float
    credit: float
    front: bool
    seq: int
    cost: float
    shape: str
    created: float
    state: State
    replica: str
    until: float
    """Wall-clock end of the claim's lease (while ``releasing``)."""
    released_at: float = 0.0

    @property
    def in_flight(self) -> InFlight:
        return InFlight(
            self.prompt_id, self.owner, self.instance, self.start, self.credit, self.front
        )


@dataclass(frozen=True, slots=True)
class Entry:
    """A held prompt with what releasing it needs."""

    held: Held
    body: bytes
    headers: tuple[tuple[str, str], ...]


@dataclass(slots=True)
class View:
    """What a choice is made on, read at once."""

    queues: dict[str, list[Held]]
    finish: dict[str, float]
    last_start: float
    flights: list[Flight]


class SchedulerStore(Protocol):
    """The gateway queue's state (see the module doc); every write is one atomic step."""

    async def next_seq(self) -> int: ...
    async def hold(self, entry: Entry) -> bool:
        """Queue it; False if the id is already held."""
        ...

    async def view(self, per_user: int) -> View: ...
    async def claim(
        self, choice: Choice, expect: float, instance: str, replica: str, until: float
    ) -> bytes | None:
        """The body, if this replica now holds the release lease (see the module doc);
        ``expect`` is the owner's finish tag the choice was made on (compare-and-set)."""
        ...

    async def entry(self, prompt_id: str) -> Entry | None: ...
    async def released(self, prompt_id: str, replica: str, at: float) -> bool: ...
    async def retake(self, prompt_id: str, replica: str, now: float, until: float) -> bool: ...
    async def unclaim(self, prompt_id: str) -> bool:
        """Back to the head of its owner's queue, its charge given back."""
        ...

    async def finish(self, prompt_id: str) -> None: ...
    async def charge(self, owner: str, delta: float) -> float:
        """Add ``delta`` to ``owner``'s finish tag (a run's measured time replacing its
        estimate); the tag as now stored (what a claim compares with)."""
        ...

    async def cancel(self, prompt_ids: Collection[str] | None, owner: str | None) -> list[str]:
        """Remove held prompts (``None``: all of ``owner``'s; ``owner`` None: anyone's)."""
        ...

    async def held(self, owner: str | None) -> list[Held]:
        """Held prompts in run order per owner (``None``: every owner's, grouped by owner)."""
        ...

    async def held_ids(self) -> set[str]: ...
    async def count(self, owner: str | None) -> int: ...
    async def flights(self) -> list[Flight]: ...
    async def feed_lease(self, instance: str, replica: str, ttl: float) -> bool: ...
    async def drop_feed_lease(self, instance: str, replica: str) -> None:
        """Give up feeding ``instance`` (shutdown): another replica takes over at once."""
        ...

    async def estimates(self) -> dict[str, float]: ...
    async def put_estimates(self, values: dict[str, float]) -> None: ...
    async def record_failed(self, owner: str, prompt_id: str, entry: dict[str, Any]) -> None:
        """Remember a refused prompt's failed history entry (the newest FAILED_KEEP)."""
        ...

    async def failed(self, owner: str | None) -> dict[str, dict[str, Any]]:
        """Failed entries by prompt id, oldest first (``None``: everyone's)."""
        ...


def _score(held: Held) -> float:
    return held.seq - FRONT_OFFSET if held.front else float(held.seq)


def _held_json(held: Held, headers: tuple[tuple[str, str], ...]) -> bytes:
    return orjson.dumps({**asdict(held), "headers": headers})


def _held_of(raw: bytes | str) -> tuple[Held, tuple[tuple[str, str], ...]]:
    data: dict[str, Any] = orjson.loads(raw)
    headers = tuple((str(k), str(v)) for k, v in data.pop("headers", ()))
    data["candidates"] = tuple(data.get("candidates", ()))
    return Held(**data), headers


def _flight_of(raw: bytes | str) -> Flight:
    return Flight(**orjson.loads(raw))


# -- memory ------------------------------------------------------------------------------------


class MemoryStore:
    """The queue in this process (no Redis: one replica)."""

    def __init__(self) -> None:
        self._seq = 0
        self._entries: dict[str, Entry] = {}
        self._queues: dict[str, dict[str, Held]] = defaultdict(dict)
        self._tags: dict[str, float] = {}
        self._last = 0.0
        self._flight: dict[str, Flight] = {}
        self._feed: dict[str, tuple[str, float]] = {}
        self._est: dict[str, float] = {}
        self._failed: dict[str, tuple[str, dict[str, Any]]] = {}

    async def next_seq(self) -> int:
        self._seq += 1
        return self._seq

    async def hold(self, entry: Entry) -> bool:
        pid = entry.held.prompt_id
        if pid in self._entries:
            return False
        self._entries[pid] = entry
        self._queues[entry.held.owner][pid] = entry.held
        return True

    async def view(self, per_user: int) -> View:
        queues = {u: run_order(q.values())[:per_user] for u, q in self._queues.items() if q}
        return View(queues, dict(self._tags), self._last, list(self._flight.values()))

    async def claim(
        self, choice: Choice, expect: float, instance: str, replica: str, until: float
    ) -> bytes | None:
        held = choice.item
        queue = self._queues.get(held.owner, {})
        if held.prompt_id not in queue or self._tags.get(held.owner, 0.0) != expect:
            return None
        del queue[held.prompt_id]
        self._tags[held.owner] = choice.finish
        self._last = choice.start
        self._flight[held.prompt_id] = _flight(choice, instance, replica, until)
        return self._entries[held.prompt_id].body

    async def entry(self, prompt_id: str) -> Entry | None:
        return self._entries.get(prompt_id)

    async def released(self, prompt_id: str, replica: str, at: float) -> bool:
        flight = self._flight.get(prompt_id)
        if flight is None or flight.replica != replica:
            return False
        self._flight[prompt_id] = replace(flight, state="released", released_at=at)
        return True

    async def retake(self, prompt_id: str, replica: str, now: float, until: float) -> bool:
        flight = self._flight.get(prompt_id)
        if flight is None or flight.state != "releasing" or flight.until > now:
            return False
        self._flight[prompt_id] = replace(flight, replica=replica, until=until)
        return True

    async def unclaim(self, prompt_id: str) -> bool:
        flight = self._flight.pop(prompt_id, None)
        entry = self._entries.get(prompt_id)
        if flight is None or entry is None:
            return False
        self._queues[flight.owner][prompt_id] = entry.held
        self._tags[flight.owner] = self._tags.get(flight.owner, 0.0) - flight.credit
        return True

    async def finish(self, prompt_id: str) -> None:
        self._flight.pop(prompt_id, None)
        self._entries.pop(prompt_id, None)

    async def charge(self, owner: str, delta: float) -> float:
        tag = self._tags[owner] = self._tags.get(owner, 0.0) + delta
        return tag

    async def cancel(self, prompt_ids: Collection[str] | None, owner: str | None) -> list[str]:
        removed: list[str] = []
        if prompt_ids is None:
            owners = [owner] if owner is not None else list(self._queues)
            prompt_ids = [pid for o in owners for pid in self._queues.get(o, {})]
        for pid in prompt_ids:
            entry = self._entries.get(pid)
            if entry is None or (owner is not None and entry.held.owner != owner):
                continue
            if self._queues[entry.held.owner].pop(pid, None) is not None:
                del self._entries[pid]
                removed.append(pid)
        return removed

    async def held(self, owner: str | None) -> list[Held]:
        owners = [owner] if owner is not None else sorted(self._queues)
        return [h for o in owners for h in run_order(self._queues.get(o, {}).values())]

    async def held_ids(self) -> set[str]:
        return {pid for q in self._queues.values() for pid in q}

    async def count(self, owner: str | None) -> int:
        if owner is not None:
            return len(self._queues.get(owner, {}))
        return sum(len(q) for q in self._queues.values())

    async def flights(self) -> list[Flight]:
        return list(self._flight.values())

    async def feed_lease(self, instance: str, replica: str, ttl: float) -> bool:
        holder = self._feed.get(instance)
        now = time.monotonic()
        if holder is not None and holder[0] != replica and holder[1] > now:
            return False
        self._feed[instance] = (replica, now + ttl)
        return True

    async def drop_feed_lease(self, instance: str, replica: str) -> None:
        if self._feed.get(instance, ("", 0.0))[0] == replica:
            del self._feed[instance]

    async def estimates(self) -> dict[str, float]:
        return dict(self._est)

    async def put_estimates(self, values: dict[str, float]) -> None:
        self._est.update(values)

    async def record_failed(self, owner: str, prompt_id: str, entry: dict[str, Any]) -> None:
        self._failed[prompt_id] = (owner, entry)
        while len(self._failed) > FAILED_KEEP:
            del self._failed[next(iter(self._failed))]

    async def failed(self, owner: str | None) -> dict[str, dict[str, Any]]:
        return {p: e for p, (o, e) in self._failed.items() if owner is None or o == owner}


def _flight(choice: Choice, instance: str, replica: str, until: float) -> Flight:
    held = choice.item
    return Flight(
        prompt_id=held.prompt_id,
        owner=held.owner,
        role=held.role,
        instance=instance,
        start=choice.start,
        credit=choice.finish - choice.start,
        front=held.front,
        seq=held.seq,
        cost=held.cost,
        shape=held.shape,
        created=held.created,
        state="releasing",
        replica=replica,
        until=until,
    )


# -- Redis -------------------------------------------------------------------------------------

PREFIX = "comfygate:sched:{q}"
PARSED_KEEP = 4096
"""Parsed held prompts a :class:`RedisStore` keeps (then starts over): more than the heads a
view reads (``per_user`` times the users waiting) in any realistic queue."""

_HOLD = """
if redis.call('HSETNX', KEYS[1], ARGV[1], ARGV[2]) == 0 then return 0 end
redis.call('HSET', KEYS[2], ARGV[1], ARGV[3])
redis.call('ZADD', KEYS[3], ARGV[4], ARGV[1])
redis.call('SADD', KEYS[4], ARGV[5])
return 1
"""

_VIEW = """
local out = {redis.call('HGETALL', KEYS[2]), redis.call('HVALS', KEYS[3])}
for _, user in ipairs(redis.call('SMEMBERS', KEYS[1])) do
  local ids = redis.call('ZRANGE', ARGV[1] .. user, 0, tonumber(ARGV[2]) - 1)
  if #ids == 0 then
    redis.call('SREM', KEYS[1], user)
  else
    local metas = redis.call('HMGET', KEYS[4], unpack(ids))
    for _, m in ipairs(metas) do if m then table.insert(out, m) end end
  end
end
return out
"""

_CLAIM = """
if not redis.call('ZSCORE', KEYS[3], ARGV[1]) then return false end
local cur = tonumber(redis.call('HGET', KEYS[5], ARGV[2]) or '0')
if cur ~= tonumber(ARGV[3]) then return false end
redis.call('ZREM', KEYS[3], ARGV[1])
if redis.call('ZCARD', KEYS[3]) == 0 then redis.call('SREM', KEYS[4], ARGV[2]) end
redis.call('HSET', KEYS[5], ARGV[2], ARGV[4], '\\0last', ARGV[5])
redis.call('HSET', KEYS[6], ARGV[1], ARGV[6])
return redis.call('HGET', KEYS[2], ARGV[1])
"""

_RELEASED = """
local raw = redis.call('HGET', KEYS[1], ARGV[1])
if not raw then return 0 end
local f = cjson.decode(raw)
if f['replica'] ~= ARGV[2] then return 0 end
f['state'] = 'released'
f['released_at'] = tonumber(ARGV[3])
redis.call('HSET', KEYS[1], ARGV[1], cjson.encode(f))
return 1
"""

_RETAKE = """
local raw = redis.call('HGET', KEYS[1], ARGV[1])
if not raw then return 0 end
local f = cjson.decode(raw)
if f['state'] ~= 'releasing' or f['until'] > tonumber(ARGV[3]) then return 0 end
f['replica'] = ARGV[2]
f['until'] = tonumber(ARGV[4])
redis.call('HSET', KEYS[1], ARGV[1], cjson.encode(f))
return 1
"""

_UNCLAIM = """
local raw = redis.call('HGET', KEYS[1], ARGV[1])
local meta = redis.call('HGET', KEYS[2], ARGV[1])
if not raw or not meta then return 0 end
local f = cjson.decode(raw)
local h = cjson.decode(meta)
redis.call('HDEL', KEYS[1], ARGV[1])
local score = h['seq']
if h['front'] then score = score - 1e15 end
redis.call('ZADD', ARGV[2] .. f['owner'], score, ARGV[1])
redis.call('SADD', KEYS[3], f['owner'])
redis.call('HINCRBYFLOAT', KEYS[4], f['owner'], -f['credit'])
return 1
"""

_CANCEL = """
local removed = {}
for i = 2, #ARGV do
  local pid = ARGV[i]
  local meta = redis.call('HGET', KEYS[1], pid)
  if meta then
    local owner = cjson.decode(meta)['owner']
    if (ARGV[1] == '' or ARGV[1] == owner) and redis.call('ZREM', KEYS[3] .. owner, pid) == 1 then
      redis.call('HDEL', KEYS[1], pid)
      redis.call('HDEL', KEYS[2], pid)
      table.insert(removed, pid)
    end
  end
end
return removed
"""

_DROP_FEED = """
if redis.call('GET', KEYS[1]) == ARGV[1] then redis.call('DEL', KEYS[1]) end
return 1
"""

_FAILED = """
if redis.call('HSETNX', KEYS[1], ARGV[1], ARGV[2]) == 0 then return 0 end
redis.call('RPUSH', KEYS[2], ARGV[1])
while redis.call('LLEN', KEYS[2]) > tonumber(ARGV[3]) do
  redis.call('HDEL', KEYS[1], redis.call('LPOP', KEYS[2]))
end
return 1
"""

_FINISH = """
redis.call('HDEL', KEYS[1], ARGV[1])
redis.call('HDEL', KEYS[2], ARGV[1])
redis.call('HDEL', KEYS[3], ARGV[1])
return 1
"""


class RedisStore:
    """The queue in Redis, shared by every replica (see the module doc)."""

    def __init__(self, client: RedisClient, prefix: str = PREFIX) -> None:
        self.client = client
        self.p = prefix
        self.items, self.bodies = f"{prefix}:items", f"{prefix}:bodies"
        self.users, self.tags = f"{prefix}:users", f"{prefix}:tags"
        self.flight, self.est = f"{prefix}:flight", f"{prefix}:est"
        self.qprefix = f"{prefix}:q:"
        self._parsed: dict[bytes | str, Held] = {}
        """Held prompts by their stored form: every round reads the same heads again, and
        parsing them (headers included) was a third of a release's cost. Stored items never
        change (a claim or cancel removes them), so the stored bytes are the key."""

    async def _eval(self, script: str, keys: list[str], *args: Any) -> Any:
        return await self.client.eval(script, len(keys), *keys, *args)

    async def next_seq(self) -> int:
        return int(await self.client.incr(f"{self.p}:seq"))

    async def hold(self, entry: Entry) -> bool:
        h = entry.held
        keys = [self.items, self.bodies, self.qprefix + h.owner, self.users]
        meta = _held_json(h, entry.headers)
        return bool(
            await self._eval(_HOLD, keys, h.prompt_id, meta, entry.body, _score(h), h.owner)
        )

    async def view(self, per_user: int) -> View:
        keys = [self.users, self.tags, self.flight, self.items]
        reply = await self._eval(_VIEW, keys, self.qprefix, per_user)
        tags_flat, flights_raw, *metas = reply
        tags = {_s(tags_flat[i]): float(tags_flat[i + 1]) for i in range(0, len(tags_flat), 2)}
        last = tags.pop(LAST, 0.0)
        queues: dict[str, list[Held]] = defaultdict(list)
        parsed = self._parsed
        if len(parsed) > PARSED_KEEP:
            parsed.clear()
        for raw in metas:
            held = parsed.get(raw)
            if held is None:
                held = parsed[raw] = _held_of(raw)[0]
            queues[held.owner].append(held)
        return View(
            {u: run_order(q) for u, q in queues.items()},
            tags,
            last,
            [_flight_of(f) for f in flights_raw],
        )

    async def claim(
        self, choice: Choice, expect: float, instance: str, replica: str, until: float
    ) -> bytes | None:
        h = choice.item
        keys = [
            self.items,
            self.bodies,
            self.qprefix + h.owner,
            self.users,
            self.tags,
            self.flight,
        ]
        flight = orjson.dumps(asdict(_flight(choice, instance, replica, until)))
        body = await self._eval(
            _CLAIM,
            keys,
            h.prompt_id,
            h.owner,
            repr(expect),
            repr(choice.finish),
            repr(choice.start),
            flight,
        )
        if body is None:
            return None
        return body if isinstance(body, bytes) else str(body).encode()

    async def entry(self, prompt_id: str) -> Entry | None:
        meta, body = await asyncio.gather(
            self.client.hget(self.items, prompt_id),
            self.client.hget(self.bodies, prompt_id),
        )
        if meta is None or body is None:
            return None
        held, headers = _held_of(meta)
        return Entry(held, body if isinstance(body, bytes) else str(body).encode(), headers)

    async def released(self, prompt_id: str, replica: str, at: float) -> bool:
        return bool(await self._eval(_RELEASED, [self.flight], prompt_id, replica, at))

    async def retake(self, prompt_id: str, replica: str, now: float, until: float) -> bool:
        return bool(await self._eval(_RETAKE, [self.flight], prompt_id, replica, now, until))

    async def unclaim(self, prompt_id: str) -> bool:
        keys = [self.flight, self.items, self.users, self.tags]
        return bool(await self._eval(_UNCLAIM, keys, prompt_id, self.qprefix))

    async def finish(self, prompt_id: str) -> None:
        await self._eval(_FINISH, [self.flight, self.items, self.bodies], prompt_id)

    async def charge(self, owner: str, delta: float) -> float:
        # Redis's own sum (long double, printed back): the claim script compares with it.
        return float(await self.client.hincrbyfloat(self.tags, owner, delta))

    async def cancel(self, prompt_ids: Collection[str] | None, owner: str | None) -> list[str]:
        if prompt_ids is None:
            prompt_ids = [h.prompt_id for h in await self.held(owner)]
        if not prompt_ids:
            return []
        keys = [self.items, self.bodies, self.qprefix]
        removed = await self._eval(_CANCEL, keys, owner or "", *prompt_ids)
        return [_s(r) for r in removed]

    async def held(self, owner: str | None) -> list[Held]:
        owners = (
            [owner]
            if owner is not None
            else sorted(_s(u) for u in await self.client.smembers(self.users))
        )
        out: list[Held] = []
        for o in owners:
            ids = await self.client.zrange(self.qprefix + o, 0, -1)
            if not ids:
                continue
            metas = await self.client.hmget(
                self.items, [_s(i) for i in ids if isinstance(i, (bytes, str))]
            )
            out.extend(run_order(_held_of(m)[0] for m in metas if m is not None))
        return out

    async def held_ids(self) -> set[str]:
        return {h.prompt_id for h in await self.held(None)}

    async def count(self, owner: str | None) -> int:
        if owner is not None:
            return int(await self.client.zcard(self.qprefix + owner))
        return len(await self.held_ids())

    async def flights(self) -> list[Flight]:
        raw = await self.client.hvals(self.flight)
        return [_flight_of(r) for r in raw]

    async def feed_lease(self, instance: str, replica: str, ttl: float) -> bool:
        key = f"{self.p}:feed:{instance}"
        ms = max(1, int(ttl * 1000))
        if await self.client.set(key, replica, nx=True, px=ms):
            return True
        holder = await self.client.get(key)
        if holder is not None and _s(holder) == replica:
            await self.client.pexpire(key, ms)
            return True
        return False

    async def drop_feed_lease(self, instance: str, replica: str) -> None:
        await self._eval(_DROP_FEED, [f"{self.p}:feed:{instance}"], replica)

    async def estimates(self) -> dict[str, float]:
        raw = await self.client.hgetall(self.est)
        return {_s(k): float(v) for k, v in raw.items()}

    async def record_failed(self, owner: str, prompt_id: str, entry: dict[str, Any]) -> None:
        keys = [f"{self.p}:failed", f"{self.p}:failedq"]
        record = orjson.dumps({"owner": owner, "entry": entry})
        await self._eval(_FAILED, keys, prompt_id, record, FAILED_KEEP)

    async def failed(self, owner: str | None) -> dict[str, dict[str, Any]]:
        ids = [_s(i) for i in await self.client.lrange(f"{self.p}:failedq", 0, -1)]
        if not ids:
            return {}
        raws = await self.client.hmget(f"{self.p}:failed", ids)
        out: dict[str, dict[str, Any]] = {}
        for pid, raw in zip(ids, raws, strict=True):
            if raw is None:
                continue
            record = orjson.loads(raw)
            if owner is None or record.get("owner") == owner:
                out[pid] = record["entry"]
        return out

    async def put_estimates(self, values: dict[str, float]) -> None:
        if values:
            mapping: dict[str | bytes, float] = {k: v for k, v in values.items()}
            await self.client.hset(self.est, mapping=mapping)  # type: ignore[arg-type]


def _s(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else value


__all__ = ["Entry", "Flight", "MemoryStore", "RedisStore", "SchedulerStore", "View"]
