"""Issue 13, items 4 and 10 (HEAD): filtered answers are read in a known encoding, and HEAD on
a filtered route tells nothing the filtered GET does not.

User B attacks user A's history, queue and jobs through a ComfyUI started with
``--enable-compress-response-body`` (the fake's ``compress_responses``), sending whatever
``Accept-Encoding`` a browser or a script sends. Each case asserts on B's answer and on what the
fake ComfyUI received: the proxy asks it for ``identity`` on every route it filters, decodes
gzip/deflate it gets anyway, refuses any other coding (502 ``upstream_bad_encoding``), and
compresses its own filtered answer for B when B accepts gzip. HEAD is sent upstream as GET and
answered with the filtered GET's status, headers and length.
"""

from __future__ import annotations

import gzip
import time
import uuid
import zlib
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, cast

import aiohttp
import orjson
import pytest
from aiohttp import web
from aiohttp.typedefs import Middleware
from multidict import CIMultiDictProxy

from proxy.comfy.records import PromptRecord
from proxy.principal import comfy_user_id
from proxy.tenancy.namespaces import upstream_client_id
from proxy.tenancy.ownership import OWNERSHIP
from proxy.upstream.encoding import MIN_COMPRESSED_BYTES
from tests.conftest import ProxyFactory, bearer
from tests.fakes.comfyui import FakeComfyUI, Received
from tests.integration.support import Client, graph, sample

ALICE, BOB = comfy_user_id("alice"), comfy_user_id("bob")
A, B = bearer("alice"), bearer("bob")
FILTERED_PATHS = ("/api/history", "/api/queue", "/api/jobs")


# -- the attacked deployment ------------------------------------------------------------------


@dataclass
class Recode:
    """What a misbehaving upstream does to the answers of the filtered routes: ``coding`` set
    -> ``Content-Encoding: coding`` with ``encode(original body)`` as the body."""

    coding: str | None = None
    encode: Callable[[bytes], bytes] = bytes


def recoding(recode: Recode) -> Middleware:
    """Innermost middleware of a fake: the answer of a filtered route re-encoded (a custom node
    middleware that compresses whatever the client asked, or with a coding nobody asked for)."""

    @web.middleware
    async def middleware(
        request: web.Request, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
    ) -> web.StreamResponse:
        response = await handler(request)
        routed = request.method in ("GET", "HEAD") and request.path.startswith(
            ("/api/history", "/api/queue", "/api/jobs", "/queue")  # "/queue": the proxy's own read
        )
        if recode.coding is None or not routed or not isinstance(response, web.Response):
            return response
        assert isinstance(response.body, bytes)
        return web.Response(
            status=response.status,
            body=recode.encode(response.body),
            headers={"Content-Type": "application/json", "Content-Encoding": recode.coding},
        )

    return cast(Middleware, middleware)


async def started_fake(root: Path, recode: Recode) -> FakeComfyUI:
    fake = FakeComfyUI(root=root, compress_responses=True)
    fake.app.middlewares.append(recoding(recode))  # before start: the app is not frozen yet
    await fake.start()
    return fake


async def place(client: Client, fake: FakeComfyUI, owner: str) -> str:
    """A prompt of ``owner`` on ``fake``, recorded as the submit guard records it."""
    prompt_id = str(uuid.uuid4())
    namespaced = upstream_client_id(owner, "")
    record = PromptRecord(prompt_id, owner, f"127.0.0.1:{fake.port}", namespaced, time.time())
    assert await client.app[OWNERSHIP].record_prompt(record)
    body = {
        "prompt": graph(),
        "prompt_id": prompt_id,
        "client_id": namespaced,
        "extra_data": {"create_time": int(time.time() * 1000)},
    }
    async with (
        aiohttp.ClientSession() as session,
        session.post(f"{fake.url}/prompt", json=body) as resp,
    ):
        assert resp.status == 200, await resp.text()
    return prompt_id


@dataclass
class Scene:
    """A's and B's prompts: finished (history), running (A) and pending (B) on held fakes."""

    client: Client
    fakes: list[FakeComfyUI]
    recode: list[Recode]
    a_done: str
    b_done: str
    b_history: set[str]
    """B's finished prompts (``b_done`` and more: a history worth compressing)."""
    a_run: str
    b_pending: str

    @property
    def a_ids(self) -> tuple[str, str]:
        return self.a_done, self.a_run


