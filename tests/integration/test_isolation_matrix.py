"""The isolation matrix end to end: A and B share one ComfyUI through the proxy.

A runs the whole flow (upload, submit, watch the socket, history, view, queue, jobs); B tries to
reach every piece of it by both route forms and fails; the admin sees it all. Everything goes
through the real app, both isolation guards included.
"""

from __future__ import annotations

import io
from typing import Any

import aiohttp
import pytest
from aiohttp import FormData
from aiohttp.test_utils import TestClient
from PIL import Image

from tests.conftest import ProxyFactory, bearer
from tests.fakes.comfyui import FakeComfyUI
from tests.integration.support import run_until_done

A, B, ADMIN = bearer("alice"), bearer("bob"), bearer("root", ("admin",))


def png() -> bytes:
    out = io.BytesIO()
    Image.new("RGB", (16, 16), (200, 10, 10)).save(out, format="PNG")
    return out.getvalue()


@pytest.mark.parametrize("state", ["memory", "redis"])
async def test_a_runs_the_whole_flow_and_b_reaches_none_of_it(
    state: str, make_proxy: ProxyFactory, fake_comfy: FakeComfyUI, request: pytest.FixtureRequest
) -> None:
    redis_section = {"url": request.getfixturevalue("redis_url")} if state == "redis" else {}
    client: TestClient[Any, Any] = await make_proxy(fake_comfy.url, token=None, redis=redis_section)

    # A uploads an image and builds a workflow on it.
    form = FormData()
    form.add_field("image", png(), filename="cat.png", content_type="image/png")
    form.add_field("subfolder", "../../elsewhere")
    upload = await client.post("/api/upload/image", data=form, headers=A)
    assert upload.status == 400  # a traversal attempt in the subfolder is refused outright
    form = FormData()
    form.add_field("image", png(), filename="cat.png", content_type="image/png")
    upload = await client.post("/api/upload/image", data=form, headers=A)
    assert upload.status == 200
    uploaded = await upload.json()
    assert uploaded["subfolder"].startswith("users/alice-")
    image_ref = f"{uploaded['subfolder']}/{uploaded['name']}"

    a_ws = await client.ws_connect("/ws?clientId=tab-a", headers=A)
    assert (await a_ws.receive_json())["data"]["sid"] == "tab-a"
    b_ws = await client.ws_connect("/api/ws?clientId=tab-a", headers=B)  # B tries A's id
    assert (await b_ws.receive_json())["data"]["sid"] == "tab-a"

    workflow = {
        "1": {"class_type": "LoadImage", "inputs": {"image": image_ref}},
        "2": {"class_type": "SaveImage", "inputs": {"images": ["1", 0], "filename_prefix": "cat"}},
    }
    resp = await client.post(
        "/api/prompt", json={"prompt": workflow, "client_id": "tab-a", "front": True}, headers=A
    )
    assert resp.status == 200, await resp.text()
    prompt_id = (await resp.json())["prompt_id"]
    events = await run_until_done(a_ws, prompt_id)
    executed = next(e for e in events if e["type"] == "executed")
    image = executed["data"]["output"]["images"][0]
    assert image["subfolder"].startswith("users/alice-")
    await fake_comfy.wait_idle()

    # A sees its own work everywhere.
    history = await (await client.get("/api/history", headers=A)).json()
    assert list(history) == [prompt_id]
    view = {"filename": image["filename"], "subfolder": image["subfolder"], "type": "output"}
    assert (await client.get("/api/view", params=view, headers=A)).status == 200
    jobs = await (await client.get("/api/jobs", headers=A)).json()
    assert [j["id"] for j in jobs["jobs"]] == [prompt_id]

    # B: nothing of A's, by any route form.
    for path in ("/history", "/api/history", f"/history/{prompt_id}", f"/api/history/{prompt_id}"):
        assert await (await client.get(path, headers=B)).json() == {}, path
    assert (await client.get("/view", params=view, headers=B)).status == 404
    assert (await client.get(f"/api/jobs/{prompt_id}", headers=B)).status == 404
    assert (await (await client.get("/api/jobs", headers=B)).json())["jobs"] == []
    b_flow = {
        "1": {"class_type": "LoadImage", "inputs": {"image": image_ref}},
        "2": {"class_type": "SaveImage", "inputs": {"images": ["1", 0]}},
    }
    stolen = await client.post("/prompt", json={"prompt": b_flow}, headers=B)
    assert stolen.status == 400
    assert (await stolen.json())["node_errors"]  # shown on the LoadImage node in the UI
    reused = await client.post(
        "/prompt", json={"prompt": workflow, "prompt_id": prompt_id}, headers=B
    )
    assert reused.status == 400
    fake_comfy.reset()
    assert (
        await client.post("/api/interrupt", json={"prompt_id": prompt_id}, headers=B)
    ).status == 200
    assert (await client.post("/history", json={"delete": [prompt_id]}, headers=B)).status == 200
    assert all(prompt_id not in (r.body or b"").decode() for r in fake_comfy.received)
    spoofed = await client.get("/api/history", headers={**B, "Comfy-User": "alice"})
    assert await spoofed.json() == {}

    # B's socket, even under A's client id, received none of A's events or previews.
    # A broadcast marker: every frame ComfyUI sent B's socket before it has been through the
    # relay's filter once B reads the marker.
    await fake_comfy.broadcast({"type": "status", "data": {"status": {"marker": True}}})
    leaked = []
    while True:
        msg = await b_ws.receive(timeout=10)
        if msg.type is aiohttp.WSMsgType.BINARY:
            leaked.append("binary frame")
            continue
        if '"marker"' in msg.data:
            break
        if prompt_id in msg.data:
            leaked.append(msg.data)
    assert leaked == []

    # The admin sees everything.
    admin_history = await (await client.get("/api/history", headers=ADMIN)).json()
    assert prompt_id in admin_history
    assert (await client.get("/api/view", params=view, headers=ADMIN)).status == 200
    await a_ws.close()
    await b_ws.close()
