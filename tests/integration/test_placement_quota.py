"""Queue quotas across placement failover: a prompt refused by the first instance and accepted
by the next is counted under the instance that accepted it (issues 5 and 8).

The per-upstream cap (``rate_limits.upstream_max_pending``) and the gauge
``comfygate_queue_quota_tracked_prompts{upstream}`` read the reservation's upstream, so it must
follow the prompt; the user's own count is unchanged by the move.
"""

from __future__ import annotations

import uuid
from collections.abc import Callable
from typing import Any

import pytest
import redis.asyncio as redis

from proxy.limits.quota.model import MemoryQuotaStore
from proxy.limits.quota.move import RedisQuotaMover, quota_mover
from proxy.limits.quota.redis_store import RedisQuotaStore
from proxy.limits.quota.service import QUEUE_QUOTA
from proxy.observability.metrics import METRICS
from proxy.principal import comfy_user_id
from proxy.redis.client import REDIS
from tests.integration.multi_support import A, Client, Fakes, fakes, graph, multi_proxy

__all__ = ["fakes", "multi_proxy"]  # fixtures used by name


def gauge(client: Client, upstream: str) -> float:
    registry = client.app[METRICS].registry
    name = "comfygate_queue_quota_tracked_prompts"
    return registry.get_sample_value(name, {"upstream": upstream}) or 0.0


@pytest.mark.parametrize("state", ["memory", "redis"])
async def test_a_prompt_that_fails_over_is_counted_where_it_runs(
    state: str,
    fakes: Fakes,
    multi_proxy: Callable[..., Any],
    request: pytest.FixtureRequest,
) -> None:
    redis_section = {"url": request.getfixturevalue("redis_url")} if state == "redis" else {}
    client: Client = await multi_proxy(
        redis=redis_section,
        # A cap of one per instance: were the prompt counted on the instance that refused it,
        # that instance would look full and the one running it empty.
        rate_limits={"upstream_max_pending": 1, "quota_poll_seconds": 3600},
    )
    quota = client.app[QUEUE_QUOTA]
    expected = RedisQuotaMover if state == "redis" else MemoryQuotaStore
    assert isinstance(quota_mover(quota.store, client.app[REDIS]), expected)

    # Three idle, identical instances: placement tries the first (home) first.
    first, second = fakes[0], fakes[1]
    first.fail_prompts = 1  # answers 500 before queueing anything: failover to the next
    second.hold()  # the prompt stays queued there while the counts are read
    prompt_id = str(uuid.uuid4())
    resp = await client.post("/prompt", json={"prompt": graph(), "prompt_id": prompt_id}, headers=A)
    assert resp.status == 200, await resp.text()
    assert await second.wait_held() == prompt_id
    assert first.fail_prompts == 0  # it was tried first, and refused

    await quota.settle()  # the 200's acceptance mark is written off the response path
    on_first = await quota.store.snapshot(fakes.name(0), 0)
    on_second = await quota.store.snapshot(fakes.name(1), 0)
    assert on_first.in_use == 0
    assert on_second.in_use == 1
    assert on_second.candidates == (prompt_id,)  # still accepted (the 200 marked it)
    assert await quota.store.in_use(f"u:{comfy_user_id('alice')}") == 1

    reconciler = quota.reconciler
    assert reconciler is not None
    assert await reconciler.poll_once() == 0  # queued on the second instance: still live
    assert gauge(client, fakes.name(0)) == 0
    assert gauge(client, fakes.name(1)) == 1

    second.release()
    await second.wait_idle()
    assert await reconciler.poll_once() == 1  # ended: released from the right instance
    assert gauge(client, fakes.name(1)) == 0


async def test_moving_a_released_or_expired_reservation_does_nothing(redis_url: str) -> None:
    """Both stores: a prompt no longer counted is not counted again by a move."""
    clock = [1000.0]
    memory = MemoryQuotaStore(10, clock=lambda: clock[0])
    assert (await memory.reserve("p", "u:x", "a", limit=0, upstream_cap=0)).outcome == "reserved"
    assert await memory.move_upstream("p", "b")
    assert (await memory.snapshot("a", 0)).in_use == 0
    assert (await memory.snapshot("b", 0)).in_use == 1
    await memory.release(["p"])
    assert not await memory.move_upstream("p", "a")
    assert (await memory.reserve("q", "u:x", "a", limit=0, upstream_cap=0)).outcome == "reserved"
    clock[0] += 11
    assert not await memory.move_upstream("q", "b")
    assert (await memory.snapshot("b", 0)).in_use == 0

    client = redis.Redis.from_url(redis_url)
    try:
        store = RedisQuotaStore(client, 10)
        mover = RedisQuotaMover(client)
        prompt_id = str(uuid.uuid4())
        owner = f"u:{uuid.uuid4()}"
        a, b = f"a-{uuid.uuid4()}", f"b-{uuid.uuid4()}"
        reserved = await store.reserve(prompt_id, owner, a, limit=0, upstream_cap=0)
        assert reserved.outcome == "reserved"
        assert await mover.move_upstream(prompt_id, b)
        assert await mover.move_upstream(prompt_id, b)  # idempotent
        assert (await store.snapshot(a, 0)).in_use == 0
        assert (await store.snapshot(b, 0)).in_use == 1
        assert 0 < await client.pttl(f"{{comfygate:queue}}:up:{b}") <= 10_000
        assert await store.release([prompt_id]) == 1  # released from where it is now
        assert (await store.snapshot(b, 0)).in_use == 0
        assert not await mover.move_upstream(prompt_id, a)
        assert (await store.snapshot(a, 0)).in_use == 0
    finally:
        await client.aclose()