async def build_scene(client: Client, fakes: list[FakeComfyUI], recode: list[Recode]) -> Scene:
    """A's prompts on ``fakes[0]``, B's on the last fake (the same one with a single instance)."""
    a_fake, b_fake = fakes[0], fakes[-1]
    a_done = await place(client, a_fake, ALICE)
    b_history = [await place(client, b_fake, BOB) for _ in range(3)]
    for fake in fakes:
        await fake.wait_idle()
    a_fake.hold()
    a_run = await place(client, a_fake, ALICE)
    await a_fake.wait_held()
    if b_fake is a_fake:
        b_pending = await place(client, b_fake, BOB)  # queued behind A's held prompt
    else:
        b_fake.hold()
        await place(client, b_fake, BOB)  # B's running one, held
        await b_fake.wait_held()
        b_pending = await place(client, b_fake, BOB)
    for fake in fakes:
        fake.reset()
    return Scene(client, fakes, recode, a_done, b_history[0], set(b_history), a_run, b_pending)


async def release(scene: Scene) -> None:
    for fake in scene.fakes:
        fake.release()
    for fake in scene.fakes:
        fake.release()  # the second held prompt of an instance holding two
        await fake.wait_idle()


@pytest.fixture
async def single(tmp_path: Path, make_proxy: ProxyFactory) -> AsyncIterator[Scene]:
    recode = Recode()
    fake = await started_fake(tmp_path / "comfyui", recode)
    try:
        client: Client = await make_proxy(fake.url, token=None)
        scene = await build_scene(client, [fake], [recode])
        yield scene
        await release(scene)
    finally:
        await fake.stop()


@pytest.fixture
async def multi(tmp_path: Path, make_proxy: ProxyFactory) -> AsyncIterator[Scene]:
    recode = [Recode(), Recode()]
    fakes: list[FakeComfyUI] = []
    try:
        for i, r in enumerate(recode):
            fakes.append(await started_fake(tmp_path / f"comfyui-{i}", r))
        urls = tuple(f.url for f in fakes)
        upstream = {"urls": urls, "lost_watch_seconds": 0, "merge_timeout_seconds": 5.0}
        client: Client = await make_proxy(urls[0], token=None, upstream=upstream)
        scene = await build_scene(client, fakes, recode)
        yield scene
        await release(scene)
    finally:
        for fake in fakes:
            await fake.stop()


# -- helpers ----------------------------------------------------------------------------------


@dataclass
class Answer:
    status: int
    headers: CIMultiDictProxy[str]
    raw: bytes

    @property
    def coding(self) -> str | None:
        return self.headers.get("Content-Encoding")

    def json(self) -> Any:
        raw = self.raw
        if self.coding == "gzip":
            raw = gzip.decompress(raw)
        else:
            assert self.coding is None, self.coding
        return orjson.loads(raw)


async def ask(
    client: Client, method: str, path: str, who: dict[str, str], accept: str | None
) -> Answer:
    """B's (or A's) request with exactly ``accept`` as ``Accept-Encoding`` (None: none), read
    undecoded."""
    headers = dict(who)
    skip: tuple[str, ...] = ()
    if accept is None:
        skip = ("Accept-Encoding",)
    else:
        headers["Accept-Encoding"] = accept
    async with client.request(
        method, path, headers=headers, auto_decompress=False, skip_auto_headers=skip
    ) as resp:
        return Answer(resp.status, resp.headers, await resp.read())


def relayed(fake: FakeComfyUI, path: str) -> list[Received]:
    """What B's requests made the proxy send (they carry the request id; background reads do
    not)."""
    return [r for r in fake.received if r.path == path and "X-Request-ID" in r.headers]


def no_trace_of(scene: Scene, answer: Answer) -> None:
    """Nothing of A's in B's answer, however it is encoded."""
    text = answer.raw if answer.coding is None else gzip.decompress(answer.raw)
    for prompt_id in scene.a_ids:
        assert prompt_id.encode() not in text


def queue_ids(queue: dict[str, Any]) -> set[str]:
    return {item[1] for key in ("queue_running", "queue_pending") for item in queue[key]}


