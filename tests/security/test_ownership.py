"""Ownership attacks (issue 13, item 3): user B tries to have A's files attributed to B.

ComfyUI's ``Preview3D`` (in the builtin policy's base allow list) returns its ``camera_info``
input verbatim as its UI output, so a ``{filename, subfolder, type}`` dict of B's choosing
comes back in B's own ``executed`` event, history entry and job. Those dicts used to be
recorded as B's files. Every case below has B name one of A's files (an upload, a saved output,
a preview) that way, then try ``/view``, ``LoadImage`` and a mask upload's ``original_ref``:
each must be refused, and the fake ComfyUI must have received no ``/view`` of the file and no
prompt naming it. The folder-name cases show that the folder a user's files live in cannot be
derived from the user's name.

B is given A's real folder name throughout (worst case: it leaked); with keyed folder names B
would normally not even know it.
"""

from __future__ import annotations

import itertools
import json
import os
from collections.abc import Callable
from typing import Any
from urllib.parse import urlencode

import aiohttp
import pytest
from aiohttp.test_utils import TestClient

from proxy.comfy.records import FileRef
from proxy.errors import SettingsError
from proxy.principal import comfy_user_id
from proxy.settings import redacted
from proxy.supervisor import _shared_folder_secret
from proxy.tenancy.namespaces import (
    FOLDERS,
    TAG_HEX_DIGITS,
    legacy_user_folder,
    user_folder,
)
from proxy.tenancy.ownership import OWNERSHIP
from tests.conftest import ProxyFactory, bearer, make_settings
from tests.fakes.comfyui import FakeComfyUI
from tests.integration.multi_support import Fakes, fakes, multi_proxy
from tests.support.graphs import png

Client = TestClient[Any, Any]
ALICE, BOB = comfy_user_id("alice"), comfy_user_id("bob")
A, B = bearer("alice"), bearer("bob")
SECRET = "ownership-test-folder-secret-0123456789abcdef"
OTHER_SECRET = "another-folder-secret-of-another-deployment-0123"
_colors = itertools.count(0x310000, 7919)  # a new graph every time: nothing is cached

__all__ = ["fakes", "multi_proxy"]  # fixtures used by name


@pytest.fixture
async def client(make_proxy: ProxyFactory, fake_comfy: FakeComfyUI) -> Client:
    proxy: Client = await make_proxy(
        fake_comfy.url, token=None, isolation={"folder_secret": SECRET}
    )
    return proxy


# -- helpers ---------------------------------------------------------------------------------


def image_graph(final: dict[str, Any], color: int | None = None) -> dict[str, Any]:
    """EmptyImage -> ``final`` (a node taking ``images``)."""
    value = next(_colors) % 0xFFFFFF if color is None else color
    empty = {"width": 8, "height": 8, "batch_size": 1, "color": value}
    return {
        "1": {"class_type": "EmptyImage", "inputs": empty},
        "2": {**final, "inputs": {"images": ["1", 0], **final.get("inputs", {})}},
    }


def echo_graph(node: str, item: dict[str, Any], *, wrapped: bool) -> dict[str, Any]:
    """One Preview3D-like node returning ``item`` in its UI output (``{"result": ["", item]}``);
    ``wrapped``: given as ``{"__value__": item}``, which ComfyUI unwraps before running it."""
    camera_info = {"__value__": item} if wrapped else item
    return {"7": {"class_type": node, "inputs": {"model_file": "", "camera_info": camera_info}}}


def prompt_posts(fake: FakeComfyUI) -> list[Any]:
    return [r for r in fake.received if r.method == "POST" and r.path.endswith("/prompt")]


async def submit(client: Client, who: dict[str, str], body: dict[str, Any]) -> tuple[int, Any]:
    async with client.post("/prompt", json=body, headers=who) as resp:
        return resp.status, await resp.json()


async def get_json(client: Client, path: str, who: dict[str, str]) -> Any:
    async with client.get(path, headers=who) as resp:
        assert resp.status == 200, await resp.text()
        return await resp.json()


async def upload(
    client: Client, who: dict[str, str], path: str = "/upload/image", **fields: str
) -> tuple[int, Any]:
    form = aiohttp.FormData()
    form.add_field("image", png(), filename="secret.png", content_type="image/png")
    for name, value in fields.items():
        form.add_field(name, value)
    async with client.post(path, data=form, headers=who) as resp:
        text = await resp.text()
        return resp.status, (json.loads(text) if text else None)


