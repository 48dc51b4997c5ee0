"""HTTP request smuggling and framing (issue 13, family "smuggling").

The proxy has two HTTP/1.1 parsers in line: aiohttp's server (llhttp, strict for requests) reads
what the client sends, and the proxy's own client (``proxy.upstream.http1``) writes a fresh
head toward ComfyUI: the client's framing headers (``Content-Length``, ``Transfer-Encoding``,
``Connection``, ``Expect``, ``Upgrade``) never reach ComfyUI as sent; the proxy frames the body
it actually forwards. So an ambiguous message is refused by the first parser (400, connection
closed) or forwarded as exactly one request with exactly the body the proxy read.

Every case is written on a raw socket to the proxy's real listening port (client libraries
normalise what an attacker would not) and asserts on what the attacker read back and on what
the fake ComfyUI received. The last part puts a scripted, misbehaving upstream behind the
proxy: whatever it does to one user's exchange, the next user's request never gets that
user's answer (response desync).
"""

from __future__ import annotations

import asyncio
import json
import re
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

import pytest
from aiohttp.test_utils import TestClient
from multidict import CIMultiDict

from tests.conftest import ProxyFactory, make_token
from tests.fakes.comfyui import FakeComfyUI

Client = TestClient[Any, Any]
TIMEOUT = 20.0
A_TOKEN, B_TOKEN = make_token("alice", ("user",)), make_token("bob", ("user",))
VIEWER_TOKEN = make_token("vic", ("viewer",))


# ------------------------------------------------------------------------------ raw HTTP


@dataclass
class Reply:
    """One HTTP response as read off the socket."""

    status: int
    headers: CIMultiDict[str]
    body: bytes

    @property
    def error_type(self) -> str | None:
        try:
            data = json.loads(self.body)
        except ValueError:
            return None
        error = data.get("error") if isinstance(data, dict) else None
        return error.get("type") if isinstance(error, dict) else None


@dataclass
class Conversation:
    """Everything one connection answered, and whether the proxy closed it afterwards."""

    replies: list[Reply] = field(default_factory=list)
    interim: list[int] = field(default_factory=list)
    closed: bool = False
    leftover: bytes = b""

    @property
    def statuses(self) -> list[int]:
        return [r.status for r in self.replies]


async def _read_reply(reader: asyncio.StreamReader, conv: Conversation, head_only: bool) -> bool:
    """Read one final response into ``conv``; False at EOF before a status line."""
    while True:
        try:
            head = await reader.readuntil(b"\r\n\r\n")
        except asyncio.IncompleteReadError as exc:
            conv.leftover += exc.partial
            return False
        status_line, *lines = head.decode("latin-1").rstrip("\r\n").split("\r\n")
        status = int(status_line.split(" ")[1])
        headers: CIMultiDict[str] = CIMultiDict()
        for line in lines:
            name, _, value = line.partition(":")
            headers.add(name.strip(), value.strip())
        if 100 <= status < 200:
            conv.interim.append(status)
            continue
        break
    if head_only or status in (204, 304):
        body = b""
    elif headers.get("Transfer-Encoding", "").lower() == "chunked":
        parts = []
        while True:
            size = int((await reader.readuntil(b"\r\n")).split(b";")[0], 16)
            if size == 0:
                await reader.readuntil(b"\r\n")
                break
            parts.append(await reader.readexactly(size))
            await reader.readexactly(2)
        body = b"".join(parts)
    elif "Content-Length" in headers:
        body = await reader.readexactly(int(headers["Content-Length"]))
    else:
        body = await reader.read()
    conv.replies.append(Reply(status, headers, body))
    return True


