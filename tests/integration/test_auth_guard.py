"""Default deny: every ComfyUI route needs a principal; identity toward ComfyUI is the proxy's.

Each refusal is asserted on what the client got (status, error.type) and on what the fake
ComfyUI received (nothing, or the request rewritten as intended).
"""

from __future__ import annotations

import dataclasses
import time
from typing import Any

import aiohttp
import jwt
import pytest
from aiohttp.test_utils import TestClient
from yarl import URL

from proxy.auth.authenticator import AUTH
from proxy.principal import comfy_user_id
from proxy.state import LIFECYCLE
from proxy.tenancy.namespaces import upstream_client_id
from tests.conftest import JWT_SECRET, ProxyFactory, make_token
from tests.fakes.comfyui import FakeComfyUI

ROUTES = [
    ("GET", "/"),
    ("GET", "/assets/index.js?v=1"),  # without a query it is one of the frontend's public files
    ("GET", "/extensions/core/x.js"),
    ("GET", "/prompt"),
    ("POST", "/prompt"),
    ("GET", "/queue"),
    ("POST", "/queue"),
    ("GET", "/history"),
    ("GET", "/history/abc"),
    ("POST", "/interrupt"),
    ("GET", "/view?filename=a.png"),
    ("POST", "/upload/image"),
    ("GET", "/object_info"),
    ("GET", "/system_stats"),
    ("GET", "/settings"),
    ("GET", "/userdata?dir=workflows"),
    ("GET", "/users"),
    ("GET", "/internal/logs"),
    ("GET", "/jobs"),
    ("GET", "/no/such/route"),
]


def both_forms() -> list[tuple[str, str]]:
    out = []
    for method, path in ROUTES:
        out.append((method, path))
        if not path.startswith("/internal") and path != "/":
            out.append((method, "/api" + path))
    return out


@pytest.fixture
async def anonymous(make_proxy: ProxyFactory, fake_comfy: FakeComfyUI) -> TestClient[Any, Any]:
    return await make_proxy(fake_comfy.url, token=None)


@pytest.mark.parametrize(("method", "path"), both_forms())
async def test_every_route_denied_without_credentials(
    method: str, path: str, anonymous: TestClient[Any, Any], fake_comfy: FakeComfyUI
) -> None:
    resp = await anonymous.request(method, path, headers={"Accept": "application/json"})
    assert resp.status == 401
    body = await resp.json()
    assert body["error"]["type"] == "unauthenticated"
    assert resp.headers["WWW-Authenticate"] == 'Bearer realm="comfygate"'
    assert fake_comfy.received == []


@pytest.mark.parametrize(("method", "path"), both_forms())
async def test_every_route_allowed_with_a_token(
    method: str, path: str, proxy: TestClient[Any, Any], fake_comfy: FakeComfyUI
) -> None:
    resp = await proxy.request(method, path)
    assert resp.status not in (401, 403), await resp.text()


async def test_browser_navigation_redirects_to_login(
    anonymous: TestClient[Any, Any], make_proxy: ProxyFactory, fake_comfy: FakeComfyUI
) -> None:
    resp = await anonymous.get("/?x=1", headers={"Accept": "text/html"}, allow_redirects=False)
    assert resp.status == 302
    assert resp.headers["Location"] == "/login?next=%2F%3Fx%3D1"
    based = await make_proxy(fake_comfy.url, token=None, server={"base_path": "/comfy"})
    resp = await based.get("/comfy/", headers={"Accept": "text/html"}, allow_redirects=False)
    assert resp.headers["Location"] == "/comfy/login?next=%2Fcomfy%2F"
    assert fake_comfy.received == []


async def test_websocket_handshake_refused_before_upgrade(
    anonymous: TestClient[Any, Any], fake_comfy: FakeComfyUI
) -> None:
    with pytest.raises(aiohttp.WSServerHandshakeError) as info:
        await anonymous.ws_connect("/ws?clientId=x")
    assert info.value.status == 401
    assert fake_comfy.received == []