async def run(
    client: Client, fake: FakeComfyUI, who: dict[str, str], prompt: dict[str, Any], tab: str
) -> tuple[str, list[Any]]:
    """Submit ``prompt`` as ``who`` with a socket open on ``tab``; its id and every event the
    socket got up to the prompt's end."""
    async with client.ws_connect(f"/ws?clientId={tab}", headers=who) as ws:
        status, answer = await submit(client, who, {"prompt": prompt, "client_id": tab})
        assert status == 200, answer
        prompt_id = answer["prompt_id"]
        events = await until_done(ws, prompt_id)
    await fake.wait_idle()
    return prompt_id, events


async def until_done(ws: aiohttp.ClientWebSocketResponse, prompt_id: str) -> list[Any]:
    events = []
    while True:
        msg = await ws.receive(timeout=10)
        if msg.type is not aiohttp.WSMsgType.TEXT:
            continue
        event = json.loads(msg.data)
        events.append(event)
        data = event.get("data", {})
        done = event["type"] == "executing" and data.get("node") is None
        if done and data.get("prompt_id") == prompt_id:
            return events


def executed_outputs(events: list[Any]) -> list[Any]:
    return [e["data"]["output"] for e in events if e["type"] == "executed"]


def view_query(ref: FileRef) -> str:
    kind, subfolder, name = ref
    return "/view?" + urlencode({"filename": name, "subfolder": subfolder, "type": kind})


def loader_value(ref: FileRef) -> str:
    kind, subfolder, name = ref
    return f"{subfolder}/{name} [{kind}]" if subfolder else f"{name} [{kind}]"


def views_of(fake: FakeComfyUI, ref: FileRef) -> list[Any]:
    """``/view`` requests for ``ref``'s file name that reached ``fake``."""
    return [
        r for r in fake.received if r.path == "/view" and ref[2] in r.query.getall("filename", [])
    ]


def prompts_naming(fake: FakeComfyUI, ref: FileRef) -> list[Any]:
    return [r for r in fake.received if r.path == "/prompt" and ref[2].encode() in r.body]


# -- A's files --------------------------------------------------------------------------------


async def alice_upload(client: Client, fake: FakeComfyUI) -> FileRef:
    status, answer = await upload(client, A)
    assert status == 200, answer
    return (answer["type"], answer["subfolder"], answer["name"])


async def alice_output(client: Client, fake: FakeComfyUI) -> FileRef:
    saver = {"class_type": "SaveImage", "inputs": {"filename_prefix": "private"}}
    _, events = await run(client, fake, A, image_graph(saver), "a-tab")
    [image] = executed_outputs(events)[0]["images"]
    return (image["type"], image["subfolder"], image["filename"])


async def alice_unseen_output(client: Client, fake: FakeComfyUI) -> FileRef:
    """A's SaveImage submitted without a socket and never read back: no record of it at all."""
    saver = {"class_type": "SaveImage", "inputs": {"filename_prefix": "unseen"}}
    status, answer = await submit(client, A, {"prompt": image_graph(saver)})
    assert status == 200, answer
    await fake.wait_idle()
    folder = client.app[FOLDERS].of(ALICE)
    [name] = [n for n in os.listdir(os.path.join(fake.paths.output, folder)) if "unseen" in n]
    ref = ("output", folder, name)
    assert await client.app[OWNERSHIP].file_owner(ref) is None
    return ref


async def alice_preview(client: Client, fake: FakeComfyUI) -> FileRef:
    """A's PreviewImage: recorded as A's from her socket (she can view it, see below)."""
    _, events = await run(client, fake, A, image_graph({"class_type": "PreviewImage"}), "a-tab")
    [image] = executed_outputs(events)[0]["images"]
    ref = (image["type"], image["subfolder"], image["filename"])
    assert await client.app[OWNERSHIP].file_owner(ref) == ALICE
    return ref


