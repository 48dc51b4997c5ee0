"""Replays the run captures over a WebSocket: the fake must send the same message types in the
same order, the same JSON shapes and the same binary layouts as ComfyUI 0.3.64.

Deliberate difference: the fake executes instantly, so where the recording interrupted a prompt
mid-graph the fake (held with ``hold()``) is interrupted at its first node.
"""

from __future__ import annotations

import io
import json
import struct
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp.test_utils import TestClient
from PIL import Image
from pytest_aiohttp import AiohttpClient

from tests.fakes.comfyui import FakeComfyUI
from tests.fakes.comfyui.captures import expected_types, load, message_type, receive, shape, texts

Client = TestClient[Any, Any]

RUNS = [
    ("run-empty-save", None),
    ("run-empty-preview", None),
    ("run-progress-text", None),
    ("execution-error", None),
    ("run-ws-binary", "legacy_no_feature_flags"),
    ("run-ws-binary", "feature_flags_preview_metadata"),
    ("run-tiny-model-ksampler", "legacy_no_feature_flags"),
    ("run-tiny-model-ksampler", "feature_flags_preview_metadata"),
]


def normalise(message: dict[str, Any], prompt_id: str) -> Any:
    """Shape of a message, with prompt ids and node ids kept (they are stable)."""
    text = json.dumps(message).replace(prompt_id, "PID")
    data = json.loads(text)
    return data["type"], shape(data["data"])


async def prepare(fake: FakeComfyUI, client: Client, name: str) -> None:
    if name == "execution-error":
        form = aiohttp.FormData()
        form.add_field("image", b"this is not a PNG\n", filename="rec_broken.png")
        async with client.post("/upload/image", data=form) as resp:
            assert resp.status == 200
    if name == "run-tiny-model-ksampler":
        fake.add_model("checkpoints", "v1-5-pruned-emaonly-fp16.safetensors")


@pytest.mark.parametrize(("name", "variant"), RUNS)
async def test_run_replay(
    name: str, variant: str | None, tmp_path: Path, aiohttp_client: AiohttpClient
) -> None:
    fake = FakeComfyUI(tmp_path)
    await replay_run(name, variant, fake, await aiohttp_client(fake.app))


async def replay_run(name: str, variant: str | None, fake: FakeComfyUI, client: Client) -> None:
    """Replay one run capture with ``client`` (straight to ``fake``, or through the proxy)."""
    capture = load(name)
    runs = capture.get("runs", capture)
    run = runs[variant] if variant else capture
    await prepare(fake, client, name)
    if variant == "feature_flags_preview_metadata":  # recorded right after the legacy run
        legacy = runs["legacy_no_feature_flags"]["exchanges"][0]["request"]["json"]
        async with client.post("/prompt", json={"prompt": legacy["prompt"]}) as resp:
            assert resp.status == 200
        await fake.wait_idle()
    ws_capture = run["websocket"]
    ws = await client.ws_connect(f"/ws?clientId={ws_capture['client_id']}")
    for sent in ws_capture["sent"]:
        await ws.send_str(json.dumps(sent["json"]))
    if ws_capture["sent"]:  # the handshake answer must come before we queue anything
        await receive(ws, 2)
    else:
        await receive(ws, 1)
    post = next(e for e in run["exchanges"] if e["request"]["path"] == "/prompt")
    async with client.post("/prompt", json=post["request"]["json"]) as resp:
        assert resp.status == 200
        answer = await resp.json()
    prompt_id = answer["prompt_id"]
    assert shape(answer) == shape(post["response"]["body"]["json"])
    await fake.wait_idle()

    want = expected_types(ws_capture)[: run.get("second_run_first_message_index")]
    skip = 2 if ws_capture["sent"] else 1
    got = await receive(ws, len(want) - skip)
    assert [message_type(m) for m in got] == want[skip:]
    recorded = [m for m in ws_capture["messages"] if m["kind"] != "closed"][skip : len(want)]
    for mine, theirs in zip(got, recorded, strict=True):
        if theirs["kind"] == "text":
            assert normalise(json.loads(mine.data), prompt_id) == normalise(
                theirs["json"], post["response"]["body"]["json"]["prompt_id"]
            )
        else:
            check_binary(mine.data, theirs["decoded"], prompt_id)
    if name == "run-empty-save":  # the identical prompt again: fully cached
        await second_cached_run(fake, client, ws, capture)
    await ws.close()

    hist = next(e for e in run["exchanges"] if e["request"]["path"].startswith("/history/"))
    async with client.get(f"/history/{prompt_id}") as resp:
        mine_hist = (await resp.json())[prompt_id]
    theirs_hist = next(iter(hist["response"]["body"]["json"].values()))
    assert shape(mine_hist) == shape(theirs_hist)
    assert mine_hist["status"]["status_str"] == theirs_hist["status"]["status_str"]
    assert [m[0] for m in mine_hist["status"]["messages"]] == [
        m[0] for m in theirs_hist["status"]["messages"]
    ]
    if name == "execution-error":
        error = mine_hist["status"]["messages"][-1][1]
        assert error["exception_type"] == "PIL.UnidentifiedImageError"
        assert error["current_inputs"] == {"image": ["rec_broken.png"]}
        assert error["exception_message"].startswith("cannot identify image file")