def hs256(claims: dict[str, Any], key: str = JWT_SECRET, alg: str = "HS256") -> str:
    return jwt.encode(claims, key, algorithm=alg)


NOW = int(time.time())
BAD_TOKENS = [
    ("expired", hs256({"sub": "a", "roles": ["user"], "exp": NOW - 3600}), "token_expired"),
    (
        "not yet valid",
        hs256({"sub": "a", "roles": ["user"], "exp": NOW + 7200, "nbf": NOW + 3600}),
        "token_not_yet_valid",
    ),
    (
        "wrong key",
        hs256(
            {"sub": "a", "roles": ["user"], "exp": NOW + 86400},
            "another-secret-of-32-bytes-or-more",
        ),
        "token_bad_signature",
    ),
    (
        "alg none",
        jwt.encode({"sub": "a", "roles": ["user"], "exp": NOW + 86400}, "", algorithm="none"),
        "token_alg_not_allowed",
    ),
    ("malformed", "not.a.jwt", "token_malformed"),
    ("missing subject", hs256({"roles": ["user"], "exp": NOW + 86400}), "token_missing_subject"),
]


@pytest.mark.parametrize(("label", "token", "reason"), BAD_TOKENS, ids=[b[0] for b in BAD_TOKENS])
async def test_bad_tokens(
    label: str,
    token: str,
    reason: str,
    make_proxy: ProxyFactory,
    fake_comfy: FakeComfyUI,
) -> None:
    client = await make_proxy(fake_comfy.url, token=token)
    resp = await client.get("/api/queue")
    assert resp.status == 401, label
    assert (await resp.json())["error"]["type"] == reason
    challenge = resp.headers["WWW-Authenticate"]
    assert challenge.startswith('Bearer realm="comfygate", error="invalid_token"')
    assert fake_comfy.received == []


async def test_authorization_scheme_must_be_bearer(
    make_proxy: ProxyFactory, fake_comfy: FakeComfyUI
) -> None:
    client = await make_proxy(fake_comfy.url, token=None)
    resp = await client.get("/api/queue", headers={"Authorization": "Basic YTpi"})
    assert resp.status == 401
    assert (await resp.json())["error"]["type"] == "token_malformed"


async def test_revoked_token(make_proxy: ProxyFactory, fake_comfy: FakeComfyUI) -> None:
    token = make_token("alice", ("user",), jti="revoke-me")
    client = await make_proxy(fake_comfy.url, token=token)
    assert (await client.get("/api/queue")).status == 200
    await client.app[AUTH].revocations.revoke("revoke-me", time.time() + 3600)
    resp = await client.get("/api/queue")
    assert resp.status == 401
    assert (await resp.json())["error"]["type"] == "token_revoked"


async def test_roles(make_proxy: ProxyFactory, fake_comfy: FakeComfyUI) -> None:
    no_role = make_token("bob", ())
    client = await make_proxy(fake_comfy.url, token=no_role)
    resp = await client.get("/api/queue")
    assert resp.status == 403
    assert (await resp.json())["error"]["type"] == "no_role"
    client = await make_proxy(fake_comfy.url, token=no_role, auth={"jwt": {"default_role": "user"}})
    assert (await client.get("/api/queue")).status == 200
    mapped = make_token("kc", (), realm_access={"roles": ["comfy-admins"]})
    client = await make_proxy(
        fake_comfy.url,
        token=mapped,
        auth={"jwt": {"roles_claim": "realm_access.roles", "role_map": {"comfy-admins": "admin"}}},
    )
    assert (await client.get("/internal/logs")).status == 200


