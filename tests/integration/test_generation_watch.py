"""Generation metrics count every proxy-submitted prompt's end once (issue 7), also prompts no
queue quota tracks (admins': quota 0) submitted by API clients without a socket: the tracker's
end watch reads the queue of the instance that accepted them and ComfyUI's history for how they
ended; a relayed event counted first makes the watch forget the prompt."""

from __future__ import annotations

import json
from typing import Any

import aiohttp
import pytest
from aiohttp.test_utils import TestClient

from proxy.monitoring.generation import GENERATION, GenerationTracker
from proxy.observability.metrics import METRICS
from tests.conftest import ProxyFactory, bearer
from tests.fakes.comfyui import FakeComfyUI

ROOT = bearer("root", ("admin",))
QUIET = {
    # No background rounds: the test drives the watch (and no reconciler poll interferes).
    "metrics": {"upstream_poll_seconds": 3600},
    "rate_limits": {"quota_poll_seconds": 3600},
}


def workflow(color: int) -> dict[str, Any]:
    return {
        "1": {
            "class_type": "EmptyImage",
            "inputs": {"width": 8, "height": 8, "batch_size": 1, "color": color},
        },
        "2": {"class_type": "SaveImage", "inputs": {"images": ["1", 0], "filename_prefix": "g"}},
    }


def sample(client: TestClient[Any, Any], name: str, **labels: str) -> float:
    return client.app[METRICS].registry.get_sample_value(name, labels) or 0.0


def finished(client: TestClient[Any, Any], role: str, outcome: str) -> float:
    return sample(client, "comfygate_prompts_finished_total", role=role, outcome=outcome)


async def submit(client: TestClient[Any, Any], color: int, **extra: Any) -> str:
    resp = await client.post("/prompt", json={"prompt": workflow(color), **extra}, headers=ROOT)
    assert resp.status == 200, await resp.text()
    prompt_id: str = (await resp.json())["prompt_id"]
    return prompt_id


@pytest.mark.parametrize("state", ["memory", "redis"])
async def test_an_admin_prompt_without_a_socket_is_counted_once(
    state: str, make_proxy: ProxyFactory, fake_comfy: FakeComfyUI, request: pytest.FixtureRequest
) -> None:
    redis_section = {"url": request.getfixturevalue("redis_url")} if state == "redis" else {}
    client = await make_proxy(fake_comfy.url, token=None, redis=redis_section, **QUIET)
    upstream = fake_comfy.url.removeprefix("http://")
    tracker: GenerationTracker = client.app[GENERATION]

    prompt_id = await submit(client, 1)
    assert tracker.watched == 1
    await fake_comfy.wait_idle()
    assert await tracker.watch_once() == 1
    await tracker.drain()
    assert tracker.watched == 0
    assert sample(client, "comfygate_prompts_submitted_total", role="admin") == 1
    assert finished(client, "admin", "completed") == 1
    assert sample(client, "comfygate_prompt_execution_seconds_count", upstream=upstream) == 1
    assert sample(client, "comfygate_prompt_queue_wait_seconds_count", upstream=upstream) == 1

    # Noticed again (another round, the quota reconciler, another worker): still once.
    assert await tracker.watch_once() == 0
    tracker.prompt_left_queue(prompt_id, upstream)
    await tracker.drain()
    assert finished(client, "admin", "completed") == 1
    assert sample(client, "comfygate_prompt_execution_seconds_count", upstream=upstream) == 1


async def test_a_deleted_prompt_is_cancelled_and_a_running_one_waits(
    make_proxy: ProxyFactory, fake_comfy: FakeComfyUI
) -> None:
    client = await make_proxy(fake_comfy.url, token=None, **QUIET)
    tracker: GenerationTracker = client.app[GENERATION]
    fake_comfy.hold()
    running = await submit(client, 2)
    assert await fake_comfy.wait_held() == running
    pending = await submit(client, 3)
    resp = await client.post("/queue", json={"delete": [pending]}, headers=ROOT)
    assert resp.status == 200

    assert await tracker.watch_once() == 1  # the deleted one; the held one is still running
    await tracker.drain()
    assert finished(client, "admin", "cancelled") == 1
    assert tracker.watched == 1

    fake_comfy.release()
    await fake_comfy.wait_idle()
    assert await tracker.watch_once() == 1
    await tracker.drain()
    assert finished(client, "admin", "completed") == 1
    assert finished(client, "admin", "cancelled") == 1
    assert tracker.watched == 0


async def test_an_end_seen_on_the_socket_is_not_read_again(
    make_proxy: ProxyFactory, fake_comfy: FakeComfyUI
) -> None:
    client = await make_proxy(fake_comfy.url, token=None, **QUIET)
    tracker: GenerationTracker = client.app[GENERATION]
    ws = await client.ws_connect("/ws?clientId=tab", headers=ROOT)
    assert (await ws.receive_json())["type"] == "status"
    fake_comfy.hold()  # the submission's answer first, then its end on the socket
    prompt_id = await submit(client, 4, client_id="tab")
    await fake_comfy.wait_held()
    await tracker.drain()
    assert tracker.watched == 1
    fake_comfy.release()
    while True:
        msg = await ws.receive(timeout=10)
        assert msg.type is aiohttp.WSMsgType.TEXT
        data = json.loads(msg.data)
        if data["type"] == "execution_success" and data["data"]["prompt_id"] == prompt_id:
            break
    await ws.close()
    await tracker.drain()
    assert tracker.watched == 0  # counted from the relay: the watch reads nothing
    assert finished(client, "admin", "completed") == 1
    before = len(fake_comfy.received)
    assert await tracker.watch_once() == 0
    assert len(fake_comfy.received) == before  # not even a queue read


async def test_prompts_ended_together_are_read_in_one_history_request(
    make_proxy: ProxyFactory, fake_comfy: FakeComfyUI
) -> None:
    """Five prompts end without a socket: one ``/history?max_items`` read counts them all; a
    deleted one (not in that answer) is read alone and counted cancelled."""
    # Room in ComfyUI for all six: the gateway queue lets each through at once, so that all
    # are ComfyUI's to end (held ones would reach it only as it makes room).
    room = {"scheduler": {"max_pending": 5}}
    client = await make_proxy(fake_comfy.url, token=None, **QUIET, **room)
    tracker: GenerationTracker = client.app[GENERATION]
    fake_comfy.hold()
    running = await submit(client, 10)
    assert await fake_comfy.wait_held() == running
    pending = [await submit(client, 11 + i) for i in range(4)]
    deleted = await submit(client, 20)
    resp = await client.post("/queue", json={"delete": [deleted]}, headers=ROOT)
    assert resp.status == 200
    fake_comfy.release()
    await fake_comfy.wait_idle()
    fake_comfy.reset()
    assert await tracker.watch_once() == 6
    await tracker.drain()
    assert finished(client, "admin", "completed") == 5
    assert finished(client, "admin", "cancelled") == 1
    reads = [r.raw_path for r in fake_comfy.received if r.path.startswith("/history")]
    assert reads == ["/history?max_items=14", f"/history/{deleted}"]
    assert tracker.watched == 0
    # Reported again by someone else (the quota reconciler): counted here, nothing read.
    fake_comfy.reset()
    for prompt_id in [running, *pending, deleted]:
        tracker.prompt_left_queue(prompt_id, fake_comfy.url.removeprefix("http://"))
    await tracker.drain()
    assert not [r for r in fake_comfy.received if r.path.startswith("/history")]
    assert finished(client, "admin", "completed") == 5
