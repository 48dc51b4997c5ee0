"""Tenant isolation, route by route, as user B's attacks on user A's work (issue 13, family
"isolation").

The isolation table of docs/isolation.md (history, queue, jobs, interrupt, view, upload, free) is
covered route by route in ``tests/integration/test_isolation_*.py``; this module throws the
attacker's variants at it: every route form (bare, ``/api``, absolute-form), A's ids re-cased,
padded, mixed into lists or given as non-strings and as objects whose keys ComfyUI would iterate,
interrupts of A's running prompt, ``clear`` as B, ``/view`` with subfolder and type variants,
uploads that try to overwrite A's file, and masks whose ``original_ref`` names A's image.

Each case asserts on B's answer (status + error type, never A's data) and on what the fake
ComfyUI received or still holds: A's history, queue entries and files are untouched.
"""

from __future__ import annotations

import json
import os
from typing import Any

import aiohttp
import pytest
from aiohttp.test_utils import TestClient

from proxy.principal import comfy_user_id
from tests.conftest import ProxyFactory, bearer
from tests.fakes.comfyui import FakeComfyUI
from tests.security.raw_http import exchange, host_of
from tests.support.gateway_queue import settled
from tests.support.graphs import png, save_graph

Client = TestClient[Any, Any]
ALICE, BOB = comfy_user_id("alice"), comfy_user_id("bob")
A, B = bearer("alice"), bearer("bob")


@pytest.fixture
async def client(make_proxy: ProxyFactory, fake_comfy: FakeComfyUI, redis_url: str) -> Client:
    """The README's deployment (JWT, isolation, policy, Redis); requests say who they are."""
    return await make_proxy(
        fake_comfy.url,
        token=None,
        redis={"url": redis_url},
        # Dozens of attempts in a row: the upload rate limit (tested elsewhere) would answer
        # 429 before the isolation decision under test.
        rate_limits={"default": {"upload": {"rate": "1000/minute", "burst": 1000}}},
    )


async def submit(client: Client, who: dict[str, str], client_id: str = "tab") -> str:
    resp = await client.post(
        "/prompt", json={"prompt": save_graph(), "client_id": client_id}, headers=who
    )
    assert resp.status == 200, await resp.text()
    return str((await resp.json())["prompt_id"])


async def upload(
    client: Client, who: dict[str, str], fields: list[tuple[str, Any]], path: str = "/upload/image"
) -> tuple[int, Any]:
    form = aiohttp.FormData()
    for name, value in fields:
        if isinstance(value, tuple):
            form.add_field(name, value[1], filename=value[0], content_type="image/png")
        else:
            form.add_field(name, value)
    resp = await client.post(path, data=form, headers=who)
    text = await resp.text()
    return resp.status, (json.loads(text) if text else None)


def folder_of(fake: FakeComfyUI, kind: str) -> str:
    """The one user folder (``users/<name>``) in ComfyUI's ``kind`` directory."""
    [name] = os.listdir(os.path.join(getattr(fake.paths, kind), "users"))
    return f"users/{name}"


def read(fake: FakeComfyUI, kind: str, *parts: str) -> bytes:
    with open(os.path.join(getattr(fake.paths, kind), *parts), "rb") as fh:
        return fh.read()


def upstream(fake: FakeComfyUI) -> list[Any]:
    """What ComfyUI was asked on the users' behalf (the proxy's catalog reads left out)."""
    return [r for r in fake.received if r.path not in ("/api/object_info", "/object_info")]


def bodies(fake: FakeComfyUI, path: str) -> list[Any]:
    return [json.loads(r.body) for r in upstream(fake) if r.path == path and r.body]


def assert_no_trace(answer: bytes | str, *secrets: str) -> None:
    text = (answer if isinstance(answer, str) else answer.decode("utf-8", "replace")).lower()
    for secret in secrets:
        assert secret.lower() not in text, secret


# ----------------------------------------------------------------------------- history


def id_spellings(prompt_id: str) -> list[str]:
    """A's id as B might write it: ComfyUI compares ids exactly, so none is A's to ComfyUI
    either; the proxy must not treat any of them as B's."""
    return [
        prompt_id,
        prompt_id.upper(),
        f" {prompt_id}",
        f"{prompt_id} ",
        f"{prompt_id}\t",
        f"{prompt_id}\n",
        prompt_id.replace("-", ""),
        f"{{{prompt_id}}}",
        f"urn:uuid:{prompt_id}",
    ]


