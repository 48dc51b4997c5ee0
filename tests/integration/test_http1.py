"""proxy.upstream.http1 against real servers on 127.0.0.1.

aiohttp servers (the ``aiohttp_server`` fixture) cover well-behaved upstreams; a scripted raw
asyncio server covers what aiohttp will not do on purpose: close-delimited bodies, closing a
keep-alive socket at a chosen moment, silence, and garbage.
"""

from __future__ import annotations

import asyncio
import datetime
import hashlib
import ipaddress
import socket
import ssl
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from pytest_aiohttp import AiohttpServer

from proxy.upstream.http1 import (
    HIGH_WATER,
    Http1Pool,
    UpstreamConnectError,
    UpstreamHttpError,
    UpstreamHttpTimeout,
    UpstreamResponse,
)

Handler = Callable[[int, asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]]
PoolFactory = Callable[..., Http1Pool]

OK = b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok"


# -- helpers ----------------------------------------------------------------------------------


class RawServer:
    """A TCP server running ``handler(connection_index, reader, writer)`` per connection."""

    def __init__(self, handler: Handler) -> None:
        self.handler = handler
        self.connections = 0
        self.port = 0
        self._server: asyncio.Server | None = None
        self._writers: list[asyncio.StreamWriter] = []

    async def start(self) -> RawServer:
        self._server = await asyncio.start_server(self._on_connection, "127.0.0.1", 0)
        self.port = self._server.sockets[0].getsockname()[1]
        return self

    async def _on_connection(self, reader: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        self.connections += 1
        self._writers.append(w)
        try:
            await self.handler(self.connections, reader, w)
        except (ConnectionError, asyncio.IncompleteReadError):
            pass
        finally:
            w.close()

    async def close(self) -> None:
        for w in self._writers:
            w.close()
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()


async def read_request(reader: asyncio.StreamReader) -> bytes:
    """One request head plus its Content-Length body (all our raw tests need)."""
    head = await reader.readuntil(b"\r\n\r\n")
    for line in head.split(b"\r\n"):
        if line.lower().startswith(b"content-length:"):
            return head + await reader.readexactly(int(line.split(b":")[1]))
    return head


async def serve_ok(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    """Answer every request on the connection with a keep-alive ``ok``."""
    while True:
        await read_request(reader)
        writer.write(OK)


@pytest.fixture
async def raw_server() -> AsyncIterator[Callable[[Handler], Awaitable[RawServer]]]:
    servers: list[RawServer] = []

    async def start(handler: Handler) -> RawServer:
        server = await RawServer(handler).start()
        servers.append(server)
        return server

    yield start
    for server in servers:
        await server.close()


@pytest.fixture
async def make_pool() -> AsyncIterator[PoolFactory]:
    pools: list[Http1Pool] = []

    def make(port: int, **overrides: Any) -> Http1Pool:
        options: dict[str, Any] = {
            "host": "127.0.0.1",
            "port": port,
            "ssl": None,
            "server_hostname": None,
            "connect_timeout": 2.0,
            "read_timeout": 5.0,
            "keepalive_timeout": 30.0,
        }
        options.update(overrides)
        pool = Http1Pool(**options)
        pools.append(pool)
        return pool

    yield make
    for pool in pools:
        await pool.close()


async def fetch(
    pool: Http1Pool, method: str, target: str, body: Any = None
) -> tuple[UpstreamResponse, bytes]:
    resp = await pool.request(method, target, [("Host", "upstream")], body)
    data = await resp.read()
    resp.release()
    return resp, data


async def until(predicate: Callable[[], bool]) -> None:
    """Let the loop run until ``predicate()`` holds (a condition wait, not a fixed sleep).

    For transport state that has no event to await; bounded by the caller's timeout.
    """
    while not predicate():  # noqa: ASYNC110 - a transport flag, not something with an Event
        await asyncio.sleep(0)


def peer_counting_app(peers: list[Any]) -> web.Application:
    """An app whose handlers record the client socket each request came on."""

    async def text(request: web.Request) -> web.Response:
        assert request.transport is not None
        peers.append(request.transport.get_extra_info("peername"))
        return web.Response(body=b"hello " + request.path.encode())

    async def echo(request: web.Request) -> web.Response:
        return web.Response(body=await request.read(), headers={"X-Method": request.method})

    async def chunked(request: web.Request) -> web.StreamResponse:
        resp = web.StreamResponse()
        resp.enable_chunked_encoding()
        await resp.prepare(request)
        for i in range(5):
            await resp.write(b"part%d;" % i)
        await resp.write_eof()
        return resp

    async def status(request: web.Request) -> web.Response:
        assert request.transport is not None
        peers.append(request.transport.get_extra_info("peername"))
        return web.Response(status=int(request.match_info["code"]), headers={"ETag": '"e"'})

    app = web.Application()
    app.router.add_get("/text/{tail:.*}", text)
    app.router.add_route("*", "/echo", echo)
    app.router.add_get("/chunked", chunked)
    app.router.add_get("/status/{code}", status)
    return app


# -- framing and keep-alive -------------------------------------------------------------------


async def test_content_length_and_keep_alive_reuse(
    aiohttp_server: AiohttpServer, make_pool: PoolFactory
) -> None:
    peers: list[Any] = []
    server = await aiohttp_server(peer_counting_app(peers))
    pool = make_pool(server.port)
    resp, body = await fetch(pool, "GET", "/text/a%2Fb?q=%20")
    assert (resp.status, resp.reason, resp.content_length) == (200, "OK", len(body))
    assert body == b"hello /text/a/b"  # aiohttp decodes the path; %2F went out byte-exact
    _, body = await fetch(pool, "GET", "/text/again")
    assert body == b"hello /text/again"
    assert len(peers) == 2
    assert peers[0] == peers[1]  # the same client socket both times
    assert pool.connects == 1
    assert pool.idle_count == 1


async def test_bytes_body_post(aiohttp_server: AiohttpServer, make_pool: PoolFactory) -> None:
    server = await aiohttp_server(peer_counting_app([]))
    pool = make_pool(server.port)
    payload = bytes(range(256)) * 1000  # larger than one write: head and body written apart
    resp, body = await fetch(pool, "PUT", "/echo", payload)
    assert body == payload
    assert resp.headers["X-Method"] == "PUT"
    _, body = await fetch(pool, "POST", "/echo", b"")
    assert body == b""
    assert pool.connects == 1


async def test_chunked_response(aiohttp_server: AiohttpServer, make_pool: PoolFactory) -> None:
    server = await aiohttp_server(peer_counting_app([]))
    pool = make_pool(server.port)
    resp = await pool.request("GET", "/chunked", [("Host", "h")], None)
    assert resp.headers["Transfer-Encoding"] == "chunked"
    assert resp.content_length is None
    chunks = []
    while chunk := await resp.read_chunk():
        chunks.append(chunk)
    resp.release()
    assert b"".join(chunks) == b"part0;part1;part2;part3;part4;"
    await fetch(pool, "GET", "/chunked")
    assert pool.connects == 1


async def test_head_has_no_body_and_keeps_the_connection(
    aiohttp_server: AiohttpServer, make_pool: PoolFactory
) -> None:
    peers: list[Any] = []
    server = await aiohttp_server(peer_counting_app(peers))
    pool = make_pool(server.port)
    resp, body = await fetch(pool, "HEAD", "/text/x")
    assert body == b""
    assert resp.content_length == len(b"hello /text/x")
    _, body = await fetch(pool, "GET", "/text/x")
    assert body == b"hello /text/x"
    assert pool.connects == 1
    assert peers[0] == peers[1]


@pytest.mark.parametrize("code", [204, 304])
async def test_bodiless_statuses(
    aiohttp_server: AiohttpServer, make_pool: PoolFactory, code: int
) -> None:
    peers: list[Any] = []
    server = await aiohttp_server(peer_counting_app(peers))
    pool = make_pool(server.port)
    for _ in range(2):
        resp, body = await fetch(pool, "GET", f"/status/{code}")
        assert (resp.status, body, resp.headers["ETag"]) == (code, b"", '"e"')
    assert pool.connects == 1
    assert peers[0] == peers[1]


@pytest.mark.parametrize(
    "head",
    [
        b"HTTP/1.1 200 OK\r\nConnection: close\r\n\r\n",
        b"HTTP/1.0 200 OK\r\nServer: old\r\n\r\n",
    ],
)
async def test_close_delimited_body(
    raw_server: Callable[[Handler], Awaitable[RawServer]], make_pool: PoolFactory, head: bytes
) -> None:
    async def handler(_: int, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_request(reader)
        writer.write(head + b"until the ")
        await writer.drain()
        writer.write(b"very end")
        await writer.drain()
        writer.close()

    server = await raw_server(handler)
    pool = make_pool(server.port)
    resp, body = await fetch(pool, "GET", "/")
    assert body == b"until the very end"
    assert resp.content_length is None
    assert pool.idle_count == 0  # never reused
    _, body = await fetch(pool, "GET", "/")
    assert server.connections == 2


async def test_keepalive_timeout_expires_idle_connections(
    aiohttp_server: AiohttpServer, make_pool: PoolFactory
) -> None:
    server = await aiohttp_server(peer_counting_app([]))
    pool = make_pool(server.port, keepalive_timeout=0.0)
    await fetch(pool, "GET", "/text/1")
    await fetch(pool, "GET", "/text/2")
    assert pool.connects == 2


# -- connections the server closed ------------------------------------------------------------


async def test_connection_closed_while_idle_is_not_reused(
    raw_server: Callable[[Handler], Awaitable[RawServer]], make_pool: PoolFactory
) -> None:
    async def handler(_: int, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_request(reader)
        writer.write(OK)  # keep-alive as far as the client can tell...
        await writer.drain()
        writer.close()  # ...then gone, like a server whose keep-alive timer fired

    server = await raw_server(handler)
    pool = make_pool(server.port)
    await fetch(pool, "GET", "/")
    assert pool.idle_count == 1
    await pool._idle[-1].wait_closed()  # the client noticed the EOF while idle
    _, body = await fetch(pool, "GET", "/")
    assert body == b"ok"
    assert server.connections == 2


def race_handler() -> Handler:
    """Connection 1 answers one request, reads the next one and closes without answering
    (the keep-alive close race); later connections answer normally."""

    async def handler(
        index: int, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> None:
        if index == 1:
            await read_request(reader)
            writer.write(OK)
            await reader.readuntil(b"\r\n\r\n")
            return  # closes, possibly with unread body bytes (a reset)
        while True:
            request = await read_request(reader)
            body = request.split(b"\r\n\r\n", 1)[1]
            writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n%s" % (len(body), body))

    return handler


@pytest.mark.parametrize(("method", "body"), [("GET", None), ("POST", b"replayed body")])
async def test_reused_connection_closed_in_race_is_retried(
    raw_server: Callable[[Handler], Awaitable[RawServer]],
    make_pool: PoolFactory,
    method: str,
    body: bytes | None,
) -> None:
    server = await raw_server(race_handler())
    pool = make_pool(server.port)
    await fetch(pool, "GET", "/first")
    resp, data = await fetch(pool, method, "/second", body)
    assert resp.status == 200
    assert data == (body or b"")
    assert server.connections == 2
    assert pool.connects == 2


async def test_iterator_body_is_not_retried(
    raw_server: Callable[[Handler], Awaitable[RawServer]], make_pool: PoolFactory
) -> None:
    server = await raw_server(race_handler())
    pool = make_pool(server.port)
    await fetch(pool, "GET", "/first")

    async def body() -> AsyncIterator[bytes]:
        yield b"cannot be replayed"

    with pytest.raises(UpstreamHttpError) as info:
        await pool.request("POST", "/second", [("Host", "h")], body())
    assert not isinstance(info.value, UpstreamHttpTimeout)
    assert server.connections == 1
    assert pool.connects == 1


# -- streaming and flow control ---------------------------------------------------------------

LARGE = 200 * 1024 * 1024
BLOCK = 1024 * 1024


async def test_large_streamed_response_keeps_buffer_flat(
    aiohttp_server: AiohttpServer, make_pool: PoolFactory
) -> None:
    block = b"\xab" * BLOCK

    async def large(request: web.Request) -> web.StreamResponse:
        resp = web.StreamResponse()
        resp.content_length = LARGE
        await resp.prepare(request)
        for _ in range(LARGE // BLOCK):
            await resp.write(block)
        return resp

    app = web.Application()
    app.router.add_get("/large", large)
    server = await aiohttp_server(app)
    pool = make_pool(server.port)
    resp = await pool.request("GET", "/large", [("Host", "h")], None)
    assert resp.content_length == LARGE
    total = peak = 0
    while True:
        # A consumer slower than the producer: let several socket reads land per chunk read.
        for _ in range(4):
            await asyncio.sleep(0)
        peak = max(peak, resp.buffered_bytes)
        chunk = await resp.read_chunk()
        if not chunk:
            break
        total += len(chunk)
    pauses = resp.reading_pauses
    resp.release()
    assert total == LARGE
    assert pauses > 0  # the consumer really was slower: flow control was exercised
    # High-water mark plus at most one socket read (256 KiB) that arrived in the same callback.
    assert peak <= HIGH_WATER + 256 * 1024
    assert pool.idle_count == 1


async def test_streamed_request_body_with_backpressure(
    aiohttp_server: AiohttpServer, make_pool: PoolFactory
) -> None:
    total = 64 * BLOCK
    started = asyncio.Event()
    go = asyncio.Event()

    async def upload(request: web.Request) -> web.Response:
        started.set()
        await go.wait()  # not reading: the client must stop producing
        digest = hashlib.sha256()
        size = 0
        async for data in request.content.iter_any():
            digest.update(data)
            size += len(data)
        return web.Response(text=f"{size} {digest.hexdigest()}")

    app = web.Application(client_max_size=total * 2)
    app.router.add_post("/upload", upload)
    server = await aiohttp_server(app)
    pool = make_pool(server.port)

    produced = 0
    expected = hashlib.sha256()

    async def body() -> AsyncIterator[bytes]:
        nonlocal produced
        for i in range(total // BLOCK):
            block = bytes([i % 251]) * BLOCK
            expected.update(block)
            produced += len(block)
            yield block

    task = asyncio.create_task(pool.request("POST", "/upload", [("Host", "h")], body()))
    await started.wait()
    async with asyncio.timeout(10):
        await until(lambda: any(c._write_paused for c in pool._conns))
    stalled_at = produced
    for _ in range(100):  # with the writer paused, the iterator is not advanced at all
        await asyncio.sleep(0)
    assert produced == stalled_at
    # Kernel socket buffers plus one transport buffer's worth, never the whole body.
    assert produced < total // 2
    go.set()
    resp = await task
    text = (await resp.read()).decode()
    resp.release()
    assert text == f"{total} {expected.hexdigest()}"


async def test_early_response_stops_the_upload(
    raw_server: Callable[[Handler], Awaitable[RawServer]], make_pool: PoolFactory
) -> None:
    done = asyncio.Event()

    async def handler(_: int, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.readuntil(b"\r\n\r\n")
        writer.write(b"HTTP/1.1 413 Payload Too Large\r\nContent-Length: 3\r\n\r\nbig")
        await done.wait()  # never reads the body

    server = await raw_server(handler)
    pool = make_pool(server.port)
    produced = 0

    async def body() -> AsyncIterator[bytes]:
        nonlocal produced
        for _ in range(64):
            produced += BLOCK
            yield b"u" * BLOCK

    resp = await pool.request("POST", "/upload", [("Host", "h")], body())
    assert resp.status == 413
    assert await resp.read() == b"big"
    resp.release()
    done.set()
    assert produced < 64 * BLOCK
    assert pool.idle_count == 0  # the request never completed on the wire: not reusable


# -- errors and timeouts ----------------------------------------------------------------------


async def test_malformed_response_is_an_error(
    raw_server: Callable[[Handler], Awaitable[RawServer]], make_pool: PoolFactory
) -> None:
    async def handler(_: int, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_request(reader)
        writer.write(b"HTTP/1.1 200 OK\r\nContent Length: 2\r\n\r\nok")
        await reader.read()

    server = await raw_server(handler)
    pool = make_pool(server.port)
    with pytest.raises(UpstreamHttpError, match="malformed"):
        await pool.request("GET", "/", [("Host", "h")], None)
    assert server.connections == 1  # a protocol error is not a dropped connection: no retry


async def test_malformed_chunked_body_is_an_error(
    raw_server: Callable[[Handler], Awaitable[RawServer]], make_pool: PoolFactory
) -> None:
    async def handler(_: int, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_request(reader)
        writer.write(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n")
        await writer.drain()
        writer.write(b"3\r\nabc\r\nnot-hex\r\n")
        await reader.read()

    server = await raw_server(handler)
    pool = make_pool(server.port)
    resp = await pool.request("GET", "/", [("Host", "h")], None)
    with pytest.raises(UpstreamHttpError, match="malformed"):
        await resp.read()
    resp.release()
    assert pool.idle_count == 0


async def test_connect_refused(make_pool: PoolFactory) -> None:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]  # bound, not listening: connections are refused
        pool = make_pool(port)
        with pytest.raises(UpstreamConnectError, match="cannot connect") as info:
            await pool.request("GET", "/", [("Host", "h")], None)
    assert isinstance(info.value, UpstreamHttpError)
    assert not isinstance(info.value, UpstreamHttpTimeout)


async def test_read_timeout_waiting_for_head(
    raw_server: Callable[[Handler], Awaitable[RawServer]], make_pool: PoolFactory
) -> None:
    async def handler(_: int, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_request(reader)
        await reader.read()  # silent until the client gives up

    server = await raw_server(handler)
    pool = make_pool(server.port, read_timeout=0.2)
    loop = asyncio.get_running_loop()
    started = loop.time()
    with pytest.raises(UpstreamHttpTimeout):
        await pool.request("GET", "/", [("Host", "h")], None)
    assert 0.19 <= loop.time() - started < 2.0
    assert server.connections == 1  # timeouts are never retried


async def test_read_timeout_between_body_bytes(
    raw_server: Callable[[Handler], Awaitable[RawServer]], make_pool: PoolFactory
) -> None:
    async def handler(_: int, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_request(reader)
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\nabc")
        await reader.read()

    server = await raw_server(handler)
    pool = make_pool(server.port, read_timeout=0.2)
    resp = await pool.request("GET", "/", [("Host", "h")], None)
    assert await resp.read_chunk() == b"abc"
    with pytest.raises(UpstreamHttpTimeout):
        await resp.read_chunk()
    resp.release()
    assert pool.idle_count == 0


async def test_connect_timeout(make_pool: PoolFactory) -> None:
    # A listener that never accepts with a full backlog: Linux drops further SYNs, so the
    # handshake hangs (retransmits after 1 s) and the 0.2 s connect timeout fires first.
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen(0)
        port = listener.getsockname()[1]
        fillers = []
        try:
            for _ in range(4):
                filler = socket.socket()
                filler.setblocking(False)
                filler.connect_ex(("127.0.0.1", port))
                fillers.append(filler)
            pool = make_pool(port, connect_timeout=0.2)
            with pytest.raises(UpstreamHttpTimeout):
                await pool.request("GET", "/", [("Host", "h")], None)
        finally:
            for filler in fillers:
                filler.close()


# -- TLS --------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tls_files(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """A self-signed certificate for localhost / 127.0.0.1 and its key."""
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "localhost")])
    now = datetime.datetime.now(datetime.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(
            x509.SubjectAlternativeName(
                [x509.DNSName("localhost"), x509.IPAddress(ipaddress.IPv4Address("127.0.0.1"))]
            ),
            critical=False,
        )
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(key, hashes.SHA256())
    )
    directory = tmp_path_factory.mktemp("tls")
    cert_path, key_path = directory / "cert.pem", directory / "key.pem"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    return cert_path, key_path


async def test_tls(
    aiohttp_server: AiohttpServer, make_pool: PoolFactory, tls_files: tuple[Path, Path]
) -> None:
    cert_path, key_path = tls_files
    server_ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    server_ctx.load_cert_chain(cert_path, key_path)
    peers: list[Any] = []
    server = await aiohttp_server(peer_counting_app(peers), ssl=server_ctx)
    client_ctx = ssl.create_default_context(cafile=str(cert_path))
    pool = make_pool(server.port, ssl=client_ctx, server_hostname="localhost")
    _, body = await fetch(pool, "GET", "/text/secure")
    assert body == b"hello /text/secure"
    _, body = await fetch(pool, "POST", "/echo", b"x" * 200_000)
    assert body == b"x" * 200_000
    _, body = await fetch(pool, "GET", "/chunked")
    assert body == b"part0;part1;part2;part3;part4;"
    assert pool.connects == 1

    untrusting = make_pool(
        server.port, ssl=ssl.create_default_context(), server_hostname="localhost"
    )
    with pytest.raises(UpstreamConnectError, match="certificate verify failed"):
        await untrusting.request("GET", "/text/x", [("Host", "h")], None)


async def test_pool_close_fails_a_pending_read(
    raw_server: Callable[[Handler], Awaitable[RawServer]], make_pool: PoolFactory
) -> None:
    async def handler(_: int, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_request(reader)
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\nabc")
        await reader.read()

    server = await raw_server(handler)
    pool = make_pool(server.port)
    resp = await pool.request("GET", "/", [("Host", "h")], None)
    assert await resp.read_chunk() == b"abc"
    reader = asyncio.create_task(resp.read_chunk())
    await asyncio.sleep(0)
    await pool.close()
    with pytest.raises(UpstreamHttpError):
        await reader
    with pytest.raises(UpstreamHttpError, match="closed"):
        await pool.request("GET", "/", [("Host", "h")], None)
