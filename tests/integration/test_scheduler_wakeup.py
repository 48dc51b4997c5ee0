"""Wake-ups across replicas (``proxy.scheduler.wakeup``): a prompt held on the replica that does
not feed its instance is released by the feeding replica at once, not at its next poll.

The poll is made as long as settings allow (5 s) and each wait is bounded well under it, so
only the published wake-up can release the prompt in time. Without the subscription (pub/sub
refused, Redis down) the poll releases it; when Redis is back, so are the wake-ups. Every
task the wake-ups start ends with the app (its cleanup)."""

from __future__ import annotations

import asyncio
from typing import Any

import redis.asyncio as redis_asyncio
from aiohttp.test_utils import TestClient

from proxy.observability.metrics import METRICS
from proxy.scheduler.gate import Gate
from proxy.scheduler.keys import GATE
from proxy.scheduler.store import PREFIX
from proxy.scheduler.wakeup import Wakeups
from tests.conftest import ProxyFactory
from tests.fakes.comfyui import FakeComfyUI
from tests.redis_server import RedisServer
from tests.security.prompt_support import A, B, image, policy_sections, saved

Client = TestClient[Any, Any]
POLL_MS = 5000
WITHIN = 2.0
"""Seconds a wake-up may take here (a loaded machine); the poll would take 5."""
SETTLE_WITHIN = 60.0
"""A bound (never a hang) on a subscription being lost or coming back: not what is measured;
each failure on the way is logged with a rendered traceback, slow on a loaded machine."""


def gate_of(client: Client) -> Gate:
    gate: Gate = client.app[GATE]
    return gate


def wakeups_of(gate: Gate) -> Wakeups:
    assert gate.wakeups is not None
    return gate.wakeups


async def post(client: Client, who: dict[str, str], seed: int) -> str:
    body = {"prompt": saved(image(width=8 + seed % 8))}
    async with client.post("/prompt", json=body, headers=who) as resp:
        assert resp.status == 200
        answer = await resp.json()
    prompt_id: str = answer["prompt_id"]
    return prompt_id


def listed(fake: FakeComfyUI) -> set[str]:
    running, pending = fake.queue.current_queue()
    return {item[1] for item in [*running, *pending]}


async def released_by(gate: Gate, fake: FakeComfyUI, prompt_id: str) -> None:
    """Until ``fake`` lists ``prompt_id`` (its queue's own change notifications: nothing here
    wakes ``gate``, so only a wake-up or its poll can release the prompt)."""
    del gate  # kept for the callers' readability: the replica expected to release it
    await fake.queue.wait_for(lambda: prompt_id in listed(fake))


async def two_replicas(
    make_proxy: ProxyFactory, fake: FakeComfyUI, tmp_path: Any, redis_url: str
) -> tuple[Client, Client]:
    """``first`` feeds the instance (it holds the feed lease), ``second`` does not. Room for
    one running prompt (held by the fake) and several pending ones."""
    sections = {
        **policy_sections(tmp_path),
        "redis": {"url": redis_url},
        "scheduler": {"enabled": True, "poll_interval_ms": POLL_MS, "max_pending": 4},
    }
    first = await make_proxy(fake.url, token=None, **sections)
    await asyncio.wait_for(wakeups_of(gate_of(first)).subscribed.wait(), WITHIN)
    fake.hold()  # the first prompt stays running: one place left (pending)
    pid = await post(first, A, 0)
    await asyncio.wait_for(released_by(gate_of(first), fake, pid), WITHIN)
    second = await make_proxy(fake.url, token=None, **sections)
    await asyncio.wait_for(wakeups_of(gate_of(second)).subscribed.wait(), WITHIN)
    return first, second


async def test_prompt_held_on_other_replica_is_released_at_once(
    make_proxy: ProxyFactory, fake_comfy: FakeComfyUI, tmp_path: Any, redis_url: str
) -> None:
    first, second = await two_replicas(make_proxy, fake_comfy, tmp_path, redis_url)
    # Fill the instance (one running, four pending, all A's, sent straight through while
    # there was room), so that B's prompt is held rather than sent straight through.
    for seed in range(10, 14):
        await asyncio.wait_for(
            released_by(gate_of(first), fake_comfy, await post(first, A, seed)), WITHIN
        )
    pid = await post(second, B, 1)
    # Held on `second`, which cannot feed (the lease is `first`'s): its own round releases
    # nothing; `first` hears the wake-up and, B coming before A's backlog in fair order,
    # takes back one of A's pending prompts and releases B's, long before its poll.
    await asyncio.wait_for(released_by(gate_of(first), fake_comfy, pid), WITHIN)
    # Only `first` feeds the instance, so only it could take A's prompt back: it heard the
    # wake-up (its poll is 5 s away). One of A's is held again, to run after B's.
    assert len(listed(fake_comfy)) == 5
    held_again = await gate_of(first).store.held(None)
    assert len(held_again) == 1
    assert held_again[0].owner.startswith("alice-")  # A's, taken back; B's is listed
    fake_comfy.release()


