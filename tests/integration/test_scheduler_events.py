"""What the gateway queue tells owners by itself: a ``status`` frame when a prompt is held or a
held one is cancelled (ComfyUI's queue did not change: it says nothing), and, when ComfyUI
refuses a prompt at release time, an ``execution_error`` and a failed entry in ``/history``
and ``/api/jobs``, for the owner only (``docs/scheduler.md``)."""

from __future__ import annotations

import asyncio
from typing import Any

import aiohttp
import pytest
from aiohttp.test_utils import TestClient

from proxy.scheduler.gate import Gate
from proxy.scheduler.keys import GATE
from tests.conftest import ProxyFactory
from tests.fakes.comfyui import FakeComfyUI
from tests.security.prompt_support import A, B, image, saved

Client = TestClient[Any, Any]
TIMEOUT = 10.0


@pytest.fixture
async def client(make_proxy: ProxyFactory, fake_comfy: FakeComfyUI) -> Client:
    fake_comfy.hold()
    sections: dict[str, Any] = {
        "scheduler": {"enabled": True, "pull_back": False},
        "rate_limits": {"enabled": False},
        "isolation": {"folder_secret": "events-test-folder-secret-0123456789abcdef"},
    }
    proxy: Client = await make_proxy(fake_comfy.url, token=None, **sections)
    return proxy


async def next_event(ws: aiohttp.ClientWebSocketResponse, kind: str, **match: Any) -> Any:
    """The next JSON event of type ``kind`` whose data has ``match``'s values."""
    async with asyncio.timeout(TIMEOUT):
        async for msg in ws:
            if msg.type != aiohttp.WSMsgType.TEXT:
                continue
            event = msg.json()
            if event.get("type") != kind:
                continue
            data = event["data"]
            if kind == "status":
                data = data["status"]["exec_info"]
            if all(data.get(k) == v for k, v in match.items()):
                return data
    raise AssertionError(f"socket closed before {kind} {match}")


async def post(client: Client, who: dict[str, str], prompt: dict[str, Any], **more: object) -> str:
    async with client.post(
        "/prompt", json={"prompt": prompt, "client_id": "tab", **more}, headers=who
    ) as r:
        answer = await r.json()
        assert r.status == 200, answer
        return str(answer["prompt_id"])


async def until_fed(gate: Gate, fake: FakeComfyUI, count: int) -> None:
    for _ in range(300):
        running, pending = fake.queue.current_queue()
        if len(running) + len(pending) == count:
            return
        gate.wake()
        await gate.wait_ticks(1)
    raise AssertionError("not fed")


async def test_status_pushed_when_held_and_when_cancelled(
    client: Client, fake_comfy: FakeComfyUI
) -> None:
    gate: Gate = client.app[GATE]
    async with (
        client.ws_connect("/ws?clientId=tab", headers=A) as alice,
        client.ws_connect("/ws?clientId=tab-b", headers=B) as bob,
    ):
        await next_event(alice, "status")  # ComfyUI's greeting
        ids = [await post(client, A, saved(image(width=8 + i))) for i in range(3)]
        await until_fed(gate, fake_comfy, 2)
        # One running, one pending in ComfyUI, one held here: three to wait for.
        await next_event(alice, "status", queue_remaining=3)
        async with client.post("/queue", json={"delete": [ids[2]]}, headers=A) as resp:
            assert resp.status == 200
        # ComfyUI's queue did not change (it never had that prompt): the push says so.
        await next_event(alice, "status", queue_remaining=2)
        fake_comfy.release()
        await next_event(alice, "status", queue_remaining=0)
        await bob.close()
        async for msg in bob:  # whatever Bob heard before closing
            if msg.type == aiohttp.WSMsgType.TEXT and msg.json().get("type") == "status":
                info = msg.json()["data"]["status"]["exec_info"]
                assert info["queue_remaining"] <= 2  # never Alice's held prompts


async def test_refused_at_release_is_a_failed_prompt_for_its_owner(
    client: Client, fake_comfy: FakeComfyUI
) -> None:
    gate: Gate = client.app[GATE]
    refused_graph = saved(image(width=0))  # below EmptyImage's minimum: ComfyUI refuses it
    async with client.ws_connect("/ws?clientId=tab", headers=A) as alice:
        await next_event(alice, "status")
        # ComfyUI busy (one running, one pending: the room the gate gives it), so the next
        # prompt is held rather than sent straight through with ComfyUI's own answer.
        busy = [await post(client, A, saved(image(width=8 + i))) for i in range(2)]
        await until_fed(gate, fake_comfy, 2)
        # Held, answered 200 at once: a partial_execution_targets that is not a list is not
        # predicted before holding (proxy.comfy.validation), so ComfyUI refuses at release.
        pid = await post(client, A, refused_graph, partial_execution_targets="9")
        fake_comfy.release()
        gate.wake()
        error = await next_event(alice, "execution_error", prompt_id=pid)
    assert error["node_id"] == "1"
    assert error["node_type"] == "EmptyImage"
    assert error["node_errors"]["1"]["errors"][0]["type"] == "value_smaller_than_min"
    assert error["exception_message"]
    # It shows as failed, as ComfyUI shows a prompt that failed.
    async with client.get(f"/history/{pid}", headers=A) as resp:
        entry = (await resp.json())[pid]
    assert entry["status"]["status_str"] == "error"
    assert entry["status"]["completed"] is False
    assert [m[0] for m in entry["status"]["messages"]] == ["execution_start", "execution_error"]
    assert entry["prompt"][3]["client_id"] == "tab"
    async with client.get("/history", headers=A) as resp:
        assert pid in await resp.json()
    async with client.get(f"/api/jobs/{pid}", headers=A) as resp:
        job = await resp.json()
    assert job["status"] == "failed"
    assert job["execution_error"]["prompt_id"] == pid
    async with client.get("/api/jobs?status=failed", headers=A) as resp:
        assert pid in [j["id"] for j in (await resp.json())["jobs"]]
    # Nothing was queued, nothing counts against the quota any more.
    await fake_comfy.wait_idle()
    assert [p for p, _ in fake_comfy.queue.started] == busy
    # Bob asks for it: unknown to him.
    async with client.get(f"/history/{pid}", headers=B) as resp:
        assert await resp.json() == {}
    async with client.get(f"/api/jobs/{pid}", headers=B) as resp:
        assert resp.status == 404
    async with client.get("/api/jobs", headers=B) as resp:
        assert pid not in [j["id"] for j in (await resp.json())["jobs"]]
