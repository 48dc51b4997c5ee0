"""WebSocket takeover and identity spoofing (issue 13, family "WebSocket/identity").

ComfyUI routes a prompt's events to the socket registered under the prompt's ``client_id`` and lets
any socket claim any id (docs/comfyui-protocol.md#connect-and-clientid-takeover); it believes any
``Comfy-User`` header (docs/comfyui-protocol.md#multi-user-mode). The proxy namespaces every socket
id and every submitted ``client_id`` per user, filters each socket's frames to its user's prompts,
and sets the identity headers ComfyUI receives from the authenticated principal alone. User B (bob)
attacks user A's (alice's) socket: by claiming its id in every spelling, by sending frames ComfyUI
acts on, by waiting on a socket for A's events (JSON, binary previews, progress text), by naming A
in identity headers, and by keeping a socket open past the end of his credential. Each case asserts
on what B got and on what the fake ComfyUI registered or received.
"""

from __future__ import annotations

import itertools
import json
import time
from typing import Any

import aiohttp
import pytest
from aiohttp.test_utils import TestClient
from yarl import URL

from proxy.auth.authenticator import AUTH
from proxy.auth.sweeper import sweep_once
from proxy.principal import comfy_user_id
from proxy.tenancy.namespaces import upstream_client_id
from tests.conftest import ProxyFactory, make_token
from tests.fakes.comfyui import FakeComfyUI
from tests.support.ws import frames_until, greeted, kinds, prompt_ids

Client = TestClient[Any, Any]
ALICE, BOB = comfy_user_id("alice"), comfy_user_id("bob")
A_TOKEN, B_TOKEN = make_token("alice", ("user",)), make_token("bob", ("user",))
A, B = {"Authorization": f"Bearer {A_TOKEN}"}, {"Authorization": f"Bearer {B_TOKEN}"}
MARKER = {"type": "status", "data": {"status": {"exec_info": {"queue_remaining": 0}}, "end": 1}}
_colors = itertools.count(0x300000, 7919)  # a new graph every time: nothing is cached


@pytest.fixture
async def client(make_proxy: ProxyFactory, fake_comfy: FakeComfyUI, redis_url: str) -> Client:
    """The README's deployment (JWT, isolation, policy, Redis)."""
    return await make_proxy(fake_comfy.url, token=None, redis={"url": redis_url})


def graph() -> dict[str, Any]:
    """EmptyImage -> PreviewImage, GetImageSize (a binary type 3 text frame that ComfyUI
    broadcasts to every socket) and SaveImageWebsocket (binary previews to the client id)."""
    color = next(_colors) % 0xFFFFFF
    return {
        "1": {
            "class_type": "EmptyImage",
            "inputs": {"width": 8, "height": 8, "batch_size": 1, "color": color},
        },
        "2": {"class_type": "PreviewImage", "inputs": {"images": ["1", 0]}},
        "3": {"class_type": "GetImageSize", "inputs": {"image": ["1", 0]}},
        "4": {
            "class_type": "EmptyImage",
            "inputs": {"width": ["3", 0], "height": ["3", 1], "batch_size": 1, "color": 0},
        },
        "5": {"class_type": "PreviewImage", "inputs": {"images": ["4", 0]}},
        "6": {"class_type": "SaveImageWebsocket", "inputs": {"images": ["1", 0]}},
    }


async def submit(client: Client, who: dict[str, str], client_id: str) -> str:
    """A prompt through the proxy (submit guard, policy and all); its prompt id."""
    resp = await client.post(
        "/prompt", json={"prompt": graph(), "client_id": client_id}, headers=who
    )
    assert resp.status == 200, await resp.text()
    return str((await resp.json())["prompt_id"])