@pytest.mark.parametrize(
    ("method", "path", "body"),
    [
        # (/internal/logs and /internal/folder_paths: called by the frontend itself, answered
        # empty for regular users: tests/security/test_clients.py)
        ("GET", "/internal/files/output", None),
        ("POST", "/api/free", {"unload_models": True}),
        ("GET", "/api/manager/queue/status", None),
        ("POST", "/api/assets/download", {"url": "http://x"}),
        ("POST", "/api/users", {"username": "mallory"}),
    ],
)
async def test_admin_only_routes(
    method: str, path: str, body: Any, make_proxy: ProxyFactory, fake_comfy: FakeComfyUI
) -> None:
    user = await make_proxy(fake_comfy.url, token=make_token("alice", ("user",)))
    resp = await user.request(method, path, json=body)
    assert resp.status == 403
    assert (await resp.json())["error"]["type"] == "forbidden_role"
    assert fake_comfy.received == []
    admin = await make_proxy(fake_comfy.url)
    resp = await admin.request(method, path, json=body)
    if path.endswith("/users"):
        assert resp.status == 403  # ComfyUI users are the proxy's business, even for admins
    else:
        assert resp.status != 403
        assert fake_comfy.received


@pytest.mark.parametrize("path", ["/api/queue", "/api/history", "/history"])
async def test_global_clear_is_admin_only_without_isolation(
    path: str, make_proxy: ProxyFactory, fake_comfy: FakeComfyUI
) -> None:
    """With isolation off a clear empties everyone's queue/history: admins only. (With
    isolation on, a user's clear is narrowed to their own prompts: test_isolation_read.)"""
    user = await make_proxy(
        fake_comfy.url, token=make_token("alice", ("user",)), isolation={"enabled": False}
    )
    resp = await user.post(path, json={"clear": True})
    assert resp.status == 403
    assert (await resp.json())["error"]["type"] == "forbidden_role"
    assert fake_comfy.received == []


async def test_viewer_cannot_queue(make_proxy: ProxyFactory, fake_comfy: FakeComfyUI) -> None:
    viewer = await make_proxy(fake_comfy.url, token=make_token("vera", ("viewer",)))
    resp = await viewer.post("/api/prompt", json={"prompt": {}})
    assert resp.status == 403
    body = await resp.json()
    assert body["error"]["type"] == "forbidden_role"
    assert body["node_errors"] == {}  # ComfyUI's shape: the stock UI shows the message
    assert (await viewer.get("/api/queue")).status == 200


async def test_system_stats_argv_only_for_admins(
    make_proxy: ProxyFactory, fake_comfy: FakeComfyUI
) -> None:
    user = await make_proxy(fake_comfy.url, token=make_token("alice", ("user",)))
    stats = await (await user.get("/api/system_stats")).json()
    assert stats["system"]["argv"] == []
    admin = await make_proxy(fake_comfy.url)
    stats = await (await admin.get("/api/system_stats")).json()
    assert stats["system"]["argv"]


async def test_users_answered_by_the_proxy(
    proxy: TestClient[Any, Any], fake_comfy: FakeComfyUI
) -> None:
    for path in ("/users", "/api/users"):
        resp = await proxy.get(path)
        assert await resp.json() == {"storage": "server", "migrated": True}
    assert fake_comfy.received == []


async def test_identity_headers_are_the_proxys(
    make_proxy: ProxyFactory, fake_comfy: FakeComfyUI
) -> None:
    client = await make_proxy(fake_comfy.url, token=make_token("alice@example.com", ("user",)))
    await client.get(
        "/api/settings",
        headers={
            "Comfy-User": "someone-else",
            "X-Forwarded-User": "root",
            "X-Forwarded-Groups": "admin",
            "Cookie": "theme=dark; comfygate_session=forged; other=1",
        },
    )
    got = fake_comfy.received[-1].headers
    assert got.getall("Comfy-User") == [comfy_user_id("alice@example.com")]
    assert got["Comfy-User"].startswith("alice-example-com-")
    assert "X-Forwarded-User" not in got
    assert "X-Forwarded-Groups" not in got
    assert "Authorization" not in got
    assert got["Cookie"] == "theme=dark; other=1"


async def test_forwarded_user_headers_when_configured(
    make_proxy: ProxyFactory, fake_comfy: FakeComfyUI
) -> None:
    client = await make_proxy(
        fake_comfy.url,
        token=make_token("alice", ("user",)),
        auth={"forward_user_headers": True},
    )
    await client.get("/api/queue", headers={"X-Forwarded-User": "root"})
    got = fake_comfy.received[-1].headers
    assert got.getall("X-Forwarded-User") == ["alice"]
    assert got["X-Forwarded-Groups"] == "user"


