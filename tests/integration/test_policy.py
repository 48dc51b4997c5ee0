"""The workflow policy through the real app, in front of the fake ComfyUI: refused prompts never
reach it, allowed ones arrive as sent (apart from isolation's rewrites), admins are not checked,
and reloads (``POST /admin/reload``, SIGHUP) swap the policy or keep the old one whole."""

from __future__ import annotations

import asyncio
import json
import signal
from pathlib import Path
from typing import Any

import aiohttp
import orjson
import pytest
from aiohttp.test_utils import TestClient

from proxy.observability.metrics import METRICS
from proxy.policy.store import POLICY
from proxy.principal import comfy_user_id
from proxy.tenancy.namespaces import upstream_client_id
from tests.conftest import ProxyFactory, bearer, make_token
from tests.fakes.comfyui import FakeComfyUI
from tests.proxy_process import proxy_process

Client = TestClient[Any, Any]
ALICE, ADMIN = bearer("alice"), bearer("root", ("admin",))

POLICY_TEXT = """
[policies.base]
nodes.allow = ["EmptyImage", "SaveImage", "PreviewImage", "ImageBlur"]
models.allow = ["*"]
limits = { max_body_mb = 0.05 }
[policies.base.bounds]
"*" = ["batch_size <= 2", "width * height <= 64 * 64"]
"""
RESTRICTED = '[policies.base]\nnodes.allow = ["SaveImage", "PreviewImage"]\n'


def write_policy(path: Path, text: str) -> None:
    """Replace a policy file (small: a blocking write is fine here)."""
    path.write_text(text)


@pytest.fixture
def policy_file(tmp_path: Path) -> Path:
    path = tmp_path / "policy.toml"
    write_policy(path, POLICY_TEXT)
    return path


@pytest.fixture
async def client(make_proxy: ProxyFactory, fake_comfy: FakeComfyUI, policy_file: Path) -> Client:
    return await make_proxy(fake_comfy.url, token=None, policy={"files": [str(policy_file)]})


def graph(*, width: int = 8, batch: int = 1, extra: dict[str, Any] | None = None) -> dict[str, Any]:
    return {
        "1": {
            "class_type": "EmptyImage",
            "inputs": {"width": width, "height": 8, "batch_size": batch, "color": 0x123456},
        },
        "2": {"class_type": "SaveImage", "inputs": {"images": ["1", 0], "filename_prefix": "p"}},
        **(extra or {}),
    }


def prompt_posts(fake: FakeComfyUI) -> list[bytes]:
    return [r.body for r in fake.received if r.method == "POST" and r.path.endswith("/prompt")]


def refusals(client: Client, reason: str) -> float:
    value = client.app[METRICS].registry.get_sample_value(
        "comfygate_policy_refusals_total", {"reason": reason}
    )
    return value or 0.0


async def test_refused_prompt_never_reaches_comfyui(
    client: Client, fake_comfy: FakeComfyUI, capsys: pytest.CaptureFixture[str]
) -> None:
    secret = "do-not-log-this-prompt-text"
    workflow = graph(
        width=4096,
        batch=3,
        extra={"3": {"class_type": "WriteAnywhere", "inputs": {"path": "/etc", "x": secret}}},
    )
    resp = await client.post("/prompt", json={"prompt": workflow}, headers=ALICE)
    assert resp.status == 400
    body = await resp.json()
    assert body["error"]["type"] == "input_out_of_bounds"  # the first one found
    assert body["error"]["message"] == "Prompt refused by the workflow policy (4 problems)"
    assert body["error"]["details"].splitlines() == [
        "node 1 (EmptyImage) input width: width = 4096, height = 8 is out of bounds for your "
        "role (width * height <= 64 * 64)",
        "node 1 (EmptyImage) input batch_size: batch_size = 3 is out of bounds for your role "
        "(batch_size <= 2)",
        "node 3 (WriteAnywhere): your role may not use WriteAnywhere nodes",
        "node 3 (WriteAnywhere) input path: path must be a relative name inside ComfyUI's "
        "folders (absolute paths are not allowed)",
    ]
    assert set(body["error"]) == {"type", "message", "details", "extra_info"}
    assert {k: [e["type"] for e in v["errors"]] for k, v in body["node_errors"].items()} == {
        "1": ["input_out_of_bounds", "input_out_of_bounds"],
        "3": ["node_not_allowed", "path_not_allowed"],
    }
    assert body["node_errors"]["1"]["errors"][0]["extra_info"] == {
        "input_name": "width",
        "received_value": [4096, 8],
    }
    assert body["node_errors"]["3"]["class_type"] == "WriteAnywhere"
    assert prompt_posts(fake_comfy) == []
    assert refusals(client, "input_out_of_bounds") == 2
    assert refusals(client, "node_not_allowed") == 1
    logged = capsys.readouterr().out
    assert "prompt_refused_by_policy" in logged
    assert secret not in logged


