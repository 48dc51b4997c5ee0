"""Prompts without a ``client_id`` are broadcast within their submitter's tenant (issue 15).

ComfyUI broadcasts the events of such a prompt to every socket. The proxy forwards it without
a client id (never one the client could aim at another socket) and its WebSocket filter
delivers those events to every socket of the submitter, and to nobody else: B's sockets never
see A's events or previews; A's two sockets both do. A marker frame sent after the frames
under test, received by the client, proves they were handled (a socket's frames stay in order).
"""

from __future__ import annotations

import json
import struct
from typing import Any

import aiohttp
import pytest

from proxy.tenancy.namespaces import upstream_client_id
from tests.fakes.comfyui import FakeComfyUI
from tests.integration.multi_support import ALICE, BOB, A, B, Client, connect, receive_until


@pytest.fixture
def client(anonymous_proxy: Client) -> Client:
    return anonymous_proxy


def graph(color: int) -> dict[str, Any]:
    return {
        "1": {
            "class_type": "EmptyImage",
            "inputs": {"width": 8, "height": 8, "batch_size": 1, "color": color},
        },
        "9": {"class_type": "PreviewImage", "inputs": {"images": ["1", 0]}},
    }


def marked(marker: str) -> Any:
    return lambda f: isinstance(f, dict) and f.get("data", {}).get("marker") == marker


async def until_marker(fake: FakeComfyUI, ws: aiohttp.ClientWebSocketResponse, m: str) -> list[Any]:
    await fake.broadcast({"type": "status", "data": {"status": {}, "marker": m}})
    return [f for f in await receive_until(ws, marked(m)) if not marked(m)(f)]


def about(frames: list[Any], prompt_id: str) -> list[Any]:
    return [f for f in frames if isinstance(f, dict) and prompt_id in json.dumps(f)]


async def sockets(client: Client, fake: FakeComfyUI) -> list[aiohttp.ClientWebSocketResponse]:
    a1, _ = await connect(client, A, "a1")
    a2, _ = await connect(client, A, "a2")
    b1, _ = await connect(client, B, "b1")
    for owner, cid in ((ALICE, "a1"), (ALICE, "a2"), (BOB, "b1")):
        await fake.wait_socket(upstream_client_id(owner, cid), flags=True)
    return [a1, a2, b1]


async def test_prompt_without_client_id_reaches_all_of_a_and_none_of_b(
    client: Client, fake_comfy: FakeComfyUI
) -> None:
    a1, a2, b1 = await sockets(client, fake_comfy)
    async with client.post("/prompt", json={"prompt": graph(0x101010)}, headers=A) as resp:
        assert resp.status == 200, await resp.text()
        prompt_id = (await resp.json())["prompt_id"]
    [sent] = [json.loads(r.body) for r in fake_comfy.received if r.path.endswith("/prompt")]
    assert "client_id" not in sent  # ComfyUI broadcasts; the filter keeps it in the tenant
    assert "client_id" not in sent.get("extra_data", {})
    await fake_comfy.wait_idle()
    for ws in (a1, a2):
        frames = await until_marker(fake_comfy, ws, f"after-run-{id(ws)}")
        kinds = [f["type"] for f in about(frames, prompt_id)]
        # What ComfyUI broadcasts for such a prompt (it sends the rest to a client id only).
        assert "progress_state" in kinds, kinds
    assert about(await until_marker(fake_comfy, b1, "after-run"), prompt_id) == []

    # Previews (no prompt id on the wire) inside A's broadcast execution: A's sockets only.
    preview = struct.pack(">II", 1, 1) + b"\xff\xd8preview"
    for kind, data in (
        ("progress", {"value": 1, "max": 2, "node": "9", "prompt_id": prompt_id}),
        (None, None),
    ):
        if kind is None:
            await fake_comfy.send_binary(None, preview)
        else:
            await fake_comfy.broadcast({"type": kind, "data": data})
    for ws in (a1, a2):
        frames = await until_marker(fake_comfy, ws, f"preview-{id(ws)}")
        assert ("binary", 1) in frames
    frames = await until_marker(fake_comfy, b1, "preview-b")
    assert frames == [] or all(f != ("binary", 1) and not about([f], prompt_id) for f in frames)
    for ws in (a1, a2, b1):
        await ws.close()


async def test_b_without_client_id_cannot_reach_a_socket_through_extra_data(
    client: Client, fake_comfy: FakeComfyUI
) -> None:
    a1, a2, b1 = await sockets(client, fake_comfy)
    # B names A's socket the only way ComfyUI would read without a top-level client_id.
    body = {"prompt": graph(0x202020), "extra_data": {"client_id": upstream_client_id(ALICE, "a1")}}
    async with client.post("/prompt", json=body, headers=B) as resp:
        assert resp.status == 200, await resp.text()
        prompt_id = (await resp.json())["prompt_id"]
    [sent] = [json.loads(r.body) for r in fake_comfy.received if r.path.endswith("/prompt")]
    # Read as B's client id, and namespaced as B's like any other.
    assert sent["client_id"] == upstream_client_id(BOB, upstream_client_id(ALICE, "a1"))
    await fake_comfy.wait_idle()
    for ws, name in ((a1, "a1"), (a2, "a2"), (b1, "b1")):
        assert about(await until_marker(fake_comfy, ws, name), prompt_id) == []
    for ws in (a1, a2, b1):
        await ws.close()


async def test_a_stale_preview_window_closes_on_another_prompt(
    client: Client, fake_comfy: FakeComfyUI
) -> None:
    """B's socket saw B's prompt start but missed its end; A's broadcast prompt then runs:
    A's previews must not pass on B's socket."""
    a1, a2, b1 = await sockets(client, fake_comfy)
    body = {"prompt": graph(0x303030)}
    async with client.post("/prompt", json=body, headers=B) as resp:
        b_prompt = (await resp.json())["prompt_id"]
    await fake_comfy.wait_idle()
    async with client.post("/prompt", json={"prompt": graph(0x313131)}, headers=A) as resp:
        a_prompt = (await resp.json())["prompt_id"]
    await fake_comfy.wait_idle()
    # B's window opened (and never closed) by a node of B's own prompt...
    await fake_comfy.broadcast({"type": "progress", "data": {"node": "9", "prompt_id": b_prompt}})
    # ...then A's prompt runs and previews.
    await fake_comfy.broadcast({"type": "progress", "data": {"node": "9", "prompt_id": a_prompt}})
    await fake_comfy.send_binary(None, struct.pack(">II", 1, 1) + b"\xff\xd8a")
    frames = await until_marker(fake_comfy, b1, "stale")
    assert ("binary", 1) not in frames
    assert about(frames, a_prompt) == []
    assert ("binary", 1) in await until_marker(fake_comfy, a1, "a-sees")
    for ws in (a1, a2, b1):
        await ws.close()
