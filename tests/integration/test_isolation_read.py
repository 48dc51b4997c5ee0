"""Tenant isolation, read side and WebSocket: users alice (A) and bob (B) share one ComfyUI
through the real app; an admin sees everything.

Prompt submission is isolated by another guard; to stay independent of its wiring these tests
create prompts the way that guard does: ownership recorded first, then the prompt submitted to
the fake with the namespaced ``client_id`` (``upstream_client_id(owner, client id)``).
"""

from __future__ import annotations

import itertools
import json
import time
import uuid
from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import pytest
from aiohttp.test_utils import TestClient

from proxy.comfy.records import PromptRecord
from proxy.principal import comfy_user_id
from proxy.settings import SETTINGS
from proxy.tenancy.attribution import preview_node_ids
from proxy.tenancy.namespaces import upstream_client_id
from proxy.tenancy.ownership import OWNERSHIP
from proxy.upstream.pool import POOL
from tests.conftest import ProxyFactory, bearer
from tests.fakes.comfyui import FakeComfyUI
from tests.fakes.comfyui.middleware import Received
from tests.integration.support import get_json, post
from tests.support.gateway_queue import settled
from tests.support.ws import frames_until, greeted, kinds, prompt_ids

Client = TestClient[Any, Any]
ALICE, BOB = comfy_user_id("alice"), comfy_user_id("bob")
_colors = itertools.count(0x100000, 7919)  # a new graph every time: nothing is cached


A, B, ADMIN = bearer("alice"), bearer("bob"), bearer("admin", ("admin",))


@pytest.fixture
def client(anonymous_proxy: Client) -> Client:
    return anonymous_proxy


@pytest.fixture
async def direct(fake_comfy: FakeComfyUI) -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession(fake_comfy.url) as session:
        yield session


def graph(*, previews: bool = False) -> dict[str, Any]:
    """EmptyImage -> PreviewImage (a temp output file); with ``previews`` also GetImageSize
    (a type 3 text frame, broadcast) and SaveImageWebsocket (binary previews)."""
    color = next(_colors) % 0xFFFFFF
    nodes: dict[str, Any] = {
        "1": {
            "class_type": "EmptyImage",
            "inputs": {"width": 8, "height": 8, "batch_size": 1, "color": color},
        },
        "2": {"class_type": "PreviewImage", "inputs": {"images": ["1", 0]}},
    }
    if previews:
        nodes["3"] = {"class_type": "GetImageSize", "inputs": {"image": ["1", 0]}}
        nodes["4"] = {
            "class_type": "EmptyImage",
            "inputs": {"width": ["3", 0], "height": ["3", 1], "batch_size": 1, "color": 0},
        }
        nodes["5"] = {"class_type": "PreviewImage", "inputs": {"images": ["4", 0]}}
        nodes["6"] = {"class_type": "SaveImageWebsocket", "inputs": {"images": ["1", 0]}}
    return nodes


async def submit(
    client: Client,
    direct: aiohttp.ClientSession,
    owner: str,
    client_id: str | None = "",
    *,
    previews: bool = False,
) -> str:
    """A prompt of ``owner`` as the submit guard creates it; ``client_id=None``: submitted
    without one (a legacy API script: ComfyUI broadcasts its progress and previews)."""
    prompt_id = str(uuid.uuid4())
    namespaced = upstream_client_id(owner, client_id or "")
    upstream = client.app[POOL].pick().name
    prompt = graph(previews=previews)
    nodes = preview_node_ids(
        ((node_id, node["class_type"]) for node_id, node in prompt.items()),
        client.app[SETTINGS].isolation.preview_nodes,
    )
    record = PromptRecord(prompt_id, owner, upstream, namespaced, time.time(), previews=nodes)
    assert await client.app[OWNERSHIP].record_prompt(record)
    body: dict[str, Any] = {
        "prompt": prompt,
        "prompt_id": prompt_id,
        "extra_data": {"create_time": int(time.time() * 1000)},
    }
    if client_id is not None:
        body["client_id"] = namespaced
    async with direct.post("/prompt", json=body) as resp:
        assert resp.status == 200, await resp.text()
    return prompt_id


