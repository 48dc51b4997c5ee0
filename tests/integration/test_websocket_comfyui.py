"""The /ws relay against the fake ComfyUI: recorded runs, clientId routing, takeover, broadcasts."""

from __future__ import annotations

import asyncio
import json
from typing import Any

import aiohttp
import pytest
from aiohttp.test_utils import TestClient

from tests.conftest import ProxyFactory
from tests.fakes.comfyui import FakeComfyUI
from tests.fakes.test_fake_comfyui_runs import RUNS, replay_run

PROMPT = {
    "1": {
        "class_type": "EmptyImage",
        "inputs": {"width": 8, "height": 8, "batch_size": 1, "color": 0},
    },
    "2": {"class_type": "PreviewImage", "inputs": {"images": ["1", 0]}},
}


@pytest.fixture
async def transparent(make_proxy: ProxyFactory, fake_comfy: FakeComfyUI) -> TestClient[Any, Any]:
    """The relay without per-user client ids (isolation off): ComfyUI's own socket semantics."""
    return await make_proxy(fake_comfy.url, isolation={"enabled": False})


@pytest.mark.parametrize(("name", "variant"), RUNS)
async def test_recorded_runs_through_the_proxy(
    name: str, variant: str | None, proxy: TestClient[Any, Any], fake_comfy: FakeComfyUI
) -> None:
    """Every recorded run (JSON events, type 1/3/4 binary frames, caching, errors) arrives
    through the proxy exactly as ComfyUI sent it, with isolation on (per-user client ids)."""
    await replay_run(name, variant, fake_comfy, proxy)


async def types_until_done(ws: aiohttp.ClientWebSocketResponse, prompt_id: str) -> list[str]:
    """Message types received up to ``executing`` with ``node: null`` for ``prompt_id``."""
    seen = []
    while True:
        msg = await asyncio.wait_for(ws.receive(), 10)
        if msg.type is not aiohttp.WSMsgType.TEXT:
            seen.append(f"binary:{msg.data[3]}")
            continue
        data = json.loads(msg.data)
        seen.append(data["type"])
        inner = data.get("data", {})
        done = data["type"] == "executing" and inner.get("node") is None
        if done and inner.get("prompt_id") == prompt_id:
            return seen


async def submit(proxy: TestClient[Any, Any], client_id: str | None) -> str:
    body: dict[str, Any] = {"prompt": PROMPT}
    if client_id is not None:
        body["client_id"] = client_id
    resp = await proxy.post("/api/prompt", json=body)
    assert resp.status == 200, await resp.text()
    return str((await resp.json())["prompt_id"])


async def test_minted_sid_when_no_client_id(proxy: TestClient[Any, Any]) -> None:
    ws = await proxy.ws_connect("/ws")
    first = await ws.receive_json()
    assert first["type"] == "status"
    assert len(first["data"]["sid"]) == 32
    await ws.close()


async def test_takeover_keeps_one_upstream_socket_per_client_id(
    transparent: TestClient[Any, Any], fake_comfy: FakeComfyUI
) -> None:
    """Two tabs with one clientId: like ComfyUI, the newer one gets the events and the older one
    stays open and silent; unlike a naive relay, the older one closing later does not unregister
    the id upstream (docs/comfyui-protocol.md#connect-and-clientid-takeover)."""
    older = await transparent.ws_connect("/ws?clientId=tab")
    await older.receive_json()
    newer = await transparent.ws_connect("/ws?clientId=tab")
    assert (await newer.receive_json())["data"]["sid"] == "tab"
    assert list(fake_comfy.sockets) == ["tab"]

    prompt_id = await submit(transparent, "tab")
    assert "execution_success" in await types_until_done(newer, prompt_id)
    await fake_comfy.wait_idle()

    await older.close()
    prompt_id = await submit(transparent, "tab")
    assert "execution_success" in await types_until_done(newer, prompt_id)
    assert list(fake_comfy.sockets) == ["tab"]
    await newer.close()


async def test_events_of_prompts_without_client_id_are_broadcast(
    transparent: TestClient[Any, Any], fake_comfy: FakeComfyUI
) -> None:
    """A transparent relay passes ComfyUI's broadcasts on (isolation is a later concern)."""
    observer = await transparent.ws_connect("/ws?clientId=observer")
    await observer.receive_json()
    prompt_id = await submit(transparent, None)
    while True:  # progress_state of a prompt without client_id goes to every socket
        msg = await observer.receive_json(timeout=10)
        if msg["type"] == "progress_state" and msg["data"]["prompt_id"] == prompt_id:
            break
    await fake_comfy.wait_idle()
    await observer.close()


async def test_upstream_socket_closed_when_client_leaves(
    transparent: TestClient[Any, Any], fake_comfy: FakeComfyUI
) -> None:
    ws = await transparent.ws_connect("/api/ws?clientId=leaver")
    await ws.receive_json()
    assert "leaver" in fake_comfy.sockets
    upstream = fake_comfy.sockets["leaver"]
    await ws.close()
    # The proxy closes the upstream side before it answers the client's close frame.
    assert upstream.closed
    ws2 = await transparent.ws_connect("/api/ws?clientId=leaver")
    await ws2.receive_json()
    prompt_id = await submit(transparent, "leaver")
    assert "execution_success" in await types_until_done(ws2, prompt_id)
    await ws2.close()