async def b_reads_only_own(scene: Scene, accept: str | None, compressed: bool) -> None:
    client = scene.client
    history = await ask(client, "GET", "/api/history", B, accept)
    entry = await ask(client, "GET", f"/api/history/{scene.a_done}", B, accept)
    queue = await ask(client, "GET", "/api/queue", B, accept)
    jobs = await ask(client, "GET", "/api/jobs", B, accept)
    job = await ask(client, "GET", f"/api/jobs/{scene.a_done}", B, accept)
    for answer in (history, entry, queue, jobs):
        assert answer.status == 200, answer.raw
        size = len(orjson.dumps(answer.json()))
        big = size >= MIN_COMPRESSED_BYTES  # smaller ones are not worth compressing
        assert answer.coding == ("gzip" if compressed and big else None), size
        assert "Accept-Encoding" in answer.headers.get("Vary", "")
        no_trace_of(scene, answer)
    assert (history.coding == "gzip") is compressed  # B's own history is large enough
    assert set(history.json()) == scene.b_history
    assert entry.json() == {}
    assert scene.b_pending in queue_ids(queue.json())
    assert not queue_ids(queue.json()) & set(scene.a_ids)
    listed = {j["id"] for j in jobs.json()["jobs"]}
    assert scene.b_done in listed
    assert not listed & set(scene.a_ids)
    assert job.status == 404
    assert orjson.loads(job.raw) == {"error": "Job not found"}

    # ComfyUI was asked for plain answers on every filtered route (history and jobs: B's own
    # prompts one by one, proxy.isolation.own_views); A's job never reached it.
    own = (f"/api/history/{scene.b_done}", f"/api/jobs/{scene.b_done}")
    for path in ("/api/queue", f"/api/history/{scene.a_done}", *own):
        asked = [r for fake in scene.fakes for r in relayed(fake, path)]
        assert asked, path
        assert {r.headers.get("Accept-Encoding") for r in asked} == {"identity"}, path
    assert not [r for f in scene.fakes for r in relayed(f, f"/api/jobs/{scene.a_done}")]


# -- compressing ComfyUI ----------------------------------------------------------------------

ACCEPTS = [
    ("gzip", True),
    ("gzip, deflate, br, zstd", True),  # what browsers send
    ("br", False),
    ("deflate", False),
    ("identity;q=0", False),  # nothing acceptable: the unencoded answer (RFC 9110 12.5.3)
    ("*", True),
    ("gzip;q=0, *", False),  # ComfyUI would gzip this one (it reads no q-values)
    ("GZIP", True),
    (None, False),
]


async def test_the_fake_compresses_like_comfyui(single: Scene) -> None:
    """The attack's premise: asked directly, this ComfyUI gzips A's entries for anyone."""
    fake = single.fakes[0]
    async with aiohttp.ClientSession(auto_decompress=False) as session:
        for accept, coding in (("gzip", "gzip"), ("gzip, deflate", "deflate"), ("br", None)):
            headers = {"Accept-Encoding": accept}
            async with session.get(f"{fake.url}/api/history", headers=headers) as resp:
                assert resp.headers.get("Content-Encoding") == coding
                raw = await resp.read()
            if coding is not None:
                raw = zlib.decompress(raw, 16 + zlib.MAX_WBITS if coding == "gzip" else 15)
            assert single.a_done in orjson.loads(raw)


@pytest.mark.parametrize(("accept", "compressed"), ACCEPTS)
async def test_b_sees_only_own_entries_whatever_it_accepts(
    single: Scene, accept: str | None, compressed: bool
) -> None:
    await b_reads_only_own(single, accept, compressed)


@pytest.mark.parametrize(("accept", "compressed"), [("gzip, deflate, br", True), ("br", False)])
async def test_merged_views_filtered_and_compressed(
    multi: Scene, accept: str, compressed: bool
) -> None:
    await b_reads_only_own(multi, accept, compressed)


async def test_a_still_reads_its_own_entries(single: Scene) -> None:
    for accept in ("gzip", "br"):
        answer = await ask(single.client, "GET", f"/api/history/{single.a_done}", A, accept)
        assert answer.status == 200
        assert set(answer.json()) == {single.a_done}


# -- an upstream that encodes anyway ----------------------------------------------------------