async def test_b_reads_no_history_entry_of_a_by_any_route_form(
    client: Client, fake_comfy: FakeComfyUI
) -> None:
    a1 = await submit(client, A)
    await settled(client, fake_comfy)
    fake_comfy.reset()
    host = host_of(client)
    targets = [
        f"/history/{a1}",
        f"/api/history/{a1}",
        f"/api/api/history/{a1}",
        f"//history/{a1}",
        f"/history/{a1}/",
        f"/history/{a1.upper()}",
        f"/history/%20{a1}",
        f"/history/{a1}%20",
        f"/history/{a1}?x=1",
        f"/history/{a1.replace('-', '%2D')}",
        f"http://{host}/history/{a1}",
        f"http://{host}/api/history/{a1}",
        "/history?max_items=1000&offset=0",
        "/api/history?max_items=-1",
        f"/api/jobs/{a1}",
        f"/api/jobs/{a1.upper()}",
        "/api/jobs?limit=100",
        "/api/jobs?status=completed",
        "/api/queue",
    ]
    for target in targets:
        for method in ("GET", "HEAD"):
            answer = await exchange(client, method, target, B)
            assert answer.status in (200, 400, 404), (target, answer.status)
            assert_no_trace(answer.body, a1)
            if method == "HEAD":
                # The size would tell A's entry is there (issue 13, item 10).
                empty = await exchange(client, "GET", target, B)
                assert answer.headers.get("Content-Length") == empty.headers.get(
                    "Content-Length"
                ), target
    # What reached ComfyUI by A's id was a read whose answer the proxy filters (as ComfyUI's
    # answer for an unknown id), or one no ComfyUI route serves.
    filtered = {"/history/{prompt_id}", "/api/history/{prompt_id}", "/api/jobs/{job_id}"}
    for seen in upstream(fake_comfy):
        if a1.lower() in seen.raw_path.lower():
            assert seen.route in filtered or seen.route in ("", None), seen
    # A still has it.
    resp = await client.get(f"/api/history/{a1}", headers=A)
    assert a1 in await resp.json()


async def test_b_deletes_nothing_of_as_history(client: Client, fake_comfy: FakeComfyUI) -> None:
    a1 = await submit(client, A)
    b1 = await submit(client, B)
    await settled(client, fake_comfy)
    fake_comfy.reset()
    attacks: list[Any] = [
        {"delete": id_spellings(a1)},
        {"delete": [a1, b1]},
        {"delete": {a1: True}},  # ComfyUI iterates a dict's keys
        {"delete": a1},  # ... and a string's characters
        {"delete": [[a1], {"id": a1}, 1, None, True]},
        {"clear": True},
        {"clear": "false"},  # truthy to ComfyUI
        {"clear": 1, "delete": [a1]},
    ]
    for body in attacks:
        for path in ("/history", "/api/history"):
            resp = await client.post(path, json=body, headers=B)
            assert resp.status == 200, (body, await resp.text())
    # ComfyUI was only ever asked to delete B's own entry.
    for sent in bodies(fake_comfy, "/history") + bodies(fake_comfy, "/api/history"):
        assert sent == {"delete": [b1]}, sent
    resp = await client.get(f"/api/history/{a1}", headers=A)
    assert a1 in await resp.json()
    assert a1 in fake_comfy.queue.history


# ------------------------------------------------------------------ queue and interrupt


async def test_b_cannot_touch_as_queue_or_running_prompt(
    client: Client, fake_comfy: FakeComfyUI
) -> None:
    fake_comfy.hold()
    running = await submit(client, A)
    assert await fake_comfy.wait_held() == running
    pending = await submit(client, A)
    fake_comfy.reset()

    queue_attacks: list[Any] = [
        {"delete": id_spellings(pending)},
        {"delete": {pending: 1, running: 1}},
        {"delete": pending},
        {"delete": [[pending], {"0": pending}, None]},
        {"clear": True},
        {"clear": "yes"},
        {"clear": True, "delete": [pending, running]},
    ]
    for body in queue_attacks:
        for path in ("/queue", "/api/queue"):
            resp = await client.post(path, json=body, headers=B)
            assert resp.status == 200, (body, await resp.text())
    interrupt_attacks: list[Any] = [
        {"prompt_id": running},
        *({"prompt_id": spelled} for spelled in id_spellings(running)[1:]),
        {"prompt_id": [running]},
        {"prompt_id": {"id": running}},
        {"prompt_id": ""},
        {"prompt_id": None},
        {},
        [running],
        running,
    ]
    for body in interrupt_attacks:
        for path in ("/interrupt", "/api/interrupt"):
            resp = await client.post(path, json=body, headers=B)
            assert resp.status in (200, 400), (body, await resp.text())
    for target in (f"/api/jobs/{running}/cancel", f"/api/jobs/{pending}/cancel"):
        resp = await client.post(target, headers=B)
        assert resp.status == 200
        assert await resp.json() == {"cancelled": False}
    resp = await client.post("/api/jobs/cancel", json={"job_ids": [running, pending]}, headers=B)
    assert resp.status == 200
    assert await resp.json() == {"cancelled": False}
    resp = await client.post("/free", json={"unload_models": True}, headers=B)
    assert resp.status == 403
    assert (await resp.json())["error"]["type"] == "forbidden_role"

    # ComfyUI never got an interrupt, a cancel, a free or a delete naming A's prompts.
    for seen in upstream(fake_comfy):
        assert seen.path not in ("/interrupt", "/api/interrupt", "/free", "/api/free"), seen
        assert running not in seen.raw_path
        assert pending not in seen.raw_path
        assert running.encode() not in seen.body
        assert pending.encode() not in seen.body
    running_now, pending_now = fake_comfy.queue.current_queue()
    assert [item[1] for item in running_now] == [running]
    assert [item[1] for item in pending_now] == [pending]
    fake_comfy.release()
    await fake_comfy.wait_idle()
    for prompt_id in (running, pending):
        status = fake_comfy.queue.history[prompt_id]["status"]
        assert status["status_str"] == "success", status