def check_binary(data: bytes, decoded: dict[str, Any], prompt_id: str) -> None:
    (event,) = struct.unpack(">I", data[:4])
    assert event == decoded["event_type"]
    if event == 3:
        (length,) = struct.unpack(">I", data[4:8])
        assert data[8 : 8 + length].decode() == decoded["node_id"]
        assert data[8 + length :].decode() == decoded["text"]
        return
    if event == 1:
        (fmt,) = struct.unpack(">I", data[4:8])
        assert fmt == decoded["image_type"]
        image = data[8:]
    else:
        (length,) = struct.unpack(">I", data[4:8])
        meta = json.loads(data[8 : 8 + length])
        want = {**decoded["metadata"], "prompt_id": prompt_id}
        assert meta == want
        image = data[8 + length :]
    with Image.open(io.BytesIO(image)) as img:
        assert img.format == decoded["image"]["format"]
        assert list(img.size) == decoded["image"]["size"]


async def second_cached_run(
    fake: FakeComfyUI,
    client: Client,
    ws: aiohttp.ClientWebSocketResponse,
    capture: dict[str, Any],
) -> None:
    """run-empty-save.json, second half: ``execution_cached`` lists both nodes, only
    ``executed`` is replayed, and ``/history?max_items=1`` returns that last prompt."""
    async with client.post(
        "/prompt", json={"prompt": capture["workflow"], "client_id": "rec-save-ebf125cc"}
    ) as resp:
        prompt_id = (await resp.json())["prompt_id"]
    await fake.wait_idle()
    want = capture["websocket"]["message_types_in_order"][
        capture["second_run_first_message_index"] :
    ]
    want = [t for t in want if t != "closed"]
    got = texts(await receive(ws, len(want)))
    assert [m["type"] for m in got] == want
    assert got[3]["data"]["nodes"] == ["1", "2"]
    assert got[5]["data"]["nodes"]["2"] == {
        "value": 1,
        "max": 1,
        "state": "finished",
        "node_id": "2",
        "prompt_id": prompt_id,
        "display_node_id": "2",
        "parent_node_id": None,
        "real_node_id": "2",
    }
    async with client.get("/history?max_items=1") as resp:
        assert list(await resp.json()) == [prompt_id]


async def test_interrupt_and_queue(tmp_path: Path, aiohttp_client: AiohttpClient) -> None:
    """captures/interrupt-and-queue.json with ``hold()`` instead of slow CPU work."""
    capture = load("interrupt-and-queue")
    fake = FakeComfyUI(tmp_path)
    client = await aiohttp_client(fake.app)
    ws = await client.ws_connect("/ws?clientId=rec-q-075881a5")
    observer = await client.ws_connect("/ws?clientId=rec-observer-6fe678b6")
    await receive(ws, 1)
    await receive(observer, 1)
    fake.hold()
    steps = {e["step"]: e for e in capture["exchanges"]}
    ids = []
    for step in (
        "queue_blur_chain_0",
        "queue_blur_chain_1",
        "queue_blur_chain_2",
        "queue_blur_chain_3",
        "queue_front_true",
    ):
        async with client.post("/prompt", json=steps[step]["request"]["json"]) as resp:
            body = await resp.json()
            ids.append(body["prompt_id"])
            if step == "queue_front_true":
                assert body["number"] == -4
        if step == "queue_blur_chain_0":
            assert await fake.wait_held() == ids[0]
    async with client.get("/queue") as resp:
        queue = await resp.json()
    recorded = steps["queue_with_running_and_pending"]["response"]["body"]["json"]
    assert shape(queue) == shape(recorded)
    assert [item[1] for item in queue["queue_running"]] == [ids[0]]
    assert [item[0] for item in queue["queue_pending"]] == [-4, 1, 3, 2]  # heap order
    async with client.get("/prompt") as resp:
        assert await resp.json() == {"exec_info": {"queue_remaining": 5}}
    async with client.post("/queue", json={"delete": [ids[1]]}) as resp:
        assert resp.status == 200
    async with client.get("/queue") as resp:
        assert len((await resp.json())["queue_pending"]) == 3
    async with client.post("/queue", json={"clear": True}) as resp:
        assert resp.status == 200
    async with client.post("/interrupt", json={"prompt_id": "not-running"}):
        pass
    assert fake.executor.interrupted is False
    async with client.post("/interrupt", json={"prompt_id": ids[0]}):
        pass
    fake.release()
    await fake.wait_idle()
    async with client.get(f"/history/{ids[0]}") as resp:
        entry = (await resp.json())[ids[0]]
    theirs = steps["history_interrupted"]["response"]["body"]["json"][capture["prompt_ids"][0]]
    assert shape(entry) == shape(theirs)
    assert entry["status"]["status_str"] == "error"
    assert [m[0] for m in entry["status"]["messages"]] == [
        "execution_start",
        "execution_cached",
        "execution_interrupted",
    ]
    # a prompt stopped by a bodyless /interrupt
    fake.hold()
    async with client.post("/prompt", json=steps["queue_again"]["request"]["json"]) as resp:
        again = (await resp.json())["prompt_id"]
    await fake.wait_held()
    async with client.post("/interrupt") as resp:
        assert resp.status == 200
    fake.release()
    await fake.wait_idle()
    async with client.get(f"/history/{again}") as resp:
        assert (await resp.json())[again]["status"]["completed"] is False
    observed = {message_type(m) for m in await receive(observer, 13 - 1)}
    assert observed == {"status"}
    async with client.post("/history", json={"delete": [ids[0]]}):
        pass
    async with client.get("/history") as resp:
        assert list(await resp.json()) == [again]
    async with client.post("/history", json={"clear": True}):
        pass
    async with client.get("/history") as resp:
        assert await resp.json() == {}
    await ws.close()
    await observer.close()


