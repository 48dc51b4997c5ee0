"""Two real ``comfygate serve`` processes on one real Redis in front of the fake ComfyUI: the
replica feeding the instance is killed with SIGKILL in the middle of a release, and the other
replica takes over without losing the prompt or running it twice (``docs/scheduler.md``, the
lease protocol).

The moment is made deterministic by the fake's :class:`~tests.fakes.comfyui.submit_hold.
SubmitHold`: the release's ``POST /prompt`` is stopped inside ComfyUI, the sender is killed,
then the request either never reaches the queue (the replica died before ComfyUI took it: the
survivor must send it) or is queued (the replica died before it learnt ComfyUI has it: the
survivor must not send it again).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
from collections import Counter
from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import pytest

from tests.conftest import bearer, make_token
from tests.fakes.comfyui import FakeComfyUI
from tests.fakes.comfyui.submit_hold import Point
from tests.proxy_process import ProxyProcess, proxy_command

ALICE, BOB = bearer("alice"), bearer("bob")
ADMIN = {"Authorization": f"Bearer {make_token()}"}
TIMEOUT = 30.0


def graph(seed: int) -> dict[str, Any]:
    return {
        "1": {
            "class_type": "EmptyImage",
            "inputs": {"width": 8, "height": 8, "batch_size": 1, "color": seed},
        },
        "9": {"class_type": "SaveImage", "inputs": {"images": ["1", 0], "filename_prefix": "k"}},
    }


@contextlib.asynccontextmanager
async def replicas(fake: FakeComfyUI, redis_url: str) -> AsyncIterator[list[ProxyProcess]]:
    env = {
        "COMFYGATE_REDIS__URL": redis_url,
        "COMFYGATE_SCHEDULER__ENABLED": "true",
        # Short leases: the survivor takes over within a second of the kill.
        "COMFYGATE_SCHEDULER__LEASE_SECONDS": "1",
        "COMFYGATE_SCHEDULER__PULL_BACK": "false",
        "COMFYGATE_ISOLATION__FOLDER_SECRET": "sigkill-test-folder-secret-0123456789abcdef",
        "COMFYGATE_RATE_LIMITS__ENABLED": "false",
        "COMFYGATE_METRICS__UPSTREAM_POLL_SECONDS": "0",
        "COMFYGATE_UPSTREAM__CHECK_MULTI_USER_AT_STARTUP": "false",
    }
    async with (
        proxy_command(fake.url, env=env, capture_logs=True) as first,
        proxy_command(fake.url, env=env, capture_logs=True) as second,
    ):
        yield [first, second]


async def submit(
    session: aiohttp.ClientSession, proxy: ProxyProcess, who: dict[str, str], seed: int
) -> str:
    async with session.post(
        f"{proxy.url}/prompt", json={"prompt": graph(seed)}, headers=who
    ) as resp:
        answer = await resp.json()
        assert resp.status == 200, answer
        return str(answer["prompt_id"])


async def replica_id(session: aiohttp.ClientSession, proxy: ProxyProcess) -> str:
    async with session.get(f"{proxy.url}/admin/scheduler", headers=ADMIN) as resp:
        assert resp.status == 200
        return str((await resp.json())["replica"])


async def feeder(
    session: aiohttp.ClientSession, procs: list[ProxyProcess], prompt_id: str
) -> tuple[ProxyProcess, ProxyProcess]:
    """(the replica releasing ``prompt_id``, the other one), from the queue's own record."""
    async with session.get(f"{procs[0].url}/admin/scheduler", headers=ADMIN) as resp:
        listing = await resp.json()
    (flight,) = [f for f in listing["in_flight"] if f["prompt_id"] == prompt_id]
    assert flight["state"] == "releasing"
    ids = [await replica_id(session, p) for p in procs]
    sender = procs[ids.index(flight["replica"])]
    return sender, procs[1 - procs.index(sender)]


def posts_of(fake: FakeComfyUI, prompt_id: str) -> int:
    return sum(
        1
        for r in fake.received
        if r.method == "POST" and r.path.endswith("/prompt") and prompt_id.encode() in r.body
    )


@pytest.mark.parametrize("point", ["before_queue", "after_queue"])
async def test_sigkill_mid_release_loses_nothing_runs_nothing_twice(
    fake_comfy: FakeComfyUI, redis_url: str, point: Point
) -> None:
    fake_comfy.queue.execution_seconds = 0.02  # simulated GPU time: the queue really waits
    fake_comfy.hold()
    async with replicas(fake_comfy, redis_url) as procs, aiohttp.ClientSession() as session:
        # The first two fill the instance's room (one running, one pending) straight through;
        # the next two are held, and released by the feeding replica once ComfyUI has room.
        ids = [await submit(session, procs[i % 2], (ALICE, BOB)[i % 2], i) for i in range(2)]
        fake_comfy.submit_hold.arm(point)
        ids += [await submit(session, procs[i % 2], (ALICE, BOB)[i % 2], i) for i in (2, 3)]
        fake_comfy.release()
        async with asyncio.timeout(TIMEOUT):
            stopped = await fake_comfy.submit_hold.wait_arrived()
        assert stopped in ids[2:]
        sender, survivor = await feeder(session, procs, stopped)

        os.killpg(sender.pid, signal.SIGKILL)  # mid-release: its POST sits inside ComfyUI
        await sender.process.wait()
        # The dead replica's request: never queued (it died before ComfyUI took it), or queued
        # (it died before it read the answer).
        fake_comfy.submit_hold.let_go(accept=point == "after_queue")

        async with asyncio.timeout(TIMEOUT):
            await fake_comfy.queue.wait_for(lambda: set(ids) <= set(fake_comfy.queue.history))
        started = Counter(pid for pid, _ in fake_comfy.queue.started)
        assert set(started) == set(ids)  # nothing lost
        assert all(n == 1 for n in started.values()), started  # nothing run twice
        # The survivor decided from what ComfyUI had: resent, or recognised as released.
        event = {"before_queue": "resent", "after_queue": "recovered"}[point]
        await survivor.wait_log(
            lambda line: (
                line.get("event") == f"scheduler_release_{event}"
                and line.get("prompt_id") == stopped
            )
        )
        assert posts_of(fake_comfy, stopped) == (2 if point == "before_queue" else 1)
        # The queue is empty again and the survivor still answers for every prompt.
        async with session.get(f"{survivor.url}/admin/scheduler", headers=ADMIN) as resp:
            listing = await resp.json()
        assert listing["held"] == []
        async with session.get(f"{survivor.url}/api/jobs/{ids[0]}", headers=ALICE) as resp:
            assert resp.status == 200
            assert (await resp.json())["status"] == "completed"
