# ruff: noqa: ASYNC240 - small blocking file calls on the loop, as ComfyUI does
"""Replays the HTTP parts of the ComfyUI 0.3.64 captures against the fake.

Deliberate differences checked loosely (documented in the fake's modules): the fake registers 14
node classes instead of 478 (``/object_info`` compared on the recorded entries only), the
templates index is a one-entry stand-in, and ids/timestamps/sizes differ.
"""

from __future__ import annotations

import io
import json
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from PIL import Image
from pytest_aiohttp import AiohttpClient

from tests.fakes.comfyui import FakeComfyUI
from tests.fakes.comfyui.captures import load, shape

COMPARED_HEADERS = ("Content-Type", "Content-Disposition", "Cache-Control", "Pragma", "Expires")


def check_response(exchange: dict[str, Any], status: int, headers: Any, body: bytes) -> None:
    expected = exchange["response"]
    where = f"{exchange['request']['method']} {exchange['request']['path']}"
    assert status == expected["status"], where
    for name in COMPARED_HEADERS:
        assert headers.get(name) == expected["headers"].get(name), f"{where}: {name}"
    recorded = expected["body"]
    if "json" in recorded:
        got = json.loads(body)
        if where.endswith("/object_info/EmptyImage") or recorded["json"] in ({}, []):
            assert got == recorded["json"], where
        else:
            assert shape(got) == shape(recorded["json"]), where
    elif "text" in recorded:  # long texts were stored truncated
        assert body.decode().startswith(recorded["text"]), where
        assert len(body) == recorded.get("length", len(body)), where
    elif "selected_entries" in recorded:
        got = json.loads(body)
        for name, entry in recorded["selected_entries"].items():
            assert got[name] == entry, name
    elif recorded.get("length") == 0:
        assert body == b"", where


@pytest.fixture
def fake(tmp_path: Path) -> FakeComfyUI:
    return FakeComfyUI(tmp_path, frontend=True)


async def test_http_basic(fake: FakeComfyUI, aiohttp_client: AiohttpClient) -> None:
    """captures/http-basic.json in order (settings pre-seeded like the recorded user)."""
    settings = {"Comfy.InstalledVersion": "1.27.10", "Comfy.TutorialCompleted": True}
    Path(fake.paths.user, "default", "comfy.settings.json").write_text(json.dumps(settings))
    client = await aiohttp_client(fake.app)
    for exchange in load("http-basic")["exchanges"]:
        req = exchange["request"]
        data: Any = None
        if "json" in req:
            data = json.dumps(req["json"])
        elif "raw_body" in req:
            data = req["raw_body"]
        headers = {"Content-Type": req["headers"]["Content-Type"]} if data is not None else {}
        async with client.request(req["method"], req["path"], data=data, headers=headers) as resp:
            body = await resp.read()
            check_response(exchange, resp.status, resp.headers, body)


async def test_api_prefix(tmp_path: Path, aiohttp_client: AiohttpClient) -> None:
    """captures/api-prefix.json: the ``/api`` twins, ``/api/internal`` 404, ``/api/`` index."""
    fake = FakeComfyUI(tmp_path, frontend=True)
    client = await aiohttp_client(fake.app)
    capture = load("api-prefix")
    settings = capture["exchanges"][5]["response"]["body"]["json"]  # the recorder's earlier writes
    Path(fake.paths.user, "default", "comfy.settings.json").write_text(json.dumps(settings))
    Path(fake.paths.user, "default", "workflows").mkdir()
    for exchange in capture["exchanges"]:
        req = exchange["request"]
        path = req["path"]
        if req["path"].endswith("/upload/image"):
            form = aiohttp.FormData()
            form.add_field("image", png_bytes(), filename="rec_api_upload.png")
            async with client.post(path, data=form) as resp:
                check_response(exchange, resp.status, resp.headers, await resp.read())
            continue
        body_json = req.get("json")
        if path == "/api/prompt" and req["method"] == "POST":  # client-chosen id, as recorded
            body_json = {**body_json, "prompt_id": capture["prompt_id"]}
        data = json.dumps(body_json) if "json" in req else None
        headers = {"Content-Type": "application/json"} if data is not None else {}
        if req["path"].startswith("/api/history?"):
            continue  # depends on the recorder's earlier history (shape checked elsewhere)
        async with client.request(req["method"], path, data=data, headers=headers) as resp:
            body = await resp.read()
            check_response(exchange, resp.status, resp.headers, body)
            if req["path"] == "/api/prompt" and req["method"] == "POST":
                await fake.wait_idle()


