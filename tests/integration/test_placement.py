"""Several ComfyUI instances behind one proxy: placement, health, drains, failover, idempotency.

Three fake ComfyUIs with different node sets and models (``gpu-a``: every node, sd15; ``gpu-b``:
every node, sdxl; ``gpu-c``: no ImageBlur, both checkpoints). Background loops run at long
intervals; the tests drive health checks and capability reads themselves
(``app[REGISTRY]``), and move the breakers' clock instead of sleeping.
"""

from __future__ import annotations

import itertools
import json
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient
from prometheus_client import CollectorRegistry
from pytest_aiohttp import AiohttpClient

from proxy.app import create_app
from proxy.multi.idempotency import IDEMPOTENCY, Claimed
from proxy.multi.registry import REGISTRY, Registry
from proxy.tenancy.ownership import OWNERSHIP
from proxy.upstream.pool import POOL, UpstreamPool
from tests.conftest import bearer, make_settings
from tests.fakes.comfyui import FakeComfyUI
from tests.support.graphs import png

Client = TestClient[Any, Any]
ADMIN, ALICE, BOB = bearer("admin", ("admin",)), bearer("alice"), bearer("bob")
SD15, SDXL = "sd15.safetensors", "sdxl.safetensors"
ALL_NODES = None
NO_BLUR = {
    "CheckpointLoaderSimple",
    "EmptyImage",
    "LoadImage",
    "SaveImage",
    "PreviewImage",
    "ImageScale",
}
_colors = itertools.count(0x300000, 7919)


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
async def fakes(tmp_path: Path) -> AsyncIterator[dict[str, FakeComfyUI]]:
    """gpu-a (every node, sd15), gpu-b (every node, sdxl), gpu-c (no ImageBlur, both)."""
    specs = {
        "gpu-a": (ALL_NODES, [SD15]),
        "gpu-b": (ALL_NODES, [SDXL]),
        "gpu-c": (NO_BLUR, [SD15, SDXL]),
    }
    out = {}
    for name, (nodes, models) in specs.items():
        fake = FakeComfyUI(root=tmp_path / name, nodes=nodes)
        for model in models:
            fake.add_model("checkpoints", model)
        await fake.start()
        out[name] = fake
    yield out
    for fake in out.values():
        await fake.stop()


def instances(fakes: dict[str, FakeComfyUI]) -> list[dict[str, Any]]:
    return [{"url": f.url, "name": name} for name, f in fakes.items()]


QUIET = {
    # Loops far apart: the tests run checks and reads themselves.
    "health": {"interval_seconds": 3600, "failure_threshold": 2, "open_seconds": 10},
    "placement": {"capabilities_refresh_seconds": 3600},
}


@pytest.fixture
def start_proxy(
    aiohttp_client: AiohttpClient,
) -> Callable[..., Awaitable[Client]]:
    async def start(
        fakes: dict[str, FakeComfyUI] | None = None,
        *,
        before: Callable[[web.Application], None] | None = None,
        **sections: dict[str, Any],
    ) -> Client:
        upstream: dict[str, Any] = {**QUIET, **sections.pop("upstream", {})}
        if fakes is not None:
            upstream.setdefault("instances", instances(fakes))
        upstream.setdefault("urls", [])
        settings = make_settings("http://127.0.0.1:9", upstream=upstream, **sections)
        app = create_app(settings, registry=CollectorRegistry())
        if before is not None:
            before(app)
        client: Client = await aiohttp_client(app)
        pool(client).clock = Clock()
        return client

    return start


def pool(client: Client) -> UpstreamPool:
    found: UpstreamPool = client.app[POOL]
    return found


def registry(client: Client) -> Registry:
    found: Registry = client.app[REGISTRY]
    return found


