"""The gateway queue in Redis: shared by replicas, resumed after a restart, a release lease
that lapsed (its replica killed mid-release) neither lost nor run twice, and the documented
fail mode when Redis is down (``docs/scheduler.md``)."""

from __future__ import annotations

import time
from typing import Any

import aiohttp
import orjson
import pytest
import redis.asyncio as redis_asyncio
from aiohttp.test_utils import TestClient
from prometheus_client import CollectorRegistry

from proxy.scheduler.fair import Held
from proxy.scheduler.gate import Gate
from proxy.scheduler.keys import GATE
from proxy.scheduler.metrics import SchedulerMetrics
from proxy.scheduler.store import Entry, RedisStore
from proxy.settings import UpstreamSettings
from proxy.settings.scheduler import SchedulerSettings
from proxy.upstream.pool import UpstreamPool
from tests.conftest import ProxyFactory
from tests.fakes.comfyui import FakeComfyUI
from tests.redis_server import RedisServer
from tests.security.prompt_support import A, B, image, policy_sections, saved

Client = TestClient[Any, Any]


def gate_of(client: Client) -> Gate:
    gate: Gate = client.app[GATE]
    return gate


async def post(client: Client, who: dict[str, str], seed: int = 0) -> tuple[int, Any]:
    body = {"prompt": saved(image(width=8 + seed % 8))}
    async with client.post("/prompt", json=body, headers=who) as resp:
        return resp.status, await resp.json()


async def rounds_until(gate: Gate, check: Any, limit: int = 300) -> None:
    for _ in range(limit):
        if check():
            return
        gate.wake()
        await gate.wait_ticks(1)
    raise AssertionError("not reached")


async def test_two_replicas_share_one_queue_and_restart_resumes(
    make_proxy: ProxyFactory, fake_comfy: FakeComfyUI, tmp_path: Any, redis_url: str
) -> None:
    sections = {
        **policy_sections(tmp_path),
        "redis": {"url": redis_url},
        "scheduler": {"enabled": True},
    }
    first = await make_proxy(fake_comfy.url, token=None, **sections)
    second = await make_proxy(fake_comfy.url, token=None, **sections)
    fake_comfy.hold()
    ids = [(await post(first, A, i))[1]["prompt_id"] for i in range(3)]
    ids += [(await post(second, B, i))[1]["prompt_id"] for i in range(3)]
    gate = gate_of(first)
    await rounds_until(gate, lambda: len(fake_comfy.queue.current_queue()[1]) == 1)
    # Both replicas see the same held prompts (B's owner sees theirs on either).
    assert {h.prompt_id for h in await gate_of(second).store.held(None)} <= set(ids)
    # A restart: both replicas stop (their feeders with them); the queue is in Redis.
    await gate_of(first).stop()
    await gate_of(second).stop()
    third = await make_proxy(fake_comfy.url, token=None, **sections)
    fake_comfy.queue.execution_seconds = 0.02  # equal, measurable runs: charged what they take
    fake_comfy.release()
    await rounds_until(gate_of(third), lambda: len(fake_comfy.queue.history) == len(ids))
    started = [pid for pid, _ in fake_comfy.queue.started]
    assert sorted(started) == sorted(ids)  # every prompt ran, none twice
    # Fair order across the restart: equal runs, so neither user ever gets more than the
    # first two releases (made before B's prompts were all queued) ahead of the other.
    owners = ["a" if pid in ids[:3] else "b" for pid in started]
    leads = [owners[: n + 1].count("a") - owners[: n + 1].count("b") for n in range(len(owners))]
    assert max(abs(lead) for lead in leads) <= 2, owners


def _held(pid: str, seq: int) -> Held:
    return Held(pid, "alice", "user", seq, 1.0, 1.0, False, time.time())


@pytest.fixture
async def redis_gate(fake_comfy: FakeComfyUI, redis_url: str) -> Any:
    """A gate over Redis feeding ``fake_comfy``, built without the proxy around it."""
    client = redis_asyncio.Redis.from_url(redis_url)
    pool = UpstreamPool(UpstreamSettings(urls=(fake_comfy.url,)))
    await pool.start()
    settings = SchedulerSettings(enabled=True, lease_seconds=0.2)
    gate = Gate(
        settings,
        RedisStore(client),
        pool,
        SchedulerMetrics(CollectorRegistry(), 60),
        replica="alive",
    )
    yield gate, fake_comfy
    await pool.close()
    await client.aclose()


async def _claim_as_dead_replica(gate: Gate, pid: str, body: bytes) -> None:
    store = gate.store
    await store.hold(Entry(_held(pid, await store.next_seq()), body, ()))
    view = await store.view(16)
    choice = Gate._choose(view, gate.instances()[0].name)
    assert choice is not None
    claimed = await store.claim(choice, 0.0, gate.instances()[0].name, "dead", time.time() - 1)
    assert claimed == body


def _body(pid: str) -> bytes:
    return orjson.dumps({"prompt": saved(image()), "prompt_id": pid})


async def test_lapsed_lease_never_sent_is_sent_once(redis_gate: Any) -> None:
    gate, fake = redis_gate
    pid = "00000000-0000-4000-8000-000000000001"
    await _claim_as_dead_replica(gate, pid, _body(pid))  # killed before sending
    await gate.tick()
    await gate.tick()
    await fake.wait_idle()
    assert [p for p, _ in fake.queue.started] == [pid]
    assert sum(1 for r in fake.received if r.path.endswith("/prompt")) == 1


async def test_lapsed_lease_already_sent_is_not_sent_again(redis_gate: Any) -> None:
    gate, fake = redis_gate
    pid = "00000000-0000-4000-8000-000000000002"
    body = _body(pid)
    await _claim_as_dead_replica(gate, pid, body)
    # The dead replica's send reached ComfyUI, then it was killed before recording it.
    async with (
        aiohttp.ClientSession() as session,
        session.post(
            f"{fake.url}/prompt", data=body, headers={"Content-Type": "application/json"}
        ) as resp,
    ):
        assert resp.status == 200
    await fake.wait_idle()
    await gate.tick()
    await gate.tick()
    assert [p for p, _ in fake.queue.started] == [pid]  # ran once
    assert sum(1 for r in fake.received if r.path.endswith("/prompt")) == 1
    assert await gate.store.flights() == []  # ended and forgotten


@pytest.mark.parametrize(("mode", "status"), [("closed", 503), ("pass_through", 200)])
async def test_redis_down_fail_mode(
    make_proxy: ProxyFactory,
    fake_comfy: FakeComfyUI,
    own_redis: RedisServer,
    mode: str,
    status: int,
) -> None:
    # Only the scheduler uses Redis here, so its own fail mode is what answers.
    sections = {
        "redis": {"url": own_redis.url},
        "auth": {"enabled": False},
        "isolation": {"enabled": False},
        "rate_limits": {"enabled": False},
        "scheduler": {"enabled": True, "redis_fail_mode": mode},
    }
    client = await make_proxy(fake_comfy.url, token=None, **sections)
    own_redis.stop()
    async with client.post("/prompt", json={"prompt": saved(image())}) as resp:
        assert resp.status == status
        answer = await resp.json()
    received = [r for r in fake_comfy.received if r.path.endswith("/prompt")]
    if mode == "closed":
        assert answer["error"]["type"] == "scheduler_unavailable"
        assert "node_errors" in answer
        assert received == []
    else:
        assert len(received) == 1  # forwarded unscheduled