async def converse(
    port: int,
    data: bytes,
    *,
    head_only: bool = False,
    then: Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]] | None = None,
) -> Conversation:
    """Write ``data`` (one or several requests, as given), read every response until the proxy
    closes the connection. ``then`` runs after the first response (to send more)."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    conv = Conversation()
    try:
        writer.write(data)
        await writer.drain()
        async with asyncio.timeout(TIMEOUT):
            first = True
            while await _read_reply(reader, conv, head_only):
                if first and then is not None:
                    await then(reader, writer)
                first = False
            conv.leftover += await reader.read()
            conv.closed = True
    finally:
        writer.close()
    return conv


def request(
    method: str,
    target: str,
    headers: list[tuple[str, str]] | None = None,
    body: bytes = b"",
    *,
    token: str | None = B_TOKEN,
    version: str = "HTTP/1.1",
    length: bool = True,
    close: bool = True,
) -> bytes:
    """A request written by hand; ``Content-Length`` added for a body unless ``length`` is
    False (then ``headers`` frame it), ``Connection: close`` unless ``close`` is False."""
    lines = [f"{method} {target} {version}", "Host: comfygate.test"]
    if token is not None:
        lines.append(f"Authorization: Bearer {token}")
    lines += [f"{name}: {value}" for name, value in headers or []]
    if body and length:
        lines.append(f"Content-Length: {len(body)}")
    if close:
        lines.append("Connection: close")
    return ("\r\n".join(lines) + "\r\n\r\n").encode() + body


def port_of(client: Client) -> int:
    port = client.server.port
    assert port is not None
    return port


def chunked(*parts: bytes) -> bytes:
    return b"".join(b"%x\r\n%s\r\n" % (len(p), p) for p in parts) + b"0\r\n\r\n"


def prompt_json(color: int = 0x123456) -> bytes:
    graph = {
        "1": {
            "class_type": "EmptyImage",
            "inputs": {"width": 8, "height": 8, "batch_size": 1, "color": color},
        },
        "9": {"class_type": "PreviewImage", "inputs": {"images": ["1", 0]}},
    }
    return json.dumps({"prompt": graph, "client_id": "tab"}).encode()


SMUGGLED = (
    b"GET /internal/logs HTTP/1.1\r\nHost: comfygate.test\r\n"
    + f"Authorization: Bearer {B_TOKEN}\r\nConnection: close\r\n\r\n".encode()
)
"""A second request hidden in a body: B's admin-only read, refused (403) if ever parsed."""


def paths(fake: FakeComfyUI) -> list[str]:
    """What ComfyUI was asked, less the proxy's own catalog reads (``/object_info``)."""
    return [f"{r.method} {r.path}" for r in fake.received if "object_info" not in r.path]


def prompt_posts(fake: FakeComfyUI) -> list[Any]:
    return [r for r in fake.received if r.path.endswith("/prompt")]


@pytest.fixture
async def client(make_proxy: ProxyFactory, fake_comfy: FakeComfyUI, redis_url: str) -> Client:
    """The README's deployment (JWT, isolation, policy, Redis); requests say who they are."""
    return await make_proxy(fake_comfy.url, token=None, redis={"url": redis_url})


def assert_refused_by_parser(conv: Conversation, fake: FakeComfyUI) -> None:
    """aiohttp's parser answered 400 (before any middleware: its own plain-text body), closed
    the connection, and nothing reached ComfyUI."""
    assert conv.statuses == [400], conv
    assert conv.closed
    assert fake.received == []
    assert b"internal" not in conv.leftover


# ------------------------------------------------------------------- ambiguous framing

FRAMING = {
    "cl_te": [("Content-Length", "4"), ("Transfer-Encoding", "chunked")],
    "te_cl": [("Transfer-Encoding", "chunked"), ("Content-Length", "4")],
    "two_cl_differ": [("Content-Length", "4"), ("Content-Length", "40")],
    "two_cl_same": [("Content-Length", "4"), ("Content-Length", "4")],
    "cl_list": [("Content-Length", "4, 4")],
    "cl_plus": [("Content-Length", "+4")],
    "cl_hex": [("Content-Length", "0x4")],
    "te_chunked_identity": [("Transfer-Encoding", "chunked, identity")],
    "te_identity": [("Transfer-Encoding", "identity")],
    "te_gzip_only": [("Transfer-Encoding", "gzip")],
    "te_xchunked": [("Transfer-Encoding", "xchunked")],
    "te_twice": [("Transfer-Encoding", "chunked"), ("Transfer-Encoding", "chunked")],
    "te_vertical_tab": [("Transfer-Encoding", "\x0bchunked")],
    "te_space_before_colon": [("Transfer-Encoding ", "chunked")],
    "cl_space_before_colon": [("Content-Length ", "4")],
}