async def test_ws_edge_cases(tmp_path: Path, aiohttp_client: AiohttpClient) -> None:
    """captures/origin-and-ws-edge-cases.json: minted sid, broadcast of a client-less prompt,
    takeover by a second socket with the same clientId, and unregistering on close."""
    capture = load("origin-and-ws-edge-cases")["websockets"]
    fake = FakeComfyUI(tmp_path)
    client = await aiohttp_client(fake.app)
    anon = await client.ws_connect("/ws")
    (first,) = texts(await receive(anon, 1))
    assert len(first["data"]["sid"]) == 32
    await anon.close()

    listener = await client.ws_connect("/ws?clientId=rec-nocid-402f23c7")
    await receive(listener, 1)
    workflow = load("run-empty-preview")["workflow"]
    async with client.post("/prompt", json={"prompt": workflow}) as resp:
        assert resp.status == 200
    await fake.wait_idle()
    want = expected_types(capture["listener_prompt_without_client_id"])[1:]
    assert [message_type(m) for m in await receive(listener, len(want))] == want
    await listener.close()

    a = await client.ws_connect("/ws?clientId=rec-dup-8101db11")
    await receive(a, 1)
    b = await client.ws_connect("/ws?clientId=rec-dup-8101db11")
    await receive(b, 1)
    assert fake.sockets["rec-dup-8101db11"] is not None
    async with client.post(
        "/prompt", json={"prompt": workflow, "client_id": "rec-dup-8101db11"}
    ) as resp:
        assert resp.status == 200
    await fake.wait_idle()
    want = expected_types(capture["same_client_id_B_second"])[1:]
    assert [message_type(m) for m in await receive(b, len(want))] == want
    await fake.send_json("rec-dup-8101db11", {"type": "probe", "data": {}})
    assert message_type(await b.receive(timeout=5)) == "probe"
    await a.close()  # closing the old socket unregisters the sid (ComfyUI's race)
    await fake.broadcast({"type": "after", "data": {}})
    assert "rec-dup-8101db11" not in fake.sockets
    await b.close()
    assert [r for r in fake.ws_received] == []


async def test_feature_flags_and_ws_log(tmp_path: Path, aiohttp_client: AiohttpClient) -> None:
    """Only the first text message negotiates; later ones are recorded and ignored."""
    fake = FakeComfyUI(tmp_path, max_upload_size=1234)
    client = await aiohttp_client(fake.app)
    ws = await client.ws_connect("/api/ws?clientId=ff")
    await receive(ws, 1)
    flags = {"type": "feature_flags", "data": {"supports_preview_metadata": True}}
    await ws.send_str(json.dumps(flags))
    (answer,) = texts(await receive(ws, 1))
    assert answer == {
        "type": "feature_flags",
        "data": {"supports_preview_metadata": True, "max_upload_size": 1234},
    }
    await ws.send_str(json.dumps(flags))
    await ws.send_bytes(b"\x00\x01")
    await fake.send_binary("ff", b"ping")  # round trip: the two frames above were handled
    assert (await ws.receive(timeout=5)).data == b"ping"
    await ws.close()
    assert [(sid, kind) for sid, kind, _ in fake.ws_received] == [
        ("ff", "text"),
        ("ff", "text"),
        ("ff", "binary"),
    ]
    assert fake.socket_table.metadata == {}
