"""What the UI offers, end to end: the real app with a test policy in front of the fake ComfyUI.

Roles (the defaults, with the policy file below): viewer sees nothing, user a few core nodes and
sd15 checkpoints / style LoRAs, power more nodes and every model but the denied ones, admin
everything (ComfyUI's own bytes).
"""

from __future__ import annotations

import asyncio
import zlib
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import aiohttp
import orjson
import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient, TestServer

from proxy.policy.catalog.cache import ObjectInfoCache
from proxy.policy.catalog.upstream import CATALOG
from proxy.policy.catalog.view import Catalog
from proxy.upstream.pool import POOL
from tests.conftest import ProxyFactory, bearer
from tests.fakes.comfyui import FakeComfyUI
from tests.fakes.comfyui.nodes import NodeClass

Client = TestClient[Any, Any]

POLICY_TOML = """
[policies.base]
nodes.allow = ["EmptyImage", "PreviewImage"]

[policies.viewer]
use_base = false

[policies.user]
nodes.allow = ["CheckpointLoaderSimple", "KSampler", "LoraLoader", "V3Loader"]
models.allow = ["checkpoints:sd15/*", "loras:styles/*", "embeddings:nice*", "unet_ok*"]
models.deny = ["*nsfw*"]

[policies.power]
extends = ["user"]
nodes.allow = ["UNETLoader", "VAELoader", "ImageScale"]
models.allow = ["*"]
"""

USER, POWER, VIEWER, ADMIN = (
    bearer("ursula", ("user",)),
    bearer("paul", ("power",)),
    bearer("vera", ("viewer",)),
    bearer("ada", ("admin",)),
)
MODELS = {
    "checkpoints": ["sd15/dream.safetensors", "sd15/nsfw_mix.safetensors", "sdxl/base.safetensors"],
    "loras": ["styles/ink.safetensors", "people/celeb.safetensors"],
    "vae": ["ae.safetensors"],
    "embeddings": ["nice_hands.safetensors", "bad_prompt.pt"],
}
V3_LOADER = {
    "input": {
        "required": {
            "unet_name": ["COMBO", {"options": ["unet_ok.safetensors", "unet_no.safetensors"]}],
            "weight_dtype": ["COMBO", {"options": ["default", "fp8_e4m3fn"]}],
        }
    },
    "input_order": {"required": ["unet_name", "weight_dtype"]},
    "output": ["MODEL"],
    "output_is_list": [False],
    "output_name": ["MODEL"],
    "name": "V3Loader",
    "display_name": "V3 Loader",
    "description": "",
    "python_module": "comfy_extras.v3",
    "category": "loaders",
    "output_node": False,
}


@pytest.fixture
def policy_file(tmp_path: Path) -> Path:
    path = tmp_path / "policy.toml"
    path.write_text(POLICY_TOML)
    return path


@pytest.fixture
def comfy(fake_comfy: FakeComfyUI) -> FakeComfyUI:
    for folder, names in MODELS.items():
        for name in names:
            fake_comfy.add_model(folder, name)
    # A node in the newer combo shape (the 0.3.64 capture has only the legacy one).
    fake_comfy.registry.classes["V3Loader"] = NodeClass("V3Loader", V3_LOADER)
    return fake_comfy


@pytest.fixture
async def client(make_proxy: ProxyFactory, comfy: FakeComfyUI, policy_file: Path) -> Client:
    return await make_proxy(comfy.url, token=None, policy={"files": [str(policy_file)]})


def object_info_fetches(fake: FakeComfyUI) -> int:
    return sum(1 for r in fake.received if r.path == "/api/object_info")


async def get_json(client: Client, path: str, headers: dict[str, str]) -> Any:
    resp = await client.get(path, headers=headers)
    assert resp.status == 200, await resp.text()
    assert resp.content_type == "application/json"
    return await resp.json()


def combo(info: dict[str, Any], node: str, name: str) -> list[Any]:
    spec = info[node]["input"]["required"][name]
    options: list[Any] = spec[0] if isinstance(spec[0], list) else spec[1]["options"]
    return options


# -- /object_info per role -----------------------------------------------------------------------


