"""The browser flow through the whole app: login page, session cookie, ComfyUI, logout."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import aiohttp
from aiohttp.test_utils import TestClient

from tests.conftest import ProxyFactory, make_token
from tests.fakes.comfyui import FakeComfyUI
from tests.support.users import write_users


def users_file(tmp_path: Path) -> str:
    return str(write_users(tmp_path / "users.toml", {"alice": ["user"]}, "correct horse battery"))


async def login(client: TestClient[Any, Any], **fields: str) -> Any:
    page = await client.get("/login?next=/%3Fworkflow%3D1")
    assert page.status == 200
    csrf = re.search(r'name="csrf" value="([^"]+)"', await page.text())
    assert csrf is not None
    origin = f"http://{client.server.host}:{client.server.port}"
    return await client.post(
        "/login",
        data={"csrf": csrf.group(1), "next": "/?workflow=1", **fields},
        headers={"Origin": origin},
        allow_redirects=False,
    )


async def test_password_login_then_comfyui_then_logout(
    make_proxy: ProxyFactory, fake_comfy: FakeComfyUI, tmp_path: Path
) -> None:
    client = await make_proxy(
        fake_comfy.url, token=None, auth={"login": {"users_file": users_file(tmp_path)}}
    )
    origin = f"http://{client.server.host}:{client.server.port}"
    resp = await client.get("/", headers={"Accept": "text/html"}, allow_redirects=False)
    assert resp.status == 302
    assert resp.headers["Location"].startswith("/login?next=")

    bad = await login(client, username="alice", password="wrong")
    assert bad.status == 401
    assert "Invalid username, password or token." in await bad.text()

    good = await login(client, username="alice", password="correct horse battery")
    assert good.status == 303
    assert good.headers["Location"] == "/?workflow=1"
    cookie = good.cookies["comfygate_session"]
    assert cookie["httponly"]
    assert cookie["samesite"] == "Lax"

    resp = await client.get("/api/queue")
    assert resp.status == 200
    assert fake_comfy.received[-1].headers["Comfy-User"].startswith("alice-")
    assert "comfygate_session" not in fake_comfy.received[-1].headers.get("Cookie", "")
    ws = await client.ws_connect("/ws?clientId=tab1", headers={"Origin": origin})
    assert (await ws.receive_json())["data"]["sid"] == "tab1"

    out = await client.post("/logout", headers={"Origin": origin}, allow_redirects=False)
    assert out.status == 303
    assert out.headers["Location"] == "/login"
    closed = await ws.receive()  # the signed-out browser's socket ends with the session
    assert (closed.type, closed.data) == (aiohttp.WSMsgType.CLOSE, 1008)
    client.session.cookie_jar.update_cookies({"comfygate_session": cookie.value})
    resp = await client.get("/api/queue")
    assert resp.status == 401  # the copied cookie died with the logout
    assert (await resp.json())["error"]["type"] == "session_revoked"


async def test_token_login(make_proxy: ProxyFactory, fake_comfy: FakeComfyUI) -> None:
    client = await make_proxy(fake_comfy.url, token=None)
    resp = await login(client, token=make_token("bob", ("user",)))
    assert resp.status == 303
    assert (await client.get("/api/queue")).status == 200


async def test_login_page_is_public_and_under_the_base_path(
    make_proxy: ProxyFactory, fake_comfy: FakeComfyUI
) -> None:
    client = await make_proxy(fake_comfy.url, token=None, server={"base_path": "/comfy"})
    resp = await client.get("/comfy/login")
    assert resp.status == 200
    assert "text/html" in resp.headers["Content-Type"]
    css = await client.get("/comfy/comfygate/static/login.css")
    assert css.status == 200
    assert fake_comfy.received == []