async def session_client(
    make_proxy: ProxyFactory, fake_comfy: FakeComfyUI, **sections: Any
) -> tuple[TestClient[Any, Any], str]:
    client = await make_proxy(fake_comfy.url, token=None, **sections)
    value, _ = client.app[AUTH].sessions.issue("carol", ["user"], source="token")
    return client, value


async def test_session_cookie_and_csrf(make_proxy: ProxyFactory, fake_comfy: FakeComfyUI) -> None:
    client, cookie = await session_client(make_proxy, fake_comfy)
    jar = {"comfygate_session": cookie}
    origin = f"http://{client.server.host}:{client.server.port}"
    assert (await client.get("/api/queue", cookies=jar)).status == 200
    resp = await client.post("/api/interrupt", cookies=jar)
    assert resp.status == 403
    assert (await resp.json())["error"]["type"] == "csrf_failed"
    resp = await client.post("/api/interrupt", cookies=jar, headers={"Origin": origin})
    assert resp.status == 200
    resp = await client.post("/api/interrupt", cookies=jar, headers={"Referer": origin + "/"})
    assert resp.status == 200
    resp = await client.post(
        "/api/interrupt", cookies=jar, headers={"Origin": "https://evil.example"}
    )
    assert resp.status == 403
    assert (await resp.json())["error"]["type"] == "origin_not_allowed"
    with pytest.raises(aiohttp.WSServerHandshakeError) as info:
        await client.ws_connect("/ws?clientId=c", headers={"Cookie": f"comfygate_session={cookie}"})
    assert info.value.status == 403
    ws = await client.ws_connect(
        "/ws?clientId=c", headers={"Cookie": f"comfygate_session={cookie}", "Origin": origin}
    )
    assert (await ws.receive_json())["type"] == "status"
    await ws.close()


async def test_bearer_requests_are_csrf_exempt(
    proxy: TestClient[Any, Any], fake_comfy: FakeComfyUI
) -> None:
    assert (await proxy.post("/api/interrupt")).status == 200


async def test_revoked_session(make_proxy: ProxyFactory, fake_comfy: FakeComfyUI) -> None:
    client, cookie = await session_client(make_proxy, fake_comfy)
    session = client.app[AUTH].sessions.verify(cookie)
    await client.app[AUTH].revocations.revoke(session.session_id, session.absolute_expires_at)
    resp = await client.get("/api/queue", cookies={"comfygate_session": cookie})
    assert resp.status == 401
    assert (await resp.json())["error"]["type"] == "session_revoked"


async def test_forged_session(make_proxy: ProxyFactory, fake_comfy: FakeComfyUI) -> None:
    client = await make_proxy(fake_comfy.url, token=None)
    forged = jwt.encode({"sub": "x", "typ": "comfygate-session"}, "g" * 32, algorithm="HS256")
    resp = await client.get("/api/queue", cookies={"comfygate_session": forged})
    assert resp.status == 401
    assert (await resp.json())["error"]["type"] == "session_invalid"
    api_token_as_cookie = make_token()  # an API token is not a session
    resp = await client.get("/api/queue", cookies={"comfygate_session": api_token_as_cookie})
    assert resp.status == 401


async def test_query_token_on_websocket_only_and_never_forwarded(
    make_proxy: ProxyFactory, fake_comfy: FakeComfyUI
) -> None:
    client = await make_proxy(fake_comfy.url, token=None)
    token = make_token("dave", ("user",))
    ws = await client.ws_connect(URL(f"/ws?clientId=q1&token={token}"))
    assert (await ws.receive_json())["data"]["sid"] == "q1"
    await ws.close()
    handshake = next(r for r in fake_comfy.received if r.path == "/ws")
    assert handshake.raw_path == f"/ws?clientId={upstream_client_id(comfy_user_id('dave'), 'q1')}"
    assert (await client.get(f"/api/queue?token={token}")).status == 401


