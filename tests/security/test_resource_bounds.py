"""Resource bounds and unreadable bodies on the inspected routes (``proxy.request.bodies``).

Memory: the bytes of request bodies the proxy holds to inspect them are bounded per principal
(429) and per process (503), accounted on Content-Length before reading and chunk by chunk for
chunked bodies, and given back when the request ends however it ends. Assertions are on the
accounting (gauge and budget), the answers, and what the fake ComfyUI received.

Reading: on every inspected route a body the proxy cannot read as ComfyUI does (not JSON, not
an object, an unknown charset, a Content-Encoding) or one over the size cap is refused in
ComfyUI's error shape and never forwarded, for plain users and admins alike; a body the old
reader (orjson) could not parse but ComfyUI's ``json.loads`` can no longer slips past
isolation.
"""

from __future__ import annotations

import asyncio
import gzip
import json
import zlib
from collections.abc import AsyncIterator, Callable
from typing import Any

import orjson
import pytest
from aiohttp.test_utils import TestClient

from proxy.errors import SettingsError
from proxy.principal import comfy_user_id
from proxy.request.bodies import BODY_BUDGET, BodyBudget
from tests.conftest import ProxyFactory, bearer, make_settings
from tests.fakes.comfyui import FakeComfyUI
from tests.integration.multi_support import Fakes, fakes, multi_proxy
from tests.integration.support import graph, sample

Client = TestClient[Any, Any]
KB, MB = 1024, 1024 * 1024
GAUGE = "comfygate_inspected_body_bytes_in_flight"
REFUSALS = "comfygate_inspected_body_refusals_total"
ALICE, BOB, ADMIN = bearer("alice"), bearer("bob"), bearer("root", ("admin",))
FIRST = 700 * KB
"""What a held request sends before it waits: two fit a principal's 2 MB, three do not."""
BOUNDS = {
    "max_inspected_body_mb": 1,
    "max_inspected_bytes_per_principal_mb": 2,
    "max_inspected_bytes_in_flight_mb": 4,
}
INSPECTED = (
    ("/api/prompt", "invalid_prompt"),
    ("/api/queue", "invalid_body"),
    ("/api/history", "invalid_body"),
    ("/api/interrupt", "invalid_body"),
    ("/api/jobs/cancel", "invalid_body"),
)


async def proxy_with(make_proxy: ProxyFactory, fake: FakeComfyUI, **server: Any) -> Client:
    """Rate limits off: these tests send many requests on purpose; the bounds are the subject."""
    client: Client = await make_proxy(
        fake.url, token=None, server={**BOUNDS, **server}, rate_limits={"enabled": False}
    )
    return client


def budget(client: Client) -> BodyBudget:
    found: BodyBudget = client.app[BODY_BUDGET]
    return found


async def until(predicate: Callable[[], bool]) -> None:
    """Let the loop run until ``predicate()`` holds (a condition wait on the proxy's own
    accounting, which has no event to await), bounded by a timeout."""
    async with asyncio.timeout(10):
        while not predicate():  # noqa: ASYNC110 - accounting state, not something with an Event
            await asyncio.sleep(0)


def posts(fake: FakeComfyUI, path: str | None = None) -> list[bytes]:
    """Bodies of the POSTs the fake received (on ``path`` when given)."""
    return [
        r.body for r in fake.received if r.method == "POST" and (path is None or r.path == path)
    ]


def padded(doc: dict[str, Any], size: int) -> bytes:
    """``doc`` with a ``pad`` member making its JSON ``size`` bytes long."""
    bare = len(orjson.dumps({**doc, "pad": ""}))
    return orjson.dumps({**doc, "pad": "x" * (size - bare)})


async def held(body: bytes, gate: asyncio.Event) -> AsyncIterator[bytes]:
    """A chunked body: :data:`FIRST` bytes, then the rest once ``gate`` is set."""
    yield body[:FIRST]
    await gate.wait()
    yield body[FIRST:]