def graph(
    *, ckpt: str | None = None, blur: bool = False, extra: str | None = None, image: str = ""
) -> dict[str, Any]:
    """EmptyImage (or LoadImage) [-> ImageBlur] -> SaveImage, plus an unconnected loader."""
    color = next(_colors) % 0xFFFFFF
    source: dict[str, Any] = {
        "class_type": "EmptyImage",
        "inputs": {"width": 8, "height": 8, "batch_size": 1, "color": color},
    }
    if image:
        source = {"class_type": "LoadImage", "inputs": {"image": image}}
    out: dict[str, Any] = {
        "1": source,
        "9": {"class_type": "SaveImage", "inputs": {"images": ["1", 0], "filename_prefix": "t"}},
    }
    if blur:
        out["2"] = {
            "class_type": "ImageBlur",
            "inputs": {"image": ["1", 0], "blur_radius": 1, "sigma": 1.0},
        }
        out["9"]["inputs"]["images"] = ["2", 0]
    if ckpt is not None:
        out["4"] = {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": ckpt}}
    if extra is not None:
        out["5"] = {"class_type": extra, "inputs": {}}
    return out


def accepted(fake: FakeComfyUI) -> list[str]:
    """Prompt ids this fake queued (its answers are not recorded: its queue and history are)."""
    return [
        json.loads(r.body).get("prompt_id")
        for r in fake.received
        if r.method == "POST" and r.path.endswith("/prompt")
    ]


def where(fakes: dict[str, FakeComfyUI], prompt_id: str) -> list[str]:
    """Which fakes received a POST /prompt with this id."""
    return [name for name, f in fakes.items() if prompt_id in accepted(f)]


async def submit(client: Client, g: dict[str, Any], headers: dict[str, str] = ADMIN) -> Any:
    resp = await client.post("/prompt", json={"prompt": g}, headers=headers)
    return resp.status, await resp.json(), resp.headers


async def settle(fakes: dict[str, FakeComfyUI]) -> None:
    for fake in fakes.values():
        await fake.wait_idle()


# -- placement -------------------------------------------------------------------------------


async def test_placement_by_capability(
    fakes: dict[str, FakeComfyUI], start_proxy: Callable[..., Awaitable[Client]]
) -> None:
    client = await start_proxy(fakes)
    caps = {i.upstream.name: i.capabilities for i in pool(client).instances()}
    assert all(c is not None for c in caps.values())  # read at startup

    # ImageBlur + sdxl: only gpu-b has both.
    status, body, _ = await submit(client, graph(ckpt=SDXL, blur=True))
    assert status == 200, body
    assert where(fakes, body["prompt_id"]) == ["gpu-b"]
    # ImageBlur + sd15: only gpu-a.
    status, body, _ = await submit(client, graph(ckpt=SD15, blur=True))
    assert status == 200, body
    assert where(fakes, body["prompt_id"]) == ["gpu-a"]
    # No blur, sdxl: gpu-b or gpu-c; gpu-b has one outstanding already, so gpu-c.
    status, body, _ = await submit(client, graph(ckpt=SDXL))
    assert status == 200, body
    assert where(fakes, body["prompt_id"]) == ["gpu-c"]
    record = await client.app[OWNERSHIP].prompt(body["prompt_id"])
    assert record is not None
    assert record.upstream == "gpu-c"
    await settle(fakes)


async def test_placement_by_load_then_affinity(
    fakes: dict[str, FakeComfyUI], start_proxy: Callable[..., Awaitable[Client]]
) -> None:
    client = await start_proxy(fakes)
    # gpu-a runs one prompt (held) and has one waiting; gpu-b runs one: they report it.
    fakes["gpu-a"].hold()
    fakes["gpu-b"].hold()
    async with client.session.post(f"{fakes['gpu-a'].url}/prompt", json={"prompt": graph()}):
        pass
    await fakes["gpu-a"].wait_held()
    async with client.session.post(f"{fakes['gpu-a'].url}/prompt", json={"prompt": graph()}):
        pass
    async with client.session.post(f"{fakes['gpu-b'].url}/prompt", json={"prompt": graph()}):
        pass
    await fakes["gpu-b"].wait_held()
    await registry(client).health.check_all()
    outstanding = {i.upstream.name: i.outstanding for i in pool(client).instances()}
    assert outstanding == {"gpu-a": 2, "gpu-b": 1, "gpu-c": 0}

    status, body, _ = await submit(client, graph(ckpt=SD15))
    assert status == 200, body
    assert where(fakes, body["prompt_id"]) == ["gpu-c"]  # least outstanding
    # Now gpu-b and gpu-c have one each: equal weights, so model affinity decides. gpu-c just
    # loaded sd15; an sdxl prompt goes to gpu-b (registry order), an sd15 one to gpu-c.
    status, body, _ = await submit(client, graph(ckpt=SD15))
    assert status == 200, body
    assert where(fakes, body["prompt_id"]) == ["gpu-c"]
    fakes["gpu-a"].release()
    fakes["gpu-b"].release()
    await settle(fakes)


async def test_weight_breaks_ties(
    fakes: dict[str, FakeComfyUI], start_proxy: Callable[..., Awaitable[Client]]
) -> None:
    spec = instances(fakes)
    spec[2]["weight"] = 3.0
    client = await start_proxy(fakes, upstream={"instances": spec})
    status, body, _ = await submit(client, graph())
    assert status == 200
    assert where(fakes, body["prompt_id"]) == ["gpu-c"]
    await settle(fakes)


async def test_no_capable_instance_is_a_comfyui_shaped_400(
    fakes: dict[str, FakeComfyUI], start_proxy: Callable[..., Awaitable[Client]]
) -> None:
    client = await start_proxy(fakes)
    # (Users' workflows only name node types the policy knows: an admin's may name any.)
    for headers in (ADMIN,):
        status, body, _ = await submit(
            client, graph(ckpt="missing.safetensors", extra="NotInstalled"), headers
        )
        assert status == 400
        assert body["error"]["type"] == "no_capable_instance"
        assert "NotInstalled" in body["error"]["message"]
        assert set(body["node_errors"]) == {"4", "5"}
        assert body["node_errors"]["5"]["errors"][0]["type"] == "node_not_available"
        model_error = body["node_errors"]["4"]["errors"][0]
        assert model_error["type"] == "model_not_available"
        assert model_error["extra_info"]["received_value"] == "missing.safetensors"
    # No single instance has ImageBlur and both checkpoints: each item names who lacks it.
    g = graph(ckpt=SDXL, blur=True)
    g["6"] = {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": SD15}}
    status, body, _ = await submit(client, g, ALICE)
    assert status == 400
    assert set(body["node_errors"]) == {"2", "4", "6"}
    assert "missing on gpu-c" in body["node_errors"]["2"]["errors"][0]["message"]
    assert all(accepted(f) == [] for f in fakes.values())


async def test_no_healthy_instance_is_a_503_with_retry_after(
    fakes: dict[str, FakeComfyUI], start_proxy: Callable[..., Awaitable[Client]]
) -> None:
    client = await start_proxy(fakes)
    for fake in fakes.values():
        fake.fail_status = 503
    for _ in range(2):  # failure_threshold
        await registry(client).health.check_all()
    assert pool(client).routable() == []
    status, body, headers = await submit(client, graph())
    assert status == 503
    assert body["error"]["type"] == "no_healthy_instance"
    assert headers["Retry-After"] == "10"
    assert body["error"]["retry_after"] == 10
    assert "node_errors" in body  # ComfyUI's /prompt shape
    ready = await client.get("/readyz")
    assert ready.status == 503
    assert set((await ready.json())["upstreams"].values()) == {"down"}
    # The only instance with ImageBlur + sdxl down, the others up: still 503 (not 400).
    for fake in fakes.values():
        fake.fail_status = None
    pool(client).clock.now += 10  # type: ignore[attr-defined]
    await registry(client).health.check_all()
    fakes["gpu-b"].fail_status = 503
    await registry(client).health.check_all()
    await registry(client).health.check_all()
    status, body, _ = await submit(client, graph(ckpt=SDXL, blur=True))
    assert status == 503
    status, body, _ = await submit(client, graph(ckpt=SD15, blur=True))
    assert status == 200
    await settle(fakes)


# -- drain -----------------------------------------------------------------------------------


async def test_drain_and_undrain_through_the_admin_api(
    fakes: dict[str, FakeComfyUI], start_proxy: Callable[..., Awaitable[Client]]
) -> None:
    client = await start_proxy(fakes)
    status, first, _ = await submit(client, graph(), ALICE)
    assert where(fakes, first["prompt_id"]) == ["gpu-a"]
    await settle(fakes)

    for headers, expected in ((ALICE, 403), ({}, 401)):
        resp = await client.post("/admin/upstreams/gpu-a/drain", headers=headers)
        assert resp.status == expected
        assert (await client.get("/admin/upstreams", headers=headers)).status == expected
    assert pool(client).routable()[0].name == "gpu-a"
    resp = await client.post("/admin/upstreams/nope/drain", headers=ADMIN)
    assert resp.status == 404
    assert (await resp.json())["error"]["type"] == "unknown_upstream"

    resp = await client.post("/admin/upstreams/gpu-a/drain", headers=ADMIN)
    assert resp.status == 200
    assert (await resp.json())["drained"] is True
    listing = await (await client.get("/admin/upstreams", headers=ADMIN)).json()
    by_name = {u["name"]: u for u in listing["upstreams"]}
    assert by_name["gpu-a"]["drained"]
    assert not by_name["gpu-a"]["routable"]
    assert by_name["gpu-a"]["state"] == "closed"
    assert by_name["gpu-b"]["capabilities"]["nodes"] > 0
    assert listing["home"] == "gpu-a"
    ready = await (await client.get("/readyz")).json()
    assert ready["upstreams"]["gpu-a"] == "drained"

    for _ in range(3):
        status, body, _ = await submit(client, graph(), ALICE)
        assert status == 200
        assert "gpu-a" not in where(fakes, body["prompt_id"])
    # A drained instance keeps serving what it holds.
    resp = await client.get(f"/history/{first['prompt_id']}", headers=ALICE)
    assert resp.status == 200
    assert first["prompt_id"] in await resp.json()

    assert (await client.post("/admin/upstreams/gpu-a/undrain", headers=ADMIN)).status == 200
    await settle(fakes)
    await registry(client).health.check_all()  # every queue is empty again
    status, body, _ = await submit(client, graph(), ALICE)
    assert where(fakes, body["prompt_id"]) == ["gpu-a"]
    await settle(fakes)


async def test_drain_is_shared_through_redis(
    fakes: dict[str, FakeComfyUI], start_proxy: Callable[..., Awaitable[Client]], redis_url: str
) -> None:
    one = await start_proxy(fakes, redis={"url": redis_url})
    two = await start_proxy(fakes, redis={"url": redis_url})
    assert (await one.post("/admin/upstreams/gpu-b/drain", headers=ADMIN)).status == 200
    assert not pool(two).is_drained("gpu-b")
    await pool(two).sync_drained()  # every health round does this
    assert pool(two).is_drained("gpu-b")
    assert (await one.post("/admin/upstreams/gpu-b/undrain", headers=ADMIN)).status == 200
    await pool(two).sync_drained()
    assert not pool(two).is_drained("gpu-b")


# -- failures --------------------------------------------------------------------------------


async def test_a_refused_submission_moves_with_the_same_prompt_id(
    fakes: dict[str, FakeComfyUI], start_proxy: Callable[..., Awaitable[Client]]
) -> None:
    client = await start_proxy(fakes)
    fakes["gpu-a"].fail_prompts = 1  # answers 500 before queueing anything
    prompt_id = str(uuid.uuid4())
    resp = await client.post(
        "/prompt", json={"prompt": graph(), "prompt_id": prompt_id}, headers=ALICE
    )
    assert resp.status == 200, await resp.text()
    assert (await resp.json())["prompt_id"] == prompt_id
    assert where(fakes, prompt_id) == ["gpu-a", "gpu-b"]  # the same id, twice sent
    await settle(fakes)
    runs = {n: len(f.queue.get_history(prompt_id=prompt_id)) for n, f in fakes.items()}
    assert runs == {"gpu-a": 0, "gpu-b": 1, "gpu-c": 0}  # it ran once
    record = await client.app[OWNERSHIP].prompt(prompt_id)
    assert record is not None
    assert record.upstream == "gpu-b"
    resp = await client.get(f"/history/{prompt_id}", headers=ALICE)
    assert prompt_id in await resp.json()


async def test_a_dead_instance_is_ejected_at_once_and_recovers(
    fakes: dict[str, FakeComfyUI], start_proxy: Callable[..., Awaitable[Client]], tmp_path: Path
) -> None:
    client = await start_proxy(fakes)
    events: list[tuple[str, str]] = []
    pool(client).subscribe(lambda event, upstream: events.append((event, upstream.name)))
    dead = fakes["gpu-a"]
    port = dead.port
    await dead.stop()

    status, body, _ = await submit(client, graph(), ALICE)
    assert status == 200
    assert where(fakes, body["prompt_id"]) == ["gpu-b"]
    assert not pool(client).is_healthy("gpu-a")
    assert ("down", "gpu-a") in events
    ready = await (await client.get("/readyz")).json()
    assert ready["upstreams"]["gpu-a"] == "down"
    assert ready["status"] == "ready"
    status, body, _ = await submit(client, graph(), ALICE)  # no second try on the dead one
    assert where(fakes, body["prompt_id"]) == ["gpu-c"]

    revived = FakeComfyUI(root=tmp_path / "gpu-a")
    revived.add_model("checkpoints", SD15)
    await revived.start(port=port)
    fakes["gpu-a"] = revived
    await registry(client).health.check_all()  # still waiting out open_seconds
    assert not pool(client).is_healthy("gpu-a")
    pool(client).clock.now += 10  # type: ignore[attr-defined]
    await registry(client).health.check_all()  # the half-open probe succeeds
    assert pool(client).is_healthy("gpu-a")
    assert events[-1] == ("up", "gpu-a")
    await settle(fakes)
    await registry(client).health.check_all()
    status, body, _ = await submit(client, graph(), ALICE)
    assert where(fakes, body["prompt_id"]) == ["gpu-a"]
    await settle(fakes)


async def test_5xx_answers_eject_after_the_threshold(
    fakes: dict[str, FakeComfyUI], start_proxy: Callable[..., Awaitable[Client]]
) -> None:
    client = await start_proxy(fakes)
    fakes["gpu-c"].fail_status = 502
    await registry(client).health.check_all()
    assert pool(client).is_healthy("gpu-c")  # one failure: not yet
    await registry(client).health.check_all()
    assert not pool(client).is_healthy("gpu-c")


# -- idempotency -----------------------------------------------------------------------------


@pytest.mark.parametrize("backend", ["memory", "redis"])
async def test_idempotency_key_replays_the_first_answer(
    fakes: dict[str, FakeComfyUI],
    start_proxy: Callable[..., Awaitable[Client]],
    request: pytest.FixtureRequest,
    backend: str,
) -> None:
    sections: dict[str, Any] = {}
    if backend == "redis":
        sections["redis"] = {"url": request.getfixturevalue("redis_url")}
    client = await start_proxy(fakes, **sections)
    g = graph()
    key = {"Idempotency-Key": "order-42"}
    first = await client.post("/prompt", json={"prompt": g}, headers={**ALICE, **key})
    assert first.status == 200
    answer = await first.json()
    again = await client.post("/prompt", json={"prompt": g}, headers={**ALICE, **key})
    assert again.status == 200
    assert await again.json() == answer
    assert again.headers["Idempotent-Replayed"] == "true"
    assert sum(len(accepted(f)) for f in fakes.values()) == 1  # submitted once

    other = await client.post("/prompt", json={"prompt": graph()}, headers={**ALICE, **key})
    assert other.status == 422
    assert (await other.json())["error"]["type"] == "idempotency_key_reused"
    # Keys are per principal: bob's "order-42" is his own.
    bobs = await client.post("/prompt", json={"prompt": g}, headers={**BOB, **key})
    assert bobs.status == 200
    assert (await bobs.json())["prompt_id"] != answer["prompt_id"]
    assert sum(len(accepted(f)) for f in fakes.values()) == 2
    await settle(fakes)


async def test_idempotency_key_in_flight_and_after_a_refusal(
    fakes: dict[str, FakeComfyUI], start_proxy: Callable[..., Awaitable[Client]]
) -> None:
    client = await start_proxy(fakes)
    g = graph()
    body = json.dumps({"prompt": g}, separators=(",", ":")).encode()  # the proxy's own form
    store = client.app[IDEMPOTENCY]
    # Another request holds the key (claimed, no answer yet): 409, retry shortly.
    import hashlib  # noqa: PLC0415

    from proxy.comfy.submission import read_submission  # noqa: PLC0415

    key = hashlib.sha256(b"alice\0k1").hexdigest()
    # The fingerprint is of the body as the proxy forwards it (its own serialisation).
    forwarded = read_submission(body).dump()
    claim = await store.claim(key, hashlib.sha256(forwarded).hexdigest(), 60)
    headers = {**ALICE, "Idempotency-Key": "k1", "Content-Type": "application/json"}
    resp = await client.post("/prompt", data=body, headers=headers)
    assert resp.status == 409
    assert resp.headers["Retry-After"] == "1"
    assert (await resp.json())["error"]["type"] == "idempotency_key_in_use"
    assert isinstance(claim, Claimed)
    await store.release(key, hashlib.sha256(forwarded).hexdigest(), claim.token)
    # A refusal (no instance can run it) leaves the key free for a corrected retry... of the
    # same body, judged afresh.
    headers["Idempotency-Key"] = "k2"
    bad = {"prompt": graph(extra="NotInstalled")}
    assert (await client.post("/prompt", json=bad, headers=headers)).status == 400
    assert (await client.post("/prompt", json=bad, headers=headers)).status == 400
    resp = await client.post(
        "/prompt", json={"prompt": g}, headers={**ALICE, "Idempotency-Key": ""}
    )
    assert resp.status == 400
    assert (await resp.json())["error"]["type"] == "bad_idempotency_key"
    await settle(fakes)


# -- uploads and inputs ----------------------------------------------------------------------


async def upload(client: Client, data: bytes, name: str, headers: dict[str, str]) -> Any:
    import aiohttp  # noqa: PLC0415

    form = aiohttp.FormData()
    form.add_field("image", data, filename=name, content_type="image/png")
    resp = await client.post("/upload/image", data=form, headers=headers)
    assert resp.status == 200, await resp.text()
    return await resp.json()


def stored(fake: FakeComfyUI, subfolder: str, name: str) -> bytes | None:
    path = Path(fake.paths.input) / subfolder / name
    return path.read_bytes() if path.exists() else None


async def test_uploads_are_stored_on_every_healthy_instance(
    fakes: dict[str, FakeComfyUI], start_proxy: Callable[..., Awaitable[Client]]
) -> None:
    client = await start_proxy(fakes)
    data = png()
    answer = await upload(client, data, "cat.png", ALICE)
    assert answer["name"] == "cat.png"
    for fake in fakes.values():
        assert stored(fake, answer["subfolder"], "cat.png") == data
    # An admin's upload (not rewritten by isolation) too.
    admin = await upload(client, data, "dog.png", ADMIN)
    for fake in fakes.values():
        assert stored(fake, admin["subfolder"], "dog.png") == data
    # Same name, other bytes: every instance gets the name the first one chose.
    other = png()
    (Path(fakes["gpu-a"].paths.input) / answer["subfolder"]).mkdir(parents=True, exist_ok=True)
    again = await upload(client, other, "cat.png", ALICE)
    assert again["name"] == "cat (1).png"
    for fake in fakes.values():
        assert stored(fake, again["subfolder"], "cat (1).png") == other
    # A mask is stored as ComfyUI composes it (mask alpha on the original): copied as stored.
    import aiohttp  # noqa: PLC0415

    ref = json.dumps({"filename": "cat.png", "subfolder": answer["subfolder"], "type": "input"})
    form = aiohttp.FormData()
    form.add_field("image", png(), filename="mask.png", content_type="image/png")
    form.add_field("original_ref", ref)
    resp = await client.post("/upload/mask", data=form, headers=ALICE)
    assert resp.status == 200, await resp.text()
    mask = await resp.json()
    composite = stored(fakes["gpu-a"], mask["subfolder"], "mask.png")
    assert composite is not None
    for fake in fakes.values():
        assert stored(fake, mask["subfolder"], "mask.png") == composite
    # The prompt that reads it runs wherever it is placed.
    image = f"{answer['subfolder']}/cat.png"
    status, body, _ = await submit(client, graph(image=image), ALICE)
    assert status == 200, body
    await settle(fakes)


async def test_discovery_joins_instances_and_inputs_follow_on_demand(
    tmp_path: Path, start_proxy: Callable[..., Awaitable[Client]]
) -> None:
    # Three fakes on one port at three loopback addresses, as pods behind a headless Service.
    first = FakeComfyUI(root=tmp_path / "a")
    port = await first.start("127.0.0.1", 0)
    second, third = FakeComfyUI(root=tmp_path / "b"), FakeComfyUI(root=tmp_path / "c")
    third.add_model("checkpoints", "only-c.safetensors")
    await second.start("127.0.0.2", port)
    await third.start("127.0.0.3", port)
    by_address = {"127.0.0.1": first, "127.0.0.2": second, "127.0.0.3": third}
    answer_with = ["127.0.0.1", "127.0.0.2"]

    async def resolver(hostname: str, resolved_port: int) -> list[str]:
        assert (hostname, resolved_port) == ("comfy.example.internal", port)
        return list(answer_with)

    def inject(app: web.Application) -> None:
        from proxy.multi.registry import RESOLVER  # noqa: PLC0415

        app[RESOLVER] = resolver

    try:
        client = await start_proxy(
            upstream={
                "urls": [],
                "discovery": {"hostname": "comfy.example.internal", "port": port},
            },
            before=inject,
        )
        assert [u.name for u in pool(client).upstreams] == [
            f"127.0.0.1:{port}",
            f"127.0.0.2:{port}",
        ]
        data = png()
        answer = await upload(client, data, "late.png", ALICE)
        assert stored(third, answer["subfolder"], "late.png") is None

        answer_with.append("127.0.0.3")
        await registry(client).discovery.resolve_once()  # type: ignore[union-attr]
        await registry(client).capabilities.refresh_all()
        assert len(pool(client).upstreams) == 3
        # Only the newcomer has this model: the prompt goes there, and its input follows.
        g = graph(image=f"{answer['subfolder']}/late.png", ckpt="only-c.safetensors")
        status, body, _ = await submit(client, g, ALICE)
        assert status == 200, body
        assert [a for a, f in by_address.items() if body["prompt_id"] in accepted(f)] == [
            "127.0.0.3"
        ]
        assert stored(third, answer["subfolder"], "late.png") == data
        await third.wait_idle()
        history = third.queue.get_history(prompt_id=body["prompt_id"])
        assert history[body["prompt_id"]]["status"]["status_str"] == "success"

        answer_with.remove("127.0.0.1")
        await registry(client).discovery.resolve_once()  # type: ignore[union-attr]
        assert [u.name for u in pool(client).upstreams] == [
            f"127.0.0.2:{port}",
            f"127.0.0.3:{port}",
        ]
    finally:
        for fake in by_address.values():
            await fake.stop()


async def test_single_instance_keeps_its_old_behaviour(
    fake_comfy: FakeComfyUI, start_proxy: Callable[..., Awaitable[Client]]
) -> None:
    client = await start_proxy(upstream={"urls": [fake_comfy.url], "instances": []})
    assert not pool(client).managed
    status, body, _ = await submit(client, graph(extra="NotInstalled"))
    assert status == 400  # ComfyUI's own validation error, not the proxy's
    assert body["error"]["type"] != "no_capable_instance"