async def test_lost_subscription_is_restored_and_feeder_lives(
    make_proxy: ProxyFactory, fake_comfy: FakeComfyUI, tmp_path: Any, redis_url: str
) -> None:
    first, second = await two_replicas(make_proxy, fake_comfy, tmp_path, redis_url)
    wakeups = wakeups_of(gate_of(first))
    admin = redis_asyncio.Redis.from_url(redis_url)
    try:
        # Every subscriber's connection is cut by Redis.
        killed = await admin.client_kill_filter(_type="pubsub")
        assert int(killed) >= 2
    finally:
        await admin.aclose()
    # The subscription comes back (supervised, short back-off) and the feeder still runs: a
    # prompt held on `second` is released without `first`'s poll.
    pid = await post(second, B, 2)
    await asyncio.wait_for(released_by(gate_of(first), fake_comfy, pid), WITHIN)
    await asyncio.wait_for(wakeups.subscribed.wait(), WITHIN)
    task = gate_of(first)._task
    assert task is not None
    assert not task.done()
    fake_comfy.release()


def wake_errors(client: Client) -> float:
    value = client.app[METRICS].registry.get_sample_value(
        "comfygate_scheduler_store_errors_total", {"op": "wake"}
    )
    return value or 0.0


async def feeds(client: Client, redis_url: str) -> None:
    """``client`` holds the feed lease again (a Redis that restarted empty has none)."""
    gate = gate_of(client)
    admin = redis_asyncio.Redis.from_url(redis_url)
    try:
        key = f"{PREFIX}:feed:{gate.instances()[0].name}"
        await admin.set(key, gate.replica, px=60_000)
    finally:
        await admin.aclose()


async def test_pubsub_refused_degrades_to_polling_and_comes_back(
    make_proxy: ProxyFactory, fake_comfy: FakeComfyUI, tmp_path: Any, own_redis: RedisServer
) -> None:
    first, second = await two_replicas(make_proxy, fake_comfy, tmp_path, own_redis.url)
    ours = wakeups_of(gate_of(first)), wakeups_of(gate_of(second))
    admin = redis_asyncio.Redis.from_url(own_redis.url)
    try:
        # Pub/sub refused while every other command works: the subscriptions are cut and
        # cannot come back (NOPERM); publishing still works.
        await admin.acl_setuser("default", enabled=True, commands=["-subscribe"])
        await admin.client_kill_filter(_type="pubsub")
        for wakeups in ours:
            await asyncio.wait_for(wakeups.down.wait(), SETTLE_WITHIN)
        pid = await post(second, B, 3)
        # Only the feeder's poll can release it now (no wake-up reaches it).
        await asyncio.wait_for(released_by(gate_of(first), fake_comfy, pid), SETTLE_WITHIN)
        assert not ours[0].subscribed.is_set()
        assert wake_errors(first) >= 1
        task = gate_of(first)._task
        assert task is not None
        assert not task.done()
        # Pub/sub allowed again: the subscriptions come back (their back-off), and with them
        # the wake-ups.
        await admin.acl_setuser("default", enabled=True, commands=["+subscribe"])
        for wakeups in ours:
            await asyncio.wait_for(wakeups.subscribed.wait(), SETTLE_WITHIN)
        pid = await post(second, B, 4)
        await asyncio.wait_for(released_by(gate_of(first), fake_comfy, pid), WITHIN)
    finally:
        await admin.aclose()
    fake_comfy.release()


async def test_redis_outage_then_wakeups_resume(
    make_proxy: ProxyFactory, fake_comfy: FakeComfyUI, tmp_path: Any, own_redis: RedisServer
) -> None:
    first, second = await two_replicas(make_proxy, fake_comfy, tmp_path, own_redis.url)
    ours = wakeups_of(gate_of(first)), wakeups_of(gate_of(second))
    own_redis.stop()
    for wakeups in ours:
        await asyncio.wait_for(wakeups.down.wait(), SETTLE_WITHIN)
    own_redis.start()  # same port, empty (no persistence in the suite's servers)
    # Back by the end of the back-off, or sooner: the feeder's first round that finds Redis
    # again cuts it short.
    for wakeups in ours:
        await asyncio.wait_for(wakeups.subscribed.wait(), SETTLE_WITHIN)
    await feeds(first, own_redis.url)
    pid = await post(second, B, 5)
    await asyncio.wait_for(released_by(gate_of(first), fake_comfy, pid), WITHIN)
    for client in (first, second):
        task = gate_of(client)._task
        assert task is not None
        assert not task.done()
    fake_comfy.release()


async def test_every_task_of_the_wakeups_ends_with_the_app(
    make_proxy: ProxyFactory, fake_comfy: FakeComfyUI, tmp_path: Any, redis_url: str
) -> None:
    first, second = await two_replicas(make_proxy, fake_comfy, tmp_path, redis_url)
    fake_comfy.release()
    before = {t for t in asyncio.all_tasks() if t.get_name() == "comfygate-scheduler-wakeups"}
    assert len(before) == 2
    admin = redis_asyncio.Redis.from_url(redis_url)
    try:
        for client in (first, second):
            await client.close()  # the app's cleanup: its scheduler context stops the gate
        assert all(t.done() for t in before)
        assert gate_of(first)._task is None
        assert gate_of(second)._task is None
        clients = await admin.client_list(_type="pubsub")
        assert clients == []  # every subscription's connection closed
    finally:
        await admin.aclose()