async def chunked(body: bytes) -> AsyncIterator[bytes]:
    """The whole body, chunked (no Content-Length)."""
    for start in range(0, len(body), 64 * KB):
        yield body[start : start + 64 * KB]


async def unsent(
    client: Client, path: str, headers: dict[str, str], length: int
) -> tuple[int, Any, dict[str, str]]:
    """POST with ``Content-Length: length`` and no byte of the body sent: only an answer given
    before reading comes back (aiohttp's client would hold the headers until the first chunk)."""
    reader, writer = await asyncio.open_connection(client.host, client.port)
    lines = [f"POST {path} HTTP/1.1", f"Host: {client.host}:{client.port}"]
    lines += [f"{k}: {v}" for k, v in headers.items()]
    lines += [f"Content-Length: {length}", "Content-Type: application/json", "", ""]
    writer.write("\r\n".join(lines).encode())
    try:
        head = (await reader.readuntil(b"\r\n\r\n")).decode().split("\r\n")
        fields = dict(line.split(": ", 1) for line in head[1:] if line)
        body = await reader.readexactly(int(fields["Content-Length"]))
    finally:
        writer.close()
    return int(head[0].split()[1]), orjson.loads(body), fields


async def answer(
    client: Client, path: str, headers: dict[str, str], data: Any
) -> tuple[int, Any, dict[str, str]]:
    """Status, JSON body (None for ComfyUI's empty 200s) and headers of a POST."""
    async with client.post(path, headers=headers, data=data) as resp:
        raw = await resp.read()
        return resp.status, orjson.loads(raw) if raw else None, dict(resp.headers)


async def own_prompt(client: Client, fake: FakeComfyUI, headers: dict[str, str]) -> str:
    """A finished prompt of the caller's, submitted through the proxy."""
    async with client.post("/api/prompt", headers=headers, json={"prompt": graph()}) as resp:
        assert resp.status == 200, await resp.text()
        prompt_id: str = (await resp.json())["prompt_id"]
    await fake.wait_idle()
    return prompt_id


# -- memory ------------------------------------------------------------------------------------


@pytest.mark.parametrize("route", ["/api/queue", "/api/prompt"])
async def test_one_user_past_its_bound_gets_429_before_more_is_read(
    make_proxy: ProxyFactory, fake_comfy: FakeComfyUI, route: str
) -> None:
    client = await proxy_with(make_proxy, fake_comfy)
    mine = await own_prompt(client, fake_comfy, ALICE)
    fake_comfy.reset()
    doc = {"prompt": graph()} if route == "/api/prompt" else {"delete": [mine]}
    body = padded(doc, 900 * KB)
    gate = asyncio.Event()
    first = [asyncio.create_task(answer(client, route, ALICE, held(body, gate))) for _ in "ab"]
    await until(lambda: sample(client, GAUGE) == 2 * FIRST)

    # A third chunked body of hers is refused as it crosses her 2 MB...
    status, error, headers = await answer(client, route, ALICE, chunked(body))
    assert status == 429
    assert error["error"]["type"] == "too_many_bodies_in_flight"
    assert headers["Retry-After"] == "1"
    assert error["error"]["retry_after"] == 1
    # ...a fourth with a Content-Length before a byte of it is read (none was ever sent).
    status, error, _ = await unsent(client, route, ALICE, len(body))
    assert (status, error["error"]["type"]) == (429, "too_many_bodies_in_flight")
    assert sample(client, GAUGE) == 2 * FIRST  # the refused ones hold nothing
    assert sample(client, REFUSALS, reason="principal_bound") == 2
    assert posts(fake_comfy) == []  # nothing of hers reached ComfyUI yet

    # Bob is not held back by her.
    bobs = padded({"prompt": graph()} if route == "/api/prompt" else {}, 900 * KB)
    status, bobs_answer, _ = await answer(client, route, BOB, bobs)
    assert status == 200
    assert sample(client, GAUGE) == 2 * FIRST
    answers = [bobs_answer]

    gate.set()
    for task in first:
        status, hers, _ = await task
        assert status == 200
        answers.append(hers)
    await until(lambda: sample(client, GAUGE) == 0)
    assert budget(client).in_flight == 0
    assert budget(client).held_by(f"u:{comfy_user_id('alice')}") == 0
    assert budget(client).peak <= 2 * MB + 900 * KB  # hers, at most, and Bob's one
    if route == "/api/queue":
        # Hers reached ComfyUI as the proxy rewrote them: her own id, no padding.
        assert posts(fake_comfy, "/api/queue") == [orjson.dumps({"delete": [mine]})] * 2
    else:
        # What ComfyUI had no room for at once, the gateway queue released as it made room.
        ids = {a["prompt_id"] for a in answers}
        await fake_comfy.queue.wait_for(lambda: ids <= set(fake_comfy.queue.history))
        assert len(posts(fake_comfy, "/api/prompt")) == 3  # hers twice, Bob's once
    await fake_comfy.wait_idle()


