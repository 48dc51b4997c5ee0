"""``GET /jobs/{id}/events``: read by a real SSE client, resumed with Last-Event-ID."""

from __future__ import annotations

import asyncio
import base64
import json
from typing import Any

import pytest

from proxy.jobs.api import JOBS
from proxy.observability.metrics import METRICS
from tests.conftest import ProxyFactory, bearer
from tests.fakes.comfyui import FakeComfyUI
from tests.fakes.comfyui.websocket import encode_preview
from tests.jobs.support import V1, Client, jobs_proxy, png, prompts_received

A = bearer("alice")
BODY = {"template": "text-to-image", "params": {"prompt": "stream", "steps": 2}}


@pytest.fixture
async def client(make_proxy: ProxyFactory, fake_comfy: FakeComfyUI, redis_url: str) -> Client:
    return await jobs_proxy(make_proxy, fake_comfy, redis_url)


async def read_events(
    client: Client,
    path: str,
    headers: dict[str, str],
    stop_after: int | None = None,
    until: str | None = None,
) -> list[dict[str, Any]]:
    """Parse the stream as an EventSource does (id/event/data lines, blank line ends one)."""
    events: list[dict[str, Any]] = []
    async with client.get(path, headers=headers) as resp:
        assert resp.status == 200
        assert resp.headers["Content-Type"].startswith("text/event-stream")
        current: dict[str, Any] = {}
        async for raw in resp.content:
            line = raw.decode().rstrip("\n")
            if not line:
                if "event" in current:
                    events.append(current)
                    if stop_after is not None and len(events) >= stop_after:
                        break
                    if until is not None and current["event"] == until:
                        break
                current = {}
            elif not line.startswith(":"):
                field, _, value = line.partition(": ")
                current[field] = json.loads(value) if field == "data" else value
    return events


async def test_stream_and_resume(client: Client, fake_comfy: FakeComfyUI) -> None:
    fake_comfy.hold()
    try:
        job = await (await client.post(f"{V1}/jobs", json=BODY, headers=A)).json()
        await fake_comfy.wait_held()
        first = await read_events(client, f"{V1}/jobs/{job['id']}/events", A, stop_after=2)
        assert [(e["id"], e["event"]) for e in first] == [("0", "queued"), ("1", "started")]
    finally:
        fake_comfy.release()
    # Reconnect as an EventSource does: only what follows the last id seen.
    rest = await read_events(client, f"{V1}/jobs/{job['id']}/events", {**A, "Last-Event-ID": "1"})
    # Live events (executing, progress: no id, not replayed) may come in between.
    rest = [e for e in rest if "id" in e]
    assert [e["event"] for e in rest] == ["output", "done"]
    assert rest[0]["id"] == "2"
    assert rest[-1]["data"]["status"] == "succeeded"


async def test_stream_of_a_plain_prompt(client: Client) -> None:
    workflow = {
        "1": {
            "class_type": "EmptyImage",
            "inputs": {"width": 8, "height": 8, "batch_size": 1, "color": 3},
        },
        "9": {"class_type": "SaveImage", "inputs": {"images": ["1", 0], "filename_prefix": "p"}},
    }
    resp = await client.post("/prompt", json={"prompt": workflow}, headers=A)
    prompt_id = (await resp.json())["prompt_id"]
    events = await read_events(client, f"{V1}/jobs/{prompt_id}/events", A)
    assert [e["event"] for e in events] == ["queued", "started", "output", "done"]