@pytest.mark.parametrize("headers", FRAMING.values(), ids=FRAMING.keys())
async def test_ambiguous_body_framing_is_refused(
    headers: list[tuple[str, str]], client: Client, fake_comfy: FakeComfyUI
) -> None:
    body = b"4\r\nabcd\r\n0\r\n\r\n" + SMUGGLED
    data = request("POST", "/api/queue", headers, body, length=False, close=False)
    conv = await converse(port_of(client), data)
    assert_refused_by_parser(conv, fake_comfy)


MALFORMED_HEADS = {
    "obs_fold": b"POST /api/queue HTTP/1.1\r\nHost: x\r\nX-A: 1\r\n Transfer-Encoding: chunked\r\n",
    "fold_into_cl": b"POST /api/queue HTTP/1.1\r\nHost: x\r\nContent-Length: 4\r\n 0\r\n",
    "bare_lf": b"POST /api/queue HTTP/1.1\nHost: x\nContent-Length: 4\n",
    "bare_lf_in_header": b"POST /api/queue HTTP/1.1\r\nHost: x\r\nX-A: 1\nContent-Length: 40\r\n",
    "bare_cr": b"POST /api/queue HTTP/1.1\r\nHost: x\r\nX-A: 1\rContent-Length: 40\r\n",
    "nul_in_value": b"POST /api/queue HTTP/1.1\r\nHost: x\r\nX-A: a\x00b\r\n",
    "space_in_name": b"POST /api/queue HTTP/1.1\r\nHost: x\r\nX A: 1\r\n",
    "empty_name": b"POST /api/queue HTTP/1.1\r\nHost: x\r\n: 1\r\n",
    "leading_space_line": b"POST /api/queue HTTP/1.1\r\n Host: x\r\n",
    "http_2_0": b"POST /api/queue HTTP/2.0\r\nHost: x\r\n",
    "http_1_2": b"POST /api/queue HTTP/1.2\r\nHost: x\r\n",
    "no_version": b"POST /api/queue\r\nHost: x\r\n",
    "tab_separator": b"POST\t/api/queue HTTP/1.1\r\nHost: x\r\n",
}


@pytest.mark.parametrize("head", MALFORMED_HEADS.values(), ids=MALFORMED_HEADS.keys())
async def test_malformed_heads_are_refused(
    head: bytes, client: Client, fake_comfy: FakeComfyUI
) -> None:
    auth = f"Authorization: Bearer {B_TOKEN}\r\n".encode()
    data = head + auth + b"Content-Length: 4\r\n\r\n{}  " + SMUGGLED
    if b"Content-Length: 4\r\n" in head:
        data = head + auth + b"\r\n{}  " + SMUGGLED
    conv = await converse(port_of(client), data)
    assert_refused_by_parser(conv, fake_comfy)


CHUNK_ABUSE = {
    "size_overflow": b"fffffffffffffffff\r\nabcd\r\n0\r\n\r\n",
    "size_negative": b"-4\r\nabcd\r\n0\r\n\r\n",
    "size_0x": b"0x4\r\nabcd\r\n0\r\n\r\n",
    "size_space_inside": b"4 4\r\nabcd\r\n0\r\n\r\n",
    "size_bare_lf": b"4\nabcd\r\n0\r\n\r\n",
    "data_longer_than_size": b"2\r\nabcd\r\n0\r\n\r\n",
    "ext_bare_lf": b"4;a=b\nabcd\r\n0\r\n\r\n",
    "ext_quoted_crlf": b'4;a="x\r\n0\r\n\r\n"\r\nabcd\r\n0\r\n\r\n',
    "no_size": b"\r\nabcd\r\n0\r\n\r\n",
}


@pytest.mark.parametrize("body", CHUNK_ABUSE.values(), ids=CHUNK_ABUSE.keys())
async def test_malformed_chunks_are_refused(
    body: bytes, client: Client, fake_comfy: FakeComfyUI
) -> None:
    data = request(
        "POST",
        "/api/queue",
        [("Content-Type", "application/json"), ("Transfer-Encoding", "chunked")],
        body + SMUGGLED,
        length=False,
        close=False,
    )
    conv = await converse(port_of(client), data)
    assert conv.statuses in ([400], [413]), conv
    assert conv.closed
    assert all(r.path not in ("/internal/logs",) for r in fake_comfy.received)
    assert all(r.body_length == 0 or r.body == b"{}" for r in fake_comfy.received)