async def test_many_users_past_the_process_bound_get_503(
    make_proxy: ProxyFactory, fake_comfy: FakeComfyUI
) -> None:
    client = await proxy_with(make_proxy, fake_comfy, max_inspected_bytes_in_flight_mb=2)
    users = [bearer(f"user{i}", ("admin",)) for i in range(4)]  # admins: forwarded as they are
    body = padded({"delete": []}, 900 * KB)
    gate = asyncio.Event()
    first = [
        asyncio.create_task(answer(client, "/api/queue", u, held(body, gate))) for u in users[:2]
    ]
    await until(lambda: sample(client, GAUGE) == 2 * FIRST)

    status, error, headers = await answer(client, "/api/queue", users[2], chunked(body))
    assert status == 503
    assert error["error"]["type"] == "proxy_busy"
    assert headers["Retry-After"] == "1"
    status, error, _ = await unsent(client, "/api/queue", users[3], len(body))
    assert (status, error["error"]["type"]) == (503, "proxy_busy")
    assert sample(client, REFUSALS, reason="process_bound") == 2
    assert sample(client, GAUGE) == 2 * FIRST
    assert posts(fake_comfy) == []

    gate.set()
    for task in first:
        assert (await task)[0] == 200
    await until(lambda: sample(client, GAUGE) == 0)
    assert budget(client).peak <= 2 * MB
    # Only the two accepted bodies reached ComfyUI, in the proxy's own form.
    assert posts(fake_comfy, "/api/queue") == [body] * 2


async def test_a_cancelled_upload_gives_its_bytes_back(
    make_proxy: ProxyFactory, fake_comfy: FakeComfyUI
) -> None:
    client = await proxy_with(make_proxy, fake_comfy)
    body = padded({"delete": []}, 900 * KB)
    task = asyncio.create_task(answer(client, "/api/queue", ADMIN, held(body, asyncio.Event())))
    await until(lambda: sample(client, GAUGE) == FIRST)
    task.cancel()  # the client goes away mid-body
    with pytest.raises(asyncio.CancelledError):
        await task
    await until(lambda: sample(client, GAUGE) == 0)
    assert budget(client).held_by(f"u:{comfy_user_id('root')}") == 0
    assert posts(fake_comfy) == []


async def test_refused_and_failed_requests_give_their_bytes_back(
    make_proxy: ProxyFactory, fake_comfy: FakeComfyUI
) -> None:
    client = await proxy_with(make_proxy, fake_comfy)
    json_type = {"Content-Type": "application/json"}
    over = padded({}, MB + 1)
    cases = [
        (b'{"delete": [' + b" " * 500 * KB, 400),  # not JSON, after 500 KB were held
        (over, 413),  # over the size cap, with a Content-Length
    ]
    for data, status in cases:
        assert (await answer(client, "/api/queue", {**ADMIN, **json_type}, data))[0] == status
        assert sample(client, GAUGE) == 0
    # Over the cap as it arrives.
    assert (await answer(client, "/api/queue", ADMIN, chunked(over)))[0] == 413
    assert sample(client, GAUGE) == 0
    # ComfyUI fails while the body is held: the proxy's 502 gives it back too.
    await fake_comfy.stop()
    status, error, _ = await answer(client, "/api/queue", ADMIN, padded({}, 900 * KB))
    assert status == 502, error
    assert sample(client, GAUGE) == 0
    assert budget(client).in_flight == 0
    assert budget(client).held_by(f"u:{comfy_user_id('root')}") == 0