async def connect(
    client: Client, who: dict[str, str], query: str | None, *, flags: bool = True
) -> tuple[aiohttp.ClientWebSocketResponse, str]:
    """A socket on ``/ws?<query>`` (the query exactly as written); with the stock UI's feature
    flags. Returns it and the sid the status message told it."""
    target = "/ws" if query is None else f"/ws?{query}"
    ws = await client.ws_connect(URL(target, encoded=True), headers=who)
    return ws, await greeted(ws, flags=flags)


async def frames_until_marker(ws: aiohttp.ClientWebSocketResponse) -> list[Any]:
    """Every frame up to :data:`MARKER` (broadcast last: all earlier frames were relayed)."""
    return await frames_until(ws, MARKER)


def handshakes(fake: FakeComfyUI) -> list[Any]:
    return [r for r in fake.received if r.path in ("/ws", "/api/ws")]


async def a_runs_one_prompt(
    client: Client, fake: FakeComfyUI, a_ws: aiohttp.ClientWebSocketResponse
) -> str:
    """A runs a prompt from her tab; she gets all of its events (the control)."""
    a1 = await submit(client, A, "tab-a")
    await fake.wait_idle()
    await fake.broadcast(MARKER)
    a_frames = await frames_until_marker(a_ws)
    assert "execution_success" in kinds(a_frames)
    assert ("binary", 4) in kinds(a_frames)
    assert ("binary", 3) in kinds(a_frames)
    assert prompt_ids(a_frames) == {a1}
    return a1


# ---------------------------------------------------------------------------- takeover

A_NAMESPACED = upstream_client_id(ALICE, "tab-a")
TAKEOVER_QUERIES = {
    "same_id": "clientId=tab-a",
    "escaped": "clientId=%74ab%2Da",
    "escaped_name": "%63lientId=tab-a",
    "plus_for_space": "clientId=tab-a+",
    "duplicated_first": "clientId=tab-a&clientId=mine",
    "duplicated_second": "clientId=mine&clientId=tab-a",
    "duplicated_escaped": "clientId=mine&%63lientId=tab-a",
    "empty": "clientId=",
    "absent": None,
    "other_case_name": "clientid=tab-a",
    "upper_value": "clientId=TAB-A",
    "nul": "clientId=tab-a%00",
    "upstream_id_of_a": f"clientId={A_NAMESPACED}",
    "semicolon": "clientId=mine;clientId=tab-a",
    "fragment_like": "clientId=mine%23clientId=tab-a",
    "very_long": "clientId=" + "a" * 4000,
    "with_token_param": f"clientId=tab-a&token={A_TOKEN}",
}


@pytest.mark.parametrize("query", TAKEOVER_QUERIES.values(), ids=TAKEOVER_QUERIES.keys())
async def test_b_cannot_take_over_a_socket_by_any_spelling_of_its_id(
    query: str | None, client: Client, fake_comfy: FakeComfyUI
) -> None:
    a_ws, _ = await connect(client, A, "clientId=tab-a")
    fake_comfy.reset()
    b_ws, b_sid = await connect(client, B, query)
    # ComfyUI saw exactly one clientId: B's own id as B was told it, in B's namespace.
    [handshake] = handshakes(fake_comfy)
    assert handshake.query.getall("clientId") == [upstream_client_id(BOB, b_sid)]
    assert "token" not in handshake.query
    assert A_NAMESPACED in fake_comfy.sockets  # A's registration was not replaced
    assert upstream_client_id(BOB, b_sid) in fake_comfy.sockets

    await a_runs_one_prompt(client, fake_comfy, a_ws)
    assert set(kinds(await frames_until_marker(b_ws))) == {"status"}
    await a_ws.close()
    await b_ws.close()


async def test_a_second_tab_of_b_with_as_id_does_not_close_as_socket(
    client: Client, fake_comfy: FakeComfyUI
) -> None:
    """The proxy's own takeover (one upstream socket per id) is per user too: B opening and
    closing sockets named like A's never supersedes or unregisters A's."""
    a_ws, _ = await connect(client, A, "clientId=tab-a")
    for _ in range(3):
        b_ws, _ = await connect(client, B, "clientId=tab-a", flags=False)
        await b_ws.close()
    await fake_comfy.wait_socket(upstream_client_id(BOB, "tab-a"), gone=True)
    assert A_NAMESPACED in fake_comfy.sockets
    assert not a_ws.closed
    await a_runs_one_prompt(client, fake_comfy, a_ws)
    await a_ws.close()


