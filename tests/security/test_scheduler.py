"""The gateway queue under attack: user B cannot see, cancel, reorder or learn about user A's
held prompts, and a plain user cannot list the queue (``docs/scheduler.md``).

Each test asserts on B's answer (status and shape) and on what the fake ComfyUI received or
still runs: A's held prompts stay held, in A's order, and are never released early or dropped.
"""

from __future__ import annotations

from typing import Any

import pytest
from aiohttp.test_utils import TestClient

from proxy.scheduler.gate import Gate
from proxy.scheduler.keys import GATE
from tests.conftest import ProxyFactory
from tests.fakes.comfyui import FakeComfyUI
from tests.security.prompt_support import A, B, image, policy_sections, saved

Client = TestClient[Any, Any]


@pytest.fixture
async def client(make_proxy: ProxyFactory, fake_comfy: FakeComfyUI, tmp_path: Any) -> Client:
    fake_comfy.hold()
    sections = {**policy_sections(tmp_path), "scheduler": {"enabled": True, "max_pending": 0}}
    return await make_proxy(fake_comfy.url, token=None, **sections)


def gate_of(client: Client) -> Gate:
    gate: Gate = client.app[GATE]
    return gate


async def a_held(client: Client, fake: FakeComfyUI, count: int = 3) -> list[str]:
    """A submits ``count``; the first runs (held at the fake's gate), the rest stay held."""
    ids = []
    for i in range(count):
        body = {"prompt": saved(image(width=8 + i)), "client_id": "a-tab"}
        async with client.post("/prompt", json=body, headers=A) as resp:
            assert resp.status == 200
            ids.append((await resp.json())["prompt_id"])
    gate = gate_of(client)
    while len(fake.queue.current_queue()[0]) != 1:
        gate.wake()
        await gate.wait_ticks(1)
    assert [h.prompt_id for h in await gate.store.held(None)] == ids[1:]
    return ids


async def held_ids(client: Client) -> list[str]:
    return [h.prompt_id for h in await gate_of(client).store.held(None)]


def prompts_received(fake: FakeComfyUI) -> int:
    return sum(1 for r in fake.received if r.method == "POST" and r.path.endswith("/prompt"))


async def test_b_does_not_see_a_held_prompts_in_queue_or_jobs(
    client: Client, fake_comfy: FakeComfyUI
) -> None:
    ids = await a_held(client, fake_comfy)
    async with client.get("/queue", headers=B) as resp:
        assert resp.status == 200
        text = await resp.text()
    assert all(pid not in text for pid in ids)
    async with client.get("/api/jobs", headers=B) as resp:
        assert resp.status == 200
        jobs = await resp.json()
    assert all(j["id"] not in ids for j in jobs["jobs"])
    for pid in ids[1:]:
        async with client.get(f"/api/jobs/{pid}", headers=B) as resp:
            assert resp.status == 404
            assert await resp.json() == {"error": "Job not found"}
    fake_comfy.release()


async def test_b_cannot_cancel_a_held_prompts(client: Client, fake_comfy: FakeComfyUI) -> None:
    ids = await a_held(client, fake_comfy)
    before = prompts_received(fake_comfy)
    async with client.post("/queue", json={"delete": ids[1:]}, headers=B) as resp:
        assert resp.status == 200
    async with client.post("/queue", json={"clear": True}, headers=B) as resp:
        assert resp.status == 200
    async with client.post(f"/api/jobs/{ids[1]}/cancel", headers=B) as resp:
        assert resp.status == 200
        assert await resp.json() == {"cancelled": False}
    async with client.post("/api/jobs/cancel", json={"job_ids": ids[1:]}, headers=B) as resp:
        assert resp.status == 200
        assert (await resp.json())["cancelled"] is False
    assert await held_ids(client) == ids[1:]  # still held, same order
    assert prompts_received(fake_comfy) == before  # nothing released or resent meanwhile
    fake_comfy.release()