async def test_live_progress_executing_and_preview(client: Client, fake_comfy: FakeComfyUI) -> None:
    """While the job runs, what ComfyUI sends to the jobs API's own socket reaches the job:
    ``progress`` in ``GET /jobs/{id}``, ``executing``/``progress``/``preview`` events, the
    preview at ``/preview`` (or inline with ``?previews=base64``)."""
    fake_comfy.hold()
    try:
        job = await (await client.post(f"{V1}/jobs", json=BODY, headers=A)).json()
        prompt_id = await fake_comfy.wait_held()
        assert prompt_id == job["id"]
        # The socket ComfyUI sends the job's events to: the prompt's (namespaced) client id.
        sid = json.loads(prompts_received(fake_comfy)[0].body)["client_id"]
        await fake_comfy.wait_socket(sid)
        image = png()
        await fake_comfy.send_json(
            sid, {"type": "executing", "data": {"node": "3", "prompt_id": prompt_id}}
        )
        await fake_comfy.send_json(
            sid,
            {
                "type": "progress",
                "data": {"value": 3, "max": 10, "prompt_id": prompt_id, "node": "3"},
            },
        )
        await fake_comfy.send_binary(sid, encode_preview(image, "PNG"))
        path = f"{V1}/jobs/{job['id']}/events?previews=base64"
        events = await read_events(client, path, A, until="preview")
        names = [e["event"] for e in events]
        assert names[:2] == ["queued", "started"]
        live = {e["event"]: e for e in events[2:]}
        assert "id" not in live["progress"]  # not part of the resumable sequence
        assert live["executing"]["data"]["node"] == "3"
        assert live["progress"]["data"] == {"job": job["id"], "node": "3", "value": 3, "max": 10}
        assert base64.b64decode(live["preview"]["data"]["base64"]) == image
        assert live["preview"]["data"]["mime"] == "image/png"
        fetched = await client.get(live["preview"]["data"]["url"], headers=A)
        assert fetched.status == 200
        assert fetched.content_type == "image/png"
        assert await fetched.read() == image
        view = await (await client.get(f"{V1}/jobs/{job['id']}", headers=A)).json()
        assert view["status"] == "running"
        assert view["progress"] == {"node": "3", "value": 3, "max": 10}
    finally:
        fake_comfy.release()


async def test_live_socket_survives_being_closed(client: Client, fake_comfy: FakeComfyUI) -> None:
    """ComfyUI drops the jobs API's socket: the supervised task logs and counts it, opens
    it again, and live progress flows again."""
    fake_comfy.hold()
    try:
        job = await (await client.post(f"{V1}/jobs", json=BODY, headers=A)).json()
        prompt_id = await fake_comfy.wait_held()
        sid = json.loads(prompts_received(fake_comfy)[0].body)["client_id"]
        await fake_comfy.wait_socket(sid)
        await fake_comfy.sockets[sid].close()
        await fake_comfy.wait_socket(sid, gone=True)
        await fake_comfy.wait_socket(sid)  # reopened by the watcher
        failures = client.app[METRICS].task_failures.labels("jobs_live")._value.get()
        assert failures >= 1
        await fake_comfy.send_json(
            sid,
            {
                "type": "progress",
                "data": {"value": 1, "max": 4, "prompt_id": prompt_id, "node": "3"},
            },
        )
        events = await read_events(client, f"{V1}/jobs/{job['id']}/events", A, until="progress")
        assert events[-1]["data"]["value"] == 1
    finally:
        fake_comfy.release()


async def test_end_recorded_and_cached_with_no_client_waiting(
    make_proxy: ProxyFactory, fake_comfy: FakeComfyUI, redis_url: str
) -> None:
    """Nobody waits or polls: the live stream (or the watcher) records the end, and the
    template's result cache is filled: the same job again is a hit."""
    client = await jobs_proxy(make_proxy, fake_comfy, redis_url, jobs={"watch_seconds": 0.05})
    first = await (await client.post(f"{V1}/jobs", json=BODY, headers=A)).json()
    await asyncio.wait_for(client.app[JOBS].watcher.wait_ended(first["id"]), 30)
    resp = await client.post(f"{V1}/jobs", json=BODY, headers=A)
    second = await resp.json()
    assert resp.status == 200, second
    assert second["cache"] == {"hit": True, "source_job": first["id"]}
    assert len(prompts_received(fake_comfy)) == 1