# -------------------------------------------------------------------------------- /view


async def test_b_cannot_view_as_files_by_any_subfolder_or_type(
    client: Client, fake_comfy: FakeComfyUI
) -> None:
    await submit(client, A)
    await fake_comfy.wait_idle()
    out = folder_of(fake_comfy, "output")
    [name] = os.listdir(os.path.join(fake_comfy.paths.output, out))
    status, answer = await upload(client, A, [("image", ("secret.png", png()))])
    assert status == 200, answer
    inp = answer["subfolder"]
    fake_comfy.reset()
    folder = out.removeprefix("users/")
    host = host_of(client)
    queries = [
        f"filename={name}&subfolder={out}&type=output",
        f"filename={name}&subfolder={out}&type=OUTPUT",
        f"filename={name}&subfolder={out}&type=output%00",
        f"filename={name}&subfolder={out}&type=",
        f"filename={name}&subfolder={out}&type=temp&type=output",
        f"filename={name}%20[output]&subfolder={out}&type=input",
        f"filename={name}[output]&subfolder={out}&type=temp",
        f"filename={name}&subfolder={out}/.",
        f"filename={name}&subfolder=./{out}",
        f"filename={name}&subfolder=users//{folder}",
        f"filename={name}&subfolder={out}/x/..",
        f"filename={name}&subfolder=users%2F{folder}",
        f"filename={name}&subfolder=users%252F{folder}",
        f"filename={name}&subfolder=users%EF%BC%8F{folder}",
        f"filename={name}&subfolder={out.upper()}",
        f"filename={name}&subfolder={out}%20",
        f"filename=./{name}&subfolder={out}",
        f"filename={out}/{name}&subfolder=",
        f"filename={name}&subfolder=users&type=output",
        f"filename=secret.png&subfolder={inp}&type=input",
        f"filename=secret.png%20[input]&subfolder={inp}",
        f"filename=secret.png&subfolder={inp}&type=input&channel=a",
        f"filename=secret.png&subfolder={inp}&type=input&preview=webp;90",
        f"subfolder={out}&filename={name}&filename=x.png",
        f"%66ilename={name}&%73ubfolder={out}",
    ]
    for query in queries:
        for target in (f"/view?{query}", f"/api/view?{query}", f"http://{host}/api/view?{query}"):
            answer = await exchange(client, "GET", target, B)
            assert answer.status in (400, 403, 404), (target, answer.status)
            assert not answer.body.startswith(b"\x89PNG"), target
            assert not answer.body.startswith(b"RIFF"), target
    # ComfyUI never served a file of A's folders to B: nothing that names them reached it.
    # (compared without case: on Windows or macOS, ComfyUI's file system would ignore it)
    for seen in upstream(fake_comfy):
        assert folder.lower() not in seen.raw_path.lower(), seen.raw_path
        assert inp.removeprefix("users/").lower() not in seen.raw_path.lower(), seen.raw_path


# ------------------------------------------------------------------- uploads and masks