async def alice_unseen_preview(client: Client, fake: FakeComfyUI) -> FileRef:
    """A's PreviewImage submitted without a socket and never read back: nobody claimed it."""
    before = set(os.listdir(fake.paths.temp))
    status, answer = await submit(
        client, A, {"prompt": image_graph({"class_type": "PreviewImage"})}
    )
    assert status == 200, answer
    await fake.wait_idle()
    [name] = set(os.listdir(fake.paths.temp)) - before
    ref = ("temp", "", name)
    assert await client.app[OWNERSHIP].file_owner(ref) is None
    return ref


TARGETS: dict[str, Callable[[Client, FakeComfyUI], Any]] = {
    "upload": alice_upload,
    "output": alice_output,
    "unclaimed-output": alice_unseen_output,
    "preview": alice_preview,
    "unclaimed-preview": alice_unseen_preview,
}


# -- the attack: B echoes A's file through a node's UI output -----------------------------------


async def b_refused_everywhere(client: Client, fake: FakeComfyUI, ref: FileRef) -> None:
    """B's ``/view``, ``LoadImage`` and ``original_ref`` of ``ref``: all refused, and the fake
    received neither a ``/view`` of the file nor a prompt or upload naming it."""
    assert await client.app[OWNERSHIP].file_owner(ref) != BOB
    fake.reset()
    async with client.get(view_query(ref), headers=B) as resp:
        assert resp.status == 404  # like a missing file
        assert await resp.read() == b""
    load = {
        "2": {"class_type": "LoadImage", "inputs": {"image": loader_value(ref)}},
        "9": {"class_type": "SaveImage", "inputs": {"images": ["2", 0], "filename_prefix": "x"}},
    }
    status, answer = await submit(client, B, {"prompt": load})
    assert status == 400, answer
    assert answer["error"]["type"] == "input_file_forbidden"
    assert answer["node_errors"]["2"]["errors"][0]["type"] == "input_file_forbidden"
    original = json.dumps({"filename": ref[2], "subfolder": ref[1], "type": ref[0]})
    status, answer = await upload(client, B, "/upload/mask", original_ref=original)
    assert status == 403, answer
    assert answer["error"]["type"] == "original_ref_forbidden"
    assert views_of(fake, ref) == []
    assert prompts_naming(fake, ref) == []
    assert not [r for r in fake.received if r.path.startswith("/upload")]


@pytest.mark.parametrize("wrapped", [False, True], ids=["literal", "__value__"])
@pytest.mark.parametrize("node", ["Preview3D", "Preview3DAnimation"])
@pytest.mark.parametrize("target", list(TARGETS))
async def test_a_file_echoed_by_a_node_is_not_the_echoers(
    client: Client, fake_comfy: FakeComfyUI, target: str, node: str, wrapped: bool
) -> None:
    ref = await TARGETS[target](client, fake_comfy)
    item = {"filename": ref[2], "subfolder": ref[1], "type": ref[0]}
    if wrapped:
        # An object inside {"__value__": ...} is refused when the prompt is read
        # (proxy.comfy: ComfyUI would hand it to the node unread): the echo never runs.
        before = len(prompt_posts(fake_comfy))
        status, answer = await submit(
            client, B, {"prompt": echo_graph(node, item, wrapped=True), "client_id": "b-tab"}
        )
        assert (status, answer["error"]["type"]) == (400, "unsupported_literal")
        assert len(prompt_posts(fake_comfy)) == before
        await b_refused_everywhere(client, fake_comfy, ref)
        return
    prompt_id, events = await run(
        client, fake_comfy, B, echo_graph(node, item, wrapped=wrapped), "b-tab"
    )
    # The echo happened, as in ComfyUI: A's file named in B's executed event, B's history
    # entry and B's job, all of which are B's own and pass.
    assert executed_outputs(events) == [{"result": ["", item]}]
    entry = (await get_json(client, f"/history/{prompt_id}", B))[prompt_id]
    assert entry["outputs"]["7"] == {"result": ["", item]}
    assert prompt_id in await get_json(client, "/history", B)
    jobs = await get_json(client, "/api/jobs", B)
    assert [job["id"] for job in jobs["jobs"]] == [prompt_id]
    job = await get_json(client, f"/api/jobs/{prompt_id}", B)
    assert job["outputs"]["7"] == {"result": ["", item]}
    await b_refused_everywhere(client, fake_comfy, ref)