def corrupt_gzip(body: bytes) -> bytes:
    return gzip.compress(body)[:-12]  # truncated: the trailer (CRC, size) missing


UNREADABLE = [
    pytest.param("br", lambda body: b"\x1b" + body, id="br"),
    pytest.param("zstd", bytes, id="zstd"),
    pytest.param("compress", bytes, id="compress"),
    pytest.param("gzip, br", gzip.compress, id="stacked"),
    pytest.param("gzip, gzip", lambda body: gzip.compress(gzip.compress(body)), id="twice"),
    pytest.param("gzip", bytes, id="plain-labelled-gzip"),
    pytest.param("gzip", corrupt_gzip, id="truncated-gzip"),
    pytest.param("deflate", gzip.compress, id="gzip-labelled-deflate"),
    pytest.param("gzip", lambda body: gzip.compress(body) + b"trailing", id="trailing-bytes"),
]


@pytest.mark.parametrize(("coding", "encode"), UNREADABLE)
async def test_unreadable_encoding_is_refused(
    single: Scene, coding: str, encode: Callable[[bytes], bytes]
) -> None:
    single.recode[0].coding, single.recode[0].encode = coding, encode
    client, fake = single.client, single.fakes[0]
    name = f"127.0.0.1:{fake.port}"
    before = sample(client, "comfygate_upstream_errors_total", upstream=name, kind="bad_encoding")
    for path in (*FILTERED_PATHS, f"/api/history/{single.a_done}"):
        for method in ("GET", "HEAD"):
            answer = await ask(client, method, path, B, "gzip, deflate, br")
            assert answer.status == 502, (path, answer.raw)
            if method == "GET":
                error = orjson.loads(answer.raw)["error"]
                assert error["type"] == "upstream_bad_encoding"
                no_trace_of(single, answer)
            (received,) = relayed(fake, path)[-1:]
            assert received.method == "GET"
            assert received.headers["Accept-Encoding"] == "identity"
    after = sample(client, "comfygate_upstream_errors_total", upstream=name, kind="bad_encoding")
    # Each refused answer once, and each of B's own prompts looked up before the full read.
    assert after >= before + 8


async def test_decisions_on_an_unreadable_queue_are_refused(single: Scene) -> None:
    """B's bare interrupt and clear are decided on the queue the proxy reads itself: unreadable,
    nothing is interrupted or deleted."""
    single.recode[0].coding, single.recode[0].encode = "br", bytes
    client, fake = single.client, single.fakes[0]
    for path, body in (("/api/interrupt", {}), ("/api/queue", {"clear": True})):
        async with client.post(path, headers=B, json=body) as resp:
            assert resp.status == 502, path
            assert (await resp.json())["error"]["type"] == "upstream_bad_encoding"
    asked = [r for r in fake.received if r.path == "/queue"]
    assert asked
    assert {r.headers["Accept-Encoding"] for r in asked} == {"identity"}
    assert not [r for r in fake.received if r.method == "POST"]
    single.recode[0].coding = None
    async with aiohttp.ClientSession() as session, session.get(f"{fake.url}/queue") as resp:
        queue = await resp.json()
    assert {single.a_run, single.b_pending} <= queue_ids(queue)


@pytest.mark.parametrize(
    ("coding", "encode"),
    [("gzip", gzip.compress), ("x-gzip", gzip.compress), ("deflate", zlib.compress)],
)
async def test_known_encoding_sent_anyway_is_decoded_and_filtered(
    single: Scene, coding: str, encode: Callable[[bytes], bytes]
) -> None:
    single.recode[0].coding, single.recode[0].encode = coding, encode
    await b_reads_only_own(single, "gzip", compressed=True)
    await b_reads_only_own(single, "br", compressed=False)


async def test_decoding_is_bounded(tmp_path: Path, make_proxy: ProxyFactory) -> None:
    """A small gzip body that decodes past ``server.max_inspected_body_mb`` is not inflated."""
    recode = Recode("gzip", lambda body: gzip.compress(b" " * 3 * 1024 * 1024 + body))
    fake = await started_fake(tmp_path / "comfyui", recode)
    try:
        client: Client = await make_proxy(fake.url, token=None, server={"max_inspected_body_mb": 1})
        await place(client, fake, BOB)  # B has a prompt: its view reads ComfyUI
        await fake.wait_idle()
        answer = await ask(client, "GET", "/api/history", B, "gzip")
        assert answer.status == 502
        assert orjson.loads(answer.raw)["error"]["type"] == "upstream_unavailable"
        assert relayed(fake, "/api/history")[-1].headers["Accept-Encoding"] == "identity"
    finally:
        await fake.stop()