async def test_comfy_users_created_once_on_a_multi_user_comfyui(
    make_proxy: ProxyFactory, tmp_path: Any
) -> None:
    fake = FakeComfyUI(root=tmp_path / "multi", multi_user=True)
    await fake.start()
    try:
        alice = await make_proxy(
            fake.url, token=make_token("alice", ("user",)), auth={"comfy_multi_user": True}
        )
        assert (await alice.get("/api/settings")).status == 200
        assert (await alice.post("/api/settings/Comfy.Theme", json="dark")).status == 200
        assert await (await alice.get("/api/settings/Comfy.Theme")).json() == "dark"
        creations = [r for r in fake.received if r.method == "POST" and r.path == "/users"]
        assert len(creations) == 1
        alice_id = fake.received[-1].headers["Comfy-User"]
        assert alice_id.startswith(comfy_user_id("alice") + "_")

        bob = await make_proxy(
            fake.url, token=make_token("bob", ("user",)), auth={"comfy_multi_user": True}
        )
        assert await (await bob.get("/api/settings/Comfy.Theme")).json() is None
        assert fake.received[-1].headers["Comfy-User"] != alice_id
        # A new proxy process finds alice's existing ComfyUI user instead of creating another.
        again = await make_proxy(
            fake.url, token=make_token("alice", ("user",)), auth={"comfy_multi_user": True}
        )
        assert await (await again.get("/api/settings/Comfy.Theme")).json() == "dark"
        assert len([r for r in fake.received if r.method == "POST" and r.path == "/users"]) == 2
    finally:
        await fake.stop()


async def test_revoked_or_expired_credentials_end_open_websockets(
    make_proxy: ProxyFactory, fake_comfy: FakeComfyUI
) -> None:
    from proxy.auth.sweeper import sweep_once  # noqa: PLC0415

    token = make_token("erin", ("user",), jti="erin-ws")
    short = make_token("frank", ("user",), exp=int(time.time()) + 2)
    client = await make_proxy(fake_comfy.url, token=None)
    revoked = await client.ws_connect(URL(f"/ws?clientId=a&token={token}"))
    expiring = await client.ws_connect(URL(f"/ws?clientId=b&token={short}"))
    await revoked.receive_json()
    await expiring.receive_json()
    assert await sweep_once(client.app) == 0
    await client.app[AUTH].revocations.revoke("erin-ws", time.time() + 3600)
    assert await sweep_once(client.app) == 1
    msg = await revoked.receive()
    assert (msg.type, msg.data, msg.extra) == (aiohttp.WSMsgType.CLOSE, 1008, "credential revoked")
    client.app[LIFECYCLE].relay_principals.update(
        {
            ws: dataclasses.replace(p, expires_at=time.time() - 1)
            for ws, p in client.app[LIFECYCLE].relay_principals.items()
            if p.subject == "frank"  # as if its exp had passed (no sleeping in tests)
        }
    )
    assert await sweep_once(client.app) == 1
    msg = await expiring.receive()
    assert (msg.data, msg.extra) == (1008, "credential expired")


async def test_csrf_behind_a_trusted_tls_proxy(
    make_proxy: ProxyFactory, fake_comfy: FakeComfyUI
) -> None:
    """Origin and Referer are compared with the host the browser used (X-Forwarded-*)."""
    client, cookie = await session_client(
        make_proxy, fake_comfy, server={"trusted_proxies": ("127.0.0.0/8",)}
    )
    forwarded = {"X-Forwarded-Host": "comfy.example.com", "X-Forwarded-Proto": "https"}
    jar = {"comfygate_session": cookie}
    for header in ("Origin", "Referer"):
        resp = await client.post(
            "/api/interrupt",
            cookies=jar,
            headers={
                **forwarded,
                header: "https://comfy.example.com" + "/" * (header == "Referer"),
            },
        )
        assert resp.status == 200, header
    resp = await client.post(
        "/api/interrupt", cookies=jar, headers={**forwarded, "Origin": "http://comfy.example.com"}
    )
    assert resp.status == 403  # the scheme is part of the origin
