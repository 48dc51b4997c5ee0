"""Credentials never reach ComfyUI, and a query token is a credential only on a real WebSocket
handshake (issue 13, item 10).

- Cookies: the proxy's session and CSRF cookies are stripped from *every* ``Cookie`` header
  (aiohttp reads only the first; a second one used to carry the session to ComfyUI), also when
  a part merely mentions them (quoted values, other separators).
- ``token`` query parameters: removed in every percent-encoding (``%74oken``) and every copy,
  whatever authenticated the request. A ``?token=`` next to a header or cookie credential is
  not refused: it is ignored (the header or cookie decides, as the authenticator's order says)
  and stripped.
- ``?token=`` authenticates only the handshake of ComfyUI's socket (rule ``ws``) that aiohttp's
  ``WebSocketResponse`` would accept: GET, ``Upgrade: websocket``, ``Connection: upgrade``, a
  ``Sec-WebSocket-Key`` of 16 bytes and a supported version. An ``Upgrade`` header on a plain
  request does not make the query token count.
"""

from __future__ import annotations

import base64
import json
import os
import time
from typing import Any

import aiohttp
import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient

from proxy.auth.authenticator import AUTH
from tests.conftest import ProxyFactory, bearer, make_token
from tests.fakes.comfyui import FakeComfyUI
from tests.security.raw_http import exchange
from tests.support.gateway_queue import settled

Client = TestClient[Any, Any]
SESSION, CSRF = "comfygate_session", "comfygate_csrf"
A_TOKEN, B_TOKEN = make_token("alice", ("user",)), make_token("bob", ("user",))
A, B = bearer("alice"), bearer("bob")


@pytest.fixture
async def client(make_proxy: ProxyFactory, fake_comfy: FakeComfyUI, redis_url: str) -> Client:
    return await make_proxy(fake_comfy.url, token=None, redis={"url": redis_url})


def session_of(client: Client, subject: str) -> str:
    app: web.Application = client.app
    value, _ = app[AUTH].sessions.issue(
        subject, ["user"], source="token", token_id=f"jti-{subject}", not_after=time.time() + 3600
    )
    return value


def no_credentials_in(fake: FakeComfyUI, *secrets: str) -> None:
    """Nothing the fake received carries a credential: headers, cookies, target."""
    assert fake.received, "the request was expected to reach ComfyUI"
    for got in fake.received:
        text = got.raw_path + "\n" + "\n".join(f"{k}: {v}" for k, v in got.headers.items())
        for secret in (*secrets, SESSION, CSRF, "Authorization"):
            assert secret not in text, (secret, text)
        assert "token" not in got.query


SWV13 = ("Sec-WebSocket-Version", "13")


def ws_handshake() -> list[tuple[str, str]]:
    key = base64.b64encode(os.urandom(16)).decode()
    return [
        ("Upgrade", "websocket"),
        ("Connection", "Upgrade"),
        ("Sec-WebSocket-Key", key),
        ("Sec-WebSocket-Version", "13"),
    ]


# -- cookies --------------------------------------------------------------------------------------


async def test_second_cookie_header_does_not_carry_the_session(
    client: Client, fake_comfy: FakeComfyUI
) -> None:
    a_session = session_of(client, "alice")
    headers = [
        *B.items(),
        ("Cookie", "theme=dark"),
        ("Cookie", f"{SESSION}={a_session}; lang=fr"),
        ("Cookie", f"{CSRF}=t"),
    ]
    answer = await exchange(client, "GET", "/api/system_stats", headers)
    assert answer.status == 200
    [got] = fake_comfy.received
    assert got.headers.getall("Cookie") == ["theme=dark; lang=fr"]
    no_credentials_in(fake_comfy, a_session)


async def test_cookie_session_in_both_headers_is_stripped_from_both(
    client: Client, fake_comfy: FakeComfyUI
) -> None:
    a_session = session_of(client, "alice")
    headers = [
        ("Cookie", f"{SESSION}={a_session}"),
        ("Cookie", f"{SESSION}={a_session}; keep=1"),
    ]
    answer = await exchange(client, "GET", "/api/system_stats", headers)
    assert answer.status == 200  # authenticated by the first header, as aiohttp reads it
    assert fake_comfy.received[-1].headers.getall("Cookie") == ["keep=1"]
    no_credentials_in(fake_comfy, a_session)


@pytest.mark.parametrize(
    "cookie",
    [
        'a="x; {session}=s"; keep=1',  # quoted value hiding a separator
        "a=1, {session}=s; keep=1",  # comma-separated (RFC 2965 style)
        " {session} =s; keep=1",  # spaces around the name
        "keep=1;{session}=s",
    ],
)
async def test_session_cookie_is_stripped_whatever_the_syntax(
    cookie: str, client: Client, fake_comfy: FakeComfyUI
) -> None:
    answer = await exchange(
        client, "GET", "/api/system_stats", [*B.items(), ("Cookie", cookie.format(session=SESSION))]
    )
    assert answer.status == 200
    [got] = fake_comfy.received
    [kept] = got.headers.getall("Cookie")
    assert kept.endswith("keep=1")
    no_credentials_in(fake_comfy)


# -- token query parameters ------------------------------------------------------------------------