async def test_object_info_per_role(client: Client, comfy: FakeComfyUI) -> None:
    viewer = await get_json(client, "/api/object_info", VIEWER)
    assert viewer == {}

    user = await get_json(client, "/api/object_info", USER)
    assert set(user) == {
        "EmptyImage",
        "PreviewImage",
        "CheckpointLoaderSimple",
        "KSampler",
        "LoraLoader",
        "V3Loader",
    }
    assert combo(user, "CheckpointLoaderSimple", "ckpt_name") == ["sd15/dream.safetensors"]
    assert combo(user, "LoraLoader", "lora_name") == ["styles/ink.safetensors"]
    assert combo(user, "V3Loader", "unet_name") == ["unet_ok.safetensors"]  # newer shape
    assert combo(user, "V3Loader", "weight_dtype") == ["default", "fp8_e4m3fn"]
    assert "euler" in combo(user, "KSampler", "sampler_name")  # not a model: untouched

    power = await get_json(client, "/object_info", POWER)  # bare and /api forms alike
    assert {"UNETLoader", "VAELoader", "ImageScale"} <= set(power)
    assert "LoraLoaderModelOnly" not in power
    assert combo(power, "CheckpointLoaderSimple", "ckpt_name") == [
        "sd15/dream.safetensors",
        "sdxl/base.safetensors",
    ]  # power allows "*" but user's deny of *nsfw* is part of power (extends)
    assert combo(power, "VAELoader", "vae_name") == ["ae.safetensors"]

    direct = comfy.registry.object_info()
    resp = await client.get("/api/object_info", headers=ADMIN)
    assert resp.status == 200
    admin = await resp.json()
    assert set(admin) == set(direct)
    assert combo(admin, "CheckpointLoaderSimple", "ckpt_name") == MODELS["checkpoints"]
    assert object_info_fetches(comfy) == 1


async def test_user_never_gets_what_only_power_may_use(client: Client) -> None:
    """Isolation of copies: the power copy is built first, then the user asks."""
    power = await get_json(client, "/api/object_info", POWER)
    user = await get_json(client, "/api/object_info", USER)
    power_only_nodes = set(power) - set(user)
    assert power_only_nodes == {"UNETLoader", "VAELoader", "ImageScale"}
    assert "sdxl/base.safetensors" not in str(user)
    for path in ("/api/object_info/UNETLoader", "/api/object_info/VAELoader"):
        assert await get_json(client, path, USER) == {}
    assert await get_json(client, "/api/models/checkpoints", USER) == ["sd15/dream.safetensors"]


# -- /object_info/{class} ------------------------------------------------------------------------


async def test_object_info_class(client: Client, comfy: FakeComfyUI) -> None:
    ckpt = await get_json(client, "/api/object_info/CheckpointLoaderSimple", USER)
    assert list(ckpt) == ["CheckpointLoaderSimple"]
    assert combo(ckpt, "CheckpointLoaderSimple", "ckpt_name") == ["sd15/dream.safetensors"]
    # not allowed: exactly ComfyUI's answer for a class it does not know
    denied = await client.get("/api/object_info/UNETLoader", headers=USER)
    unknown = await client.get("/api/object_info/NoSuchNode", headers=USER)
    for resp in (denied, unknown):
        assert resp.status == 200
        assert resp.headers["Content-Type"] == "application/json; charset=utf-8"
        assert await resp.read() == b"{}"
    admin = await get_json(client, "/object_info/UNETLoader", ADMIN)
    assert admin == {"UNETLoader": comfy.registry.definition("UNETLoader")}
    # one node is cheap for ComfyUI: asked every time, by the path the client used
    asked = [r.raw_path for r in comfy.received if r.path.startswith("/api/object_info/")]
    assert asked == [
        "/api/object_info/CheckpointLoaderSimple",
        "/api/object_info/UNETLoader",
        "/api/object_info/NoSuchNode",
    ]


# -- model lists ---------------------------------------------------------------------------------


async def test_models_folder(client: Client, comfy: FakeComfyUI) -> None:
    assert await get_json(client, "/api/models/checkpoints", USER) == ["sd15/dream.safetensors"]
    assert await get_json(client, "/models/loras", USER) == ["styles/ink.safetensors"]
    assert await get_json(client, "/api/models/vae", USER) == []
    assert await get_json(client, "/api/models/vae", POWER) == ["ae.safetensors"]
    assert await get_json(client, "/api/models/checkpoints", ADMIN) == MODELS["checkpoints"]
    # ComfyUI's own answers pass: the folder list, and 404 for an unknown folder
    folders = await get_json(client, "/api/models", USER)
    assert "checkpoints" in folders
    missing = await client.get("/api/models/no_such_folder", headers=USER)
    assert missing.status == 404


