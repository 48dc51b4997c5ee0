"""Tenant isolation, write side: users alice (A) and bob (B) share one ComfyUI through the real app.

``POST /prompt`` is rewritten into A's namespace, uploads land in A's input folder, ``/view``
serves A's files to A only; every refusal is asserted on what the client got and on what the
fake ComfyUI received (nothing, unless stated).
"""

from __future__ import annotations

import json
import os
import uuid
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp.test_utils import TestClient

from proxy.principal import comfy_user_id
from proxy.tenancy.namespaces import folder_names, upstream_client_id
from proxy.tenancy.ownership import OWNERSHIP
from tests.conftest import ProxyFactory, bearer
from tests.fakes.comfyui import FakeComfyUI
from tests.fakes.comfyui.images import solid
from tests.support.gateway_queue import settled
from tests.support.graphs import png, save_graph

Client = TestClient[Any, Any]
ALICE, BOB = comfy_user_id("alice"), comfy_user_id("bob")
# The test settings configure no isolation.folder_secret: folders are keyed by this process's key.
ALICE_NAME = folder_names("").of(ALICE).removeprefix("users/")
BOB_NAME = folder_names("").of(BOB).removeprefix("users/")


A, B, ADMIN = bearer("alice"), bearer("bob"), bearer("admin", ("admin",))


@pytest.fixture
def client(anonymous_proxy: Client) -> Client:
    return anonymous_proxy


def load_graph(image: str, prefix: str = "loaded") -> dict[str, Any]:
    """LoadImage -> SaveImage."""
    return {
        "2": {"class_type": "LoadImage", "inputs": {"image": image}},
        "9": {"class_type": "SaveImage", "inputs": {"images": ["2", 0], "filename_prefix": prefix}},
    }


def read_bytes(*parts: str) -> bytes:
    with open(os.path.join(*parts), "rb") as fh:
        return fh.read()


def exists(*parts: str) -> bool:
    return os.path.exists(os.path.join(*parts))


def prompt_posts(fake: FakeComfyUI) -> list[dict[str, Any]]:
    return [json.loads(r.body) for r in fake.received if r.path.endswith("/prompt")]


async def submit(client: Client, who: dict[str, str], body: dict[str, Any]) -> Any:
    async with client.post("/prompt", json=body, headers=who) as resp:
        return resp.status, await resp.json()


async def alice_output(client: Client, fake: FakeComfyUI) -> str:
    """A saves one image; returns its file name (in output/users/<alice>/)."""
    status, answer = await submit(client, A, {"prompt": save_graph(), "client_id": "tab"})
    assert status == 200, answer
    await settled(client, fake)
    names = os.listdir(os.path.join(fake.paths.output, "users", ALICE_NAME))
    assert len(names) == 1
    fake.reset()
    return names[0]


async def upload(
    client: Client,
    who: dict[str, str],
    fields: Sequence[tuple[str, Any]],
    *,
    path: str = "/upload/image",
) -> tuple[int, Any]:
    form = aiohttp.FormData()
    for name, value in fields:
        if name == "image":
            form.add_field("image", value[1], filename=value[0], content_type="image/png")
        else:
            form.add_field(name, value)
    async with client.post(path, data=form, headers=who) as resp:
        text = await resp.text()
        return resp.status, (json.loads(text) if text else None)


# -- POST /prompt ------------------------------------------------------------------------------


async def test_prompt_is_rewritten_into_the_users_namespace(
    client: Client, fake_comfy: FakeComfyUI
) -> None:
    graph = save_graph("run/img")
    body: dict[str, Any] = {
        "prompt": graph,
        "client_id": "tab-1",
        "front": True,
        "number": -100,
        "prompt_id": "not-a-uuid",
        "extra_data": {"extra_pnginfo": {"workflow": {"nodes": []}}, "api_key_comfy_org": "k"},
    }
    status, answer = await submit(client, A, body)
    assert status == 200, answer
    assert str(uuid.UUID(answer["prompt_id"], version=4)) == answer["prompt_id"]
    [sent] = prompt_posts(fake_comfy)
    assert sent["prompt_id"] == answer["prompt_id"]
    assert sent["client_id"] == upstream_client_id(ALICE, "tab-1")
    assert "front" not in sent
    assert "number" not in sent
    assert sent["prompt"]["9"]["inputs"]["filename_prefix"] == f"users/{ALICE_NAME}/run/img"
    assert sent["prompt"]["1"] == graph["1"]
    assert sent["extra_data"] == body["extra_data"]  # forwarded untouched
    record = await client.app[OWNERSHIP].prompt(answer["prompt_id"])
    assert record is not None
    assert (record.owner, record.client_id) == (ALICE, sent["client_id"])
    await fake_comfy.wait_idle()
    saved = os.listdir(os.path.join(fake_comfy.paths.output, "users", ALICE_NAME, "run"))
    assert saved == ["img_00001_.png"]