# ------------------------------------------------------- what is accepted is framed anew


async def test_chunk_extensions_and_trailers_reach_comfyui_as_the_proxys_own_framing(
    client: Client, fake_comfy: FakeComfyUI
) -> None:
    """Valid chunk extensions and trailers are read and dropped: ComfyUI gets the decoded
    body, framed by the proxy (Content-Length), and no client framing header."""
    body = (
        b'2;name="v\\"al";x=1\r\n{"\r\n'
        b"5;ext\r\ndelet\r\n"
        b'4\r\ne": \r\n3\r\n[]}\r\n0\r\nX-Trailer: 1\r\n\r\n'
    )
    data = request(
        "POST",
        "/api/queue",
        [("Content-Type", "application/json"), ("Transfer-Encoding", "chunked")],
        body,
        length=False,
    )
    conv = await converse(port_of(client), data)
    assert conv.statuses == [200], conv
    # Nothing of B's to delete: the isolation guard answers itself.
    assert fake_comfy.received == []

    data = request(
        "POST",
        "/api/prompt",
        [("Content-Type", "application/json"), ("Transfer-Encoding", "chunked")],
        chunked(prompt_json()[:10], prompt_json()[10:]),
        length=False,
    )
    conv = await converse(port_of(client), data)
    assert conv.statuses == [200], conv
    [seen] = prompt_posts(fake_comfy)
    assert (seen.method, seen.path) == ("POST", "/api/prompt")
    assert seen.headers["Content-Length"] == str(seen.body_length)
    assert "Transfer-Encoding" not in seen.headers
    assert "X-Trailer" not in seen.headers
    assert json.loads(seen.body)["prompt"]["1"]["inputs"]["color"] == 0x123456


async def test_refused_request_body_is_never_read_as_a_request(
    client: Client, fake_comfy: FakeComfyUI
) -> None:
    """A request refused before its body is read (no credentials, a viewer's prompt, an
    admin-only route) still has its body consumed by its own framing: the request hidden in
    it is never parsed, answered or forwarded."""
    for token, target in [
        (None, "/api/prompt"),
        (VIEWER_TOKEN, "/api/prompt"),
        (B_TOKEN, "/internal/logs"),
        (B_TOKEN, "/api/free"),
    ]:
        data = request("POST", target, [], SMUGGLED, token=token, close=False)
        data += request("GET", "/api/queue", [("X-Next", "1")])
        conv = await converse(port_of(client), data)
        assert len(conv.replies) == 2, conv
        assert conv.statuses[0] in (401, 403), conv
        assert conv.replies[1].status == 200
        assert json.loads(conv.replies[1].body).keys() == {"queue_running", "queue_pending"}
        assert paths(fake_comfy) == ["GET /api/queue"]
        fake_comfy.reset()


async def test_pipelined_requests_after_a_refused_one_are_answered_in_order(
    client: Client, fake_comfy: FakeComfyUI
) -> None:
    data = (
        request("GET", "/internal/files/output", close=False)  # 403 forbidden_role
        + request("GET", "/api/history", token=None, close=False)  # 401
        + request("GET", "http://elsewhere.test/api/queue", close=False)  # 400 target
        + request("GET", "/api/queue")
    )
    conv = await converse(port_of(client), data)
    assert conv.statuses == [403, 401, 400, 200], conv
    assert [r.error_type for r in conv.replies[:3]] == [
        "forbidden_role",
        "unauthenticated",
        "bad_request_target",
    ]
    assert paths(fake_comfy) == ["GET /api/queue"]