async def test_embeddings(client: Client) -> None:
    assert await get_json(client, "/api/embeddings", USER) == ["nice_hands"]
    assert await get_json(client, "/api/embeddings", VIEWER) == []
    assert sorted(await get_json(client, "/api/embeddings", ADMIN)) == ["bad_prompt", "nice_hands"]


async def test_experiment_models(client: Client, comfy: FakeComfyUI) -> None:
    entries = await get_json(client, "/api/experiment/models/checkpoints", USER)
    assert [e["name"] for e in entries] == ["sd15/dream.safetensors"]
    assert set(entries[0]) == {"name", "pathIndex", "modified", "created", "size"}
    loras = await get_json(client, "/api/experiment/models/loras", POWER)
    assert sorted(e["name"] for e in loras) == sorted(MODELS["loras"])
    # the folder list (not model names) passes as ComfyUI sends it
    folders = await get_json(client, "/api/experiment/models", USER)
    assert "checkpoints" in [f["name"] for f in folders]
    # a preview of a model the caller may not see: ComfyUI's 404 for a missing one
    path = comfy.add_model("checkpoints", "sdxl/base.webp")
    await asyncio.to_thread(Path(path).write_bytes, b"RIFF....WEBP")
    preview = "/api/experiment/models/preview/checkpoints/0/sdxl/base.safetensors"
    hidden = await client.get(preview, headers=USER)
    assert hidden.status == 404
    assert await hidden.read() == b""
    shown = await client.get(preview, headers=POWER)
    assert shown.status == 200
    assert await shown.read() == b"RIFF....WEBP"


# -- transparency --------------------------------------------------------------------------------


async def test_etag_head_and_no_encoding_when_comfyui_does_not_compress(client: Client) -> None:
    plain = await client.get("/api/object_info", headers=USER, auto_decompress=False)
    body = await plain.read()
    assert plain.headers.get("Content-Encoding") is None  # as ComfyUI by default
    assert plain.headers["Content-Type"] == "application/json; charset=utf-8"
    etag = plain.headers["ETag"]

    again = await client.get("/api/object_info", headers={**USER, "If-None-Match": etag})
    assert again.status == 304
    assert await again.read() == b""

    head = await client.head("/api/object_info", headers=USER)
    assert head.status == 200
    assert int(head.headers["Content-Length"]) == len(body)

    # the tag is compared with the caller's own copy: another role's tag never validates
    other = await client.get("/api/object_info", headers={**POWER, "If-None-Match": etag})
    assert other.status == 200


@web.middleware
async def compress_body(
    request: web.Request, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
) -> web.StreamResponse:
    """ComfyUI's ``--enable-compress-response-body`` middleware (server.py), verbatim."""
    accept_encoding = request.headers.get("Accept-Encoding", "")
    response = await handler(request)
    if not isinstance(response, web.Response):
        return response
    if response.content_type not in ["application/json", "text/plain"]:
        return response
    if response.body and "gzip" in accept_encoding:
        response.enable_compression()
    return response


def decoded(raw: bytes, coding: str | None) -> bytes:
    if coding is None:
        return raw
    return zlib.decompress(raw, 16 + zlib.MAX_WBITS if coding == "gzip" else zlib.MAX_WBITS)


@pytest.mark.parametrize(
    ("accept", "coding"),
    [("gzip, deflate", "deflate"), ("gzip", "gzip"), ("br", None), ("identity", None)],
)
async def test_encoded_exactly_as_a_compressing_comfyui_encodes(
    make_proxy: ProxyFactory, policy_file: Path, tmp_path: Path, accept: str, coding: str | None
) -> None:
    fakes = []
    for name in ("behind", "direct"):
        fake = FakeComfyUI(root=tmp_path / name)
        fake.app.middlewares.append(compress_body)
        fake.add_model("checkpoints", "sd15/dream.safetensors")
        await fake.start()
        fakes.append(fake)
    behind, direct = fakes
    try:
        client = await make_proxy(behind.url, token=None, policy={"files": [str(policy_file)]})
        async with aiohttp.ClientSession(auto_decompress=False) as session:
            for path in ("/api/object_info", "/api/models/checkpoints", "/api/embeddings"):
                for caller in (USER, ADMIN):
                    headers = {**caller, "Accept-Encoding": accept}
                    via = await client.get(path, headers=headers, auto_decompress=False)
                    async with session.get(direct.url + path, headers=headers) as ref:
                        assert via.status == ref.status == 200
                        assert via.headers.get("Content-Encoding") == coding, path
                        assert ref.headers.get("Content-Encoding") == coding, path
                        got = orjson.loads(decoded(await via.read(), coding))
                        if caller is ADMIN:  # unfiltered: the same as ComfyUI's
                            assert got == orjson.loads(decoded(await ref.read(), coding))
            user = await get_json(client, "/api/object_info", {**USER, "Accept-Encoding": accept})
            assert combo(user, "CheckpointLoaderSimple", "ckpt_name") == ["sd15/dream.safetensors"]
    finally:
        for fake in fakes:
            await fake.stop()


