"""Queue-quota stores: the in-memory one and the Redis one (a real redis-server) behave alike.

Time is injected (both stores take a clock; the Redis scripts then use it instead of ``TIME``),
so expiry and the reconciler's grace are tested without waiting.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any

import pytest
import redis.asyncio as redis

from proxy.limits.quota.model import MemoryQuotaStore, QuotaStore, queue_quota_for
from proxy.limits.quota.reconciler import QuotaEventObserver, ended_prompt
from proxy.limits.quota.redis_store import PREFIX, RedisQuotaStore
from proxy.principal import Principal
from proxy.settings.auth import DEFAULT_ROLES, RoleSettings
from proxy.settings.limits import RateLimitSettings
from proxy.state import compose_frame_filters

TTL = 100.0


class Clock:
    def __init__(self) -> None:
        self.now = 1_700_000_000.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture(params=["memory", "redis"])
async def store(request: pytest.FixtureRequest, clock: Clock) -> AsyncIterator[QuotaStore]:
    if request.param == "memory":
        yield MemoryQuotaStore(TTL, clock=clock)
        return
    client = redis.Redis.from_url(request.getfixturevalue("redis_url"))
    yield RedisQuotaStore(client, TTL, clock=clock)
    await client.aclose()


async def fill(store: QuotaStore, owner: str, n: int, *, upstream: str = "gpu1") -> list[str]:
    ids = [f"{owner}-p{i}" for i in range(n)]
    for pid in ids:
        reservation = await store.reserve(pid, owner, upstream, limit=n, upstream_cap=0)
        assert reservation.outcome == "reserved"
    return ids


# -- reserve ----------------------------------------------------------------------------------


async def test_quota_is_exact_and_per_owner(store: QuotaStore) -> None:
    await fill(store, "u:alice", 3)
    over = await store.reserve("extra", "u:alice", "gpu1", limit=3, upstream_cap=0)
    assert (over.outcome, over.in_use) == ("user_quota", 3)
    assert await store.in_use("u:alice") == 3
    # Bob's quota does not see Alice's prompts.
    bob = await store.reserve("b1", "u:bob", "gpu1", limit=3, upstream_cap=0)
    assert (bob.outcome, bob.in_use) == ("reserved", 1)


async def test_limit_zero_is_unlimited(store: QuotaStore) -> None:
    for i in range(20):
        r = await store.reserve(f"p{i}", "u:admin", "gpu1", limit=0, upstream_cap=0)
        assert r.outcome == "reserved"
    assert await store.in_use("u:admin") == 20


async def test_a_counted_id_is_a_duplicate(store: QuotaStore) -> None:
    await fill(store, "u:alice", 1)
    again = await store.reserve("u:alice-p0", "u:bob", "gpu1", limit=5, upstream_cap=0)
    assert again.outcome == "duplicate"
    assert await store.in_use("u:bob") == 0


async def test_upstream_cap_counts_every_owner_of_that_upstream(store: QuotaStore) -> None:
    for i, owner in enumerate(("u:a", "u:b", "u:c")):
        r = await store.reserve(f"p{i}", owner, "gpu1", limit=5, upstream_cap=3)
        assert r.outcome == "reserved"
    capped = await store.reserve("p9", "u:d", "gpu1", limit=5, upstream_cap=3)
    assert (capped.outcome, capped.in_use) == ("upstream_cap", 3)
    other = await store.reserve("p10", "u:d", "gpu2", limit=5, upstream_cap=3)
    assert other.outcome == "reserved"


# -- release, accept, expiry ------------------------------------------------------------------


async def test_release_frees_a_slot_and_is_idempotent(store: QuotaStore) -> None:
    ids = await fill(store, "u:alice", 2)
    assert await store.release([ids[0], ids[0], "unknown"]) == 1
    assert await store.release([ids[0]]) == 0
    assert await store.in_use("u:alice") == 1
    r = await store.reserve("next", "u:alice", "gpu1", limit=2, upstream_cap=2)
    assert r.outcome == "reserved"


async def test_accepting_a_released_prompt_does_not_count_it_again(store: QuotaStore) -> None:
    [pid] = await fill(store, "u:alice", 1)
    await store.release([pid])  # its end event overtook ComfyUI's answer
    await store.accepted(pid)
    assert await store.in_use("u:alice") == 0
    snapshot = await store.snapshot("gpu1", grace_seconds=10)
    assert snapshot.candidates == ()
    assert snapshot.in_use == 0


async def test_expired_entries_stop_counting(store: QuotaStore, clock: Clock) -> None:
    await fill(store, "u:alice", 2)
    clock.now += TTL - 1
    assert await store.in_use("u:alice") == 2
    clock.now += 1
    assert await store.in_use("u:alice") == 0
    assert (await store.reserve("n", "u:alice", "gpu1", limit=2, upstream_cap=1)).outcome == (
        "reserved"
    )
    assert (await store.snapshot("gpu1", grace_seconds=10)).in_use == 1


async def test_snapshot_lists_only_accepted_or_long_unanswered(
    store: QuotaStore, clock: Clock
) -> None:
    a, b, c = await fill(store, "u:alice", 3)
    await store.accepted(a)
    snapshot = await store.snapshot("gpu1", grace_seconds=30)
    assert snapshot.candidates == (a,)
    assert snapshot.in_use == 3
    clock.now += 31  # b and c never got an answer (the client went away, say)
    later = await store.snapshot("gpu1", grace_seconds=30)
    assert sorted(later.candidates) == sorted([a, b, c])
    assert (await store.snapshot("gpu2", grace_seconds=30)).in_use == 0


async def test_concurrent_reservations_never_exceed_the_quota(store: QuotaStore) -> None:
    results = await asyncio.gather(
        *(store.reserve(f"p{i}", "u:alice", "gpu1", limit=5, upstream_cap=0) for i in range(40))
    )
    assert sum(r.outcome == "reserved" for r in results) == 5
    assert await store.in_use("u:alice") == 5


async def test_redis_keys_share_one_cluster_slot(redis_url: str) -> None:
    from redis.crc import key_slot  # noqa: PLC0415

    client = redis.Redis.from_url(redis_url)
    store = RedisQuotaStore(client, TTL)
    await store.reserve("p-{x}", "u:alice", "gpu1:8188", limit=1, upstream_cap=0)
    keys = [k async for k in client.scan_iter(match=f"{PREFIX}*")]
    assert len(keys) == 3
    assert len({key_slot(k) for k in keys}) == 1
    ttls = [await client.pttl(k) for k in keys]
    assert all(0 < t <= TTL * 1000 for t in ttls)  # nothing outlives its newest entry
    await client.aclose()


# -- who gets which quota ---------------------------------------------------------------------


def principal(*roles: str) -> Principal:
    return Principal(subject="s", roles=frozenset(roles), source="bearer")


@pytest.mark.parametrize(
    ("roles", "expected"),
    [
        (("user",), 10),  # role without its own: [rate_limits] queue_quota
        (("power",), 50),
        (("user", "power"), 50),  # the most generous
        (("power", "admin"), 0),  # 0 = unlimited wins
        (("unknown-role",), 10),
        ((), 10),
    ],
)
def test_quota_per_role(roles: tuple[str, ...], expected: int) -> None:
    assert queue_quota_for(principal(*roles), RateLimitSettings(), DEFAULT_ROLES) == expected


def test_role_quota_overrides_the_default() -> None:
    roles = {**DEFAULT_ROLES, "tight": RoleSettings(queue_quota=1)}
    settings = RateLimitSettings(queue_quota=4)
    assert queue_quota_for(principal("tight"), settings, roles) == 1
    assert queue_quota_for(principal("user"), settings, roles) == 4


# -- WebSocket end events ---------------------------------------------------------------------


@pytest.mark.parametrize(
    ("frame", "expected"),
    [
        ('{"type": "execution_success", "data": {"prompt_id": "p1", "timestamp": 1}}', "p1"),
        ('{"type": "execution_error", "data": {"prompt_id": "p2", "node_id": "3"}}', "p2"),
        ('{"type": "execution_interrupted", "data": {"prompt_id": "p3"}}', "p3"),
        ('{"type": "executing", "data": {"node": null, "prompt_id": "p4"}}', "p4"),
        ('{"type": "executing", "data": {"node": "3", "display_node": null, "prompt_id": "x"}}',
         None),
        ('{"type": "executing", "data": {"node": null}}', None),  # connect-time: no id
        ('{"type": "execution_start", "data": {"prompt_id": "p5"}}', None),
        ('{"type": "progress", "data": {"value": 1, "max": 2, "prompt_id": "p6"}}', None),
        ('{"type": "status", "data": {"status": {"exec_info": {"queue_remaining": 0}}}}', None),
        ('{"type": "execution_success", "data": {"prompt_id": 7}}', None),
        ('not json "execution_success"', None),
    ],
)  # fmt: skip
def test_ended_prompt(frame: str, expected: str | None) -> None:
    assert ended_prompt(frame) == expected


class _Releases:
    def __init__(self) -> None:
        self.released: list[str] = []

    async def release(self, prompt_ids: Any, *, reason: str) -> int:
        self.released.extend(prompt_ids)
        return len(prompt_ids)


async def test_observer_releases_once_and_passes_frames_to_the_next_filter() -> None:
    quota = _Releases()
    seen: list[str | bytes] = []

    async def inner(frame: str | bytes) -> str | bytes | None:
        seen.append(frame)
        return None if frame == b"drop" else frame

    # The observer comes first in the socket's filters (it sees frames the next one drops).
    observer = compose_frame_filters([QuotaEventObserver(quota), inner])  # type: ignore[arg-type]
    assert observer is not None
    success = '{"type": "execution_success", "data": {"prompt_id": "p1"}}'
    done = '{"type": "executing", "data": {"node": null, "prompt_id": "p1"}}'
    assert await observer(success) == success
    assert await observer(done) == done
    assert await observer(b"drop") is None
    assert quota.released == ["p1"]
    assert seen == [success, done, b"drop"]
    bare = QuotaEventObserver(quota)  # type: ignore[arg-type]
    assert await bare(b"\x00\x00\x00\x01jpeg") == b"\x00\x00\x00\x01jpeg"