async def test_expect_100_continue_never_reaches_comfyui(
    client: Client, fake_comfy: FakeComfyUI
) -> None:
    """A refused request with ``Expect: 100-continue``: answered, nothing forwarded; an
    accepted one: the proxy reads the body itself and sends ComfyUI no ``Expect``."""
    head = request(
        "POST", "/internal/logs/subscribe", [("Expect", "100-continue")], b"", close=False
    )
    head = head.replace(b"\r\n\r\n", b"\r\nContent-Length: 2\r\n\r\n")

    conv = await converse(port_of(client), head + b"{}" + request("GET", "/api/queue"))
    assert conv.statuses == [403, 200], conv
    assert paths(fake_comfy) == ["GET /api/queue"]
    fake_comfy.reset()

    body = prompt_json(0x654321)
    data = request(
        "POST",
        "/api/prompt",
        [("Expect", "100-continue"), ("Content-Type", "application/json")],
        body,
    )
    conv = await converse(port_of(client), data)
    assert conv.statuses == [200], conv
    [seen] = prompt_posts(fake_comfy)
    assert "Expect" not in seen.headers
    assert json.loads(seen.body)["prompt"]["1"]["inputs"]["color"] == 0x654321


async def test_get_with_a_body_is_refused(client: Client, fake_comfy: FakeComfyUI) -> None:
    """Content on GET/HEAD has no meaning (RFC 9110 9.3.1) and readers disagree on it (some
    ignore the length and read the bytes as the next request): refused, never forwarded."""
    for method in ("GET", "HEAD"):
        conv = await converse(
            port_of(client),
            request(method, "/api/history", [], SMUGGLED),
            head_only=method == "HEAD",
        )
        assert conv.statuses == [400], conv
        if method == "GET":
            assert conv.replies[0].error_type == "body_not_allowed"
    chunked_get = request(
        "GET",
        "/api/queue",
        [("Transfer-Encoding", "chunked")],
        chunked(SMUGGLED),
        length=False,
    )
    conv = await converse(port_of(client), chunked_get)
    assert conv.statuses == [400], conv
    assert fake_comfy.received == []
    # An empty body stays allowed: some clients send "Content-Length: 0" on every request.
    conv = await converse(port_of(client), request("GET", "/api/queue", [("Content-Length", "0")]))
    assert conv.statuses == [200]
    [seen] = fake_comfy.received
    assert seen.body_length == 0


async def test_http_1_0_keep_alive(client: Client, fake_comfy: FakeComfyUI) -> None:
    """HTTP/1.0 with ``Connection: keep-alive``: each request answered once, in order;
    ComfyUI receives each as its own HTTP/1.1 request without the client's hop headers."""
    data = request(
        "GET",
        "/api/queue?n=1",
        [("Connection", "keep-alive"), ("Keep-Alive", "timeout=5")],
        version="HTTP/1.0",
        close=False,
    ) + request("GET", "/api/queue?n=2", version="HTTP/1.0", close=False)
    conv = await converse(port_of(client), data)
    assert conv.statuses == [200, 200], conv
    assert [r.query["n"] for r in fake_comfy.received] == ["1", "2"]
    for seen in fake_comfy.received:
        assert "Keep-Alive" not in seen.headers
        assert seen.headers.get("Connection", "").lower() != "keep-alive"


async def test_non_websocket_upgrade_does_not_tunnel(
    client: Client, fake_comfy: FakeComfyUI
) -> None:
    """``Upgrade: h2c`` (curl --http2 on http://) or any protocol but a WebSocket: answered as
    plain HTTP/1.1 (never 101), the bytes after the head are never a tunnel to ComfyUI, and
    ComfyUI gets no upgrade headers. (aiohttp drops what follows a declined h2c upgrade in the
    same packet; the request is closed here so the case does not wait for the idle timeout.)"""
    for upgrade, connection in [
        ("h2c", "Upgrade, HTTP2-Settings, close"),
        ("websocket", "Upgrade, close"),
        ("foo", "close"),
    ]:
        data = request(
            "GET",
            "/api/queue",
            [
                ("Upgrade", upgrade),
                ("Connection", connection),
                ("HTTP2-Settings", ""),
                ("Sec-WebSocket-Key", "dGhlIHNhbXBsZSBub25jZQ=="),
                ("Sec-WebSocket-Version", "13"),
            ],
            close=False,
        )
        # Bytes after "Connection: close" are refused by llhttp unless an upgrade paused it.
        tail = SMUGGLED if "Upgrade" in connection else b""
        conv = await converse(port_of(client), data + tail)
        assert conv.statuses == [200], (upgrade, conv)
        assert paths(fake_comfy) == ["GET /api/queue"]
        [seen] = fake_comfy.received
        # Headers the client's Connection names are hop-by-hop too (RFC 9110 7.6.1).
        hop = ("HTTP2-Settings",) if "HTTP2-Settings" in connection else ()
        for name in ("Upgrade", "Connection", *hop):
            assert name not in seen.headers, (upgrade, name)
        fake_comfy.reset()