async def test_other_methods_pass_through(client: Client, comfy: FakeComfyUI) -> None:
    resp = await client.post("/api/object_info", headers=ADMIN)
    assert resp.status == 405  # ComfyUI's own answer: no POST route there
    assert comfy.received[-1].method == "POST"


# -- the cache -----------------------------------------------------------------------------------


def object_info_cache(client: Client) -> ObjectInfoCache:
    catalog: Catalog = client.app[CATALOG]
    return catalog.cache(client.app[POOL].home())


async def test_many_requests_one_upstream_fetch(client: Client, comfy: FakeComfyUI) -> None:
    roles = (USER, POWER, VIEWER, ADMIN)
    answers = await asyncio.gather(
        *(client.get("/api/object_info", headers=roles[i % 4]) for i in range(40))
    )
    assert all(r.status == 200 for r in answers)
    assert object_info_fetches(comfy) == 1
    fetch = next(r for r in comfy.received if r.path == "/api/object_info")
    assert "Authorization" not in fetch.headers  # the proxy's credentials never go upstream
    assert fetch.headers["Comfy-User"]  # on behalf of whoever missed first
    for _ in range(10):
        await get_json(client, "/api/object_info", USER)
    assert object_info_fetches(comfy) == 1


class Clock:
    def __init__(self, cache: ObjectInfoCache) -> None:
        self.now = cache.clock()

    def __call__(self) -> float:
        return self.now


async def test_ttl_expiry_refreshes_once_in_the_background(
    client: Client, comfy: FakeComfyUI
) -> None:
    before = await get_json(client, "/api/object_info", USER)
    cache = object_info_cache(client)
    clock = Clock(cache)
    cache.clock = clock
    comfy.add_model("checkpoints", "sd15/new.safetensors")
    clock.now += cache.ttl + 1
    stale = await asyncio.gather(*(client.get("/api/object_info", headers=USER) for _ in range(5)))
    for resp in stale:  # served the old copy at once
        assert await resp.json() == before
    await client.app[CATALOG].idle()
    assert object_info_fetches(comfy) == 2  # one refresh for all five
    fresh = await get_json(client, "/api/object_info", USER)
    assert combo(fresh, "CheckpointLoaderSimple", "ckpt_name") == [
        "sd15/dream.safetensors",
        "sd15/new.safetensors",
    ]
    assert object_info_fetches(comfy) == 2


async def test_policy_reload_invalidates(
    client: Client, comfy: FakeComfyUI, policy_file: Path
) -> None:
    user = await get_json(client, "/api/object_info", USER)
    assert "ImageScale" not in user
    changed = POLICY_TOML.replace('"V3Loader"]', '"V3Loader", "ImageScale"]')
    changed = changed.replace('"checkpoints:sd15/*"', '"checkpoints:sdxl/*"')
    await asyncio.to_thread(policy_file.write_text, changed)
    reload = await client.post("/admin/reload", headers=ADMIN)
    assert reload.status == 200, await reload.text()
    reloaded = await get_json(client, "/api/object_info", USER)
    assert "ImageScale" in reloaded
    assert combo(reloaded, "CheckpointLoaderSimple", "ckpt_name") == ["sdxl/base.safetensors"]
    assert await get_json(client, "/api/models/checkpoints", USER) == ["sdxl/base.safetensors"]
    await client.app[CATALOG].idle()
    assert object_info_fetches(comfy) == 2  # the reload also refetched, in the background
    # a bad file keeps the old policy (and its copies) in force
    await asyncio.to_thread(policy_file.write_text, "[policies.user]\nnodes.allow = 3\n")
    refused = await client.post("/admin/reload", headers=ADMIN)
    assert refused.status == 422
    assert await get_json(client, "/api/object_info", USER) == reloaded