def requests_to(fake: FakeComfyUI, method: str, path: str) -> list[Received]:
    return [r for r in fake.received if r.method == method and r.path == path]


# -- history ------------------------------------------------------------------------------


async def test_history_shows_only_own_prompts(
    client: Client, direct: aiohttp.ClientSession, fake_comfy: FakeComfyUI
) -> None:
    a1 = await submit(client, direct, ALICE)
    b1 = await submit(client, direct, BOB)
    a2 = await submit(client, direct, ALICE)
    await fake_comfy.wait_idle()

    assert list(await get_json(client, "/api/history", B)) == [b1]
    assert await get_json(client, f"/api/history/{a1}", B) == {}
    assert await get_json(client, "/api/history/no-such-id", B) == {}
    assert list(await get_json(client, "/history?max_items=1", B)) == [b1]
    assert list(await get_json(client, "/api/history", A)) == [a1, a2]
    assert list(await get_json(client, "/api/history/" + a1, A)) == [a1]
    assert list(await get_json(client, "/api/history", ADMIN)) == [a1, b1, a2]

    # Paging applies to A's own list (ComfyUI's semantics), read prompt by prompt: only what
    # the window needs, never ComfyUI's whole history (proxy.isolation.own_views).
    fake_comfy.reset()
    assert list(await get_json(client, "/api/history?max_items=1&x=%26", A)) == [a2]
    assert [r.raw_path for r in fake_comfy.received] == [f"/api/history/{a2}"]
    assert list(await get_json(client, "/api/history?max_items=1&offset=0", A)) == [a1]
    assert list(await get_json(client, "/api/history?offset=1", A)) == [a2]
    assert list(await get_json(client, "/api/history?max_items=5", A)) == [a1, a2]
    # Admins are not filtered: ComfyUI pages the whole history itself.
    assert list(await get_json(client, "/api/history?max_items=1", ADMIN)) == [a2]
    assert requests_to(fake_comfy, "GET", "/api/history")[-1].raw_path.endswith("max_items=1")
    # A bad value goes upstream untouched: ComfyUI's own 500.
    async with client.get("/api/history?max_items=x", headers=A) as resp:
        assert resp.status == 500


async def test_history_records_outputs_as_the_owners_files(
    client: Client, direct: aiohttp.ClientSession, fake_comfy: FakeComfyUI
) -> None:
    a1 = await submit(client, direct, ALICE)
    b1 = await submit(client, direct, BOB)
    await fake_comfy.wait_idle()
    entry = (await get_json(client, f"/history/{a1}", A))[a1]
    image = entry["outputs"]["2"]["images"][0]
    assert image["type"] == "temp"
    ownership = client.app[OWNERSHIP]
    assert await ownership.file_owner(("temp", image["subfolder"], image["filename"])) == ALICE
    # B's history view never names A's files, and B's own are B's.
    b_image = (await get_json(client, "/history", B))[b1]["outputs"]["2"]["images"][0]
    assert await ownership.file_owner(("temp", "", b_image["filename"])) == BOB


async def test_history_delete_and_clear_only_own(
    client: Client, direct: aiohttp.ClientSession, fake_comfy: FakeComfyUI
) -> None:
    a1 = await submit(client, direct, ALICE)
    b1 = await submit(client, direct, BOB)
    await settled(client, fake_comfy)
    fake_comfy.reset()

    assert await post(client, "/api/history", B, {"delete": [a1, b1]}) == (200, b"")
    assert [json.loads(r.body) for r in requests_to(fake_comfy, "POST", "/api/history")] == [
        {"delete": [b1]}
    ]
    assert a1 in fake_comfy.queue.history
    assert b1 not in fake_comfy.queue.history

    fake_comfy.reset()
    assert await post(client, "/api/history", B, {"delete": [a1]}) == (200, b"")
    status, _ = await post(client, "/api/history", B, {"clear": True})
    assert status == 200  # narrowed to a delete of B's own ids
    sent = [json.loads(r.body) for r in requests_to(fake_comfy, "POST", "/api/history")]
    assert sent in ([], [{"delete": [b1]}])  # never A's, never a real clear
    assert a1 in fake_comfy.queue.history