async def test_b_cannot_overwrite_as_upload(client: Client, fake_comfy: FakeComfyUI) -> None:
    original = png()
    status, answer = await upload(client, A, [("image", ("secret.png", original))])
    assert status == 200, answer
    a_folder = answer["subfolder"]
    a_name = a_folder.removeprefix("users/")
    fake_comfy.reset()
    forged = png()
    attempts: list[list[tuple[str, Any]]] = [
        [("subfolder", a_folder), ("overwrite", "true"), ("image", ("secret.png", forged))],
        [("image", ("secret.png", forged)), ("subfolder", a_folder), ("overwrite", "1")],
        [("subfolder", f"../{a_name}"), ("overwrite", "true"), ("image", ("secret.png", forged))],
        [("subfolder", f"../../{a_folder}"), ("image", ("secret.png", forged))],
        [("subfolder", "users"), ("image", (f"{a_name}/secret.png", forged))],
        [("subfolder", ""), ("subfolder", a_folder), ("image", ("secret.png", forged))],
        [("type", "input"), ("subfolder", f"/{a_folder}"), ("image", ("secret.png", forged))],
        [("subfolder", f"{a_folder}/."), ("overwrite", "true"), ("image", ("secret.png", forged))],
        [("image", ("secret.png", forged)), ("type", "output"), ("subfolder", a_folder)],
    ]
    for fields in attempts:
        for path in ("/upload/image", "/api/upload/image"):
            status, answer = await upload(client, B, fields, path)
            assert status in (200, 400, 403), (fields, answer)
            if status == 200:  # accepted: it landed in B's own folder
                assert answer["subfolder"].startswith("users/"), answer
                assert a_name not in answer["subfolder"].split("/")[1], answer
    assert read(fake_comfy, "input", a_folder, "secret.png") == original
    assert os.listdir(os.path.join(fake_comfy.paths.input, a_folder)) == ["secret.png"]
    for seen in upstream(fake_comfy):
        assert f'name="subfolder"\r\n\r\n{a_folder}'.encode() not in seen.body


async def test_b_cannot_mask_as_image(client: Client, fake_comfy: FakeComfyUI) -> None:
    status, answer = await upload(client, A, [("image", ("base.png", png()))])
    assert status == 200, answer
    a_folder = answer["subfolder"]
    await submit(client, A)
    await settled(client, fake_comfy)
    out_folder = folder_of(fake_comfy, "output")
    [out_name] = os.listdir(os.path.join(fake_comfy.paths.output, out_folder))
    fake_comfy.reset()
    refs: list[str] = [
        json.dumps({"filename": "base.png", "subfolder": a_folder, "type": "input"}),
        json.dumps({"filename": "base.png [input]", "subfolder": a_folder}),
        json.dumps({"filename": out_name, "subfolder": out_folder}),  # type defaults to output
        json.dumps({"filename": out_name, "subfolder": out_folder, "type": "output"}),
        json.dumps({"filename": f"{a_folder}/base.png", "subfolder": "", "type": "input"}),
        json.dumps({"filename": "base.png", "subfolder": f"users/x/../{a_folder[6:]}"}),
        json.dumps({"filename": "base.png", "subfolder": a_folder.upper(), "type": "input"}),
        # Repeated keys: json.loads (ComfyUI's reader) keeps the last one.
        '{"filename": "base.png", "subfolder": "", "subfolder": "'
        + a_folder
        + '", "type": "input"}',
        json.dumps([{"filename": "base.png", "subfolder": a_folder, "type": "input"}]),
        json.dumps({"filename": ["base.png"], "subfolder": a_folder, "type": "input"}),
        "not json",
    ]
    # The reference before the image (the stock UI's order) is refused before anything is
    # sent; after it, once ComfyUI has had part of the upload, which is then cut off (ComfyUI
    # reads the whole form before acting). Early ones first: a cut-off request may reach the
    # fake after its refusal reached B.
    for early in (True, False):
        for ref in refs:
            image: tuple[str, Any] = ("image", ("mask.png", png()))
            fields = [("original_ref", ref), image] if early else [image, ("original_ref", ref)]
            status, answer = await upload(client, B, fields, "/upload/mask")
            assert status in (400, 403), (ref, answer)
            assert answer["error"]["type"] in (
                "original_ref_forbidden",
                "invalid_path",
                "bad_upload",
            ), (ref, answer)
        if early:
            assert [r for r in upstream(fake_comfy) if r.path.endswith("/upload/mask")] == []
    # Two original_ref fields: ComfyUI reads the first; the proxy decides on that one too.
    own = json.dumps({"filename": "base.png", "subfolder": a_folder, "type": "input"})
    for first, second in ((own, "{}"), ("{}", own)):
        fields = [
            ("original_ref", first),
            ("original_ref", second),
            ("image", ("mask.png", png())),
        ]
        status, answer = await upload(client, B, fields, "/upload/mask")
        assert status in (400, 403), (first, second, answer)
    # ComfyUI never read a whole mask upload of B's.
    assert all(r.body_length == 0 for r in upstream(fake_comfy) if r.path.endswith("/upload/mask"))
    users = os.listdir(os.path.join(fake_comfy.paths.input, "users"))
    assert users == [a_folder.removeprefix("users/")]  # B got no folder, nor a masked copy