# -- upstream errors -----------------------------------------------------------------------------


class FlakyComfy:
    """A minimal upstream whose /object_info answers are scripted."""

    def __init__(self, *answers: Callable[[], web.Response]) -> None:
        self.answers = list(answers)
        self.calls = 0
        app = web.Application()
        app.router.add_get("/object_info", self.object_info)  # an old ComfyUI: no /api mirror
        self.server = TestServer(app)

    async def object_info(self, request: web.Request) -> web.Response:
        self.calls += 1
        return self.answers.pop(0)() if len(self.answers) > 1 else self.answers[0]()


def ok(info: dict[str, Any]) -> Callable[[], web.Response]:
    return lambda: web.json_response(info)


def boom() -> web.Response:
    return web.Response(status=500, text="500 Internal Server Error", content_type="text/plain")


async def test_upstream_error_passes_through_uncached_then_stale_is_served(
    make_proxy: ProxyFactory, policy_file: Path
) -> None:
    info = {"EmptyImage": {"input": {}, "output": ["IMAGE"]}, "SaveImage": {"input": {}}}
    flaky = FlakyComfy(boom, ok(info), boom)
    await flaky.server.start_server()
    try:
        url = str(flaky.server.make_url("")).rstrip("/")
        client = await make_proxy(url, token=None, policy={"files": [str(policy_file)]})
        first = await client.get("/object_info", headers=USER)  # an old ComfyUI: no /api
        assert first.status == 500  # ComfyUI's error, as it was
        assert await first.text() == "500 Internal Server Error"
        assert first.headers["Content-Type"].startswith("text/plain")
        assert await get_json(client, "/object_info", USER) == {"EmptyImage": info["EmptyImage"]}
        assert flaky.calls == 2  # the error was not cached
        cache = object_info_cache(client)
        clock = Clock(cache)
        cache.clock = clock
        clock.now += cache.ttl + 1
        assert await get_json(client, "/api/object_info", USER) == {
            "EmptyImage": info["EmptyImage"]
        }
        await client.app[CATALOG].idle()
        assert flaky.calls == 3  # the refresh (/api/object_info: 404, then /object_info) failed
        # ... and the stale copy stays in force
        assert await get_json(client, "/api/object_info", ADMIN) == info
    finally:
        await flaky.server.close()


async def test_unreachable_upstream_is_a_clear_502(
    make_proxy: ProxyFactory, policy_file: Path, unused_tcp_port: int
) -> None:
    client = await make_proxy(
        f"http://127.0.0.1:{unused_tcp_port}", token=None, policy={"files": [str(policy_file)]}
    )
    resp = await client.get("/api/object_info", headers=USER)
    assert resp.status == 502
    assert (await resp.json())["error"]["type"] == "upstream_unavailable"


async def test_policy_off_filters_nothing(make_proxy: ProxyFactory, comfy: FakeComfyUI) -> None:
    client = await make_proxy(comfy.url, token=None, policy={"enabled": False})
    info = await get_json(client, "/api/object_info", VIEWER)
    assert set(info) == set(comfy.registry.classes)
    assert await get_json(client, "/api/models/checkpoints", USER) == MODELS["checkpoints"]


async def test_a_model_list_that_cannot_be_read_is_not_passed_on(
    make_proxy: ProxyFactory, policy_file: Path
) -> None:
    """SECURITY: unfiltered, it would show a user what their role may not see."""

    async def not_json(request: web.Request) -> web.Response:
        return web.Response(text="<html>sd15/a, sdxl/b</html>")

    app = web.Application()
    app.router.add_get("/models/checkpoints", not_json)
    server = TestServer(app)
    await server.start_server()
    try:
        url = str(server.make_url("")).rstrip("/")
        client = await make_proxy(url, token=None, policy={"files": [str(policy_file)]})
        resp = await client.get("/models/checkpoints", headers=USER)
        assert resp.status == 502
        assert (await resp.json())["error"]["type"] == "upstream_bad_catalog"
        admin = await client.get("/models/checkpoints", headers=ADMIN)
        assert admin.status == 200  # an admin gets ComfyUI's answer as it is
        assert await admin.text() == "<html>sd15/a, sdxl/b</html>"
    finally:
        await server.close()
