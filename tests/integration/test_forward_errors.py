"""Upstream failures become JSON errors (502/504) with a log line; never a traceback."""

from __future__ import annotations

import asyncio
import gzip
import socket
from typing import Any

import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient
from pytest_aiohttp import AiohttpServer
from structlog.testing import capture_logs

from tests.conftest import ProxyFactory


def dead_port() -> int:
    """A loopback port nothing listens on."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


async def test_upstream_refused_is_502_json(make_proxy: ProxyFactory) -> None:
    client = await make_proxy(f"http://127.0.0.1:{dead_port()}")
    with capture_logs() as logs:
        resp = await client.post("/api/prompt", json={"prompt": {}})
    assert resp.status == 502
    body = await resp.json()
    assert body["error"]["type"] == "upstream_unavailable"
    assert body["node_errors"] == {}  # ComfyUI's /prompt shape, so the stock UI shows the message
    assert "Traceback" not in await resp.text()
    events = [e["event"] for e in logs]
    assert "upstream_failed" in events
    assert events.count("request_finished") == 1
    assert resp.headers["X-Request-ID"]


async def test_upstream_refused_other_route_shape(make_proxy: ProxyFactory) -> None:
    client = await make_proxy(f"http://127.0.0.1:{dead_port()}")
    resp = await client.get("/history")
    assert resp.status == 502
    body = await resp.json()
    assert set(body) == {"error"}
    assert body["error"]["type"] == "upstream_unavailable"


async def test_upstream_timeout_is_504(
    make_proxy: ProxyFactory, aiohttp_server: AiohttpServer
) -> None:
    release = asyncio.Event()

    async def hang(request: web.Request) -> web.Response:
        await release.wait()
        return web.Response(text="late")

    app = web.Application()
    app.router.add_get("/history", hang)
    server = await aiohttp_server(app)
    client = await make_proxy(
        str(server.make_url("")).rstrip("/"), upstream={"read_timeout_seconds": 0.2}
    )
    resp = await client.get("/history")
    release.set()
    assert resp.status == 504
    assert (await resp.json())["error"]["type"] == "upstream_timeout"


async def test_upstream_5xx_passes_through_unchanged(
    make_proxy: ProxyFactory, aiohttp_server: AiohttpServer
) -> None:
    async def boom(request: web.Request) -> web.Response:
        return web.Response(
            status=500, text="500 Internal Server Error\n\nServer got itself in trouble"
        )

    app = web.Application()
    app.router.add_post("/prompt", boom)
    server = await aiohttp_server(app)
    client = await make_proxy(str(server.make_url("")).rstrip("/"))
    resp = await client.post("/prompt", json={"prompt": {}})
    assert resp.status == 500
    assert await resp.text() == "500 Internal Server Error\n\nServer got itself in trouble"


@pytest.fixture
async def special_upstream(aiohttp_server: AiohttpServer) -> Any:
    """Responses the fake ComfyUI does not produce: compressed, chunked, broken mid-stream."""
    payload = b"x" * 300_000

    async def gz(request: web.Request) -> web.Response:
        return web.Response(
            body=gzip.compress(b'{"a": 1}'),
            headers={"Content-Encoding": "gzip", "Content-Type": "application/json"},
        )

    async def chunked(request: web.Request) -> web.StreamResponse:
        resp = web.StreamResponse()
        resp.enable_chunked_encoding()
        await resp.prepare(request)
        for _ in range(5):
            await resp.write(b"chunk-" * 1000)
        await resp.write_eof()
        return resp

    async def big(request: web.Request) -> web.Response:
        return web.Response(body=payload, headers={"Cache-Control": "no-cache"})

    async def broken(request: web.Request) -> web.StreamResponse:
        resp = web.StreamResponse(headers={"Content-Length": str(len(payload))})
        await resp.prepare(request)
        await resp.write(payload[:1000])
        assert request.transport is not None
        request.transport.close()
        return resp

    app = web.Application()
    app.router.add_get("/gz", gz)
    app.router.add_get("/chunked", chunked)
    app.router.add_get("/big", big)
    app.router.add_get("/broken", broken)
    server = await aiohttp_server(app)
    return str(server.make_url("")).rstrip("/"), payload


async def test_content_encoding_passes_untouched(
    make_proxy: ProxyFactory, special_upstream: Any
) -> None:
    url, _ = special_upstream
    client: TestClient[Any, Any] = await make_proxy(url)
    resp = await client.get("/gz", headers={"Accept-Encoding": "gzip"}, auto_decompress=False)
    assert resp.status == 200
    assert resp.headers["Content-Encoding"] == "gzip"
    assert gzip.decompress(await resp.read()) == b'{"a": 1}'


async def test_chunked_and_large_responses_stream(
    make_proxy: ProxyFactory, special_upstream: Any
) -> None:
    url, payload = special_upstream
    client = await make_proxy(url)
    resp = await client.get("/chunked")
    assert resp.headers.get("Transfer-Encoding") == "chunked"
    assert await resp.read() == b"chunk-" * 5000
    resp = await client.get("/big")
    assert resp.headers["Content-Length"] == str(len(payload))
    assert resp.headers["Cache-Control"] == "no-cache"
    assert await resp.read() == payload
    head = await client.head("/big")
    assert head.status == 200
    assert head.headers["Content-Length"] == str(len(payload))
    assert await head.read() == b""


async def test_upstream_breaking_mid_stream_truncates(
    make_proxy: ProxyFactory, special_upstream: Any
) -> None:
    url, _ = special_upstream
    client = await make_proxy(url)
    with capture_logs() as logs:
        resp = await client.get("/broken")
        assert resp.status == 200  # headers were already out
        with pytest.raises(Exception):  # noqa: B017,PT011 - any client-side payload error
            await resp.read()
    assert any(e["event"] == "upstream_stream_broken" for e in logs)