@pytest.mark.parametrize(
    "query",
    [
        "token={t}&x=1",
        "%74oken={t}&x=1",
        "%74%6F%6B%65%6E={t}&x=1",
        "tok%65n={t}&x=1",
        "x=1&token={t}&token={t}",
        "x=1&%74oken={t}&token=other",
        "x=1&token",
        "x=1&&token={t}&",
    ],
)
async def test_token_params_beside_a_bearer_never_reach_comfyui(
    query: str, client: Client, fake_comfy: FakeComfyUI
) -> None:
    """B's bearer decides; A's token in the query is ignored (not refused) and stripped."""
    answer = await exchange(
        client, "GET", "/api/system_stats?" + query.format(t=A_TOKEN), list(B.items())
    )
    assert answer.status == 200
    [got] = fake_comfy.received
    assert got.raw_path == "/api/system_stats?x=1"
    no_credentials_in(fake_comfy, A_TOKEN)


async def test_token_param_beside_a_cookie_is_stripped_and_not_used(
    client: Client, fake_comfy: FakeComfyUI
) -> None:
    a_session = session_of(client, "alice")
    # (a route ComfyUI answers itself: a user's /history is built by the proxy from their own
    # prompts, and alice has none)
    target = f"/api/system_stats?%74oken={B_TOKEN}"
    answer = await exchange(client, "GET", target, [("Cookie", f"{SESSION}={a_session}")])
    assert answer.status == 200
    [got] = fake_comfy.received
    assert got.raw_path == "/api/system_stats"
    no_credentials_in(fake_comfy, a_session, B_TOKEN)


async def test_another_users_query_token_does_not_change_who_is_asking(
    client: Client, fake_comfy: FakeComfyUI
) -> None:
    graph = {
        "1": {
            "class_type": "EmptyImage",
            "inputs": {"width": 8, "height": 8, "batch_size": 1, "color": 7},
        },
        "2": {"class_type": "PreviewImage", "inputs": {"images": ["1", 0]}},
    }
    body = json.dumps({"prompt": graph}).encode()
    answer = await exchange(
        client, "POST", "/prompt", [*A.items(), ("Content-Type", "application/json")], body
    )
    a_prompt = answer.json()["prompt_id"]
    await settled(client, fake_comfy)
    fake_comfy.reset()
    # B's own view (/history is built from B's prompts: none) and a view ComfyUI answers.
    answer = await exchange(client, "GET", f"/api/history?token={A_TOKEN}", list(B.items()))
    assert answer.status == 200
    assert a_prompt not in answer.body.decode()
    answer = await exchange(client, "GET", f"/api/queue?token={A_TOKEN}", list(B.items()))
    assert answer.status == 200
    assert a_prompt not in answer.body.decode()
    no_credentials_in(fake_comfy, A_TOKEN)


# -- the query token counts only on a real WebSocket handshake -------------------------------------


@pytest.mark.parametrize(
    ("method", "path", "headers"),
    [
        ("GET", "/api/history", [("Upgrade", "websocket")]),
        ("GET", "/api/history", [("Upgrade", "websocket"), ("Connection", "Upgrade")]),
        ("GET", "/api/history", ws_handshake()),  # a full handshake, but not on the socket
        ("GET", "/view?filename=x.png", ws_handshake()),
        ("GET", "/ws", [("Upgrade", "websocket")]),
        ("GET", "/ws", [("Upgrade", "websocket"), ("Connection", "Upgrade")]),
        ("GET", "/ws", [h for h in ws_handshake() if h[0] != "Sec-WebSocket-Key"]),
        ("GET", "/ws", [*ws_handshake()[:3], ("Sec-WebSocket-Version", "12")]),
        ("GET", "/ws", [*ws_handshake()[:2], ("Sec-WebSocket-Key", "c2hvcnQ="), SWV13]),
        ("GET", "/ws", [("Upgrade", "h2c"), ("Connection", "Upgrade"), *ws_handshake()[2:]]),
        ("GET", "/ws", [("Upgrade", "websocket"), ("Connection", "close"), *ws_handshake()[2:]]),
        ("POST", "/ws", ws_handshake()),
    ],
)
async def test_query_token_without_a_real_handshake_is_not_a_credential(
    method: str,
    path: str,
    headers: list[tuple[str, str]],
    client: Client,
    fake_comfy: FakeComfyUI,
) -> None:
    sep = "&" if "?" in path else "?"
    answer = await exchange(client, method, f"{path}{sep}token={B_TOKEN}", headers)
    assert answer.status == 401, answer.body
    assert answer.error_type == "unauthenticated"
    assert fake_comfy.received == []


async def test_query_token_on_the_socket_handshake_is_used_and_stripped(
    client: Client, fake_comfy: FakeComfyUI
) -> None:
    url = client.make_url(f"/ws?clientId=tab&%74oken={B_TOKEN}")
    async with aiohttp.ClientSession() as session, session.ws_connect(url) as ws:
        message = await ws.receive_json(timeout=10)
        assert message["type"] == "status"
    [got] = [r for r in fake_comfy.received if r.path.endswith("/ws")]
    assert "token" not in got.query
    assert got.query["clientId"]  # the caller's, namespaced by isolation
    no_credentials_in(fake_comfy, B_TOKEN)