async def test_clear_becomes_delete_of_own_ids_for_roles_let_through(
    make_proxy: ProxyFactory, direct: aiohttp.ClientSession, fake_comfy: FakeComfyUI
) -> None:
    """A role that RoleGuard lets clear (allow_routes) still only clears its own prompts."""
    roles = {
        "user": {"allow_routes": ["queue", "history"]},
        "admin": {"admin": True},
    }
    client: Client = await make_proxy(fake_comfy.url, token=None, roles=roles)
    a1 = await submit(client, direct, ALICE)
    b1 = await submit(client, direct, BOB)
    await fake_comfy.wait_idle()
    fake_comfy.hold()
    a_running = await submit(client, direct, ALICE)
    await fake_comfy.wait_held()
    a_pending = await submit(client, direct, ALICE)
    b_pending = await submit(client, direct, BOB)
    fake_comfy.reset()

    assert await post(client, "/queue", B, {"clear": True}) == (200, b"")
    assert json.loads(requests_to(fake_comfy, "POST", "/queue")[0].body) == {"delete": [b_pending]}
    assert [item[1] for item in fake_comfy.queue.queue] == [a_pending]

    assert await post(client, "/history", B, {"clear": True}) == (200, b"")
    sent = json.loads(requests_to(fake_comfy, "POST", "/history")[0].body)
    assert set(sent["delete"]) == {b1, b_pending}
    assert "clear" not in sent
    assert set(fake_comfy.queue.history) == {a1}
    fake_comfy.release()
    await fake_comfy.wait_idle()
    assert set(fake_comfy.queue.history) == {a1, a_running, a_pending}


# -- queue --------------------------------------------------------------------------------


async def test_queue_redacts_other_users_entries(
    client: Client, direct: aiohttp.ClientSession, fake_comfy: FakeComfyUI
) -> None:
    fake_comfy.hold()
    a1 = await submit(client, direct, ALICE)
    await fake_comfy.wait_held()
    a2 = await submit(client, direct, ALICE)
    b1 = await submit(client, direct, BOB)

    seen_by_b = await get_json(client, "/api/queue", B)
    (running,) = seen_by_b["queue_running"]
    assert running[2:] == [{}, {}, []]
    assert running[1] not in (a1, a2)
    assert str(uuid.UUID(running[1])) == running[1]
    pending = {item[1]: item for item in seen_by_b["queue_pending"]}
    assert len(pending) == 2
    assert b1 in pending
    assert a2 not in pending
    assert pending[b1][2] == graph_of(fake_comfy, b1)
    (redacted,) = [item for pid, item in pending.items() if pid != b1]
    assert redacted[2:] == [{}, {}, []]
    assert isinstance(redacted[0], int)
    assert "client_id" not in json.dumps(redacted)
    # Stable placeholders: the UI's list does not churn between polls.
    assert await get_json(client, "/api/queue", B) == seen_by_b

    seen_by_a = await get_json(client, "/queue", A)
    assert seen_by_a["queue_running"][0][1] == a1
    assert {item[1] for item in seen_by_a["queue_pending"]} >= {a2}
    admin = await get_json(client, "/queue", ADMIN)
    assert {item[1] for item in admin["queue_pending"]} == {a2, b1}
    assert admin["queue_running"][0][3]["client_id"] == upstream_client_id(ALICE, "")
    fake_comfy.release()
    await fake_comfy.wait_idle()


def graph_of(fake: FakeComfyUI, prompt_id: str) -> Any:
    return next(item[2] for item in fake.queue.queue if item[1] == prompt_id)


