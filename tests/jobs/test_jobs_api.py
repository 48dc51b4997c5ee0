"""The jobs API end to end against the fake ComfyUI: templates, submit, wait, list, cancel."""

from __future__ import annotations

import json
from typing import Any

import pytest

from tests.conftest import ProxyFactory, bearer
from tests.fakes.comfyui import FakeComfyUI
from tests.jobs.support import V1, Client, jobs_proxy, prompts_received, upload

A = bearer("alice")


@pytest.fixture
async def client(make_proxy: ProxyFactory, fake_comfy: FakeComfyUI, redis_url: str) -> Client:
    return await jobs_proxy(make_proxy, fake_comfy, redis_url)


async def test_text_to_image_to_bytes_with_one_post(
    client: Client, fake_comfy: FakeComfyUI
) -> None:
    resp = await client.post(
        f"{V1}/jobs?wait=30",
        json={"template": "text-to-image", "params": {"prompt": "a fox", "seed": 7, "steps": 3}},
        headers=A,
    )
    job = await resp.json()
    assert resp.status == 200, job
    assert job["status"] == "succeeded"
    assert job["template"] == "text-to-image"
    assert job["timings"]["run_seconds"] is not None
    [output] = job["outputs"]
    image = await client.get(output["url"], headers=A)
    assert image.status == 200
    assert (await image.read()).startswith(b"\x89PNG")
    [sent] = prompts_received(fake_comfy)
    graph = json.loads(sent.body)["prompt"]
    assert graph["3"]["inputs"]["seed"] == 7
    assert graph["6"]["inputs"]["text"] == "a fox"


@pytest.mark.parametrize("name", ["image-to-image", "upscale"])
async def test_image_templates_run(client: Client, name: str) -> None:
    image = await upload(client, A)
    params: dict[str, Any] = {"image": image}
    params.update({"width": 32, "height": 16} if name == "upscale" else {"strength": 0.2})
    resp = await client.post(
        f"{V1}/jobs?wait=30", json={"template": name, "params": params}, headers=A
    )
    job = await resp.json()
    assert resp.status == 200, job
    assert job["status"] == "succeeded", job
    assert len(job["outputs"]) == 1


async def test_templates_listed_with_json_schema(client: Client) -> None:
    resp = await client.get(f"{V1}/templates", headers=A)
    names = [t["name"] for t in (await resp.json())["templates"]]
    assert names == ["image-to-image", "text-to-image", "upscale"]
    resp = await client.get(f"{V1}/templates/text-to-image", headers=A)
    schema = (await resp.json())["params"]
    assert schema["required"] == ["prompt"]
    assert schema["properties"]["steps"] == {
        "type": "integer",
        "default": 20,
        "minimum": 1,
        "maximum": 50,
    }


async def test_viewer_sees_no_template(client: Client, fake_comfy: FakeComfyUI) -> None:
    viewer = bearer("val", ("viewer",))
    assert (await (await client.get(f"{V1}/templates", headers=viewer)).json())["templates"] == []
    resp = await client.post(
        f"{V1}/jobs", json={"template": "text-to-image", "params": {"prompt": "x"}}, headers=viewer
    )
    assert resp.status == 404
    assert (await resp.json())["error"]["type"] == "template_not_found"
    assert prompts_received(fake_comfy) == []


async def test_every_parameter_error_at_once(client: Client, fake_comfy: FakeComfyUI) -> None:
    resp = await client.post(
        f"{V1}/jobs",
        json={
            "template": "text-to-image",
            "params": {"seed": -1, "steps": 500, "width": 640, "colour": "red"},
        },
        headers=A,
    )
    assert resp.status == 422
    error = (await resp.json())["error"]
    assert error["type"] == "invalid_params"
    problems = {(p["param"], p["rule"]) for p in error["extra_info"]["problems"]}
    assert problems == {
        ("colour", "additionalProperties"),
        ("prompt", "required"),
        ("seed", "minimum"),
        ("steps", "maximum"),
        ("width", "enum"),
    }
    assert prompts_received(fake_comfy) == []