async def test_a_compressed_body_is_refused_before_it_is_inflated(
    make_proxy: ProxyFactory, fake_comfy: FakeComfyUI
) -> None:
    """A 2 KB gzip body would inflate to 900 KB behind a Content-Length of 2 KB: the policy,
    which reads /prompt bodies first, must not read it either."""
    client = await proxy_with(make_proxy, fake_comfy)
    bomb = gzip.compress(padded({"prompt": graph()}, 900 * KB))
    assert len(bomb) < 8 * KB
    headers = {**BOB, "Content-Type": "application/json", "Content-Encoding": "gzip"}
    status, body, _ = await answer(client, "/api/prompt", headers, bomb)
    assert (status, body["error"]["type"]) == (400, "invalid_prompt")
    assert body["node_errors"] == {}
    assert budget(client).peak == 0  # not a byte of it was held
    assert posts(fake_comfy) == []


@pytest.mark.parametrize(
    ("server", "problem"),
    [
        ({"max_inspected_body_mb": 100}, "max_inspected_bytes_per_principal_mb must be at least"),
        (
            {"max_inspected_bytes_per_principal_mb": 512},
            "max_inspected_bytes_in_flight_mb must be at least",
        ),
    ],
)
def test_bounds_below_one_body_are_a_configuration_error(
    server: dict[str, Any], problem: str
) -> None:
    """A bound below one allowed body would answer "retry later" to that body forever."""
    with pytest.raises(SettingsError, match=problem):
        make_settings("http://127.0.0.1:8188", server=server)


# -- unreadable bodies ---------------------------------------------------------------------


def _gzip(headers: dict[str, str]) -> tuple[dict[str, str], bytes]:
    return {**headers, "Content-Encoding": "gzip"}, gzip.compress(b'{"delete": []}')


UNREADABLE: dict[str, tuple[Callable[[dict[str, str]], tuple[dict[str, str], Any]], int, str]] = {
    "not_json": (lambda h: (h, b'{"delete": ['), 400, "not_json"),
    "array": (lambda h: (h, b"[1, 2]"), 400, "wrong_type"),
    "string": (lambda h: (h, b'"clear"'), 400, "wrong_type"),
    "null": (lambda h: (h, b"null"), 400, "wrong_type"),
    "gzip": (_gzip, 400, "content_encoding"),
    "deflate": (
        lambda h: ({**h, "Content-Encoding": "deflate"}, zlib.compress(b"{}")),
        400,
        "content_encoding",
    ),
    "charset": (
        lambda h: ({**h, "Content-Type": "application/json; charset=x-nope"}, b"{}"),
        400,
        "charset",
    ),
    "charset_not_text": (
        lambda h: ({**h, "Content-Type": "application/json; charset=base64"}, b"e30="),
        400,
        "charset",
    ),
    "oversized": (lambda h: (h, padded({}, MB + 1)), 413, "too_large"),
    "oversized_chunked": (lambda h: (h, chunked(padded({}, MB + 1))), 413, "too_large"),
}


@pytest.mark.parametrize("case", sorted(UNREADABLE))
@pytest.mark.parametrize(("route", "error_type"), INSPECTED)
async def test_unreadable_bodies_are_refused_in_comfyuis_shape(
    make_proxy: ProxyFactory, fake_comfy: FakeComfyUI, route: str, error_type: str, case: str
) -> None:
    client = await proxy_with(make_proxy, fake_comfy)
    build, status, reason = UNREADABLE[case]
    for who in (BOB, ADMIN):  # admins' bodies were forwarded unread before
        headers, data = build({**who, "Content-Type": "application/json"})
        got, body, _ = await answer(client, route, headers, data)
        assert got == status, body
        error = body["error"]
        assert set(error) == {"type", "message", "details", "extra_info"}
        assert error["type"] == (error_type if status == 400 else "payload_too_large")
        if route == "/api/prompt":
            assert body["node_errors"] == {}  # what the frontend needs to show the message
        else:
            assert "node_errors" not in body
    assert sample(client, REFUSALS, reason=reason) == 2
    assert posts(fake_comfy) == []  # never forwarded
    assert sample(client, GAUGE) == 0