async def test_echo_in_a_preview_nodes_graph_is_not_attributed(
    client: Client, fake_comfy: FakeComfyUI
) -> None:
    """B's graph also has a real preview node: only that node's own previews become B's."""
    ref = await alice_upload(client, fake_comfy)
    item = {"filename": ref[2], "subfolder": ref[1], "type": ref[0]}
    prompt = {
        **image_graph({"class_type": "PreviewImage"}),
        **echo_graph("Preview3D", item, wrapped=False),
    }
    prompt_id, events = await run(client, fake_comfy, B, prompt, "b-tab")
    [own] = [o["images"][0] for o in executed_outputs(events) if "images" in o]
    await get_json(client, f"/history/{prompt_id}", B)
    async with client.get(
        view_query((own["type"], own["subfolder"], own["filename"])), headers=B
    ) as resp:
        assert resp.status == 200  # B's own preview is B's
    await b_refused_everywhere(client, fake_comfy, ref)


async def test_an_identical_graph_answered_from_cache_does_not_hand_over_a_preview(
    client: Client, fake_comfy: FakeComfyUI
) -> None:
    """ComfyUI's cache answers B's identical PreviewImage with A's file name (a real preview
    node of B's own prompt): A claimed it first, so it stays A's."""
    color = next(_colors) % 0xFFFFFF
    graph = image_graph({"class_type": "PreviewImage"}, color)
    _, events = await run(client, fake_comfy, A, graph, "a-tab")
    [mine] = executed_outputs(events)[0]["images"]
    prompt_id, events = await run(
        client, fake_comfy, B, image_graph({"class_type": "PreviewImage"}, color), "b-tab"
    )
    [replayed] = executed_outputs(events)[0]["images"]
    assert replayed == mine  # the cache named A's file in B's event
    await get_json(client, f"/history/{prompt_id}", B)
    await get_json(client, f"/api/jobs/{prompt_id}", B)
    ref = (mine["type"], mine["subfolder"], mine["filename"])
    assert await client.app[OWNERSHIP].file_owner(ref) == ALICE
    await b_refused_everywhere(client, fake_comfy, ref)
    async with client.get(view_query(ref), headers=A) as resp:
        assert resp.status == 200  # still A's


@pytest.mark.parametrize("via", ["socket", "history", "job"])
async def test_own_previews_stay_viewable(
    client: Client, fake_comfy: FakeComfyUI, via: str
) -> None:
    """The control: what the proxy attributes (a PreviewImage of the user's own prompt, learnt
    from the socket, the history or the job) is the user's, and only the user's."""
    prompt = image_graph({"class_type": "PreviewImage"})
    if via == "socket":
        prompt_id, events = await run(client, fake_comfy, A, prompt, "a-tab")
        [image] = executed_outputs(events)[0]["images"]
    else:
        status, answer = await submit(client, A, {"prompt": prompt})
        assert status == 200, answer
        prompt_id = answer["prompt_id"]
        await fake_comfy.wait_idle()
        if via == "history":
            entry = (await get_json(client, f"/history/{prompt_id}", A))[prompt_id]
        else:
            entry = await get_json(client, f"/api/jobs/{prompt_id}", A)
        [image] = entry["outputs"]["2"]["images"]
    ref = (image["type"], image["subfolder"], image["filename"])
    fake_comfy.reset()
    async with client.get(view_query(ref), headers=A) as resp:
        assert resp.status == 200
    assert len(views_of(fake_comfy, ref)) == 1
    await b_refused_everywhere(client, fake_comfy, ref)


# -- folder names ----------------------------------------------------------------------------


def test_folder_names_are_keyed_and_not_derivable_from_the_user_name() -> None:
    one, two = user_folder(ALICE, SECRET.encode()), user_folder(ALICE, OTHER_SECRET.encode())
    assert one != two
    assert one.startswith(f"users/{ALICE}-")
    assert two.startswith(f"users/{ALICE}-")
    tag = one.rsplit("-", 1)[1]
    assert len(tag) == TAG_HEX_DIGITS
    assert set(tag) <= set("0123456789abcdef")
    assert one != legacy_user_folder(ALICE)  # the old, predictable name
    assert user_folder(BOB, SECRET.encode()).rsplit("-", 1)[1] != tag  # per user
    # Another user's comfy_user is no help: the tag is not a function of names alone.
    assert user_folder(ALICE, b"") != one
    assert user_folder(ALICE, SECRET.encode()) == one  # stable