async def test_prompt_without_client_id_goes_without_one(
    client: Client, fake_comfy: FakeComfyUI
) -> None:
    # ComfyUI broadcasts its events; the socket filter keeps them in A's sockets
    # (tests/security/test_tenant_broadcast.py).
    status, answer = await submit(client, A, {"prompt": save_graph()})
    assert status == 200
    [sent] = prompt_posts(fake_comfy)
    assert "client_id" not in sent
    record = await client.app[OWNERSHIP].prompt(answer["prompt_id"])
    assert record is not None
    assert (record.owner, record.client_id, record.sent_client_id) == (ALICE, "", "")


async def test_unused_canonical_prompt_id_is_kept(client: Client, fake_comfy: FakeComfyUI) -> None:
    mine = str(uuid.uuid4())
    status, answer = await submit(client, A, {"prompt": save_graph(), "prompt_id": mine})
    assert (status, answer["prompt_id"]) == (200, mine)
    assert prompt_posts(fake_comfy)[0]["prompt_id"] == mine


async def test_another_users_prompt_id_is_refused(client: Client, fake_comfy: FakeComfyUI) -> None:
    status, answer = await submit(client, A, {"prompt": save_graph()})
    assert status == 200
    await settled(client, fake_comfy)
    fake_comfy.reset()
    for who in (B, A):  # B guessing it, and A reusing it (ComfyUI would overwrite history)
        status, refused = await submit(
            client, who, {"prompt": save_graph(), "prompt_id": answer["prompt_id"]}
        )
        assert status == 400
        assert refused["error"]["type"] == "prompt_id_taken"
        assert refused["node_errors"] == {}
    assert fake_comfy.received == []
    record = await client.app[OWNERSHIP].prompt(answer["prompt_id"])
    assert record is not None
    assert record.owner == ALICE


async def test_prompt_refused_by_comfyui_is_forgotten(
    client: Client, fake_comfy: FakeComfyUI
) -> None:
    mine = str(uuid.uuid4())
    # Allowed by the workflow policy, refused by ComfyUI's validation (no images input).
    bad = {"1": {"class_type": "SaveImage", "inputs": {"filename_prefix": "x"}}}
    status, answer = await submit(client, A, {"prompt": bad, "prompt_id": mine})
    assert status == 400
    assert answer["error"]["type"] == "prompt_outputs_failed_validation"  # ComfyUI's, passed on
    assert await client.app[OWNERSHIP].prompt(mine) is None
    status, answer = await submit(client, A, {"prompt": save_graph(), "prompt_id": mine})
    assert (status, answer["prompt_id"]) == (200, mine)


@pytest.mark.parametrize("prefix", ["../x", "/tmp/x", "a/../../x", "C:\\x", "x\\..\\y"])
async def test_escaping_filename_prefix_is_refused(
    prefix: str, client: Client, fake_comfy: FakeComfyUI
) -> None:
    status, answer = await submit(client, A, {"prompt": save_graph(prefix)})
    assert status == 400
    assert answer["error"]["type"] == "filename_prefix_invalid"
    assert answer["error"]["extra_info"]["node_id"] == "9"
    assert "node 9 (SaveImage)" in answer["error"]["message"]
    assert "node_errors" in answer
    assert prompt_posts(fake_comfy) == []


async def test_priority_kept_for_a_priority_role(
    make_proxy: ProxyFactory, fake_comfy: FakeComfyUI
) -> None:
    c: Client = await make_proxy(
        fake_comfy.url,
        token=None,
        roles={"vip": {"priority": True}, "user": {}, "admin": {"admin": True}},
    )
    async with c.post(
        "/prompt", json={"prompt": save_graph(), "front": True}, headers=bearer("carol", ("vip",))
    ) as resp:
        assert resp.status == 200
    [sent] = prompt_posts(fake_comfy)
    assert sent["front"] is True
    assert sent["prompt"]["9"]["inputs"]["filename_prefix"].startswith("users/")


async def test_malformed_prompt_body_is_refused_in_comfyuis_shape(
    client: Client, fake_comfy: FakeComfyUI
) -> None:
    async with client.post(
        "/prompt", data=b"[1, 2]", headers={**A, "Content-Type": "application/json"}
    ) as resp:
        answer = await resp.json()
        # ComfyUI would fail with a 500 on a non-object: the proxy says why, and sends nothing.
        assert (resp.status, answer["error"]["type"]) == (400, "invalid_prompt")
    assert prompt_posts(fake_comfy) == []