def png_bytes(
    size: tuple[int, int] = (40, 30), color: tuple[int, int, int] = (10, 20, 30)
) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", size, color).save(buf, format="PNG")
    return buf.getvalue()


async def test_validation_errors(tmp_path: Path, aiohttp_client: AiohttpClient) -> None:
    """captures/validation-errors.json: every rejected body answers exactly as recorded."""
    fake = FakeComfyUI(tmp_path)
    client = await aiohttp_client(fake.app)
    for name, exchange in load("validation-errors")["exchanges"].items():
        req = exchange["request"]
        data = json.dumps(req["json"]) if "json" in req else req["raw_body"]
        async with client.post(
            req["path"], data=data, headers={"Content-Type": "application/json"}
        ) as resp:
            assert resp.status == exchange["response"]["status"], name
            assert resp.headers["Content-Type"] == exchange["response"]["headers"]["Content-Type"]
            recorded = exchange["response"]["body"]
            if "text" in recorded:
                assert await resp.text() == recorded["text"], name
                continue
            got = await resp.json()
            want = recorded["json"]
            if name == "link_to_missing_node":  # traceback lines name the fake's files
                for body in (got, want):
                    body["node_errors"]["2"]["errors"][0]["extra_info"].pop("traceback")
            assert got == want, name
    assert fake.queue.history == {}


async def test_view_variants(tmp_path: Path, aiohttp_client: AiohttpClient) -> None:
    """captures/run-empty-save.json: /view forms, Range -> 206, ETag -> 304, bad requests."""
    fake = FakeComfyUI(tmp_path)
    client = await aiohttp_client(fake.app)
    capture = load("run-empty-save")
    async with client.post("/prompt", json={"prompt": capture["workflow"]}) as resp:
        prompt_id = (await resp.json())["prompt_id"]
    await fake.wait_idle()
    async with client.get(f"/history/{prompt_id}") as resp:
        outputs = (await resp.json())[prompt_id]["outputs"]
    assert outputs == {
        "2": {
            "images": [
                {"filename": "rec_empty_1795896218_00001_.png", "subfolder": "", "type": "output"}
            ]
        }
    }
    etag = None
    for exchange in capture["exchanges"]:
        req = exchange["request"]
        if not req["path"].startswith("/view"):
            continue
        headers = {k: v for k, v in req["headers"].items() if k in ("Range", "If-None-Match")}
        if "If-None-Match" in headers:
            assert etag is not None
            headers["If-None-Match"] = etag
        async with client.get(req["path"], headers=headers) as resp:
            body = await resp.read()
            check_response(exchange, resp.status, resp.headers, body)
            etag = resp.headers.get("Etag", etag)
            image = exchange["response"]["body"].get("image")
            if image:
                with Image.open(io.BytesIO(body)) as img:
                    assert [img.format, img.mode, list(img.size)] == [
                        image["format"],
                        image["mode"],
                        image["size"],
                    ]
            if resp.status == 206:
                assert resp.headers["Content-Range"] == f"bytes 0-15/{len(open_output(fake))}"


def open_output(fake: FakeComfyUI) -> bytes:
    return Path(fake.paths.output, "rec_empty_1795896218_00001_.png").read_bytes()