async def test_folder_names_are_stable_across_app_instances_with_one_secret(
    make_proxy: ProxyFactory, fake_comfy: FakeComfyUI
) -> None:
    """Two replicas (or a restart) with the same secret put A's files in one folder; a
    deployment with another secret in another; and B reaches none of them."""
    replicas = [
        await make_proxy(fake_comfy.url, token=None, isolation={"folder_secret": secret})
        for secret in (SECRET, SECRET, OTHER_SECRET)
    ]
    folders = []
    for replica in replicas:
        status, answer = await upload(replica, A)
        assert status == 200, answer
        folders.append(answer["subfolder"])
        assert answer["subfolder"] == replica.app[FOLDERS].of(ALICE)
    assert folders[0] == folders[1] == user_folder(ALICE, SECRET.encode())
    assert folders[2] == user_folder(ALICE, OTHER_SECRET.encode()) != folders[0]
    fake_comfy.reset()
    for replica in replicas:
        ref = ("input", folders[0], "secret.png")
        async with replica.get(view_query(ref), headers=B) as resp:
            assert resp.status == 404
    assert [r for r in fake_comfy.received if r.path == "/view"] == []


def test_folder_secret_settings() -> None:
    with pytest.raises(SettingsError, match=r"isolation\.folder_secret"):
        make_settings("http://127.0.0.1:1", isolation={"folder_secret": "too-short"})
    settings = make_settings("http://127.0.0.1:1", isolation={"folder_secret": SECRET})
    assert redacted(settings)["isolation"]["folder_secret"] == "<redacted>"


def test_supervisor_gives_its_workers_one_folder_secret() -> None:
    """Without a configured secret, one ``serve --workers N`` run still names folders alike
    in every worker (each would otherwise generate its own)."""
    bare = make_settings("http://127.0.0.1:1")
    shared = _shared_folder_secret(bare)
    assert len(shared.isolation.folder_secret) >= 32
    configured = make_settings("http://127.0.0.1:1", isolation={"folder_secret": SECRET})
    assert _shared_folder_secret(configured) is configured


# -- several instances: the WebSocket fan-in and merged history ------------------------------


async def test_fanin_and_merged_views_do_not_attribute_echoes(
    multi_proxy: Callable[..., Any],
    fakes: Fakes,
) -> None:
    client: Client = await multi_proxy(isolation={"folder_secret": SECRET})
    status, answer = await upload(client, A)
    assert status == 200, answer
    ref = (answer["type"], answer["subfolder"], answer["name"])
    item = {"filename": ref[2], "subfolder": ref[1], "type": ref[0]}
    async with client.ws_connect("/ws?clientId=b-tab", headers=B) as ws:  # fan-in: 3 sockets
        body = {"prompt": echo_graph("Preview3D", item, wrapped=False), "client_id": "b-tab"}
        status, answer = await submit(client, B, body)
        assert status == 200, answer
        prompt_id = answer["prompt_id"]
        events = await until_done(ws, prompt_id)
    assert executed_outputs(events) == [{"result": ["", item]}]
    for fake in fakes:
        await fake.wait_idle()
    merged = await get_json(client, "/history", B)  # merged over the instances
    assert merged[prompt_id]["outputs"]["7"] == {"result": ["", item]}
    await get_json(client, f"/history/{prompt_id}", B)  # the prompt's instance
    assert [j["id"] for j in (await get_json(client, "/api/jobs", B))["jobs"]] == [prompt_id]
    await get_json(client, f"/api/jobs/{prompt_id}", B)
    assert await client.app[OWNERSHIP].file_owner(ref) != BOB
    for fake in fakes:
        fake.reset()
    async with client.get(view_query(ref), headers=B) as resp:
        assert resp.status == 404
    load = {
        "2": {"class_type": "LoadImage", "inputs": {"image": loader_value(ref)}},
        "9": {"class_type": "SaveImage", "inputs": {"images": ["2", 0], "filename_prefix": "x"}},
    }
    status, answer = await submit(client, B, {"prompt": load})
    assert status == 400, answer
    assert answer["error"]["type"] == "input_file_forbidden"
    for fake in fakes:
        assert views_of(fake, ref) == []
        assert prompts_naming(fake, ref) == []