async def test_get_prompt_passes(client: Client, fake_comfy: FakeComfyUI) -> None:
    async with client.get("/api/prompt", headers=B) as resp:
        assert resp.status == 200
        assert "exec_info" in await resp.json()


# -- GET /view ---------------------------------------------------------------------------------


async def test_own_output_is_viewable_by_its_owner_only(
    client: Client, fake_comfy: FakeComfyUI
) -> None:
    name = await alice_output(client, fake_comfy)
    own = f"users/{ALICE_NAME}"
    async with client.get(
        "/api/view", params={"filename": name, "subfolder": own, "type": "output"}, headers=A
    ) as resp:
        assert resp.status == 200
        assert (await resp.read()).startswith(b"\x89PNG")
    [seen] = fake_comfy.received
    assert (seen.query["filename"], seen.query["subfolder"]) == (name, own)
    fake_comfy.reset()

    hidden = [
        {"filename": name, "subfolder": own, "type": "output"},
        {"filename": name, "subfolder": own},
        {"filename": f"{name} [output]", "subfolder": own, "type": "input"},
        {"filename": name, "subfolder": f"users/{ALICE_NAME}/", "type": "temp"},
        {"filename": f"{own}/{name}"},  # ComfyUI would look for basename in output/
        {"filename": name, "subfolder": "users"},
    ]
    for params in hidden:
        async with client.get("/view", params=params, headers=B) as resp:
            assert resp.status == 404, params
    traversal = [
        f"/view?filename={name}&subfolder=users/{BOB_NAME}/../{ALICE_NAME}",
        f"/view?filename={name}&subfolder=users%2F{BOB_NAME}%2F%2E%2E%2F{ALICE_NAME}",
        f"/api/view?filename=..%2Fusers%2F{ALICE_NAME}%2F{name}",
        f"/view?filename=%2Foutput%2Fusers%2F{ALICE_NAME}%2F{name}",
        f"/view?filename={name}&subfolder=%2Fetc",
        f"/view?filename={name}&subfolder=users%5C{ALICE_NAME}",
        f"/view?filename={name}%00&subfolder=users/{ALICE_NAME}",
        f"/view?filename={name}&subfolder=users/{BOB_NAME}&subfolder=users/{ALICE_NAME}",
    ]
    for path in traversal:
        async with client.get(path, headers=B) as resp:
            assert resp.status == 400, path
            assert (await resp.json())["error"]["type"] == "invalid_path"
    assert fake_comfy.received == []


async def test_preview_in_temp_is_viewable_when_recorded_as_own(
    client: Client, fake_comfy: FakeComfyUI
) -> None:
    path = os.path.join(fake_comfy.paths.temp, "ComfyUI_temp_abcde_00001_.png")
    solid(8, 8, 0).save(path)
    params = {"filename": "ComfyUI_temp_abcde_00001_.png", "subfolder": "", "type": "temp"}
    async with client.get("/view", params=params, headers=A) as resp:
        assert resp.status == 404  # nobody's yet
    await client.app[OWNERSHIP].record_files(ALICE, [("temp", "", params["filename"])])
    async with client.get("/view", params=params, headers=A) as resp:
        assert resp.status == 200
    async with client.get("/view", params=params, headers=B) as resp:
        assert resp.status == 404
    assert len(fake_comfy.received) == 1


async def test_shared_input_folder_is_readable(client: Client, fake_comfy: FakeComfyUI) -> None:
    os.makedirs(os.path.join(fake_comfy.paths.input, "shared"))
    solid(8, 8, 0x00FF00).save(os.path.join(fake_comfy.paths.input, "shared", "s.png"))
    params = {"filename": "s.png", "subfolder": "shared", "type": "input"}
    async with client.get("/view", params=params, headers=B) as resp:
        assert resp.status == 200
    async with client.get("/view", params={**params, "type": "output"}, headers=B) as resp:
        assert resp.status == 404
    status, answer = await submit(client, B, {"prompt": load_graph("shared/s.png")})
    assert status == 200, answer


@pytest.mark.parametrize(
    "path", ["/view_metadata/checkpoints?filename=m.safetensors", "/view?filename=blake3:abcd"]
)
async def test_admin_only_view_forms(path: str, client: Client, fake_comfy: FakeComfyUI) -> None:
    async with client.get(path, headers=B) as resp:
        assert resp.status == 403
        assert (await resp.json())["error"]["type"] == "forbidden_role"
    assert fake_comfy.received == []
    async with client.get(path, headers=ADMIN) as resp:
        assert resp.status == 404  # forwarded: ComfyUI has no such file
    assert len(fake_comfy.received) == 1


