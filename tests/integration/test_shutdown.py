"""SIGTERM: /readyz 503, listener closed, WebSockets closed with 1001, in-flight HTTP finishes."""

from __future__ import annotations

import asyncio

import aiohttp
from aiohttp import WSMsgType, web
from pytest_aiohttp import AiohttpServer

from tests.proxy_process import proxy_process


async def test_graceful_shutdown(aiohttp_server: AiohttpServer) -> None:
    entered, release = asyncio.Event(), asyncio.Event()

    async def slow(request: web.Request) -> web.Response:
        entered.set()
        await release.wait()
        return web.json_response({"done": True})

    async def ws_handler(request: web.Request) -> web.WebSocketResponse:
        ws = web.WebSocketResponse()
        await ws.prepare(request)
        await ws.send_json({"type": "status", "data": {"sid": "s1"}})
        async for _ in ws:
            pass
        return ws

    async def prompt(request: web.Request) -> web.Response:
        return web.json_response({"exec_info": {"queue_remaining": 0}})

    app = web.Application()
    app.router.add_get("/history", slow)
    app.router.add_get("/ws", ws_handler)
    app.router.add_get("/prompt", prompt)
    upstream = await aiohttp_server(app)

    async with (
        proxy_process(
            str(upstream.make_url("")).rstrip("/"), COMFYGATE_SERVER__DRAIN_SECONDS="1.0"
        ) as proxy,
        aiohttp.ClientSession(headers=proxy.auth) as client,
    ):
        async with client.get(f"{proxy.url}/readyz") as resp:
            assert resp.status == 200
        ws = await client.ws_connect(f"{proxy.url}/ws?clientId=s1")
        assert (await ws.receive_json())["type"] == "status"
        in_flight = asyncio.create_task(client.get(f"{proxy.url}/history"))
        await entered.wait()

        proxy.terminate()
        async with asyncio.timeout(5):
            while True:  # the signal is asynchronous: wait for the proxy to act on it
                async with client.get(f"{proxy.url}/readyz") as resp:
                    if resp.status == 503:
                        assert (await resp.json())["status"] == "draining"
                        break

        msg = await asyncio.wait_for(ws.receive(), 10)
        assert msg.type is WSMsgType.CLOSE
        assert msg.data == 1001

        refused = False
        try:
            async with client.get(f"{proxy.url}/healthz") as resp:
                pass
        except aiohttp.ClientConnectionError:
            refused = True
        assert refused, "new connections must be refused once draining is over"

        release.set()
        resp = await asyncio.wait_for(in_flight, 10)
        assert resp.status == 200
        assert await resp.json() == {"done": True}
        assert await asyncio.wait_for(proxy.process.wait(), 10) == 0