async def test_uploads(tmp_path: Path, aiohttp_client: AiohttpClient) -> None:
    """captures/run-upload-scale.json: overwrite, ``(1)`` renaming, duplicates, subfolder+type,
    400s, mask; plus the 500 of an unknown type and the 413 of ``max_upload_size``."""
    fake = FakeComfyUI(tmp_path, max_upload_size=4096)
    client = await aiohttp_client(fake.app)
    capture = load("run-upload-scale")
    first, other = png_bytes(), png_bytes(color=(200, 0, 0))

    async def upload(
        fields: dict[str, str],
        data: bytes | None,
        name: str = "rec_upload.png",
        path: str = "/upload/image",
    ) -> aiohttp.ClientResponse:
        form = aiohttp.FormData()
        if data is not None:
            form.add_field("image", data, filename=name, content_type="image/png")
        for key, value in fields.items():
            form.add_field(key, value)
        return await client.post(path, data=form)

    answers = [
        await upload({"overwrite": "true"}, first),
        await upload({}, other),
        await upload({}, first),
        await upload({"subfolder": "recsub", "type": "temp"}, first, name="rec_sub.png"),
    ]
    recorded = [e["response"] for e in capture["exchanges"][:4]]
    for resp, want in zip(answers, recorded, strict=True):
        assert resp.status == 200
        assert await resp.json() == want["body"]["json"]
    async with client.post("/upload/image", data={"type": "input"}) as resp:
        assert resp.status == 400  # no image part
    resp = await upload({"subfolder": "../"}, first)
    assert resp.status == 400
    resp = await upload({"type": "bogus"}, first)
    assert resp.status == 500
    resp = await upload(
        {"original_ref": json.dumps({"filename": "rec_upload.png", "type": "input"})},
        png_bytes(),
        name="rec_mask.png",
        path="/upload/mask",
    )
    assert (resp.status, await resp.json()) == (
        200,
        capture["exchanges"][6]["response"]["body"]["json"],
    )
    with Image.open(Path(fake.paths.input, "rec_mask.png")) as img:
        assert img.mode == "RGBA"
    resp = await upload({}, b"\0" * 8192, name="big.png")
    assert resp.status == 413
    async with client.get("/view?filename=rec_upload.png&type=input&subfolder=") as resp:
        assert resp.status == 200
        assert await resp.read() == first


async def test_received_log(tmp_path: Path, aiohttp_client: AiohttpClient) -> None:
    """raw_path keeps ``%2F``; bodies are stored (and blanked above 1 MiB); /__fake__ is not."""
    fake = FakeComfyUI(tmp_path)
    client = await aiohttp_client(fake.app)
    async with client.post(
        "/api/userdata/workflows%2Fa.json?overwrite=true", data=b'{"a": 1}'
    ) as r:
        assert r.status == 200
        assert await r.json() == "workflows/a.json"
    async with client.get("/api/userdata/workflows%2Fa.json", headers={"Comfy-User": "x"}) as r:
        assert await r.read() == b'{"a": 1}'
    async with client.post("/api/userdata/big.bin", data=b"x" * (1024 * 1024 + 1)) as r:
        assert r.status == 200
    async with client.post("/__fake__/reset") as r:
        assert r.status == 200
    assert fake.received == []
    async with client.post("/api/userdata/workflows%2Fa.json?overwrite=true", data=b"[]") as r:
        assert r.status == 200
    (rec,) = fake.received
    assert rec.raw_path == "/api/userdata/workflows%2Fa.json?overwrite=true"
    assert rec.path == "/api/userdata/workflows/a.json"
    assert rec.query["overwrite"] == "true"
    assert rec.body == b"[]"
    assert rec.body_length == 2
    fake.reset()
    async with client.post("/api/userdata/big.bin", data=b"x" * (1024 * 1024 + 1)) as r:
        assert r.status == 200
    assert (fake.received[0].body, fake.received[0].body_length) == (b"", 1024 * 1024 + 1)


async def test_origin_checks(tmp_path: Path, aiohttp_client: AiohttpClient) -> None:
    """captures/origin-and-ws-edge-cases.json (HTTP part) plus newer Sec-Fetch-Site rule."""
    fake = FakeComfyUI(tmp_path)
    client = await aiohttp_client(fake.app)
    for exchange in load("origin-and-ws-edge-cases")["exchanges"][:7]:
        req = exchange["request"]
        headers = {k: v for k, v in req["headers"].items() if k in ("Host", "Origin")}
        data = json.dumps(req["json"]) if "json" in req else None
        if data is not None:
            headers["Content-Type"] = "application/json"
        async with client.request(req["method"], req["path"], headers=headers, data=data) as resp:
            assert resp.status == exchange["response"]["status"], (req, headers)
            if resp.status == 403:
                assert await resp.read() == b""
    await fake.wait_idle()
    async with client.get("/", headers={"Sec-Fetch-Site": "cross-site"}) as resp:
        assert resp.status == 403
    async with client.get("/", headers={"Sec-Fetch-Site": "same-origin"}) as resp:
        assert resp.status == 200
    with pytest.raises(aiohttp.WSServerHandshakeError) as info:
        await client.ws_connect("/ws", headers={"Origin": "http://evil.example:1234"})
    assert info.value.status == 403
    relaxed = FakeComfyUI(tmp_path / "relaxed", origin_check=False, sec_fetch_check=False)
    rclient = await aiohttp_client(relaxed.app)
    async with rclient.get(
        "/system_stats", headers={"Origin": "http://evil.example", "Sec-Fetch-Site": "cross-site"}
    ) as resp:
        assert resp.status == 200