# -- uploads -----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("fields", "subfolder"),
    [
        ([("image", ("a.png", b""))], ""),
        ([("image", ("a.png", b"")), ("subfolder", "pics"), ("type", "input")], "/pics"),
        ([("subfolder", "pics/deep"), ("image", ("a.png", b""))], "/pics/deep"),
        ([("type", "input"), ("overwrite", "true"), ("image", ("a.png", b""))], ""),
    ],
)
async def test_upload_lands_in_the_users_folder(
    fields: list[tuple[str, Any]], subfolder: str, client: Client, fake_comfy: FakeComfyUI
) -> None:
    data = png()
    fields = [(n, ("a.png", data) if n == "image" else v) for n, v in fields]
    status, answer = await upload(client, A, fields)
    assert status == 200, answer
    folder = f"users/{ALICE_NAME}{subfolder}"
    assert answer == {"name": "a.png", "subfolder": folder, "type": "input"}
    assert read_bytes(fake_comfy.paths.input, folder, "a.png") == data
    [received] = fake_comfy.received
    assert received.body.count(b'name="subfolder"') == 1
    assert received.body.count(b'name="type"') == 1
    assert await client.app[OWNERSHIP].file_owner(("input", folder, "a.png")) == ALICE
    # ... and A can use it, by the name the answer gave.
    status, answer = await submit(client, A, {"prompt": load_graph(f"{folder}/a.png")})
    assert status == 200, answer


@pytest.mark.parametrize("kind", ["output", "temp"])
@pytest.mark.parametrize("early", [True, False])
async def test_upload_to_output_or_temp_is_refused(
    kind: str, early: bool, client: Client, fake_comfy: FakeComfyUI
) -> None:
    image = ("image", ("a.png", png()))
    fields = [("type", kind), image] if early else [image, ("type", kind)]
    status, answer = await upload(client, A, fields)
    assert status == 403
    assert answer["error"]["type"] == "upload_type_forbidden"
    if early:
        assert fake_comfy.received == []
    for root in (fake_comfy.paths.output, fake_comfy.paths.temp, fake_comfy.paths.input):
        assert not exists(root, "a.png")
        assert not exists(root, "users")


@pytest.mark.parametrize("subfolder", ["../x", "/abs", "a/../../b", "a\\b"])
async def test_upload_subfolder_traversal_is_refused(
    subfolder: str, client: Client, fake_comfy: FakeComfyUI
) -> None:
    status, answer = await upload(client, A, [("subfolder", subfolder), ("image", ("a.png", b"x"))])
    assert status == 400
    assert answer["error"]["type"] == "invalid_path"
    assert fake_comfy.received == []


@pytest.mark.parametrize("filename", ["../../evil.png", "a/b.png", "..\\\\evil.png", ".."])
async def test_upload_file_name_traversal_is_refused(
    filename: str, client: Client, fake_comfy: FakeComfyUI
) -> None:
    # Written by hand: aiohttp's FormData would percent-quote the name.
    body = (
        f'--b\r\nContent-Disposition: form-data; name="image"; filename="{filename}"\r\n'
        "Content-Type: image/png\r\n\r\nx\r\n--b--\r\n"
    ).encode()
    headers = {**A, "Content-Type": "multipart/form-data; boundary=b"}
    async with client.post("/upload/image", data=body, headers=headers) as resp:
        assert resp.status == 400
        assert (await resp.json())["error"]["type"] == "invalid_path"
    assert fake_comfy.received == []


async def test_non_multipart_upload_is_refused(client: Client, fake_comfy: FakeComfyUI) -> None:
    async with client.post("/upload/image", data={"subfolder": "x"}, headers=A) as resp:
        assert resp.status == 400
        assert (await resp.json())["error"]["type"] == "bad_upload"
    assert fake_comfy.received == []


async def test_loading_another_users_upload_is_refused(
    client: Client, fake_comfy: FakeComfyUI
) -> None:
    status, _ = await upload(client, A, [("image", ("secret.png", png()))])
    assert status == 200
    fake_comfy.reset()
    for image in (f"users/{ALICE_NAME}/secret.png", f"users/{ALICE_NAME}/secret.png [input]"):
        status, refused = await submit(client, B, {"prompt": load_graph(image)})
        assert status == 400
        assert refused["error"]["type"] == "input_file_forbidden"
        assert refused["error"]["extra_info"] == {
            "node_id": "2",
            "class_type": "LoadImage",
            "input_name": "image",
        }
    status, refused = await submit(
        client, B, {"prompt": load_graph(f"users/{BOB_NAME}/../{ALICE_NAME}/secret.png")}
    )
    assert (status, refused["error"]["type"]) == (400, "input_path_invalid")
    assert prompt_posts(fake_comfy) == []