async def test_queue_delete_and_clear_only_own(
    client: Client, direct: aiohttp.ClientSession, fake_comfy: FakeComfyUI
) -> None:
    fake_comfy.hold()
    await submit(client, direct, ALICE)
    await fake_comfy.wait_held()
    a2 = await submit(client, direct, ALICE)
    b1 = await submit(client, direct, BOB)
    fake_comfy.reset()

    assert await post(client, "/api/queue", B, {"delete": [a2, b1]}) == (200, b"")
    assert [json.loads(r.body) for r in requests_to(fake_comfy, "POST", "/api/queue")] == [
        {"delete": [b1]}
    ]
    assert [item[1] for item in fake_comfy.queue.queue] == [a2]

    fake_comfy.reset()
    assert await post(client, "/api/queue", B, {"delete": [a2]}) == (200, b"")
    assert (await post(client, "/api/queue", B, {"clear": True}))[0] == 200  # own: none left
    assert requests_to(fake_comfy, "POST", "/api/queue") == []
    assert [item[1] for item in fake_comfy.queue.queue] == [a2]
    fake_comfy.release()
    await fake_comfy.wait_idle()


# -- interrupt ------------------------------------------------------------------------------


async def test_interrupt_only_own_running_prompt(
    client: Client, direct: aiohttp.ClientSession, fake_comfy: FakeComfyUI
) -> None:
    fake_comfy.hold()
    a1 = await submit(client, direct, ALICE)
    assert await fake_comfy.wait_held() == a1
    fake_comfy.reset()

    assert await post(client, "/api/interrupt", B, {"prompt_id": a1}) == (200, b"")
    assert await post(client, "/api/interrupt", B) == (200, b"")  # A's runs: a no-op for B
    assert await post(client, "/interrupt", B, {"prompt_id": ""}) == (200, b"")
    assert requests_to(fake_comfy, "POST", "/api/interrupt") == []
    assert requests_to(fake_comfy, "POST", "/interrupt") == []
    assert not fake_comfy.queue.executor.interrupted

    assert await post(client, "/api/interrupt", A) == (200, b"")
    (sent,) = requests_to(fake_comfy, "POST", "/api/interrupt")
    assert json.loads(sent.body) == {"prompt_id": a1}
    fake_comfy.release()
    await fake_comfy.wait_idle()
    history = fake_comfy.queue.history[a1]["status"]
    assert history["messages"][-1][0] == "execution_interrupted"


# -- jobs -----------------------------------------------------------------------------------


async def test_jobs_filtered_paginated_and_cancel_only_own(
    client: Client, direct: aiohttp.ClientSession, fake_comfy: FakeComfyUI
) -> None:
    a1 = await submit(client, direct, ALICE)
    b1 = await submit(client, direct, BOB)
    a2 = await submit(client, direct, ALICE)
    await fake_comfy.wait_idle()
    fake_comfy.hold()
    a_running = await submit(client, direct, ALICE)
    await fake_comfy.wait_held()
    a_pending = await submit(client, direct, ALICE)
    b_pending = await submit(client, direct, BOB)
    fake_comfy.reset()

    page = await get_json(client, "/api/jobs?limit=1&offset=0&sort_order=asc", B)
    assert [j["id"] for j in page["jobs"]] == [b1]
    assert page["pagination"] == {"offset": 0, "limit": 1, "total": 2, "has_more": True}
    # B's own jobs, each read on its own: ComfyUI's whole list is never fetched.
    assert sorted(r.raw_path for r in fake_comfy.received) == sorted(
        f"/api/jobs/{p}" for p in (b1, b_pending)
    )
    page = await get_json(client, "/api/jobs?status=completed&limit=1&offset=1", A)
    assert page["pagination"] == {"offset": 1, "limit": 1, "total": 2, "has_more": False}
    assert [j["id"] for j in page["jobs"]] in ([a1], [a2])
    everything = await get_json(client, "/api/jobs", ADMIN)
    assert everything["pagination"]["total"] == 6
    async with client.get("/api/jobs?limit=0", headers=B) as resp:
        assert resp.status == 400  # ComfyUI's own answer
        assert "limit" in (await resp.json())["error"]

    fake_comfy.reset()
    async with client.get(f"/api/jobs/{a1}", headers=B) as resp:
        assert resp.status == 404
        assert await resp.json() == {"error": "Job not found"}
    assert await get_json(client, f"/api/jobs/{b1}", B) != {}
    assert (await get_json(client, f"/api/jobs/{a1}", ADMIN))["id"] == a1
    assert await post(client, f"/api/jobs/{a_pending}/cancel", B) == (
        200,
        b'{"cancelled":false}',
    )
    assert await post(client, f"/api/jobs/{a_running}/cancel", B) == (
        200,
        b'{"cancelled":false}',
    )
    assert await post(client, "/api/jobs/cancel", B, {"job_ids": [a_pending]}) == (
        200,
        b'{"cancelled":false}',
    )
    assert [r.raw_path for r in fake_comfy.received if r.method == "POST"] == []
    assert await get_json(client, f"/api/jobs/{b1}", B) != {}
    assert {r.path for r in fake_comfy.received} == {f"/api/jobs/{b1}", f"/api/jobs/{a1}"}

    status, body = await post(client, "/api/jobs/cancel", B, {"job_ids": [a_pending, b_pending]})
    assert (status, json.loads(body)) == (200, {"cancelled": True})
    (sent,) = requests_to(fake_comfy, "POST", "/api/jobs/cancel")
    assert json.loads(sent.body) == {"job_ids": [b_pending]}
    status, body = await post(client, "/api/jobs/cancel", B, {"job_ids": [a_pending, "nope"]})
    assert status == 400
    assert json.loads(body)["invalid_ids"] == ["nope"]
    assert [item[1] for item in fake_comfy.queue.queue] == [a_pending]
    fake_comfy.release()
    await fake_comfy.wait_idle()


