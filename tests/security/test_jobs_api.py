"""The jobs API between users (issue 19): user B attacks user A's jobs and fails.

B reads, waits on, streams and cancels A's jobs (submitted through the jobs API and through
plain ``POST /prompt``), lists jobs, and submits templates and workflows its role or policy
does not allow. Each case asserts on B's answer (404 ``job_not_found`` exactly as for an
unknown id; nothing of A's) and on what the fake ComfyUI received (no cancel, no prompt).
"""

from __future__ import annotations

from typing import Any

import pytest

from tests.conftest import ProxyFactory, bearer
from tests.fakes.comfyui import FakeComfyUI
from tests.jobs.support import V1, Client, jobs_proxy, prompts_received, upload

A, B = bearer("alice"), bearer("bob")
BODY = {"template": "text-to-image", "params": {"prompt": "alice's secret", "steps": 1}}


@pytest.fixture
async def client(make_proxy: ProxyFactory, fake_comfy: FakeComfyUI, redis_url: str) -> Client:
    return await jobs_proxy(make_proxy, fake_comfy, redis_url)


async def _alice_job(client: Client) -> dict[str, Any]:
    resp = await client.post(f"{V1}/jobs", json=BODY, headers=A)
    assert resp.status == 202, await resp.text()
    return dict(await resp.json())


async def _not_found(resp: Any) -> None:
    assert resp.status == 404
    body = await resp.json()
    assert body["error"]["type"] == "job_not_found"
    assert "alice" not in str(body)


@pytest.mark.parametrize(
    ("method", "suffix"),
    [
        ("GET", ""),
        ("GET", "?wait=5"),
        ("DELETE", ""),
        ("GET", "/events"),
        ("GET", "/events?previews=base64"),
        ("GET", "/preview"),
    ],
)
async def test_b_cannot_touch_a_job(
    client: Client, fake_comfy: FakeComfyUI, method: str, suffix: str
) -> None:
    fake_comfy.hold()
    try:
        job = await _alice_job(client)
        await fake_comfy.wait_held()
        fake_comfy.reset()
        resp = await client.request(method, f"{V1}/jobs/{job['id']}{suffix}", headers=B)
        await _not_found(resp)
        unknown = await client.request(method, f"{V1}/jobs/{'0' * 36}{suffix}", headers=B)
        await _not_found(unknown)
        # Nothing reached ComfyUI on B's behalf: no interrupt, no queue delete.
        assert [r for r in fake_comfy.received if r.method == "POST"] == []
        mine = await (await client.get(f"{V1}/jobs/{job['id']}", headers=A)).json()
        assert mine["status"] == "running"
    finally:
        fake_comfy.release()


async def test_b_cannot_touch_a_plain_prompt(client: Client, fake_comfy: FakeComfyUI) -> None:
    workflow = {
        "1": {
            "class_type": "EmptyImage",
            "inputs": {"width": 8, "height": 8, "batch_size": 1, "color": 1},
        },
        "9": {"class_type": "SaveImage", "inputs": {"images": ["1", 0], "filename_prefix": "p"}},
    }
    resp = await client.post("/prompt", json={"prompt": workflow}, headers=A)
    prompt_id = (await resp.json())["prompt_id"]
    await _not_found(await client.get(f"{V1}/jobs/{prompt_id}", headers=B))
    await _not_found(await client.get(f"{V1}/jobs/{prompt_id}/events", headers=B))
    mine = await (await client.get(f"{V1}/jobs/{prompt_id}?wait=30", headers=A)).json()
    assert mine["status"] == "succeeded"


async def test_b_lists_only_own_jobs(client: Client) -> None:
    await _alice_job(client)
    page = await (await client.get(f"{V1}/jobs", headers=B)).json()
    assert page["jobs"] == []


async def test_b_cannot_read_a_outputs(client: Client) -> None:
    resp = await client.post(f"{V1}/jobs?wait=30", json=BODY, headers=A)
    job = await resp.json()
    [output] = job["outputs"]
    stolen = await client.get(output["url"], headers=B)
    assert stolen.status == 404


async def test_b_cannot_run_a_template_on_a_file(client: Client, fake_comfy: FakeComfyUI) -> None:
    """An image parameter is judged by isolation as any file input: A's upload is not B's."""
    image = await upload(client, A)
    fake_comfy.reset()
    resp = await client.post(
        f"{V1}/jobs", json={"template": "upscale", "params": {"image": image}}, headers=B
    )
    assert resp.status in (400, 403), await resp.text()
    assert prompts_received(fake_comfy) == []


async def test_result_cache_is_per_user(client: Client, fake_comfy: FakeComfyUI) -> None:
    first = await (await client.post(f"{V1}/jobs?wait=30", json=BODY, headers=A)).json()
    assert first["status"] == "succeeded"
    hit = await (await client.post(f"{V1}/jobs?wait=30", json=BODY, headers=A)).json()
    assert hit["cache"] == {"hit": True, "source_job": first["id"]}
    theirs = await (await client.post(f"{V1}/jobs?wait=30", json=BODY, headers=B)).json()
    assert theirs["cache"]["hit"] is False
    assert len(prompts_received(fake_comfy)) == 2


async def test_viewer_cannot_submit_a_workflow(client: Client, fake_comfy: FakeComfyUI) -> None:
    workflow = {
        "1": {
            "class_type": "EmptyImage",
            "inputs": {"width": 8, "height": 8, "batch_size": 1, "color": 1},
        }
    }
    resp = await client.post(
        f"{V1}/jobs", json={"workflow": workflow}, headers=bearer("val", ("viewer",))
    )
    assert resp.status == 403
    assert (await resp.json())["error"]["type"] == "forbidden_role"
    assert prompts_received(fake_comfy) == []


async def test_anonymous_gets_nothing(client: Client, fake_comfy: FakeComfyUI) -> None:
    for method, path in [("GET", "/templates"), ("POST", "/jobs"), ("GET", "/jobs")]:
        resp = await client.request(method, f"{V1}{path}", json=BODY)
        assert resp.status == 401
    assert fake_comfy.received == []