async def test_mask_original_ref_must_be_own(client: Client, fake_comfy: FakeComfyUI) -> None:
    status, answer = await upload(client, A, [("image", ("base.png", png()))])
    assert status == 200
    ref = json.dumps({"filename": "base.png", "subfolder": f"users/{ALICE_NAME}", "type": "input"})
    mask = [("image", ("mask.png", png())), ("original_ref", ref), ("subfolder", "clipspace")]
    fake_comfy.reset()
    status, refused = await upload(client, B, mask, path="/upload/mask")
    assert status == 403
    assert refused["error"]["type"] == "original_ref_forbidden"
    assert not exists(fake_comfy.paths.input, "users", BOB_NAME)
    status, answer = await upload(client, A, mask, path="/api/upload/mask")
    assert status == 200, answer
    assert answer["subfolder"] == f"users/{ALICE_NAME}/clipspace"
    assert exists(fake_comfy.paths.input, "users", ALICE_NAME, "clipspace", "mask.png")


# -- admins and switching it off ---------------------------------------------------------------


async def test_admin_is_unaffected(client: Client, fake_comfy: FakeComfyUI) -> None:
    name = await alice_output(client, fake_comfy)
    params = {"filename": name, "subfolder": f"users/{ALICE_NAME}", "type": "output"}
    async with client.get("/view", params=params, headers=ADMIN) as resp:
        assert resp.status == 200
    status, answer = await upload(
        client, ADMIN, [("image", ("adm.png", png())), ("type", "output")]
    )
    assert (status, answer["type"], answer["subfolder"]) == (200, "output", "")
    status, answer = await submit(
        client, ADMIN, {"prompt": save_graph("plain"), "client_id": "t", "front": True}
    )
    assert status == 200, answer
    sent = prompt_posts(fake_comfy)[-1]
    assert sent["prompt"]["9"]["inputs"]["filename_prefix"] == "plain"
    assert sent["front"] is True
    assert sent["client_id"] == upstream_client_id(comfy_user_id("admin"), "t")
    record = await client.app[OWNERSHIP].prompt(answer["prompt_id"])
    assert record is not None
    assert record.owner == comfy_user_id("admin")


async def test_isolation_disabled_passes_everything(
    make_proxy: ProxyFactory, fake_comfy: FakeComfyUI
) -> None:
    c: Client = await make_proxy(fake_comfy.url, token=None, isolation={"enabled": False})
    async with c.post("/prompt", json={"prompt": save_graph("x")}, headers=B) as resp:
        assert resp.status == 200
    assert prompt_posts(fake_comfy)[0]["prompt"]["9"]["inputs"]["filename_prefix"] == "x"


# -- what chain.render_errors has to add -------------------------------------------------------


async def test_hidden_file_answers_an_empty_404(client: Client, fake_comfy: FakeComfyUI) -> None:
    async with client.get("/view", params={"filename": "x.png"}, headers=B) as resp:
        assert resp.status == 404
        assert await resp.read() == b""


async def test_refused_prompt_names_nodes_in_node_errors(
    client: Client, fake_comfy: FakeComfyUI
) -> None:
    status, answer = await submit(client, A, {"prompt": save_graph("../x")})
    assert status == 400
    assert answer["node_errors"]["9"]["errors"][0]["type"] == "filename_prefix_invalid"
    assert answer["node_errors"]["9"]["class_type"] == "SaveImage"


async def test_large_upload_streams_through_intact(
    make_proxy: ProxyFactory, tmp_path: Path
) -> None:
    # record=False: the fake's request log re-feeds bodies over 128 KiB into a paused parser.
    fake = FakeComfyUI(root=tmp_path / "big", record=False)
    await fake.start()
    try:
        c: Client = await make_proxy(fake.url, token=None)
        data = os.urandom(3 * 1024 * 1024 + 17)  # many chunks; fields after the file part
        fields = [("image", ("big.png", data)), ("subfolder", "big"), ("type", "input")]
        status, answer = await upload(c, A, fields)
        assert status == 200, answer
        assert answer["subfolder"] == f"users/{ALICE_NAME}/big"
        assert read_bytes(fake.paths.input, "users", ALICE_NAME, "big", "big.png") == data
    finally:
        await fake.stop()
