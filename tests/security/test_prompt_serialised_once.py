"""``POST /prompt`` is serialised once, after the last guard, and that is what ComfyUI gets
(issue 17).

Guards edit the one parsed submission; its serialisation is written when the body is first
read (by the forwarder) and from then on the submission is sealed. B's hostile submission
reaches the fake ComfyUI as exactly the serialisation of the form the guards left (byte for
byte, with B's namespaced client id and B's folder), a guard that read the bytes cannot have
them changed under it by a later one (refused, nothing forwarded), and the body is serialised
once per request whatever the number of guards that edit it.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

import orjson
import pytest
from aiohttp import web

from proxy.chain import ROUTE_TABLE, Guard, RouteTable
from proxy.comfy.submission import Submission
from proxy.isolation.submit_guard import PromptSubmitGuard
from proxy.state import RequestContext
from proxy.tenancy.namespaces import folder_names, upstream_client_id
from tests.conftest import ProxyFactory
from tests.fakes.comfyui import FakeComfyUI
from tests.security.prompt_support import (
    ALICE,
    BOB,
    FOLDER_SECRET,
    B,
    Client,
    image,
    policy_sections,
    prompt_posts,
    saved,
)

A_FOLDER = folder_names(FOLDER_SECRET).of(ALICE)
B_FOLDER = folder_names(FOLDER_SECRET).of(BOB)
A_SOCKET = upstream_client_id(ALICE, "alice-tab")


class Snapshot:
    """A guard put last on ``POST /prompt``: the serialisation of the submission as the guards
    left it, taken without reading ``ctx.body`` (which would write it)."""

    name = "snapshot"

    def __init__(self) -> None:
        self.forms: list[bytes] = []

    async def check(self, request: web.Request, ctx: RequestContext) -> None:
        parsed = ctx.current_parse()
        if request.method == "POST" and isinstance(parsed, Submission):
            self.forms.append(orjson.dumps(parsed.value))


class ReadsTheBytes:
    """A (buggy) guard that decides on ``ctx.body`` before others edit the submission."""

    name = "reads_the_bytes"

    async def check(self, request: web.Request, ctx: RequestContext) -> None:
        if request.method == "POST":
            assert ctx.body is not None


def set_guards(client: Client, guards: tuple[Guard, ...]) -> None:
    app = client.app
    assert app is not None
    table = app[ROUTE_TABLE]
    table._endpoints["prompt"] = dataclasses.replace(table["prompt"], guards=guards)


def prompt_guards(client: Client) -> tuple[Guard, ...]:
    app = client.app
    assert app is not None
    table: RouteTable = app[ROUTE_TABLE]
    return table["prompt"].guards


@pytest.fixture(params=["memory", "redis"])
async def client(
    request: pytest.FixtureRequest,
    make_proxy: ProxyFactory,
    fake_comfy: FakeComfyUI,
    tmp_path: Path,
) -> Client:
    """Isolation and the workflow policy on; state in process or in a real Redis."""
    sections: dict[str, Any] = policy_sections(tmp_path)
    if request.param == "redis":
        sections["redis"] = {"url": request.getfixturevalue("redis_url")}
    return await make_proxy(fake_comfy.url, token=None, **sections)


def hostile_body() -> bytes:
    """B names A's socket (both ways), A's folder, jumps the queue, picks a malformed id, and
    writes structural characters escaped (what a second reader could read apart)."""
    graph = saved(image())
    graph["9"]["inputs"]["filename_prefix"] = f"{A_FOLDER}/stolen"
    body = {
        "prompt": graph,
        "client_id": A_SOCKET,
        "extra_data": {"client_id": "alice-tab", "extra_pnginfo": {"note": 'x":"y'}},
        "prompt_id": "NOT-A-UUID",
        "front": True,
        "number": -1,
    }
    raw = orjson.dumps(body).replace(b'x\\":\\"y', b"x\\u0022\\u003a\\u0022y")
    assert b"\\u003a" in raw
    return raw


async def test_b_gets_exactly_the_form_the_guards_left_forwarded(
    client: Client, fake_comfy: FakeComfyUI
) -> None:
    snapshot = Snapshot()
    set_guards(client, (*prompt_guards(client), snapshot))
    headers = {**B, "Content-Type": "application/json"}
    async with client.post("/prompt", data=hostile_body(), headers=headers) as resp:
        assert resp.status == 200, await resp.text()
        prompt_id = (await resp.json())["prompt_id"]
    posts = [r for r in fake_comfy.received if r.method == "POST" and r.path.endswith("/prompt")]
    assert len(posts) == 1
    assert len(snapshot.forms) == 1
    # Byte for byte the serialisation of what the guards decided on: not the client's bytes,
    # not an earlier form.
    assert posts[0].body == snapshot.forms[0]
    sent = json.loads(posts[0].body)
    assert sent["prompt_id"] == prompt_id != "NOT-A-UUID"
    assert sent["client_id"] == upstream_client_id(BOB, A_SOCKET) != A_SOCKET
    assert "front" not in sent
    assert "number" not in sent
    prefix = sent["prompt"]["9"]["inputs"]["filename_prefix"]
    assert prefix.startswith(f"{B_FOLDER}/")
    assert sent["extra_data"]["extra_pnginfo"]["note"] == 'x":"y'


async def test_a_guard_that_read_the_bytes_cannot_have_them_changed(
    client: Client, fake_comfy: FakeComfyUI
) -> None:
    guards = prompt_guards(client)
    at = next(i for i, g in enumerate(guards) if isinstance(g, PromptSubmitGuard))
    set_guards(client, (*guards[:at], ReadsTheBytes(), *guards[at:]))
    async with client.post("/prompt", json={"prompt": saved(image())}, headers=B) as resp:
        assert resp.status == 500
        assert (await resp.json())["error"]["type"] == "internal_error"
    assert prompt_posts(fake_comfy) == []  # nothing forwarded in a form nobody decided on


async def test_the_submission_is_serialised_once_per_request(
    client: Client, fake_comfy: FakeComfyUI, monkeypatch: pytest.MonkeyPatch
) -> None:
    dumps: list[int] = []
    dump = Submission.dump

    def counted(self: Submission) -> bytes:
        dumps.append(1)
        return dump(self)

    monkeypatch.setattr(Submission, "dump", counted)
    body = {"prompt": saved(image()), "client_id": "bob-tab"}
    async with client.post("/prompt", json=body, headers=B) as resp:
        assert resp.status == 200, await resp.text()
    assert len(dumps) == 1  # read_prompt and isolation edit it; one serialisation is written
    assert len(prompt_posts(fake_comfy)) == 1