# -- WebSocket --------------------------------------------------------------------------------

MARKER = {"type": "status", "data": {"status": {"exec_info": {"queue_remaining": 0}}, "end": 1}}


async def frames_until_marker(ws: aiohttp.ClientWebSocketResponse) -> list[Any]:
    """Every frame up to :data:`MARKER` (broadcast last: all earlier frames were relayed)."""
    return await frames_until(ws, MARKER)


async def connect(
    client: Client, headers: dict[str, str], client_id: str | None, *, flags: bool = True
) -> tuple[aiohttp.ClientWebSocketResponse, str]:
    """A socket (with the stock UI's feature flags); returns it and the sid it was told."""
    path = "/ws" if client_id is None else f"/ws?clientId={client_id}"
    ws = await client.ws_connect(path, headers=headers)
    return ws, await greeted(ws, flags=flags)


async def test_socket_ids_are_namespaced_and_sid_mapped_back(
    client: Client, fake_comfy: FakeComfyUI
) -> None:
    ws, sid = await connect(client, A, "tab-a", flags=False)
    assert sid == "tab-a"
    assert upstream_client_id(ALICE, "tab-a") in fake_comfy.sockets
    assert "tab-a" not in fake_comfy.sockets
    (handshake,) = requests_to(fake_comfy, "GET", "/ws")
    assert handshake.query["clientId"] == upstream_client_id(ALICE, "tab-a")

    minted_ws, minted = await connect(client, A, None, flags=False)
    assert len(minted) == 32
    assert minted != "tab-a"
    assert upstream_client_id(ALICE, minted) in fake_comfy.sockets
    await ws.close()
    await minted_ws.close()


async def test_a_socket_gets_all_of_its_events_b_none(
    client: Client, direct: aiohttp.ClientSession, fake_comfy: FakeComfyUI
) -> None:
    a_ws, _ = await connect(client, A, "tab-a")
    b_ws, _ = await connect(client, B, "tab-b")
    a1 = await submit(client, direct, ALICE, "tab-a", previews=True)
    await fake_comfy.wait_idle()
    await fake_comfy.broadcast(MARKER)

    a_frames = await frames_until_marker(a_ws)
    a_kinds = kinds(a_frames)
    for kind in ("execution_start", "executing", "progress", "executed", "execution_success"):
        assert kind in a_kinds
    assert ("binary", 4) in a_kinds  # SaveImageWebsocket previews, with metadata
    assert ("binary", 3) in a_kinds  # GetImageSize's text, broadcast by ComfyUI
    assert prompt_ids(a_frames) == {a1}
    assert a_frames[-1] == {"type": "executing", "data": {"node": None, "prompt_id": a1}}

    b_frames = await frames_until_marker(b_ws)
    assert set(kinds(b_frames)) == {"status"}  # queue counts only: type 3 was dropped
    await a_ws.close()
    await b_ws.close()


