"""Attack family: isolation of input files. Bob tries to make ComfyUI read Alice's uploads
(``input/users/<alice>/``) through node inputs that read files, as the instance's
``/object_info`` declares them (upload flags, folder combos), whatever the file's extension,
wrapped in ``{"__value__": ...}``, in a wrapped list, or reached through primitive nodes.
Every case asserts Bob's answer and that the fake ComfyUI received no prompt; the allowed
cases assert what it received and which file it actually read."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from aiohttp import web
from pytest_aiohttp import AiohttpServer

from proxy.tenancy.namespaces import user_folder
from tests.conftest import ProxyFactory
from tests.fakes.comfyui import FakeComfyUI
from tests.security.prompt_support import (
    ALICE,
    BOB,
    FOLDER_SECRET,
    B,
    Client,
    chain,
    image,
    node,
    policy_sections,
    prompt_posts,
    ran,
    refusal,
    shown,
    submit,
    user_file,
)

ALICE_DIR = user_folder(ALICE, FOLDER_SECRET.encode())
BOB_DIR = user_folder(BOB, FOLDER_SECRET.encode())


@pytest.fixture
async def client(make_proxy: ProxyFactory, fake_comfy: FakeComfyUI, tmp_path: Path) -> Client:
    return await make_proxy(fake_comfy.url, token=None, **policy_sections(tmp_path))


@pytest.fixture
def alices(fake_comfy: FakeComfyUI) -> dict[str, str]:
    """Alice's uploads, by kind (extensions the old checks did not know among them)."""
    return {
        "aiff": user_file(fake_comfy, ALICE, "voice.aiff"),
        "3gp": user_file(fake_comfy, ALICE, "clip.3gp"),
        "png": user_file(fake_comfy, ALICE, "face.png"),
        "none": user_file(fake_comfy, ALICE, "notes"),
    }


def loads(class_type: str, name: str, value: object, **more: dict[str, Any]) -> dict[str, Any]:
    """``class_type`` reading ``value`` as node "2", shown by PreviewAny (an output)."""
    return {
        "2": node(class_type, **{name: value}),
        **more,
        "9": node("PreviewAny", source=["2", 0]),
    }


async def refused(
    client: Client, fake: FakeComfyUI, graph: dict[str, Any], error_type: str
) -> None:
    status, answer = await submit(client, B, {"prompt": graph})
    assert status == 400, answer
    assert refusal(answer) == (error_type, {"2"})
    assert prompt_posts(fake) == []


READERS = [("LoadAudio", "audio"), ("LoadVideo", "file"), ("LoadImage", "image")]


@pytest.mark.parametrize(("class_type", "name"), READERS)
@pytest.mark.parametrize("kind", ["aiff", "3gp", "png", "none"])
async def test_another_users_file_is_refused_whatever_its_extension(
    client: Client,
    fake_comfy: FakeComfyUI,
    alices: dict[str, str],
    class_type: str,
    name: str,
    kind: str,
) -> None:
    graph = loads(class_type, name, alices[kind])
    await refused(client, fake_comfy, graph, "input_file_forbidden")


WRAPPINGS = [
    ("wrapped", lambda f: ({"__value__": f}, {})),
    ("wrapped list", lambda f: ({"__value__": ["x.wav", f]}, {})),
    ("annotated", lambda f: (f"{f} [input]", {})),
    ("primitive", lambda f: (["100", 0], chain("String", 1, f))),
    ("primitive chain", lambda f: (["100", 0], chain("String", 4, f))),
    ("wrapped at the chain's end", lambda f: (["100", 0], chain("String", 3, {"__value__": f}))),
    ("multiline primitive",
     lambda f: (["100", 0], {"100": node("PrimitiveStringMultiline", value=f)})),
]  # fmt: skip


@pytest.mark.parametrize("wrap", [w for _, w in WRAPPINGS], ids=[n for n, _ in WRAPPINGS])
@pytest.mark.parametrize(("class_type", "name"), READERS)
async def test_another_users_file_is_refused_however_it_is_written(
    client: Client,
    fake_comfy: FakeComfyUI,
    alices: dict[str, str],
    class_type: str,
    name: str,
    wrap: Any,
) -> None:
    value, more = wrap(alices["aiff"])
    await refused(
        client, fake_comfy, loads(class_type, name, value, **more), "input_file_forbidden"
    )