# ------------------------------------------------------------------------- response desync


class ScriptedComfyUI:
    """A raw upstream that misbehaves on request: ``/api/embeddings?who=<user>&act=<act>``.

    It answers each request with ``{"for": "<user>"}``; ``act`` adds the misbehaviour. Every
    request is recorded with the index of the connection it came on.
    """

    SECRET = b'{"for": "alice", "secret": "alice-only"}'

    def __init__(self) -> None:
        self.seen: list[tuple[int, str]] = []
        self.connections = 0
        self.release = asyncio.Event()
        self._server: asyncio.Server | None = None
        self._writers: list[asyncio.StreamWriter] = []
        self.port = 0

    async def start(self) -> None:
        self._server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        self.port = self._server.sockets[0].getsockname()[1]

    async def stop(self) -> None:
        if self._server is not None:
            self._server.close()
            for writer in self._writers:
                writer.close()
            await self._server.wait_closed()

    @staticmethod
    def answer(body: bytes, *extra: str) -> bytes:
        head = ["HTTP/1.1 200 OK", "Content-Type: application/json", *extra]
        head.append(f"Content-Length: {len(body)}")
        return ("\r\n".join(head) + "\r\n\r\n").encode() + body

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        index = self.connections
        self._writers.append(writer)
        try:
            while True:
                head = (await reader.readuntil(b"\r\n\r\n")).decode("latin-1")
                method, target, _ = head.split("\r\n", 1)[0].split(" ")
                match = re.search(r"Content-Length: (\d+)", head, re.IGNORECASE)
                if match:
                    await reader.readexactly(int(match.group(1)))
                self.seen.append((index, f"{method} {target}"))
                who = re.search(r"who=(\w+)", target)
                act = re.search(r"act=(\w+)", target)
                body = json.dumps({"for": who.group(1) if who else ""}).encode()
                await self._act(act.group(1) if act else "", body, writer)
                await writer.drain()
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            writer.close()

    async def _act(self, act: str, body: bytes, writer: asyncio.StreamWriter) -> None:
        if act == "double":  # a second, unasked-for answer right behind the first
            writer.write(self.answer(body) + self.answer(self.SECRET))
        elif act == "double_split":  # ... sent as its own write
            writer.write(self.answer(body))
            await writer.drain()
            writer.write(self.answer(self.SECRET))
        elif act == "short_length":  # Content-Length shorter than the body sent
            writer.write(self.answer(body)[:-2] + b'"}' + self.answer(self.SECRET))
        elif act == "head_body":  # a HEAD answered with a body
            writer.write(self.answer(self.SECRET))
        elif act == "late":  # the answer comes after the proxy gave up waiting
            await self.release.wait()
            writer.write(self.answer(self.SECRET))
        elif act == "cl_and_te":  # both framings: readers could split it two ways
            writer.write(
                b"HTTP/1.1 200 OK\r\nContent-Length: 3\r\nTransfer-Encoding: chunked\r\n\r\n"
                + b"0\r\n\r\n"
                + self.answer(self.SECRET)
            )
        elif act == "interim":  # 1xx interim answers before the final one
            writer.write(b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 103 Early Hints\r\n\r\n")
            writer.write(self.answer(body))
        elif act == "big":  # a body the client stops reading half-way
            size = 4 * 1024 * 1024
            writer.write(
                f"HTTP/1.1 200 OK\r\nContent-Length: {size}\r\n\r\n".encode() + b"x" * size
            )
            writer.write(self.answer(self.SECRET))
        else:
            writer.write(self.answer(body))


@pytest.fixture
async def scripted() -> AsyncIterator[ScriptedComfyUI]:
    upstream = ScriptedComfyUI()
    await upstream.start()
    yield upstream
    upstream.release.set()
    await upstream.stop()


@pytest.fixture
async def desync_proxy(make_proxy: ProxyFactory, scripted: ScriptedComfyUI) -> Client:
    return await make_proxy(
        f"http://127.0.0.1:{scripted.port}",
        token=None,
        upstream={"read_timeout_seconds": 1.0},
    )


def embeddings(who: str, act: str = "", method: str = "GET", close: bool = True) -> bytes:
    token = {"alice": A_TOKEN, "bob": B_TOKEN}[who]
    target = f"/api/embeddings?who={who}" + (f"&act={act}" if act else "")
    return request(method, target, token=token, close=close)


async def bob_gets_his_own(
    client: Client, scripted: ScriptedComfyUI, *, fresh: bool = True
) -> None:
    """B's request, right after A's exchange: B's answer; with ``fresh``, on a connection
    A's exchange never used (the one A's left out of step was dropped)."""
    conv = await converse(port_of(client), embeddings("bob"))
    assert conv.statuses == [200], conv
    assert json.loads(conv.replies[0].body) == {"for": "bob"}
    index, line = scripted.seen[-1]
    assert line == "GET /api/embeddings?who=bob"
    if fresh:
        assert [i for i, _ in scripted.seen].count(index) == 1, scripted.seen


@pytest.mark.parametrize("act", ["double", "double_split", "short_length", "cl_and_te"])
async def test_an_extra_answer_never_reaches_the_next_user(
    act: str, desync_proxy: Client, scripted: ScriptedComfyUI
) -> None:
    conv = await converse(port_of(desync_proxy), embeddings("alice", act))
    assert b"alice-only" not in b"".join(r.body for r in conv.replies)
    if act == "cl_and_te":
        assert conv.statuses == [502], conv
        assert conv.replies[0].error_type == "upstream_unavailable"
    else:
        assert conv.statuses == [200], conv
    await bob_gets_his_own(desync_proxy, scripted)


async def test_a_head_answered_with_a_body(desync_proxy: Client, scripted: ScriptedComfyUI) -> None:
    conv = await converse(
        port_of(desync_proxy), embeddings("alice", "head_body", "HEAD"), head_only=True
    )
    assert conv.statuses == [200], conv
    await bob_gets_his_own(desync_proxy, scripted)


async def test_a_late_answer_never_reaches_the_next_user(
    desync_proxy: Client, scripted: ScriptedComfyUI
) -> None:
    conv = await converse(port_of(desync_proxy), embeddings("alice", "late"))
    assert conv.statuses == [504], conv
    assert conv.replies[0].error_type == "upstream_timeout"
    scripted.release.set()  # ComfyUI answers A now, on the connection the proxy dropped
    await bob_gets_his_own(desync_proxy, scripted)


async def test_interim_answers_are_skipped(desync_proxy: Client, scripted: ScriptedComfyUI) -> None:
    conv = await converse(port_of(desync_proxy), embeddings("alice", "interim"))
    assert conv.statuses == [200], conv
    assert conv.interim == []
    assert json.loads(conv.replies[0].body) == {"for": "alice"}
    await bob_gets_his_own(desync_proxy, scripted, fresh=False)  # in step: may be reused


async def test_a_client_leaving_mid_body_leaves_no_rest_for_the_next_user(
    desync_proxy: Client, scripted: ScriptedComfyUI
) -> None:
    reader, writer = await asyncio.open_connection("127.0.0.1", port_of(desync_proxy))
    writer.write(embeddings("alice", "big"))
    await writer.drain()
    async with asyncio.timeout(TIMEOUT):
        head = await reader.readuntil(b"\r\n\r\n")
        assert head.startswith(b"HTTP/1.1 200"), head
        await reader.readexactly(64 * 1024)
    writer.close()  # A goes away with most of the body unread
    await bob_gets_his_own(desync_proxy, scripted)


async def test_keep_alive_reuse_is_in_step(desync_proxy: Client, scripted: ScriptedComfyUI) -> None:
    """The well-behaved case the others are measured against: A's and B's exchanges share one
    upstream connection (reuse works) and each gets its own answer."""
    for who in ("alice", "bob", "alice", "bob"):
        conv = await converse(port_of(desync_proxy), embeddings(who))
        assert json.loads(conv.replies[0].body) == {"for": who}
    assert {i for i, _ in scripted.seen} == {1}
