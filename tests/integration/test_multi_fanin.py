"""WebSocket fan-in over three instances: one client socket hears the events of its prompts
from whichever instance runs them, gets one ``status`` and one ``feature_flags`` answer,
``queue_remaining`` summed, and keeps its socket while an instance restarts."""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any

from prometheus_client import CollectorRegistry

from proxy.observability.metrics import METRICS
from proxy.tenancy.namespaces import upstream_client_id
from tests.integration.multi_support import (
    ADMIN,
    ALICE,
    BOB,
    A,
    B,
    Client,
    Fakes,
    connect,
    ended,
    fakes,
    graph,
    multi_proxy,
    place,
    receive_until,
)

__all__ = ["fakes", "multi_proxy"]  # fixtures used by name


def status_total(n: int) -> Callable[[Any], bool]:
    return lambda f: (
        isinstance(f, dict)
        and f.get("type") == "status"
        and f["data"]["status"]["exec_info"]["queue_remaining"] == n
    )


def counter(client: Client, name: str, **labels: str) -> float:
    registry: CollectorRegistry = client.app[METRICS].registry
    return registry.get_sample_value(name, labels) or 0.0


async def test_events_from_all_three_instances_reach_one_socket(
    multi_proxy: Callable[..., Any], fakes: Fakes
) -> None:
    client: Client = await multi_proxy()
    ws, status = await connect(client, A, "tab")
    assert status["data"]["sid"] == "tab"
    sid = upstream_client_id(ALICE, "tab")
    for fake in fakes:
        await fake.wait_socket(sid, flags=True)  # every instance got the client's flags
    b_ws, _ = await connect(client, B, "tab-b")
    for fake in fakes:  # B's broadcast below must find B's socket on every instance
        await fake.wait_socket(upstream_client_id(BOB, "tab-b"), flags=True)

    prompts = [await place(client, fake, ALICE, "tab") for fake in fakes]
    seen: list[Any] = []
    for prompt_id in prompts:
        seen += await receive_until(ws, ended(prompt_id))
    # Previews (binary, with metadata: the client's flags reached that instance) too.
    previewing = graph()
    previewing["3"] = {"class_type": "SaveImageWebsocket", "inputs": {"images": ["1", 0]}}
    with_preview = await place(client, fakes[1], ALICE, "tab", prompt=previewing)
    preview_frames = await receive_until(ws, ended(with_preview))
    assert ("binary", 4) in preview_frames
    started = [f["data"]["prompt_id"] for f in seen if f.get("type") == "execution_start"]
    assert sorted(started) == sorted(prompts)
    for prompt_id in prompts:
        assert any(
            f.get("type") == "executed" and f["data"]["prompt_id"] == prompt_id for f in seen
        )
    # One connect-time status and one feature_flags answer, whatever the number of instances.
    for fake in fakes:
        await fake.broadcast({"type": "status", "data": {"status": {}, "marker": fake.port}})
    seen += await receive_until(ws, lambda f: f.get("data", {}).get("marker") == fakes[2].port)
    assert [f for f in seen if f.get("type") == "feature_flags"] == [
        {"type": "feature_flags", "data": fakes[0].server_features()}
    ]
    assert not [f for f in seen if f.get("type") == "status" and "sid" in f["data"]]
    # B's socket heard none of it.
    b_seen = await receive_until(b_ws, lambda f: f.get("data", {}).get("marker") == fakes[2].port)
    assert {f["type"] for f in b_seen} <= {"status", "feature_flags"}
    await ws.close()
    await b_ws.close()
    for fake in fakes:
        await fake.wait_socket(sid, gone=True)


async def test_status_carries_the_sum_over_instances(
    multi_proxy: Callable[..., Any], fakes: Fakes
) -> None:
    client: Client = await multi_proxy()
    for fake in fakes:
        fake.hold()
    await place(client, fakes[0], BOB)
    await fakes[0].wait_held()
    ws, _ = await connect(client, A, "tab")
    sid = upstream_client_id(ALICE, "tab")
    for fake in fakes:
        await fake.wait_socket(sid)
    await place(client, fakes[1], BOB)
    await receive_until(ws, status_total(2))
    await place(client, fakes[2], BOB)
    await place(client, fakes[2], BOB)
    await receive_until(ws, status_total(4))
    for fake in fakes:
        fake.release()
    for fake in fakes:
        await fake.wait_idle()
    await receive_until(ws, status_total(0))
    await ws.close()


async def test_a_restarted_instance_is_reconnected_without_dropping_the_client(
    multi_proxy: Callable[..., Any], fakes: Fakes
) -> None:
    client: Client = await multi_proxy(upstream={"ws_reconnect_max_seconds": 0.5})
    ws, _ = await connect(client, A, "tab")
    sid = upstream_client_id(ALICE, "tab")
    for fake in fakes:
        await fake.wait_socket(sid, flags=True)
    fakes[1].hold()
    await place(client, fakes[1], BOB)
    await fakes[1].wait_held()
    await receive_until(ws, status_total(1))

    fresh = await fakes.restart(1)
    await receive_until(ws, status_total(0))  # its queue no longer counts
    await fresh.wait_socket(sid, flags=True)  # reconnected, the client's flags sent first again
    assert json.loads(fresh.ws_received[0][2])["type"] == "feature_flags"
    assert (
        counter(client, "comfygate_websocket_upstream_reconnects_total", upstream=fakes.name(1))
        >= 1
    )
    assert not ws.closed

    prompt_id = await place(client, fresh, ALICE, "tab")
    frames = await receive_until(ws, ended(prompt_id))
    assert any(f.get("type") == "execution_success" for f in frames)
    assert not [f for f in frames if f.get("type") == "feature_flags"]  # answered once only
    await ws.close()


async def test_a_newer_socket_with_the_same_id_takes_over_on_every_instance(
    multi_proxy: Callable[..., Any], fakes: Fakes
) -> None:
    client: Client = await multi_proxy()
    old, _ = await connect(client, A, "tab")
    assert (await old.receive_json(timeout=10))["type"] == "feature_flags"
    new, _ = await connect(client, A, "tab")
    sid = upstream_client_id(ALICE, "tab")
    for fake in fakes:
        await fake.wait_socket(sid)
        assert len([s for s in fake.sockets if s == sid]) == 1
    prompt_id = await place(client, fakes[2], ALICE, "tab")
    await receive_until(new, ended(prompt_id))
    assert not old.closed  # open and silent (its upstream sockets are gone), as with ComfyUI
    await old.close()
    await new.close()


async def test_without_isolation_one_minted_id_is_used_on_every_instance(
    multi_proxy: Callable[..., Any], fakes: Fakes
) -> None:
    client: Client = await multi_proxy(isolation={"enabled": False})
    ws = await client.ws_connect("/ws", headers=ADMIN)
    status = await ws.receive_json(timeout=10)
    sid = status["data"]["sid"]
    for fake in fakes:
        await fake.wait_socket(sid)
    await ws.close()