# ------------------------------------------------------------------ frames B sends upstream


async def test_b_frames_reach_only_bs_own_socket_upstream(
    client: Client, fake_comfy: FakeComfyUI
) -> None:
    """The one client message ComfyUI acts on (``feature_flags``, first frame only) and
    anything else B sends are received under B's namespaced id: A's negotiated flags (which
    decide how her previews are encoded) stay hers."""
    a_ws, _ = await connect(client, A, "clientId=tab-a")
    b_ws, b_sid = await connect(client, B, "clientId=tab-a", flags=False)
    b_upstream = upstream_client_id(BOB, b_sid)
    sent: list[str | bytes] = [
        json.dumps({"type": "feature_flags", "data": {"supports_preview_metadata": False}}),
        json.dumps({"type": "feature_flags", "data": {"sid": "tab-a", "client_id": A_NAMESPACED}}),
        json.dumps({"type": "credential_auth", "data": {"credential_key": "x"}}),
        json.dumps({"type": "status", "data": {"sid": A_NAMESPACED}}),
        "not json",
        b"\x00\x00\x00\x01binary",
    ]
    for frame in sent:
        if isinstance(frame, bytes):
            await b_ws.send_bytes(frame)
        else:
            await b_ws.send_str(frame)
    assert (await b_ws.receive_json(timeout=10))["type"] == "feature_flags"
    await fake_comfy.broadcast(MARKER)
    assert await frames_until_marker(b_ws) == []
    await frames_until_marker(a_ws)
    # Everything B sent arrived in order on B's socket, none on A's.
    b_received = [data for sid, _, data in fake_comfy.ws_received if sid == b_upstream]
    assert b_received == sent
    assert all(sid in (A_NAMESPACED, b_upstream) for sid, _, _ in fake_comfy.ws_received)
    assert [d for s, _, d in fake_comfy.ws_received if s == A_NAMESPACED][1:] == []
    assert fake_comfy.socket_table.metadata[A_NAMESPACED]["feature_flags"] == {
        "supports_preview_metadata": True
    }
    # A's previews still come with metadata (type 4); B gets none of them.
    await a_runs_one_prompt(client, fake_comfy, a_ws)
    assert set(kinds(await frames_until_marker(b_ws))) == {"status"}
    await a_ws.close()
    await b_ws.close()


# ------------------------------------------------------------------------- A's events


async def test_b_running_a_prompt_right_before_a_sees_none_of_as_frames(
    client: Client, fake_comfy: FakeComfyUI
) -> None:
    """Binary frames without a prompt id (type 1 previews, type 3 progress text, which
    ComfyUI broadcasts) pass to a socket only while its user's prompt executes. B's prompt
    runs just before A's: B's window closes with B's prompt, so A's broadcast text frames,
    arriving on B's socket next, are dropped."""
    a_ws, _ = await connect(client, A, "clientId=tab-a")
    b_ws, _ = await connect(client, B, "clientId=tab-b")
    b_legacy, _ = await connect(client, B, "clientId=tab-b2", flags=False)  # type 1 previews
    fake_comfy.hold()  # B's prompt waits at the gate until A's is queued behind it
    b1 = await submit(client, B, "tab-b")
    await fake_comfy.wait_held()
    a1 = await submit(client, A, "tab-a")
    fake_comfy.release()
    await fake_comfy.wait_idle()
    await fake_comfy.broadcast(MARKER)

    a_frames = await frames_until_marker(a_ws)
    b_frames = await frames_until_marker(b_ws)
    assert prompt_ids(a_frames) == {a1}
    assert prompt_ids(b_frames) == {b1}
    # Each prompt has one GetImageSize: one text frame each, none of A's on B's socket.
    assert kinds(b_frames).count(("binary", 3)) == 1
    assert kinds(a_frames).count(("binary", 3)) == 1
    assert ("binary", 4) in kinds(b_frames)
    # B's flag-less second tab ran nothing: neither A's nor B's own binaries reach it.
    assert set(kinds(await frames_until_marker(b_legacy))) == {"status"}
    for ws in (a_ws, b_ws, b_legacy):
        await ws.close()