async def test_allowed_prompt_arrives_as_sent_apart_from_isolation(
    client: Client, fake_comfy: FakeComfyUI
) -> None:
    sent = {"prompt": graph(), "client_id": "tab-1", "extra_data": {"extra_pnginfo": {"a": 1}}}
    resp = await client.post("/prompt", json=sent, headers=ALICE)
    assert resp.status == 200, await resp.text()
    [received] = prompt_posts(fake_comfy)
    arrived = orjson.loads(received)
    answer = await resp.json()
    # Exactly isolation's rewrites (docs/isolation.md): ids and the output prefix, nothing else.
    assert arrived["prompt_id"] == answer["prompt_id"]
    assert arrived["client_id"] == upstream_client_id(comfy_user_id("alice"), "tab-1")
    prefix = arrived["prompt"]["2"]["inputs"].pop("filename_prefix")
    assert prefix.startswith("users/")
    assert prefix.endswith("/p")
    del sent["prompt"]["2"]["inputs"]["filename_prefix"]  # type: ignore[index]
    assert {k: v for k, v in arrived.items() if k not in ("prompt_id", "client_id")} == {
        k: v for k, v in sent.items() if k != "client_id"
    }


@pytest.mark.parametrize("scheduler", [False, True])
async def test_without_isolation_the_proxys_own_serialisation_arrives(
    make_proxy: ProxyFactory, fake_comfy: FakeComfyUI, policy_file: Path, scheduler: bool
) -> None:
    client = await make_proxy(
        fake_comfy.url,
        token=None,
        policy={"files": [str(policy_file)]},
        isolation={"enabled": False},
        rate_limits={"enabled": False},  # the queue quota would add a prompt_id
        scheduler={"enabled": scheduler},
    )
    raw = json.dumps({"prompt": graph(), "client_id": "c", "x": [1.50, "é"]}, indent=1).encode()
    headers = {**ALICE, "Content-Type": "application/json"}
    resp = await client.post("/prompt", data=raw, headers=headers)
    assert resp.status == 200, await resp.text()
    # Never the client's bytes: what the proxy read, serialised by the proxy (same values).
    [arrived] = prompt_posts(fake_comfy)
    assert arrived != raw
    values = json.loads(arrived)
    if scheduler:  # the gateway queue names every prompt (its answer and views use the id)
        assert values.pop("prompt_id") == (await resp.json())["prompt_id"]
    assert values == json.loads(raw)
    assert arrived == orjson.dumps(json.loads(arrived))


async def test_admins_and_a_disabled_policy_are_not_checked(
    client: Client, make_proxy: ProxyFactory, fake_comfy: FakeComfyUI, policy_file: Path
) -> None:
    unknown = {"prompt": {"1": {"class_type": "NoSuchNode", "inputs": {}}}}
    resp = await client.post("/prompt", json=unknown, headers=ADMIN)
    answer = await resp.json()
    assert (resp.status, answer["error"]["type"]) == (400, "invalid_prompt")
    # Not the policy's refusal but ComfyUI's own answer, as ComfyUI gives it (the gateway
    # queue, on by default, predicts it before holding: docs/scheduler.md).
    async with (
        aiohttp.ClientSession() as session,
        session.post(f"{fake_comfy.url}/prompt", json=unknown) as direct,
    ):
        assert (direct.status, await direct.json()) == (400, answer)
    off = await make_proxy(
        fake_comfy.url, token=None, policy={"enabled": False, "files": [str(policy_file)]}
    )
    resp = await off.post("/prompt", json=unknown, headers=ALICE)
    # Isolation still judges alice's prompt on the instance's node catalog, which lacks the
    # type: refused as ComfyUI would refuse it, without reaching it.
    assert (resp.status, (await resp.json())["error"]["type"]) == (400, "missing_node_type")
    assert len(prompt_posts(fake_comfy)) == 1  # the direct one: neither proxy sent one


async def test_body_over_the_role_limit_is_refused_before_it_is_read(
    client: Client, fake_comfy: FakeComfyUI
) -> None:
    big = orjson.dumps({"prompt": graph(), "extra_data": {"pad": "x" * 60_000}})
    resp = await client.post("/prompt", data=big, headers=ALICE)
    assert resp.status == 400
    body = await resp.json()
    assert body["error"]["type"] == "body_too_large"
    assert body["node_errors"] == {}
    assert prompt_posts(fake_comfy) == []


async def test_ui_format_workflow_says_to_export_api_format(
    client: Client, fake_comfy: FakeComfyUI
) -> None:
    ui = {"last_node_id": 1, "nodes": [{"id": 1, "type": "EmptyImage"}], "links": []}
    for body in ({"prompt": ui}, ui):
        resp = await client.post("/prompt", json=body, headers=ALICE)
        answer = await resp.json()
        assert (resp.status, answer["error"]["type"]) == (400, "ui_format_workflow")
        assert "Export (API)" in answer["error"]["details"]
    assert prompt_posts(fake_comfy) == []


