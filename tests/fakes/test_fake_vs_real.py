"""Where the fake differed from a real ComfyUI 0.3.64 (run on the CPU, issue 15) and now agrees.

Found by sending the same requests to both (``/users``, ``/settings``, ``/userdata``,
``/v2/userdata``, ``/prompt`` and its errors, ``/history``, ``/queue``, ``/interrupt``,
``/object_info``, ``/extensions``, ``/view``, ``/internal/logs``, the WebSocket events of one
run); everything not listed here already answered alike (statuses, content types, JSON shapes).
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import cast

import aiohttp
from aiohttp import web
from aiohttp.typedefs import Middleware
from pytest_aiohttp import AiohttpClient

from tests.fakes.comfyui import FakeComfyUI

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


async def test_a_json_array_body_on_prompt_is_no_prompt(
    tmp_path: Path, aiohttp_client: AiohttpClient
) -> None:
    """ComfyUI tests ``"front" in json_data`` (membership, works on a list), then answers 400
    ``no_prompt``; the fake called ``.get`` on it and answered 500."""
    client = await aiohttp_client(FakeComfyUI(tmp_path).app)
    async with client.post("/prompt", json=[1]) as resp:
        assert resp.status == 400
        assert await resp.json() == {
            "error": {
                "type": "no_prompt",
                "message": "No prompt provided",
                "details": "No prompt provided",
                "extra_info": {},
            },
            "node_errors": {},
        }


async def test_got_prompt_is_logged_first_and_without_an_id(
    tmp_path: Path, aiohttp_client: AiohttpClient
) -> None:
    """ComfyUI logs ``got prompt`` on entering ``POST /prompt``, refused or not."""
    fake = FakeComfyUI(tmp_path)
    client = await aiohttp_client(fake.app)
    async with client.post("/prompt", json={}) as resp:
        assert resp.status == 400
    assert fake.logs[-1][1] == "got prompt"


async def test_an_empty_username_is_a_500_and_names_are_stripped(
    tmp_path: Path, aiohttp_client: AiohttpClient
) -> None:
    """``UserManager.add_user`` strips the name and raises on an empty one (aiohttp's plain 500);
    the id keeps ``[a-zA-Z0-9-_]`` and turns every other run of characters into one ``-``."""
    fake = FakeComfyUI(tmp_path, multi_user=True)
    client = await aiohttp_client(fake.app)
    async with client.post("/users", json={"username": "   "}) as resp:
        assert resp.status == 500
        assert resp.content_type == "text/plain"
    async with client.post("/users", json={"username": " An é user "}) as resp:
        assert resp.status == 200
        user_id = await resp.json()
    assert user_id.startswith("An-user_")
    assert fake.userdata.users[user_id] == "An é user"


async def test_a_settings_write_reads_the_file_before_its_body_arrives(tmp_path: Path) -> None:
    """ComfyUI's ``AppSettings`` reads ``comfy.settings.json`` and only then awaits the body: a
    write whose body arrives late undoes one that completed meanwhile (a lost update, seen on a
    real 0.3.64 with the body sent 0.5 s after the headers). The fake reproduces it, so the
    proxy's per-user settings lock is tested against the real hazard."""
    fake = FakeComfyUI(tmp_path)
    entered = asyncio.Event()

    @web.middleware
    async def tell(request: web.Request, handler: Handler) -> web.StreamResponse:
        if request.path == "/settings/Comfy.A":
            entered.set()  # the handler runs on, synchronously, up to its body read
        return await handler(request)

    fake.app.middlewares.append(cast(Middleware, tell))
    await fake.start()
    try:
        reader, writer = await asyncio.open_connection(fake.host, fake.port)
        body = b'"from-A"'
        writer.write(
            b"POST /settings/Comfy.A HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
            + f"Content-Length: {len(body)}\r\n\r\n".encode()
        )
        await writer.drain()
        await entered.wait()
        async with aiohttp.ClientSession() as session:
            async with session.post(f"{fake.url}/settings/Comfy.B", data=b'"from-B"') as resp:
                assert resp.status == 200
            writer.write(body)
            await writer.drain()
            assert (await reader.readline()).startswith(b"HTTP/1.1 200")
            writer.close()
            async with session.get(f"{fake.url}/settings") as resp:
                assert await resp.json() == {"Comfy.A": "from-A"}  # B's change is lost
        recorded = [r for r in fake.received if r.path == "/settings/Comfy.A"]
        assert [r.body for r in recorded] == [body]  # still recorded, after the handler
    finally:
        await fake.stop()