async def test_events_of_a_prompt_b_names_with_as_client_id_go_to_b(
    client: Client, fake_comfy: FakeComfyUI
) -> None:
    """B submits with A's tab id (or A's upstream id) as ``client_id``: ComfyUI routes that
    prompt's events in B's namespace; A's socket gets nothing of it."""
    a_ws, _ = await connect(client, A, "clientId=tab-a")
    b_ws, _ = await connect(client, B, "clientId=tab-a")
    fake_comfy.reset()
    b1 = await submit(client, B, "tab-a")
    b2 = await submit(client, B, A_NAMESPACED)
    await fake_comfy.wait_idle()
    posted = [json.loads(r.body) for r in fake_comfy.received if r.path.endswith("/prompt")]
    assert [p["client_id"] for p in posted] == [
        upstream_client_id(BOB, "tab-a"),
        upstream_client_id(BOB, A_NAMESPACED),
    ]
    await fake_comfy.broadcast(MARKER)
    assert set(kinds(await frames_until_marker(a_ws))) == {"status"}
    assert prompt_ids(await frames_until_marker(b_ws)) == {b1}  # b2 went to no socket
    assert b2
    await a_ws.close()
    await b_ws.close()


# ----------------------------------------------------------------- identity headers

SPOOFED = {
    "Comfy-User": ALICE,
    "comfy-user": "admin",
    "X-Forwarded-User": "alice",
    "X-Forwarded-Email": "alice@example.com",
    "X-Forwarded-Groups": "admin",
    "X-Forwarded-Preferred-Username": "alice",
    "X-Auth-Request-User": "alice",
    "X-Auth-Request-Email": "alice@example.com",
    "Remote-User": "alice",
    "X-Forwarded-For": "10.0.0.1",
    "X-Forwarded-Host": "evil.test",
    "X-Forwarded-Proto": "https",
    "Forwarded": "for=10.0.0.1;host=evil.test;proto=https",
    "X-Real-IP": "10.0.0.1",
    # Naming the identity headers hop-by-hop must not make the proxy drop its own.
    "Connection": "Comfy-User, X-Forwarded-For, X-Forwarded-Host, Host",
}
NEVER_FORWARDED = [
    "X-Forwarded-Email",
    "X-Forwarded-Preferred-Username",
    "X-Auth-Request-User",
    "X-Auth-Request-Email",
    "Remote-User",
    "Forwarded",
    "X-Real-IP",
    "Authorization",
]


def assert_identity_is_bobs(seen: Any, client: Client, *, user_headers: bool) -> None:
    headers = seen.headers
    assert headers.getall("Comfy-User") == [BOB]
    assert headers.getall("X-Forwarded-For") == ["127.0.0.1"]
    assert headers.getall("X-Forwarded-Host") == [f"{client.server.host}:{client.server.port}"]
    assert headers.getall("X-Forwarded-Proto") == ["http"]
    for name in NEVER_FORWARDED:
        assert name not in headers, name
    if user_headers:
        assert headers.getall("X-Forwarded-User") == ["bob"]
        assert headers.getall("X-Forwarded-Groups") == ["user"]
    else:
        assert "X-Forwarded-User" not in headers
        assert "X-Forwarded-Groups" not in headers


