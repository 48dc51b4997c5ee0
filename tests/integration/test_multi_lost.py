"""An instance killed with prompts in its queue: their owners are told at once with an
``execution_error``, history and jobs answer them as failed with that message, the metric
counts them, and other users learn nothing."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from prometheus_client import CollectorRegistry

from proxy.multi.dispatch import MULTI
from proxy.multi.lost import LOST_EXCEPTION_TYPE
from proxy.observability.metrics import METRICS
from proxy.upstream.pool import POOL
from tests.fakes.comfyui import FakeComfyUI
from tests.integration.lost_replicas import holder
from tests.integration.multi_support import (
    ALICE,
    A,
    B,
    Client,
    Fakes,
    connect,
    fakes,
    get_json,
    graph,
    multi_proxy,
    place,
    receive_until,
)

__all__ = ["fakes", "multi_proxy"]  # fixtures used by name


def lost_count(client: Client, upstream: str) -> float:
    registry: CollectorRegistry = client.app[METRICS].registry
    value = registry.get_sample_value("comfygate_prompts_lost_total", {"upstream": upstream})
    return value or 0.0


def error_of(prompt_id: str) -> Callable[[Any], bool]:
    return lambda f: (
        isinstance(f, dict)
        and f.get("type") == "execution_error"
        and f["data"]["prompt_id"] == prompt_id
    )


async def test_owners_are_told_when_an_instance_dies_mid_run(
    multi_proxy: Callable[..., Any], fakes: Fakes
) -> None:
    client: Client = await multi_proxy(upstream={"ws_reconnect_max_seconds": 0.5})
    ws, _ = await connect(client, A, "tab")
    assert (await ws.receive_json(timeout=10))["type"] == "feature_flags"
    for fake in fakes:
        fake.hold()

    # Submitted through the proxy (placement decides where; the watch learns of it at once).
    async with client.post(
        "/prompt", headers=A, json={"prompt": graph(), "client_id": "tab"}
    ) as resp:
        assert resp.status == 200, await resp.text()
        running = (await resp.json())["prompt_id"]
    victim_index = holder(fakes, running)
    victim: FakeComfyUI = fakes[victim_index]
    await victim.wait_held()
    # And one only the periodic watch knows (queued there directly, behind the running one).
    pending = await place(client, victim, ALICE, "tab")
    name = fakes.name(victim_index)
    state = client.app[MULTI]
    upstream = client.app[POOL].get(name)
    assert upstream is not None
    await state.lost.refresh(upstream)
    assert state.lost.watch.held(name) == {running, pending}

    await victim.stop()  # killed: its socket drops, the reconnect is refused, it is down
    frames: list[Any] = []
    told: set[str] = set()
    while told != {running, pending}:
        frames += await receive_until(ws, lambda f: f.get("type") == "execution_error")
        told.add(frames[-1]["data"]["prompt_id"])
    frames += await receive_until(ws, lambda f: f.get("type") == "executing")
    error = next(f for f in frames if error_of(running)(f))["data"]
    assert error["node_id"] is None
    assert error["exception_type"] == LOST_EXCEPTION_TYPE
    assert name in error["exception_message"]
    assert "became unavailable" in error["exception_message"]
    assert isinstance(error["traceback"], list)
    assert {"executed", "current_inputs", "current_outputs", "timestamp"} <= set(error)
    # Each error is followed by the end of that prompt, so the UI stops showing it running.
    after = frames[frames.index(next(f for f in frames if error_of(running)(f))) + 1]
    assert after == {"type": "executing", "data": {"node": None, "prompt_id": running}}
    assert not ws.closed  # the client keeps its socket: the other instances still serve it
    assert lost_count(client, name) == 2

    # History and jobs say what happened instead of forgetting the prompt.
    entry = (await get_json(client, f"/history/{running}", A))[running]
    assert entry["status"]["status_str"] == "error"
    (message,) = entry["status"]["messages"]
    assert message[0] == "execution_error"
    assert "became unavailable" in message[1]["exception_message"]
    assert set(await get_json(client, "/history", A)) == {running, pending}
    job = await get_json(client, f"/api/jobs/{pending}", A)
    assert job["status"] == "failed"
    assert "became unavailable" in job["execution_error"]["exception_message"]
    listed = await get_json(client, "/api/jobs?status=failed", A)
    assert {j["id"] for j in listed["jobs"]} == {running, pending}
    # B sees nothing of it.
    assert await get_json(client, f"/history/{running}", B) == {}
    assert await get_json(client, "/history", B) == {}
    assert (await get_json(client, "/api/jobs", B))["jobs"] == []
    # Deleting the entry forgets it.
    async with client.post("/history", headers=A, json={"delete": [pending]}) as resp:
        assert resp.status == 200
    assert set(await get_json(client, "/history", A)) == {running}

    for fake in fakes:
        if fake is not victim:
            fake.release()
    await ws.close()


async def test_nothing_is_reported_for_an_instance_that_held_nothing(
    multi_proxy: Callable[..., Any], fakes: Fakes
) -> None:
    client: Client = await multi_proxy()
    state = client.app[MULTI]
    upstream = client.app[POOL].get(fakes.name(2))
    assert upstream is not None
    await state.lost.refresh(upstream)
    assert await state.lost.instance_lost(upstream) == []
    assert lost_count(client, fakes.name(2)) == 0
