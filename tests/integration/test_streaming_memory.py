"""Bodies stream: 200 MB each way through a real comfygate process with flat memory."""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
from collections.abc import AsyncIterator

import psutil
from aiohttp import ClientSession, web
from pytest_aiohttp import AiohttpServer

from tests.proxy_process import proxy_process

SIZE = 200 * 1024 * 1024
CHUNK = 1024 * 1024
MAX_GROWTH = 40 * 1024 * 1024  # the proxy's RSS may grow by buffers, never by the body


def block(i: int) -> bytes:
    return bytes([i % 251]) * CHUNK


class RssSampler:
    """Samples a process's RSS on every event-loop turn while a transfer runs."""

    def __init__(self, pid: int) -> None:
        self.process = psutil.Process(pid)
        self.baseline = self.process.memory_info().rss
        self.peak = self.baseline
        self._stop = asyncio.Event()

    async def run(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, self.process.memory_info().rss)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._stop.wait(), 0.02)

    def stop(self) -> None:
        self._stop.set()


async def big_upstream(aiohttp_server: AiohttpServer) -> tuple[str, dict[str, str]]:
    received: dict[str, str] = {}

    async def view(request: web.Request) -> web.StreamResponse:
        resp = web.StreamResponse(headers={"Content-Type": "video/mp4"})
        resp.content_length = SIZE
        await resp.prepare(request)
        for i in range(SIZE // CHUNK):
            await resp.write(block(i))
        await resp.write_eof()
        return resp

    async def upload(request: web.Request) -> web.Response:
        digest = hashlib.sha256()
        async for chunk in request.content.iter_chunked(CHUNK):
            digest.update(chunk)
        received["sha256"] = digest.hexdigest()
        return web.json_response({"name": "big.bin", "subfolder": "", "type": "input"})

    app = web.Application(client_max_size=SIZE * 2)
    app.router.add_get("/api/view", view)
    app.router.add_post("/api/upload/image", upload)
    server = await aiohttp_server(app)
    return str(server.make_url("")).rstrip("/"), received


async def test_200mb_download_and_upload_keep_rss_flat(aiohttp_server: AiohttpServer) -> None:
    upstream, received = await big_upstream(aiohttp_server)
    async with proxy_process(upstream) as proxy, ClientSession(headers=proxy.auth) as client:
        sampler = RssSampler(proxy.pid)
        sampling = asyncio.create_task(sampler.run())

        expected = hashlib.sha256()
        for i in range(SIZE // CHUNK):
            expected.update(block(i))
        got = hashlib.sha256()
        async with client.get(f"{proxy.url}/api/view?filename=big.mp4&type=output") as resp:
            assert resp.status == 200
            assert resp.headers["Content-Length"] == str(SIZE)
            async for chunk in resp.content.iter_chunked(CHUNK):
                got.update(chunk)
        assert got.hexdigest() == expected.hexdigest()

        async def body() -> AsyncIterator[bytes]:
            for i in range(SIZE // CHUNK):
                yield block(i)

        async with client.post(
            f"{proxy.url}/api/upload/image",
            data=body(),
            headers={"Content-Length": str(SIZE), "Content-Type": "application/octet-stream"},
        ) as resp:
            assert resp.status == 200
        assert received["sha256"] == expected.hexdigest()

        sampler.stop()
        await sampling
        growth = sampler.peak - sampler.baseline
        print(f"proxy RSS growth {growth / 2**20:.1f} MiB")
        assert growth < MAX_GROWTH, f"proxy RSS grew by {growth / 2**20:.1f} MiB"
