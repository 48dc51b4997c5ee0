"""What the UI offers with several ComfyUI instances: their catalogs united, filtered per role.

Three fake instances with different node sets and models (``gpu-a``: every node, sd15 dream and a
style LoRA; ``gpu-b``: a few nodes, sdxl; ``gpu-c``: a few nodes plus a custom ``V3Loader``, sd15
other). ``/object_info``, ``/object_info/{class}`` and the model lists answer the union of the
reachable instances, filtered by the caller's policy; an instance joining or leaving changes
the union; an instance that is down is left out, the answer does not wait for it.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient, TestServer

from proxy.multi.merge import DEGRADED_HEADER
from proxy.policy.catalog.upstream import CATALOG
from proxy.policy.catalog.view import Catalog
from proxy.upstream.pool import POOL, Upstream, UpstreamPool
from tests.conftest import ProxyFactory, bearer
from tests.fakes.comfyui import FakeComfyUI
from tests.fakes.comfyui.nodes import NodeClass
from tests.integration.test_policy_catalog import V3_LOADER, combo

Client = TestClient[Any, Any]

POLICY_TOML = """
[policies.base]
nodes.allow = ["EmptyImage", "PreviewImage"]

[policies.user]
nodes.allow = ["CheckpointLoaderSimple", "LoraLoader", "V3Loader"]
models.allow = ["checkpoints:sd15/*", "loras:styles/*", "embeddings:nice*", "unet_ok*"]
"""
USER, ADMIN = bearer("ursula", ("user",)), bearer("ada", ("admin",))
DREAM, OTHER, SDXL = "sd15/dream.safetensors", "sd15/other.safetensors", "sdxl/base.safetensors"
FEW = {"CheckpointLoaderSimple", "LoraLoader", "EmptyImage", "PreviewImage", "SaveImage"}
SPECS: dict[str, tuple[set[str] | None, dict[str, list[str]]]] = {
    "gpu-a": (
        None,
        {
            "checkpoints": [DREAM],
            "loras": ["styles/ink.safetensors", "people/celeb.safetensors"],
            "embeddings": ["nice_hands.safetensors"],
        },
    ),
    "gpu-b": (FEW, {"checkpoints": [SDXL], "embeddings": ["bad_prompt.pt"]}),
    "gpu-c": (FEW, {"checkpoints": [OTHER, DREAM], "embeddings": ["nice_eyes.pt"]}),
}
QUIET = {
    # Background loops far apart: the tests drive what happens.
    "health": {"interval_seconds": 3600},
    "placement": {"capabilities_refresh_seconds": 3600},
    "lost_watch_seconds": 0,
    "merge_timeout_seconds": 5.0,
}


@pytest.fixture
async def fakes(tmp_path: Path) -> AsyncIterator[dict[str, FakeComfyUI]]:
    out = {}
    for name, (nodes, models) in SPECS.items():
        fake = FakeComfyUI(root=tmp_path / name, nodes=nodes)
        for folder, files in models.items():
            for file in files:
                fake.add_model(folder, file)
        out[name] = fake
    out["gpu-c"].registry.classes["V3Loader"] = NodeClass("V3Loader", V3_LOADER)
    for fake in out.values():
        await fake.start()
    yield out
    for fake in out.values():
        await fake.stop()


Start = Callable[..., Awaitable[Client]]


@pytest.fixture
def start(make_proxy: ProxyFactory, fakes: dict[str, FakeComfyUI], tmp_path: Path) -> Start:
    """``await start(names)``: the app in front of those instances (default: all three)."""
    policy = tmp_path / "policy.toml"
    policy.write_text(POLICY_TOML)

    async def build(names: tuple[str, ...] = tuple(SPECS), **upstream: Any) -> Client:
        settings = {
            **QUIET,
            "urls": [],
            "instances": [{"url": fakes[n].url, "name": n} for n in names],
            **upstream,
        }
        client: Client = await make_proxy(
            fakes[names[0]].url,
            token=None,
            upstream=settings,
            policy={"files": [str(policy)]},
        )
        return client

    return build


async def get(client: Client, path: str, headers: dict[str, str]) -> tuple[Any, Any]:
    resp = await client.get(path, headers=headers)
    assert resp.status == 200, await resp.text()
    assert resp.content_type == "application/json"
    return await resp.json(), resp.headers


def catalog(client: Client) -> Catalog:
    found: Catalog = client.app[CATALOG]
    return found


def pool(client: Client) -> UpstreamPool:
    found: UpstreamPool = client.app[POOL]
    return found


def fetches(fake: FakeComfyUI) -> int:
    return sum(1 for r in fake.received if r.path.endswith("/object_info"))


async def test_admin_sees_the_union(start: Start, fakes: dict[str, FakeComfyUI]) -> None:
    client = await start()
    info, headers = await get(client, "/api/object_info", ADMIN)
    every = set(fakes["gpu-a"].registry.classes) | {"V3Loader"}
    assert set(info) == every
    assert DEGRADED_HEADER not in headers
    # a model on any instance is offered, home's order first
    assert combo(info, "CheckpointLoaderSimple", "ckpt_name") == [DREAM, SDXL, OTHER]
    assert info["V3Loader"] == V3_LOADER  # only gpu-c has it
    # ... and the same union is served again without asking anyone or rebuilding it
    view = catalog(client).union
    builds, asked = view.builds, [fetches(f) for f in fakes.values()]
    again, _ = await get(client, "/api/object_info", ADMIN)
    assert again == info
    assert view.builds == builds
    assert [fetches(f) for f in fakes.values()] == asked


async def test_a_user_sees_the_union_filtered(start: Start) -> None:
    client = await start()
    info, _ = await get(client, "/api/object_info", USER)
    assert set(info) == {
        "CheckpointLoaderSimple",
        "LoraLoader",
        "V3Loader",
        "EmptyImage",
        "PreviewImage",
    }
    assert combo(info, "CheckpointLoaderSimple", "ckpt_name") == [DREAM, OTHER]
    assert combo(info, "LoraLoader", "lora_name") == ["styles/ink.safetensors"]
    options = info["V3Loader"]["input"]["required"]["unet_name"][1]["options"]
    assert options == ["unet_ok.safetensors"]
    # one ready copy per (policy version, role, union generation): the same bytes again
    first = await client.get("/api/object_info", headers=USER)
    second = await client.get("/api/object_info", headers=USER)
    assert first.headers["ETag"] == second.headers["ETag"]
    assert await first.read() == await second.read()
    revalidated = await client.get(
        "/api/object_info", headers={**USER, "If-None-Match": first.headers["ETag"]}
    )
    assert revalidated.status == 304


async def test_object_info_class_from_the_union(start: Start) -> None:
    client = await start()
    assert (await get(client, "/api/object_info/V3Loader", ADMIN))[0] == {"V3Loader": V3_LOADER}
    blur = "ImageBlur"  # only gpu-a has it: the union does, whoever is home
    assert blur in (await get(client, "/api/object_info/ImageBlur", ADMIN))[0]
    assert (await get(client, f"/api/object_info/{blur}", USER))[0] == {}  # not allowed
    assert (await get(client, "/api/object_info/NoSuchNode", ADMIN))[0] == {}
    loader, _ = await get(client, "/api/object_info/CheckpointLoaderSimple", USER)
    assert combo(loader, "CheckpointLoaderSimple", "ckpt_name") == [DREAM, OTHER]


async def test_model_lists_are_united_then_filtered(
    start: Start, fakes: dict[str, FakeComfyUI]
) -> None:
    client = await start()
    assert (await get(client, "/api/models/checkpoints", ADMIN))[0] == [DREAM, OTHER, SDXL]
    assert (await get(client, "/api/models/checkpoints", USER))[0] == [DREAM, OTHER]
    assert (await get(client, "/api/embeddings", ADMIN))[0] == [
        "bad_prompt",
        "nice_eyes",
        "nice_hands",
    ]
    assert (await get(client, "/api/embeddings", USER))[0] == ["nice_eyes", "nice_hands"]
    entries, headers = await get(client, "/api/experiment/models/checkpoints", ADMIN)
    assert [e["name"] for e in entries] == [DREAM, SDXL, OTHER]  # one per name, home first
    assert headers.get(DEGRADED_HEADER) is None
    entries, _ = await get(client, "/api/experiment/models/checkpoints", USER)
    assert [e["name"] for e in entries] == [DREAM, OTHER]
    # every instance was asked, each once per request
    for fake in fakes.values():
        assert sum(1 for r in fake.received if r.path == "/api/models/checkpoints") == 2
    # an unknown folder: ComfyUI's own 404
    unknown = await client.get("/api/models/nope", headers=USER)
    assert unknown.status == 404
    # HEAD: the headers of the filtered list, no body
    head = await client.head("/api/models/checkpoints", headers=USER)
    assert head.status == 200
    assert int(head.headers["Content-Length"]) == len(
        b'["sd15/dream.safetensors","sd15/other.safetensors"]'
    )


async def test_joining_and_leaving_change_the_union(
    start: Start, fakes: dict[str, FakeComfyUI]
) -> None:
    client = await start(("gpu-a", "gpu-b"))
    info, _ = await get(client, "/api/object_info", USER)
    assert "V3Loader" not in info
    assert combo(info, "CheckpointLoaderSimple", "ckpt_name") == [DREAM]
    generation = catalog(client).union.generation

    joined = Upstream.from_url(fakes["gpu-c"].url, name="gpu-c")
    assert await pool(client).join(joined)
    info, _ = await get(client, "/api/object_info", USER)
    assert "V3Loader" in info
    assert combo(info, "CheckpointLoaderSimple", "ckpt_name") == [DREAM, OTHER]
    assert (await get(client, "/api/models/checkpoints", ADMIN))[0] == [DREAM, OTHER, SDXL]
    assert catalog(client).union.generation > generation

    assert await pool(client).leave("gpu-b")
    admin, _ = await get(client, "/api/object_info", ADMIN)
    assert combo(admin, "CheckpointLoaderSimple", "ckpt_name") == [DREAM, OTHER]
    assert (await get(client, "/api/models/checkpoints", ADMIN))[0] == [DREAM, OTHER]


async def test_a_refresh_of_one_instance_changes_the_union(
    start: Start, fakes: dict[str, FakeComfyUI]
) -> None:
    client = await start()
    await get(client, "/api/object_info", USER)
    cache = catalog(client).cache(pool(client).get("gpu-b") or pool(client).home())
    now = cache.clock()
    cache.clock = lambda: now + cache.ttl + 1
    fakes["gpu-b"].add_model("checkpoints", "sd15/late.safetensors")
    stale, _ = await get(client, "/api/object_info", USER)  # served at once, refresh started
    assert combo(stale, "CheckpointLoaderSimple", "ckpt_name") == [DREAM, OTHER]
    await catalog(client).idle()
    fresh, _ = await get(client, "/api/object_info", USER)
    assert combo(fresh, "CheckpointLoaderSimple", "ckpt_name") == [
        DREAM,
        "sd15/late.safetensors",
        OTHER,
    ]


async def test_an_instance_down_at_start_is_left_out(
    start: Start, fakes: dict[str, FakeComfyUI]
) -> None:
    await fakes["gpu-c"].stop()
    client = await start()  # the startup checks find it down: not reachable
    info, headers = await get(client, "/api/object_info", USER)
    assert "V3Loader" not in info
    assert combo(info, "CheckpointLoaderSimple", "ckpt_name") == [DREAM]
    assert DEGRADED_HEADER not in headers  # not reachable: not part of the union at all
    assert (await get(client, "/api/models/checkpoints", ADMIN))[0] == [DREAM, SDXL]


async def test_an_instance_that_dies_is_served_from_its_copy_until_ejected(
    start: Start, fakes: dict[str, FakeComfyUI]
) -> None:
    client = await start()
    await fakes["gpu-c"].stop()
    info, _ = await get(client, "/api/object_info", USER)
    assert "V3Loader" in info  # its cached copy still counts while it is reachable
    names, headers = await get(client, "/api/models/checkpoints", ADMIN)
    assert names == [DREAM, SDXL]  # the lists are asked live: it is left out...
    assert headers[DEGRADED_HEADER] == "gpu-c"
    assert not pool(client).is_healthy("gpu-c")  # ...and its refusal ejected it
    info, _ = await get(client, "/api/object_info", USER)
    assert "V3Loader" not in info
    assert combo(info, "CheckpointLoaderSimple", "ckpt_name") == [DREAM]


SLOW_NODE = {
    "input": {"required": {}},
    "input_order": {"required": []},
    "output": [],
    "output_is_list": [],
    "output_name": [],
    "name": "SlowNode",
    "display_name": "Slow Node",
    "description": "",
    "python_module": "custom_nodes.slow",
    "category": "testing",
    "output_node": True,
}


class Stalling:
    """A minimal instance whose catalog answers 503 until ``armed``, then waits for
    ``release`` before answering (a ComfyUI rescanning a slow disk)."""

    def __init__(self) -> None:
        self.armed = False
        self.release = asyncio.Event()
        self.asked = asyncio.Event()
        app = web.Application()
        app.router.add_get("/prompt", self.prompt)
        app.router.add_get("/api/object_info", self.object_info)
        app.router.add_get("/api/models/{folder}", self.models)
        self.server = TestServer(app)

    @property
    def url(self) -> str:
        return str(self.server.make_url("")).rstrip("/")

    async def prompt(self, _request: web.Request) -> web.Response:
        return web.json_response({"exec_info": {"queue_remaining": 0}})

    async def object_info(self, _request: web.Request) -> web.Response:
        if not self.armed:
            return web.Response(status=503)
        self.asked.set()
        await self.release.wait()
        return web.json_response({"SlowNode": SLOW_NODE})

    async def models(self, _request: web.Request) -> web.Response:
        if self.armed:
            await self.release.wait()
        return web.json_response(["slow.safetensors"])


async def test_a_slow_instance_does_not_block_the_answer(
    start: Start, fakes: dict[str, FakeComfyUI]
) -> None:
    """A fetch still running after ``merge_timeout_seconds`` is left out of this answer; it
    goes on in the background and joins the union when it lands."""
    stalling = Stalling()
    await stalling.server.start_server()
    try:
        client = await start(
            ("gpu-a", "gpu-b"),
            merge_timeout_seconds=0.2,
            instances=[
                {"url": fakes["gpu-a"].url, "name": "gpu-a"},
                {"url": fakes["gpu-b"].url, "name": "gpu-b"},
                {"url": stalling.url, "name": "slow"},
            ],
        )
        stalling.armed = True
        info, headers = await get(client, "/api/object_info", ADMIN)
        assert "SlowNode" not in info
        assert headers[DEGRADED_HEADER] == "slow"
        names, headers = await get(client, "/api/models/checkpoints", ADMIN)
        assert names == [DREAM, SDXL]
        assert headers[DEGRADED_HEADER] == "slow"
        assert stalling.asked.is_set()
        stalling.release.set()
        await catalog(client).idle()
        info, headers = await get(client, "/api/object_info", ADMIN)
        assert info["SlowNode"] == SLOW_NODE
        assert DEGRADED_HEADER not in headers
        assert "slow.safetensors" in (await get(client, "/api/models/checkpoints", ADMIN))[0]
    finally:
        stalling.release.set()
        await stalling.server.close()


async def test_one_instance_left_answers_with_its_own_bytes(start: Start) -> None:
    """A union of one is that instance's copy: its bytes for admins, no union built."""
    client = await start(("gpu-a", "gpu-b"))
    assert await pool(client).leave("gpu-b")
    resp = await client.get("/api/object_info", headers=ADMIN)
    assert resp.status == 200
    cache = catalog(client).cache(pool(client).home())
    assert cache.snapshot is not None
    assert await resp.read() == cache.snapshot.raw.body
    assert catalog(client).union.builds == 0