@pytest.mark.parametrize(
    "value",
    [
        f"{ALICE_DIR}/voice.aiff[input]",  # ComfyUI cuts 9 characters after "[output]"...
        f"{BOB_DIR}/../{ALICE_DIR.removeprefix('users/')}/voice.aiff",
        f"/abs/{ALICE_DIR}/voice.aiff",
        "",
    ],
)
async def test_a_name_read_two_ways_is_refused(
    client: Client, fake_comfy: FakeComfyUI, alices: dict[str, str], value: str
) -> None:
    await refused(client, fake_comfy, loads("LoadAudio", "audio", value), "input_path_invalid")


async def test_a_file_name_computed_by_a_node_is_refused(
    client: Client, fake_comfy: FakeComfyUI
) -> None:
    """A loader fed by a node the proxy cannot evaluate reads a name it cannot see."""
    graph = loads("LoadVideo", "file", ["5", 0], **{"5": image()})
    await refused(client, fake_comfy, graph, "input_not_literal")


async def test_own_files_load_in_every_form(
    client: Client, fake_comfy: FakeComfyUI, alices: dict[str, str]
) -> None:
    """Bob's own uploads, with extensions the old checks did not know, wrapped: forwarded as
    the proxy read them (unwrapped), and the fake reads exactly those files. (A primitive's
    STRING cannot feed a combo: ComfyUI refuses that link itself, see the chain cases above.)"""
    mine = user_file(fake_comfy, BOB, "take.aiff")
    video = user_file(fake_comfy, BOB, "cut.3gp")
    cases = [
        ("audio", loads("LoadAudio", "audio", {"__value__": mine}), mine),
        ("file", loads("LoadVideo", "file", {"__value__": f"{video} [input]"}), video),
    ]
    for name, graph, expected in cases:
        fake_comfy.reset()
        status, answer = await submit(client, B, {"prompt": graph})
        assert status == 200, answer
        [sent] = prompt_posts(fake_comfy)
        assert sent["prompt"]["2"]["inputs"] == {name: graph["2"]["inputs"][name]["__value__"]}
        await fake_comfy.wait_idle()
        runs = ran(fake_comfy, answer["prompt_id"])
        assert runs["2"][name] == sent["prompt"]["2"]["inputs"][name]  # the name ComfyUI read
        assert runs["9"]["source"].endswith(f"(input/{expected})")  # and the file it opened


async def test_shown_value_of_a_chain_is_not_a_file_read(
    client: Client, fake_comfy: FakeComfyUI, alices: dict[str, str]
) -> None:
    """A string that only flows into a text input is not confined: only inputs that read
    files are (Alice's file name as text is harmless)."""
    graph = shown(["100", 0], **chain("String", 2, alices["aiff"]))
    status, answer = await submit(client, B, {"prompt": graph})
    assert status == 200, answer
    await fake_comfy.wait_idle()
    assert ran(fake_comfy, answer["prompt_id"])["9"]["source"] == alices["aiff"]


async def test_without_a_node_catalog_prompts_are_refused(
    make_proxy: ProxyFactory, aiohttp_server: AiohttpServer, tmp_path: Path
) -> None:
    """Default deny: with no /object_info, a file input cannot be told from a text input."""
    prompts: list[bytes] = []

    async def object_info(request: web.Request) -> web.Response:
        return web.Response(status=500, text="broken custom node")

    async def prompt(request: web.Request) -> web.Response:
        prompts.append(await request.read())
        return web.json_response({"prompt_id": "x", "number": 1, "node_errors": {}})

    app = web.Application()
    app.router.add_get("/api/object_info", object_info)
    app.router.add_get("/object_info", object_info)
    app.router.add_post("/prompt", prompt)
    server = await aiohttp_server(app)
    client = await make_proxy(
        str(server.make_url("")).rstrip("/"), token=None, **policy_sections(tmp_path)
    )
    graph = loads("LoadAudio", "audio", f"{ALICE_DIR}/voice.aiff")
    async with client.post("/prompt", json={"prompt": graph}, headers=B) as resp:
        assert resp.status == 503
        assert resp.headers["Retry-After"]
        assert (await resp.json())["error"]["type"] == "catalog_unavailable"
    assert prompts == []