@pytest.mark.parametrize("user_headers", [False, True], ids=["default", "forward_user_headers"])
async def test_identity_headers_are_the_proxys_never_bs(
    user_headers: bool, make_proxy: ProxyFactory, fake_comfy: FakeComfyUI, redis_url: str
) -> None:
    client = await make_proxy(
        fake_comfy.url,
        token=None,
        redis={"url": redis_url},
        auth={"forward_user_headers": user_headers},
    )
    spoofed = {**B, **SPOOFED}
    resp = await client.get("/api/queue", headers=spoofed)
    assert resp.status == 200
    resp = await client.get("/api/userdata?dir=workflows", headers=spoofed)
    assert resp.status in (200, 404)
    resp = await client.post(
        "/prompt", json={"prompt": graph(), "client_id": "tab-b"}, headers=spoofed
    )
    assert resp.status == 200, await resp.text()
    connection = {"Connection": "Upgrade, " + SPOOFED["Connection"]}
    ws = await client.ws_connect("/ws?clientId=tab-b", headers={**spoofed, **connection})
    assert (await ws.receive_json(timeout=10))["type"] == "status"
    await ws.close()
    # Less the proxy's own reads (its node catalog, ComfyUI's user mode, and the gateway
    # queue's reads of ComfyUI's queue, which carry no request id): not B's requests.
    seen = [
        r
        for r in fake_comfy.received
        if r.path not in ("/api/object_info", "/users")
        and not (r.path == "/queue" and "X-Request-ID" not in r.headers)
    ]
    assert [r.path for r in seen] == ["/api/queue", "/api/userdata", "/prompt", "/ws"]
    for request in seen:
        assert_identity_is_bobs(request, client, user_headers=user_headers)
    await fake_comfy.wait_idle()


# ------------------------------------------------------------ the end of a credential


async def test_a_socket_ends_with_its_token(client: Client, fake_comfy: FakeComfyUI) -> None:
    """B's socket outlives neither the revocation nor the expiry of his token (the relay
    sweeper's recheck, driven here); ComfyUI's socket for it is closed too. A's socket is
    left alone."""
    a_ws, _ = await connect(client, A, "clientId=tab-a", flags=False)
    revoked_token = make_token("bob", ("user",), jti="bob-ws-revoked")
    now = int(time.time())
    expiring_token = make_token("bob", ("user",), jti="bob-ws-expiring", exp=now + 600)
    revoked, _ = await connect(
        client, {"Authorization": f"Bearer {revoked_token}"}, "clientId=one", flags=False
    )
    expiring, _ = await connect(client, {}, f"clientId=two&token={expiring_token}", flags=False)
    assert await sweep_once(client.app) == 0

    await client.app[AUTH].revocations.revoke("bob-ws-revoked", now + 3600)
    assert await sweep_once(client.app) == 1
    msg = await revoked.receive(timeout=10)
    assert (msg.type, msg.data) == (aiohttp.WSMsgType.CLOSE, 1008)
    await fake_comfy.wait_socket(upstream_client_id(BOB, "one"), gone=True)

    assert await sweep_once(client.app, now=now + 601) == 1
    msg = await expiring.receive(timeout=10)
    assert (msg.type, msg.data) == (aiohttp.WSMsgType.CLOSE, 1008)
    await fake_comfy.wait_socket(upstream_client_id(BOB, "two"), gone=True)

    assert A_NAMESPACED in fake_comfy.sockets
    assert not a_ws.closed
    fake_comfy.reset()
    # Neither credential opens a new socket: nothing reaches ComfyUI.
    with pytest.raises(aiohttp.WSServerHandshakeError) as caught:
        await client.ws_connect(
            "/ws?clientId=one", headers={"Authorization": f"Bearer {revoked_token}"}
        )
    assert caught.value.status == 401
    expired = make_token("bob", ("user",), exp=now - 120, iat=now - 600)
    with pytest.raises(aiohttp.WSServerHandshakeError) as caught:
        await client.ws_connect(f"/ws?clientId=two&token={expired}")
    assert caught.value.status == 401
    assert handshakes(fake_comfy) == []
    await a_ws.close()