async def test_b_cannot_reorder_or_take_over_a_prompt_id(
    client: Client, fake_comfy: FakeComfyUI
) -> None:
    ids = await a_held(client, fake_comfy)
    # B reuses A's held id (to replace or jump it) and asks for the front of the queue.
    body = {"prompt": saved(image()), "prompt_id": ids[2], "front": True, "number": -100}
    async with client.post("/prompt", json=body, headers=B) as resp:
        assert resp.status == 400
        answer = await resp.json()
    assert answer["error"]["type"] == "prompt_id_taken"
    assert await held_ids(client) == ids[1:]
    entry = await gate_of(client).store.entry(ids[2])
    assert entry is not None
    assert entry.held.owner != "bob"
    # B's own prompt with front: a plain user's front is dropped (isolation), not honoured.
    body = {"prompt": saved(image(width=12)), "front": True}
    async with client.post("/prompt", json=body, headers=B) as resp:
        b_id = (await resp.json())["prompt_id"]
    held = {h.prompt_id: h for h in await gate_of(client).store.held(None)}
    assert held[b_id].front is False
    fake_comfy.release()


async def test_b_status_counts_only_b_held_prompts(client: Client, fake_comfy: FakeComfyUI) -> None:
    await a_held(client, fake_comfy, count=4)
    gate = gate_of(client)
    assert await gate.store.count("bob") == 0
    async with client.ws_connect("/ws?clientId=b-tab", headers=B) as ws:
        first = await ws.receive_json()
    assert first["type"] == "status"
    # ComfyUI's own queue (the one running prompt) plus B's held prompts (none): A's three
    # held prompts are not B's to know about.
    assert first["data"]["status"]["exec_info"]["queue_remaining"] == 1
    fake_comfy.release()


async def test_plain_user_cannot_list_the_gateway_queue(
    client: Client, fake_comfy: FakeComfyUI
) -> None:
    await a_held(client, fake_comfy)
    async with client.get("/admin/scheduler", headers=B) as resp:
        assert resp.status == 403
        assert (await resp.json())["error"]["type"] == "forbidden_role"
    fake_comfy.release()


async def test_b_learns_nothing_of_a_prompt_refused_at_release(
    client: Client, fake_comfy: FakeComfyUI
) -> None:
    """A's prompt ComfyUI refuses at release time becomes a failed entry for A alone: B's
    socket hears no ``execution_error`` for it, and B's history and jobs views do not have it,
    by id or in lists; ComfyUI got it once (the refused release) and runs nothing for it."""
    async with client.ws_connect("/ws?clientId=b-tab", headers=B) as b_socket:
        # ComfyUI busy with one of A's (its whole room), so the next one is held rather than
        # sent straight through with ComfyUI's own answer.
        (running,) = await a_held(client, fake_comfy, count=1)
        body = {
            "prompt": saved(image(width=0)),  # below the minimum
            "client_id": "a-tab",
            # not a list: not predicted before holding (proxy.comfy.validation), so it is held
            # and ComfyUI refuses it at release
            "partial_execution_targets": "9",
        }
        async with client.post("/prompt", json=body, headers=A) as resp:
            assert resp.status == 200
            pid = (await resp.json())["prompt_id"]
        fake_comfy.release()
        gate = gate_of(client)
        while pid not in (await gate.store.failed(None)):
            gate.wake()
            await gate.wait_ticks(1)
        await gate.wait_ticks(1)  # the refusing round has ended: its frames are sent
        await b_socket.close()
        frames = [m.data for m in [m async for m in b_socket] if isinstance(m.data, str)]
    assert not any(pid in frame for frame in frames)
    async with client.get(f"/history/{pid}", headers=B) as resp:
        assert resp.status == 200
        assert await resp.json() == {}
    async with client.get("/history", headers=B) as resp:
        assert pid not in await resp.json()
    async with client.get(f"/api/jobs/{pid}", headers=B) as resp:
        assert resp.status == 404
    async with client.get("/api/jobs?status=failed", headers=B) as resp:
        assert pid not in [j["id"] for j in (await resp.json())["jobs"]]
    async with client.get(f"/history/{pid}", headers=A) as resp:
        assert (await resp.json())[pid]["status"]["status_str"] == "error"
    assert prompts_received(fake_comfy) == 2  # A's running one, and the refused release
    assert [p for p, _ in fake_comfy.queue.started] == [running]