async def test_unreadable_instance_left_out_of_merged_views(multi: Scene) -> None:
    """Several instances: the one that sends an unknown coding is left out (named in
    ``Comfygate-Degraded``), never passed on; none readable: 502."""
    multi.recode[0].coding, multi.recode[0].encode = "br", bytes  # A's instance
    a_name = f"127.0.0.1:{multi.fakes[0].port}"
    for path in FILTERED_PATHS:
        answer = await ask(multi.client, "GET", path, B, "gzip")
        assert answer.status == 200, answer.raw
        # B's history and jobs are read from B's prompts' instance only: complete.
        degraded = a_name if path == "/api/queue" else None
        assert answer.headers.get("Comfygate-Degraded") == degraded, path
        no_trace_of(multi, answer)
    history = await ask(multi.client, "GET", "/api/history", B, "gzip")
    assert set(history.json()) == multi.b_history
    # The prompt's own instance is asked directly: refused.
    entry = await ask(multi.client, "GET", f"/api/history/{multi.a_done}", B, "gzip")
    assert entry.status == 502
    assert orjson.loads(entry.raw)["error"]["type"] == "upstream_bad_encoding"
    multi.recode[1].coding, multi.recode[1].encode = "zstd", bytes
    answer = await ask(multi.client, "GET", "/api/history", B, "gzip")
    assert answer.status == 502
    no_trace_of(multi, answer)
    for fake in multi.fakes:
        assert {r.headers["Accept-Encoding"] for r in relayed(fake, "/api/history")} == {"identity"}


# -- HEAD --------------------------------------------------------------------------------------


async def head_matches_get(scene: Scene, path: str, accept: str) -> Answer:
    """HEAD answers as the filtered GET: same status, encoding, type and length, no body; it
    reached ComfyUI as a GET (when it reached it at all)."""
    client = scene.client
    get = await ask(client, "GET", path, B, accept)
    for fake in scene.fakes:
        fake.reset()
    head = await ask(client, "HEAD", path, B, accept)
    assert head.status == get.status, path
    assert head.raw == b""
    assert head.coding == get.coding, path
    assert head.headers.get("Content-Type") == get.headers.get("Content-Type"), path
    assert head.headers["Content-Length"] == str(len(get.raw)), path
    received = [r for f in scene.fakes for r in f.received if r.path == path]
    assert all(r.method == "GET" for r in received), path
    return get


@pytest.mark.parametrize("accept", ["identity", "gzip"])
async def test_head_answers_as_the_filtered_get(single: Scene, accept: str) -> None:
    fake = single.fakes[0]
    # The leak: ComfyUI's own HEAD announces the size of A's entry.
    async with (
        aiohttp.ClientSession() as session,
        session.head(f"{fake.url}/api/history/{single.a_done}") as direct,
    ):
        assert int(direct.headers["Content-Length"]) > 100
    entry = await head_matches_get(single, f"/api/history/{single.a_done}", accept)
    assert entry.json() == {}
    for path in (*FILTERED_PATHS, "/api/system_stats", f"/api/history/{single.b_done}"):
        await head_matches_get(single, path, accept)
    job = await head_matches_get(single, f"/api/jobs/{single.a_done}", accept)
    assert job.status == 404
    assert not [r for r in fake.received if r.path == f"/api/jobs/{single.a_done}"]
    stats = await head_matches_get(single, "/api/system_stats", accept)
    assert stats.json()["system"]["argv"] == []


async def test_head_on_merged_views_answers_as_the_get(multi: Scene) -> None:
    for accept in ("identity", "gzip"):
        entry = await head_matches_get(multi, f"/api/history/{multi.a_done}", accept)
        assert entry.json() == {}
        for path in (*FILTERED_PATHS, f"/api/jobs/{multi.b_done}", "/api/prompt"):
            await head_matches_get(multi, path, accept)
        job = await head_matches_get(multi, f"/api/jobs/{multi.a_done}", accept)
        assert job.status == 404
