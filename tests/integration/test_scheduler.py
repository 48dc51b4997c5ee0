"""The gateway queue through the API: held prompts answered at once, fed one running + one
pending, fair order (B before A's backlog), transparency of ``/queue`` and ``/api/jobs``,
cancellation, restart recovery and the Redis fail mode (``docs/scheduler.md``)."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any

import pytest
from aiohttp import ClientSession
from aiohttp.test_utils import TestClient

from proxy.scheduler.gate import Gate
from proxy.scheduler.hook import WAIT_HEADER
from proxy.scheduler.keys import GATE
from tests.conftest import ProxyFactory
from tests.fakes.comfyui import FakeComfyUI
from tests.security.prompt_support import ADMIN, A, B, image, policy_sections, saved

Client = TestClient[Any, Any]


def sections(tmp_path: Any, **scheduler: Any) -> dict[str, Any]:
    return {**policy_sections(tmp_path), "scheduler": {"enabled": True, **scheduler}}


def gate_of(client: Client) -> Gate:
    gate: Gate = client.app[GATE]
    return gate


async def until(gate: Gate, condition: Callable[[], Awaitable[bool]], rounds: int = 200) -> None:
    """Feeder rounds until ``condition`` holds (each round is one read of every queue)."""
    for _ in range(rounds):
        if await condition():
            return
        gate.wake()
        await gate.wait_ticks(1)
    raise AssertionError("condition not reached")


async def post(client: Client, who: dict[str, str], seed: int = 0) -> tuple[int, Any, Any]:
    body = {"prompt": saved(image(width=8 + seed % 8)), "client_id": "tab-1"}
    async with client.post("/prompt", json=body, headers=who) as resp:
        return resp.status, await resp.json(), resp.headers


def comfy_ids(fake: FakeComfyUI) -> tuple[list[str], list[str]]:
    running, pending = fake.queue.current_queue()
    return [i[1] for i in running], [i[1] for i in pending]


async def fed(fake: FakeComfyUI, running: int, pending: int) -> bool:
    r, p = comfy_ids(fake)
    return len(r) == running and len(p) == pending


@pytest.fixture
async def held_proxy(make_proxy: ProxyFactory, fake_comfy: FakeComfyUI, tmp_path: Any) -> Client:
    fake_comfy.hold()
    return await make_proxy(fake_comfy.url, token=None, **sections(tmp_path))


async def test_submit_is_answered_at_once_in_comfyui_shape(
    held_proxy: Client, fake_comfy: FakeComfyUI
) -> None:
    status, answer, headers = await post(held_proxy, A)
    assert status == 200
    assert set(answer) == {"prompt_id", "number", "node_errors"}
    assert answer["node_errors"] == {}
    assert float(headers[WAIT_HEADER]) >= 0
    gate = gate_of(held_proxy)
    await until(gate, lambda: fed(fake_comfy, 1, 0))
    assert comfy_ids(fake_comfy)[0] == [answer["prompt_id"]]
    fake_comfy.release()


async def test_one_running_one_pending_the_rest_held_and_shown(
    held_proxy: Client, fake_comfy: FakeComfyUI
) -> None:
    ids = [(await post(held_proxy, A, i))[1]["prompt_id"] for i in range(4)]
    gate = gate_of(held_proxy)
    await until(gate, lambda: fed(fake_comfy, 1, 1))
    assert comfy_ids(fake_comfy) == ([ids[0]], [ids[1]])
    async with held_proxy.get("/queue", headers=A) as resp:
        queue = await resp.json()
    assert [i[1] for i in queue["queue_running"]] == ids[:1]
    assert [i[1] for i in queue["queue_pending"]] == ids[1:]  # ComfyUI's, then held, in order
    numbers = [i[0] for i in queue["queue_pending"]]
    assert numbers == sorted(numbers)
    assert queue["queue_pending"][-1][3]["client_id"] == "tab-1"  # as the client sent it
    async with held_proxy.get("/api/jobs", headers=A) as resp:
        jobs = await resp.json()
    pending = {j["id"] for j in jobs["jobs"] if j["status"] == "pending"}
    assert set(ids[2:]) <= pending
    async with held_proxy.get(f"/api/jobs/{ids[3]}", headers=A) as resp:
        detail = await resp.json()
    assert detail["status"] == "pending"
    assert detail["estimated_wait_seconds"] >= 0
    assert detail["gateway_queue"]["position"] == 1
    fake_comfy.release()


async def test_b_runs_right_after_the_running_prompt(
    held_proxy: Client, fake_comfy: FakeComfyUI
) -> None:
    ids = [(await post(held_proxy, A, i))[1]["prompt_id"] for i in range(6)]
    gate = gate_of(held_proxy)
    await until(gate, lambda: fed(fake_comfy, 1, 1))
    _, answer, _ = await post(held_proxy, B)
    b_id = answer["prompt_id"]
    # A's pending prompt is taken back: B's waits next in ComfyUI.
    await until(gate, lambda: _async(comfy_ids(fake_comfy) == ([ids[0]], [b_id])))
    fake_comfy.release()
    await until(gate, lambda: _async(b_id in fake_comfy.queue.history))
    await fake_comfy.wait_idle()
    await until(gate, lambda: _async(len(fake_comfy.queue.history) == 7))
    order = [pid for pid, _ in fake_comfy.queue.started]
    assert order.index(b_id) == 1
    assert sorted(order) == sorted([*ids, b_id])
    assert len(order) == len(set(order))  # nothing ran twice


async def _async(value: bool) -> bool:
    return value


async def test_delete_clear_and_job_cancel_remove_held_prompts(
    held_proxy: Client, fake_comfy: FakeComfyUI
) -> None:
    ids = [(await post(held_proxy, A, i))[1]["prompt_id"] for i in range(6)]
    gate = gate_of(held_proxy)
    await until(gate, lambda: fed(fake_comfy, 1, 1))
    async with held_proxy.post("/queue", json={"delete": [ids[2]]}, headers=A) as resp:
        assert resp.status == 200
    async with held_proxy.post(f"/api/jobs/{ids[3]}/cancel", headers=A) as resp:
        assert await resp.json() == {"cancelled": True}
    held = [h.prompt_id for h in await gate.store.held(None)]
    assert held == ids[4:]
    async with held_proxy.post("/queue", json={"clear": True}, headers=A) as resp:
        assert resp.status == 200
    assert await gate.store.held(None) == []
    fake_comfy.release()
    await fake_comfy.wait_idle()
    started = [pid for pid, _ in fake_comfy.queue.started]
    assert not set(ids[2:]) & set(started)


async def test_on_by_default(
    make_proxy: ProxyFactory, fake_comfy: FakeComfyUI, tmp_path: Any
) -> None:
    client = await make_proxy(fake_comfy.url, token=None, **policy_sections(tmp_path))
    assert GATE in client.app


async def test_with_room_comfyuis_own_refusal_is_the_answer(
    held_proxy: Client, fake_comfy: FakeComfyUI
) -> None:
    """ComfyUI has room and nothing waits: the prompt goes straight through and the client
    gets ComfyUI's 400 with its ``node_errors`` (what the stock UI shows), as without the
    queue; nothing is kept, nothing is sent again."""
    # Below EmptyImage's minimum; a partial_execution_targets that is not a list is left to
    # ComfyUI (not predicted before holding, proxy.comfy.validation): ComfyUI itself refuses.
    body = {"prompt": saved(image(width=0)), "partial_execution_targets": "9"}
    async with held_proxy.post("/prompt", json=body, headers=A) as resp:
        assert resp.status == 400
        answer = await resp.json()
    async with (
        ClientSession() as direct,
        direct.post(f"{fake_comfy.url}/prompt", json=body) as resp,
    ):
        assert resp.status == 400
        comfy = await resp.json()
    assert answer == comfy
    assert answer["node_errors"]["1"]["errors"][0]["type"] == "value_smaller_than_min"
    gate = gate_of(held_proxy)
    assert await gate.store.held(None) == []
    assert await gate.store.flights() == []
    assert await gate.store.failed(None) == {}
    await gate.wait_ticks(2)
    assert sum(1 for r in fake_comfy.received if r.path == "/prompt") == 2  # ours, and direct
    fake_comfy.release()


async def test_with_room_a_comfyui_down_is_a_502_and_nothing_is_kept(
    held_proxy: Client, fake_comfy: FakeComfyUI
) -> None:
    status, first, _ = await post(held_proxy, A)  # runs (and the proxy knows ComfyUI's nodes)
    assert status == 200
    fake_comfy.release()
    await fake_comfy.stop()
    status, answer, _ = await post(held_proxy, A, 1)  # room for one more: straight through
    assert status == 502
    assert answer["error"]["type"] == "upstream_unavailable"
    assert answer["node_errors"] == {}
    gate = gate_of(held_proxy)
    assert await gate.store.held(None) == []
    # Never released later (the client was told): only the first is in flight.
    assert [f.prompt_id for f in await gate.store.flights()] == [first["prompt_id"]]


async def test_straight_through_answer_is_comfyuis_and_held_ones_follow(
    held_proxy: Client, fake_comfy: FakeComfyUI
) -> None:
    """Room for two (one running, one pending): those two are forwarded by their own requests
    (ComfyUI's answer, its numbers); the third is held (the gateway queue's answer)."""
    answers = [await post(held_proxy, A, i) for i in range(3)]
    assert [s for s, _, _ in answers] == [200] * 3
    ids = [a["prompt_id"] for _, a, _ in answers]
    running, pending = comfy_ids(fake_comfy)
    assert [*running, *pending] == ids[:2]  # in ComfyUI as its submit returned
    gate = gate_of(held_proxy)
    assert [h.prompt_id for h in await gate.store.held(None)] == ids[2:]
    assert all(float(h[WAIT_HEADER]) >= 0 for _, _, h in answers)
    fake_comfy.release()
    await until(gate, lambda: _async(set(ids) <= set(fake_comfy.queue.history)))


async def test_disabled_is_pass_through(
    make_proxy: ProxyFactory, fake_comfy: FakeComfyUI, tmp_path: Any
) -> None:
    client = await make_proxy(fake_comfy.url, token=None, **sections(tmp_path, enabled=False))
    assert GATE not in client.app
    fake_comfy.hold()
    ids = [(await post(client, A, i))[1]["prompt_id"] for i in range(3)]
    running, pending = comfy_ids(fake_comfy)
    assert [*running, *pending] == ids
    fake_comfy.release()


async def test_admin_lists_the_queue_users_may_not(
    held_proxy: Client, fake_comfy: FakeComfyUI
) -> None:
    ids = [(await post(held_proxy, A, i))[1]["prompt_id"] for i in range(3)]
    gate = gate_of(held_proxy)
    await until(gate, lambda: fed(fake_comfy, 1, 1))
    async with held_proxy.get("/admin/scheduler", headers=ADMIN) as resp:
        assert resp.status == 200
        listing = await resp.json()
    assert [h["prompt_id"] for h in listing["held"]] == ids[2:]
    assert {f["prompt_id"] for f in listing["in_flight"]} == set(ids[:2])
    async with held_proxy.get("/admin/scheduler", headers=A) as resp:
        assert resp.status == 403
    fake_comfy.release()
