"""Wake-ups across replicas (``proxy.scheduler.wakeup``): a prompt held on the replica that does
not feed its instance is released by the feeding replica at once, not at its next poll.

The poll is made as long as settings allow (5 s) and each wait is bounded well under it, so
only the published wake-up can release the prompt in time."""

from __future__ import annotations

import asyncio
from typing import Any

import redis.asyncio as redis_asyncio
from aiohttp.test_utils import TestClient

from proxy.scheduler.gate import Gate
from proxy.scheduler.keys import GATE
from proxy.scheduler.wakeup import Wakeups
from tests.conftest import ProxyFactory
from tests.fakes.comfyui import FakeComfyUI
from tests.security.prompt_support import A, B, image, policy_sections, saved

Client = TestClient[Any, Any]
POLL_MS = 5000
WITHIN = 2.0
"""Seconds a wake-up may take here (a loaded machine); the poll would take 5."""


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
    """Until ``fake`` lists ``prompt_id``, following ``gate``'s rounds without waking it."""
    while prompt_id not in listed(fake):
        await gate.wait_ticks(1)


async def two_replicas(
    make_proxy: ProxyFactory, fake: FakeComfyUI, tmp_path: Any, redis_url: str
) -> tuple[Client, Client]:
    """``first`` feeds the instance (it holds the feed lease), ``second`` does not."""
    sections = {
        **policy_sections(tmp_path),
        "redis": {"url": redis_url},
        "scheduler": {"enabled": True, "poll_interval_ms": POLL_MS},
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
    pid = await post(second, B, 1)
    # Held on `second`, which cannot feed (the lease is `first`'s): its own round releases
    # nothing; `first` hears the wake-up and releases it long before its poll.
    await asyncio.wait_for(released_by(gate_of(first), fake_comfy, pid), WITHIN)
    assert {f.replica for f in await gate_of(first).store.flights()} == {gate_of(first).replica}
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