@pytest.mark.parametrize(("route", "error_type"), INSPECTED)
async def test_several_instances_refuse_them_too(
    multi_proxy: Callable[..., Any], fakes: Fakes, route: str, error_type: str
) -> None:
    """The merged and split paths (sticky interrupt, split deletes...) read the same way."""
    client: Client = await multi_proxy(server=BOUNDS, rate_limits={"enabled": False})
    for who in (BOB, ADMIN):
        for data in (b'{"delete": [', b"[]"):
            got, body, _ = await answer(
                client, route, {**who, "Content-Type": "application/json"}, data
            )
            assert (got, body["error"]["type"]) == (400, error_type)
    for fake in fakes:
        assert posts(fake) == []


async def test_an_empty_interrupt_still_stops_what_runs(
    make_proxy: ProxyFactory, fake_comfy: FakeComfyUI
) -> None:
    """ComfyUI reads an empty /interrupt body as ``{}`` (the stock UI sends none): not refused."""
    client = await proxy_with(make_proxy, fake_comfy)
    async with client.post("/api/interrupt", headers=ADMIN) as resp:
        assert resp.status == 200
    assert posts(fake_comfy, "/api/interrupt") == [b"{}"]


# -- what the old reader missed: bodies only ComfyUI's json.loads reads ------------------------


@pytest.mark.parametrize(
    "encode",
    [
        pytest.param(lambda d: (json.dumps({**d, "n": float("nan")}).encode(), {}), id="nan"),
        pytest.param(
            lambda d: (
                json.dumps(d).encode("utf-16"),
                {"Content-Type": "application/json; charset=utf-16"},
            ),
            id="utf-16",
        ),
        pytest.param(lambda d: (json.dumps({**d, "n": 10**30}).encode(), {}), id="big-int"),
    ],
)
@pytest.mark.parametrize("route", ["/api/history", "/api/queue"])
async def test_bob_cannot_delete_alices_entries_with_a_body_only_comfyui_reads(
    make_proxy: ProxyFactory,
    fake_comfy: FakeComfyUI,
    route: str,
    encode: Callable[[dict[str, Any]], tuple[bytes, dict[str, str]]],
) -> None:
    client = await proxy_with(make_proxy, fake_comfy)
    alices = await own_prompt(client, fake_comfy, ALICE)
    fake_comfy.reset()
    data, extra = encode({"delete": [alices], "clear": False})
    headers = {**BOB, "Content-Type": "application/json", **extra}
    async with client.post(route, headers=headers, data=data) as resp:
        # What Bob's request made the proxy send carries its request id (the proxy's own
        # background reads, such as the gateway queue's of ComfyUI's queue, carry none).
        relayed = [r for r in fake_comfy.received if "X-Request-ID" in r.headers]
        if b"NaN" in data or str(10**30).encode() in data:
            # Ambiguous between readers (proxy.comfy.json_body): refused, never forwarded.
            assert (resp.status, (await resp.json())["error"]["type"]) == (400, "invalid_body")
            assert relayed == []
        else:
            assert resp.status == 200  # ComfyUI's answer for nothing of his to delete
    for received in [r for r in fake_comfy.received if "X-Request-ID" in r.headers]:
        # As ComfyUI reads it: decoded with the charset it was sent with, by json.loads.
        charset = received.headers.get("Content-Type", "").partition("charset=")[2] or "utf-8"
        assert alices not in str(json.loads(received.body.decode(charset)).get("delete"))
    assert alices in fake_comfy.queue.history  # her entry is still there


__all__ = ["fakes", "multi_proxy"]  # fixtures used by name