async def test_routing_edges(tmp_path: Path, aiohttp_client: AiohttpClient) -> None:
    """aiohttp routing as ComfyUI has it: decoded path matching, strict slashes, 405, HEAD."""
    fake = FakeComfyUI(tmp_path)
    client = await aiohttp_client(fake.app)
    expectations = [
        ("GET", "/api/%70rompt", 200),
        ("GET", "/api/prompt/", 404),
        ("GET", "/API/prompt", 404),
        ("HEAD", "/api/prompt", 200),
        ("HEAD", "/prompt", 200),
        ("PUT", "/prompt", 405),
        ("GET", "/api/api/jobs", 200),
        ("GET", "/jobs", 404),
        ("GET", "/internal/files/bad", 400),
        ("GET", "/api/internal/folder_paths", 404),
        ("GET", "/models/nope", 404),
        ("GET", "/history?max_items=x", 500),
        ("GET", "/view?filename=x.png%20%5Binput%5D", 404),
        ("PATCH", "/internal/logs/subscribe", 500),
        ("POST", "/api/userdata/workflows/a.json", 405),
    ]
    for method, path, status in expectations:
        async with client.request(method, path) as resp:
            assert resp.status == status, (method, path)
    async with client.patch(
        "/internal/logs/subscribe", json={"clientId": "abc", "enabled": True}
    ) as resp:
        assert resp.status == 200
    assert fake.log_subscribers == {"abc"}


async def test_jobs_api(tmp_path: Path, aiohttp_client: AiohttpClient) -> None:
    """Newer ``/api/jobs`` shapes (docs/comfyui-protocol.md#jobs-api)."""
    fake = FakeComfyUI(tmp_path)
    client = await aiohttp_client(fake.app)
    workflow = load("run-empty-preview")["workflow"]
    fake.hold()
    ids = []
    for _ in range(2):
        async with client.post("/api/prompt", json={"prompt": workflow}) as resp:
            ids.append((await resp.json())["prompt_id"])
    await fake.wait_held()
    async with client.get("/api/jobs?status=in_progress,pending&limit=200&offset=0") as resp:
        body = await resp.json()
    assert [j["status"] for j in body["jobs"]] == ["in_progress", "pending"]
    assert body["pagination"] == {"offset": 0, "limit": 200, "total": 2, "has_more": False}
    async with client.post(f"/api/jobs/{ids[1]}/cancel") as resp:
        assert await resp.json() == {"cancelled": True}
    async with client.post("/api/jobs/cancel", json={"job_ids": ["nope"]}) as resp:
        assert resp.status == 400
    fake.release()
    await fake.wait_idle()
    async with client.get(f"/api/jobs/{ids[0]}") as resp:
        job = await resp.json()
    assert job["status"] == "completed"
    assert job["outputs_count"] == 2
    assert job["preview_output"]["type"] == "temp"
    assert set(job) >= {"outputs", "execution_status", "workflow", "execution_start_time"}
    async with client.get(f"/api/jobs/{ids[1]}") as resp:
        assert (resp.status, await resp.json()) == (404, {"error": "Job not found"})
    async with client.get("/api/jobs?limit=0") as resp:
        assert resp.status == 400


async def test_control_ws_stream(tmp_path: Path) -> None:
    """``/__fake__/ws_stream`` sends exact-size valid preview frames; served on a real port."""
    fake = FakeComfyUI(tmp_path, record=False)
    await fake.start()
    try:
        async with aiohttp.ClientSession() as session:
            ws = await session.ws_connect(fake.url + "/ws?clientId=bench")
            await ws.receive(timeout=5)
            for kind in (1, 4):
                async with session.post(
                    fake.url + "/__fake__/ws_stream",
                    json={
                        "sid": "bench",
                        "count": 3,
                        "size": 20000,
                        "type": kind,
                        "interval_ms": 0,
                    },
                ) as resp:
                    assert (await resp.json())["sent"] == 3
                for _ in range(3):
                    msg = await ws.receive(timeout=5)
                    assert len(msg.data) == 20000
                    assert msg.data[:4] == kind.to_bytes(4, "big")
                    offset = 8 if kind == 1 else 8 + int.from_bytes(msg.data[4:8], "big")
                    with Image.open(io.BytesIO(msg.data[offset:])) as img:
                        assert img.format == "JPEG"
            await ws.close()
    finally:
        await fake.stop()
    assert fake.received == []
