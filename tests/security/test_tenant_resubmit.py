"""Re-submitting what ``/history`` shows (issue 15): the isolation rewrite is idempotent.

A workflow read back from ``/history`` already names A's folder; submitted again it must save
there once, never in ``users/<A>/users/<A>/``. B naming A's folder is still moved into B's.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from aiohttp.test_utils import TestClient

from proxy.principal import comfy_user_id
from proxy.tenancy.namespaces import folder_names
from tests.conftest import ProxyFactory, bearer
from tests.fakes.comfyui import FakeComfyUI
from tests.support.backends import STATES, proxy_over
from tests.support.gateway_queue import settled

Client = TestClient[Any, Any]
ALICE, BOB = comfy_user_id("alice"), comfy_user_id("bob")
A_FOLDER = folder_names("").of(ALICE)
B_FOLDER = folder_names("").of(BOB)
A, B = bearer("alice"), bearer("bob")


@pytest.fixture(params=STATES)
async def client(
    request: pytest.FixtureRequest, make_proxy: ProxyFactory, fake_comfy: FakeComfyUI
) -> Client:
    """The proxy, its ownership records in process or in a real Redis (the record keeps the
    client's own client id)."""
    return await proxy_over(request, make_proxy, fake_comfy)


def graph(prefix: str, image: str | None = None, color: int = 0x123456) -> dict[str, Any]:
    source: dict[str, Any] = {
        "class_type": "EmptyImage",
        "inputs": {"width": 8, "height": 8, "batch_size": 1, "color": color},
    }
    if image is not None:
        source = {"class_type": "LoadImage", "inputs": {"image": image}}
    return {
        "1": source,
        "9": {"class_type": "SaveImage", "inputs": {"images": ["1", 0], "filename_prefix": prefix}},
    }


def sent_prompts(fake: FakeComfyUI) -> list[dict[str, Any]]:
    return [json.loads(r.body) for r in fake.received if r.path.endswith("/prompt")]


async def test_resubmitting_history_keeps_the_prefix_once(
    client: Client, fake_comfy: FakeComfyUI
) -> None:
    async with client.post("/prompt", json={"prompt": graph("run/img")}, headers=A) as resp:
        assert resp.status == 200, await resp.text()
        first = (await resp.json())["prompt_id"]
    await fake_comfy.wait_idle()
    async with client.get(f"/history/{first}", headers=A) as resp:
        assert resp.status == 200
        entry = (await resp.json())[first]
    shown = entry["prompt"][2]
    assert shown["9"]["inputs"]["filename_prefix"] == f"{A_FOLDER}/run/img"
    [output] = entry["outputs"]["9"]["images"]
    fake_comfy.reset()
    # The very graph history showed, plus a file input naming A's own output by its path.
    again = dict(shown)
    again["1"] = {
        "class_type": "LoadImage",
        "inputs": {"image": f"{output['subfolder']}/{output['filename']} [output]"},
    }
    async with client.post("/prompt", json={"prompt": again}, headers=A) as resp:
        assert resp.status == 200, await resp.text()
    [sent] = sent_prompts(fake_comfy)
    assert sent["prompt"]["9"]["inputs"]["filename_prefix"] == f"{A_FOLDER}/run/img"
    assert sent["prompt"]["1"]["inputs"]["image"] == again["1"]["inputs"]["image"]
    await fake_comfy.wait_idle()
    saved = sorted((Path(fake_comfy.paths.output) / A_FOLDER / "run").iterdir())
    assert [p.name for p in saved] == ["img_00001_.png", "img_00002_.png"]
    assert not (Path(fake_comfy.paths.output) / A_FOLDER / "users").exists()


async def test_prefix_in_another_users_folder_is_moved_into_the_callers(
    client: Client, fake_comfy: FakeComfyUI
) -> None:
    stolen = f"{A_FOLDER}/img"
    async with client.post("/prompt", json={"prompt": graph(stolen)}, headers=B) as resp:
        assert resp.status == 200, await resp.text()
    [sent] = sent_prompts(fake_comfy)
    assert sent["prompt"]["9"]["inputs"]["filename_prefix"] == f"{B_FOLDER}/{stolen}"
    await fake_comfy.wait_idle()
    assert not (Path(fake_comfy.paths.output) / A_FOLDER).exists()


async def test_file_input_in_another_users_folder_stays_refused(
    client: Client, fake_comfy: FakeComfyUI
) -> None:
    async with client.post("/prompt", json={"prompt": graph("mine")}, headers=A) as resp:
        assert resp.status == 200
    await settled(client, fake_comfy)
    fake_comfy.reset()
    body = {"prompt": graph("b", image=f"{A_FOLDER}/mine_00001_.png [output]")}
    async with client.post("/prompt", json=body, headers=B) as resp:
        assert resp.status == 400
        answer = await resp.json()
    assert answer["node_errors"]["1"]["errors"][0]["type"] == "input_file_forbidden"
    assert sent_prompts(fake_comfy) == []


# -- the client's own client_id in history, queue and jobs ------------------------------------


async def get_json(client: Client, path: str, who: dict[str, str]) -> Any:
    async with client.get(path, headers=who) as resp:
        assert resp.status == 200, await resp.text()
        return await resp.json()


async def test_own_views_show_the_client_id_the_client_sent(
    client: Client, fake_comfy: FakeComfyUI
) -> None:
    fake_comfy.hold()
    body = {"prompt": graph("cid", color=0x0F0F0F), "client_id": "tab-7"}
    async with client.post("/prompt", json=body, headers=A) as resp:
        assert resp.status == 200
        running = (await resp.json())["prompt_id"]
    await fake_comfy.wait_held()
    body = {"prompt": graph("cid", color=0x0E0E0E), "client_id": "tab-7"}
    async with client.post("/prompt", json=body, headers=A) as resp:
        pending = (await resp.json())["prompt_id"]
    [sent, _] = sent_prompts(fake_comfy)
    namespaced = sent["client_id"]
    assert namespaced != "tab-7"

    queue = await get_json(client, "/queue", A)
    assert queue["queue_running"][0][1] == running
    assert queue["queue_running"][0][3]["client_id"] == "tab-7"
    assert queue["queue_pending"][0][3]["client_id"] == "tab-7"
    # B sees placeholders: neither id.
    assert "tab-7" not in json.dumps(await get_json(client, "/queue", B))
    assert namespaced not in json.dumps(await get_json(client, "/queue", B))
    fake_comfy.release()
    await fake_comfy.wait_idle()

    for path in ("/history", "/history?max_items=1", f"/history/{pending}", "/api/history"):
        history = await get_json(client, path, A)
        assert history, path
        for entry in history.values():
            assert entry["prompt"][3]["client_id"] == "tab-7", path
    job = await get_json(client, f"/api/jobs/{running}", A)
    assert job["workflow"]["extra_data"]["client_id"] == "tab-7"
    assert namespaced not in json.dumps(await get_json(client, "/history", A))
    # B: nothing of A's, in any form.
    assert await get_json(client, f"/history/{running}", B) == {}
    async with client.get(f"/api/jobs/{running}", headers=B) as resp:
        assert resp.status == 404
    # Admins' unfiltered views show what ComfyUI keeps.
    admin = await get_json(client, f"/history/{running}", bearer("root", ("admin",)))
    assert admin[running]["prompt"][3]["client_id"] == namespaced