async def test_not_json_is_refused_in_comfyuis_shape(
    client: Client, fake_comfy: FakeComfyUI
) -> None:
    resp = await client.post("/prompt", data=b"{nope", headers=ALICE)
    answer = await resp.json()
    assert (resp.status, answer["error"]["type"]) == (400, "invalid_prompt")  # ComfyUI: a 500
    assert answer["node_errors"] == {}
    assert prompt_posts(fake_comfy) == []


# -- reload ---------------------------------------------------------------------------------


async def test_admin_reload(client: Client, fake_comfy: FakeComfyUI, policy_file: Path) -> None:
    assert (await client.post("/admin/reload")).status == 401
    resp = await client.post("/admin/reload", headers=ALICE)
    assert resp.status == 403
    assert (await resp.json())["error"]["type"] == "forbidden_role"
    assert (await client.get("/admin/reload", headers=ADMIN)).status == 405

    write_policy(policy_file, RESTRICTED)
    resp = await client.post("/admin/reload", headers=ADMIN)
    assert resp.status == 200
    assert await resp.json() == {"reloaded": True, "version": 2, "sources": [str(policy_file)]}
    resp = await client.post("/prompt", json={"prompt": graph()}, headers=ALICE)
    assert (resp.status, (await resp.json())["error"]["type"]) == (400, "node_not_allowed")

    write_policy(policy_file, '[policies.base]\nnodes.allow = "EmptyImage"\n[policies.bsae]\n')
    resp = await client.post("/admin/reload", headers=ADMIN)
    assert resp.status == 422
    error = (await resp.json())["error"]
    assert error["type"] == "policy_invalid"
    assert error["message"] == "the policy files are invalid; policy version 2 stays in force"
    problems = [
        f"{policy_file}: policies.base.nodes.allow: must be a list of non-empty strings",
        f"{policy_file}: policies.bsae: not a role in [roles], not the base policy ('base') "
        "and not extended by any policy (a typo?)",
    ]
    assert error["extra_info"] == {"problems": problems, "version": 2}
    assert error["details"] == "\n".join(problems)
    assert client.app[POLICY].version == 2  # the old policy stays in force
    resp = await client.post("/prompt", json={"prompt": graph()}, headers=ALICE)
    assert (resp.status, (await resp.json())["error"]["type"]) == (400, "node_not_allowed")
    assert prompt_posts(fake_comfy) == []


async def test_reload_keeps_open_connections(client: Client, policy_file: Path) -> None:
    """A WebSocket opened before a reload is still relayed after it."""
    ws = await client.ws_connect("/ws?clientId=keep", headers=ALICE)
    assert (await ws.receive_json())["type"] == "status"
    write_policy(policy_file, RESTRICTED)
    assert (await client.post("/admin/reload", headers=ADMIN)).status == 200
    resp = await client.post("/prompt", json={"prompt": graph()}, headers=ALICE)
    assert resp.status == 400
    assert not ws.closed
    await ws.close()


async def test_sighup_reloads_and_a_bad_file_keeps_the_old_policy(
    fake_comfy: FakeComfyUI, policy_file: Path
) -> None:
    alice = {"Authorization": f"Bearer {make_token('alice', ('user',))}"}
    env = {
        "COMFYGATE_POLICY__FILES": json.dumps([str(policy_file)]),
        "COMFYGATE_METRICS__ENABLED": "false",  # no second listener to collide with others
    }
    async with (
        proxy_process(fake_comfy.url, **env) as proxy,
        aiohttp.ClientSession(headers=alice) as session,
    ):

        async def submit() -> tuple[int, str]:
            async with session.post(f"{proxy.url}/prompt", json={"prompt": graph()}) as resp:
                body = await resp.json()
                return resp.status, (body.get("error") or {}).get("type", "")

        assert await submit() == (200, "")
        write_policy(policy_file, RESTRICTED)
        proxy.process.send_signal(signal.SIGHUP)
        async with asyncio.timeout(10):
            while await submit() != (400, "node_not_allowed"):
                pass  # the signal is asynchronous: wait for the proxy to act on it

        write_policy(policy_file, "[policies.base\n")  # not TOML
        proxy.process.send_signal(signal.SIGHUP)
        async with session.post(f"{proxy.url}/admin/reload", headers=proxy.auth) as resp:
            assert resp.status == 422
            answer = await resp.json()
        assert answer["error"]["extra_info"]["version"] == 2  # neither reload took effect
        assert await submit() == (400, "node_not_allowed")
        assert proxy.process.returncode is None  # SIGHUP never stops the proxy