async def test_broadcast_events_of_a_prompt_reach_only_its_owner(
    client: Client, direct: aiohttp.ClientSession, fake_comfy: FakeComfyUI
) -> None:
    """A prompt without client_id: ComfyUI broadcasts its progress and type 1 previews."""
    a_ws, _ = await connect(client, A, "tab-a", flags=False)
    b_ws, _ = await connect(client, B, "tab-b", flags=False)
    admin_ws, _ = await connect(client, ADMIN, "tab-admin", flags=False)
    a1 = await submit(client, direct, ALICE, None, previews=True)
    await fake_comfy.wait_idle()
    await fake_comfy.broadcast(MARKER)

    b_frames = await frames_until_marker(b_ws)
    assert set(kinds(b_frames)) == {"status"}
    a_frames = await frames_until_marker(a_ws)
    assert prompt_ids(a_frames) == {a1}
    assert {"progress", "progress_state"} <= set(kinds(a_frames))
    # A's own progress opens the preview window on A's socket: the untagged previews of A's
    # prompt reach A (a broadcast within the tenant), and B got none of them (above).
    assert ("binary", 1) in kinds(a_frames)
    assert ("binary", 3) in kinds(a_frames)
    admin_frames = await frames_until_marker(admin_ws)  # admins are not filtered
    assert ("binary", 1) in kinds(admin_frames)
    assert ("binary", 3) in kinds(admin_frames)
    for ws in (a_ws, b_ws, admin_ws):
        await ws.close()


async def test_b_cannot_claim_a_socket_id(
    client: Client, direct: aiohttp.ClientSession, fake_comfy: FakeComfyUI
) -> None:
    a_ws, _ = await connect(client, A, "tab-a")
    b_ws, b_sid = await connect(client, B, "tab-a")
    assert b_sid == "tab-a"  # B is told its own id back, but upstream it is a different one
    assert {upstream_client_id(ALICE, "tab-a"), upstream_client_id(BOB, "tab-a")} <= set(
        fake_comfy.sockets
    )
    a1 = await submit(client, direct, ALICE, "tab-a", previews=True)
    await fake_comfy.wait_idle()
    await fake_comfy.broadcast(MARKER)
    a_frames = await frames_until_marker(a_ws)
    assert "execution_success" in kinds(a_frames)
    assert prompt_ids(a_frames) == {a1}
    assert set(kinds(await frames_until_marker(b_ws))) == {"status"}
    await a_ws.close()
    await b_ws.close()


async def test_logs_and_unattributed_events_only_for_admins(
    client: Client, fake_comfy: FakeComfyUI
) -> None:
    b_ws, _ = await connect(client, B, "tab-b", flags=False)
    admin_ws, _ = await connect(client, ADMIN, "tab-admin", flags=False)
    logs = {"type": "logs", "data": {"entries": [{"t": "now", "m": "secret"}], "size": None}}
    chat = {"type": "display_component", "data": {"node_id": "1", "component": "X"}}
    for sid in (
        upstream_client_id(BOB, "tab-b"),
        upstream_client_id(comfy_user_id("admin"), "tab-admin"),
    ):
        await fake_comfy.send_json(sid, logs)
    await fake_comfy.broadcast(chat)
    await fake_comfy.broadcast(MARKER)
    assert await frames_until_marker(b_ws) == []
    assert await frames_until_marker(admin_ws) == [logs, chat]
    await b_ws.close()
    await admin_ws.close()


async def test_isolation_disabled_filters_nothing(
    make_proxy: ProxyFactory, direct: aiohttp.ClientSession, fake_comfy: FakeComfyUI
) -> None:
    client: Client = await make_proxy(fake_comfy.url, token=None, isolation={"enabled": False})
    a1 = await submit(client, direct, ALICE)
    await fake_comfy.wait_idle()
    assert list(await get_json(client, "/history", B)) == [a1]
    ws = await client.ws_connect("/ws?clientId=plain", headers=B)
    assert (await ws.receive_json())["data"]["sid"] == "plain"
    assert "plain" in fake_comfy.sockets
    await ws.close()