async def test_policy_refusal_comes_back_in_comfyui_shape(
    client: Client, fake_comfy: FakeComfyUI
) -> None:
    workflow = {"1": {"class_type": "NoSuchNode", "inputs": {}}}
    resp = await client.post(f"{V1}/jobs", json={"workflow": workflow}, headers=A)
    body = await resp.json()
    assert resp.status == 400, body
    assert "node_errors" in body
    assert prompts_received(fake_comfy) == []


async def test_raw_workflow_and_listing(client: Client) -> None:
    workflow = {
        "1": {
            "class_type": "EmptyImage",
            "inputs": {"width": 8, "height": 8, "batch_size": 1, "color": 5},
        },
        "9": {"class_type": "SaveImage", "inputs": {"images": ["1", 0], "filename_prefix": "w"}},
    }
    ids = []
    for _ in range(3):
        resp = await client.post(f"{V1}/jobs", json={"workflow": workflow}, headers=A)
        assert resp.status == 202, await resp.text()
        ids.append((await resp.json())["id"])
    page = await (await client.get(f"{V1}/jobs?limit=2", headers=A)).json()
    assert [j["id"] for j in page["jobs"]] == ids[::-1][:2]
    rest = await (
        await client.get(f"{V1}/jobs?limit=2&before={page['next_before']}", headers=A)
    ).json()
    assert [j["id"] for j in rest["jobs"]] == ids[:1]
    assert rest["next_before"] is None
    done = await (await client.get(f"{V1}/jobs/{ids[0]}?wait=30", headers=A)).json()
    assert done["status"] == "succeeded"


async def test_idempotency_key_gives_the_same_job(client: Client, fake_comfy: FakeComfyUI) -> None:
    body = {"template": "text-to-image", "params": {"prompt": "once", "seed": 1, "steps": 1}}
    headers = {**A, "Idempotency-Key": "k-1"}
    first = await (await client.post(f"{V1}/jobs", json=body, headers=headers)).json()
    again = await client.post(f"{V1}/jobs", json=body, headers=headers)
    assert again.status in (200, 202)
    assert (await again.json())["id"] == first["id"]
    assert len(prompts_received(fake_comfy)) == 1


@pytest.mark.parametrize("queued", [True, False])
async def test_cancel(client: Client, fake_comfy: FakeComfyUI, queued: bool) -> None:
    """A running job is interrupted, a queued one deleted from the queue; then it has ended."""
    body: dict[str, Any] = {"template": "text-to-image", "params": {"prompt": "later", "steps": 1}}
    fake_comfy.hold()  # the first prompt starts and stays running
    try:
        running = await (await client.post(f"{V1}/jobs", json=body, headers=A)).json()
        assert await fake_comfy.wait_held() == running["id"]
        body["params"]["seed"] = 2
        pending = await (await client.post(f"{V1}/jobs", json=body, headers=A)).json()
        job = pending if queued else running
        view = await (await client.get(f"{V1}/jobs/{job['id']}", headers=A)).json()
        assert view["status"] == ("queued" if queued else "running")
        resp = await client.delete(f"{V1}/jobs/{job['id']}", headers=A)
        assert resp.status in (200, 202), await resp.text()
        sent = [r.path for r in fake_comfy.received if r.method == "POST"]
        assert sent[-1] == ("/api/queue" if queued else "/api/interrupt")
    finally:
        fake_comfy.release()
    view = await (await client.get(f"{V1}/jobs/{job['id']}?wait=30", headers=A)).json()
    assert view["status"] == "cancelled", view
    again = await client.delete(f"{V1}/jobs/{job['id']}", headers=A)
    assert again.status == 409
    assert (await again.json())["error"]["type"] == "job_finished"


async def test_failed_job_names_the_node(client: Client) -> None:
    resp = await client.post(
        f"{V1}/jobs?wait=30",
        json={"template": "image-to-image", "params": {"image": "missing.png"}},
        headers=A,
    )
    body = await resp.json()
    # ComfyUI refuses an unknown file at validation: the chain's 400 with node_errors.
    assert resp.status == 400, body
    assert body["node_errors"]
