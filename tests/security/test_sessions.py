"""Sessions end with the credential they came from (issue 13, item 7).

A browser session made by pasting an API token on the login page ends when the token is revoked
(``comfygate token revoke`` or the revocation list's API) and never outlives the token's ``exp``;
a session made with a password ends when ``comfygate user remove`` / ``user passwd`` (or an edit
of the user's roles) changes the user's entry. "Ends" means: the cookie gets 401
``session_revoked`` on its next request, on every replica, and an open WebSocket is closed with
1008 at the next recheck (``sweep_once``, driven here instead of waited for). Each case checks
the holder's answer and that the fake ComfyUI received nothing after the credential ended.
"""

from __future__ import annotations

import argparse
import asyncio
import io
import os
import re
import time
from pathlib import Path
from typing import Any

import aiohttp
import jwt
import pytest
from aiohttp.test_utils import TestClient

from proxy.auth import cli as auth_cli
from proxy.auth.authenticator import AUTH
from proxy.auth.revocation import CachedRevocationList, FailModeRevocations
from proxy.auth.sessions import SessionCodec
from proxy.auth.sweeper import sweep_once
from proxy.auth.users import UsersFile
from proxy.settings import SETTINGS
from tests.conftest import JWT_SECRET, SESSION_SECRET, ProxyFactory, make_settings
from tests.fakes.comfyui import FakeComfyUI

Client = TestClient[Any, Any]
COOKIE = "comfygate_session"
PASSWORD = "correct horse battery"
NEW_PASSWORD = "staple battery horse"


# ------------------------------------------------------------------------------- helpers


@pytest.fixture(params=["memory", "redis"])
def redis_section(request: pytest.FixtureRequest) -> dict[str, Any]:
    """The proxy's ``[redis]`` section: none (in-process state) or the suite's redis-server."""
    if request.param == "memory":
        return {}
    return {"url": request.getfixturevalue("redis_url")}


def make_users_file(tmp_path: Path) -> Path:
    path = tmp_path / "users.toml"
    users = UsersFile(path)
    users.add("alice", PASSWORD, ["user"])
    return path


def pasted_token(subject: str = "alice", *, ttl: int = 3600, **claims: Any) -> tuple[str, str]:
    """An API token ``(token, jti)`` as ``comfygate token create`` would issue it."""
    now = int(time.time())
    jti = f"jti-{os.urandom(6).hex()}"
    payload = {"sub": subject, "roles": ["user"], "iat": now, "exp": now + ttl, "jti": jti}
    payload.update(claims)
    return jwt.encode(payload, JWT_SECRET, algorithm="HS256"), jti


async def proxy(
    make_proxy: ProxyFactory,
    fake: FakeComfyUI,
    redis: dict[str, Any],
    users: Path | None = None,
) -> Client:
    auth: dict[str, Any] = {}
    if users is not None:
        auth["login"] = {"users_file": str(users)}
    return await make_proxy(fake.url, token=None, redis=redis, auth=auth)


def origin(client: Client) -> str:
    return f"http://{client.server.host}:{client.server.port}"


async def login(client: Client, **fields: str) -> aiohttp.ClientResponse:
    """The login form as a browser posts it (CSRF token from the page, our Origin)."""
    page = await client.get("/login")
    csrf = re.search(r'name="csrf" value="([^"]+)"', await page.text())
    assert csrf is not None
    return await client.post(
        "/login",
        data={"csrf": csrf.group(1), "next": "/", **fields},
        headers={"Origin": origin(client)},
        allow_redirects=False,
    )


async def session_of(client: Client, **fields: str) -> str:
    """Sign in; the session cookie's value (the jar is emptied: requests pass it explicitly,
    so the same value can be replayed by another party)."""
    resp = await login(client, **fields)
    assert resp.status == 303, await resp.text()
    value = resp.cookies[COOKIE].value
    client.session.cookie_jar.clear()
    return value


async def get_queue(client: Client, cookie: str) -> aiohttp.ClientResponse:
    return await client.get("/api/queue", headers={"Cookie": f"{COOKIE}={cookie}"})


async def open_socket(client: Client, cookie: str, client_id: str) -> Any:
    ws = await client.ws_connect(
        f"/ws?clientId={client_id}",
        headers={"Cookie": f"{COOKIE}={cookie}", "Origin": origin(client)},
    )
    assert (await ws.receive_json())["type"] == "status"
    return ws


async def assert_ended(client: Client, cookie: str, error_type: str = "session_revoked") -> None:
    resp = await get_queue(client, cookie)
    assert resp.status == 401, await resp.text()
    assert (await resp.json())["error"]["type"] == error_type


async def assert_socket_closed(client: Client, ws: Any, **sweep: float) -> None:
    assert await sweep_once(client.app, **sweep) >= 1
    msg = await ws.receive()
    assert msg.type == aiohttp.WSMsgType.CLOSE
    assert msg.data == 1008


def cli(argv: list[str], settings: Any, stdin: str = "") -> tuple[int, str]:
    """``comfygate <argv>`` as the operator runs it; (exit status, stderr)."""
    parser = argparse.ArgumentParser(prog="comfygate")
    auth_cli.register(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(argv)
    out, err = io.StringIO(), io.StringIO()
    status = auth_cli.run(
        args, settings, stdin=io.StringIO(stdin), stdout=out, stderr=err, configure_logs=False
    )
    return status, err.getvalue()


def expire_cached_answers(client: Client) -> None:
    """Move this replica's revocation cache past its TTL (``auth.revocation_cache_seconds``):
    a revocation written by another process is honoured once the cached answer is that old."""
    outer = client.app[AUTH].revocations
    assert isinstance(outer, FailModeRevocations)
    cache = outer.inner
    assert isinstance(cache, CachedRevocationList)
    cache.clock = lambda: time.monotonic() + cache.ttl


# ---------------------------------------------------------------------- pasted API tokens


async def test_revoking_the_pasted_token_ends_the_session_and_its_socket(
    make_proxy: ProxyFactory, fake_comfy: FakeComfyUI, redis_section: dict[str, Any]
) -> None:
    """The revocation list's API (what every replica's denylist is), with and without Redis."""
    client = await proxy(make_proxy, fake_comfy, redis_section)
    token, jti = pasted_token()
    cookie = await session_of(client, token=token)
    assert (await get_queue(client, cookie)).status == 200
    ws = await open_socket(client, cookie, "tab1")

    await client.app[AUTH].revocations.revoke(jti, time.time() + 3600)
    seen = len(fake_comfy.received)
    await assert_ended(client, cookie)
    await assert_socket_closed(client, ws)
    assert len(fake_comfy.received) == seen
    # The login page no longer shows the browser as signed in, and the token cannot sign in.
    page = await client.get("/login", headers={"Cookie": f"{COOKIE}={cookie}"})
    assert "You are signed in" not in await page.text()
    client.session.cookie_jar.clear()
    assert (await login(client, token=token)).status == 401
    assert len(fake_comfy.received) == seen


async def test_cli_token_revoke_ends_sessions_on_every_replica(
    make_proxy: ProxyFactory, fake_comfy: FakeComfyUI, redis_url: str
) -> None:
    """``comfygate token revoke <jti>`` writes Redis; both replicas refuse the session (after at
    most their revocation cache TTL) and close its sockets at their recheck."""
    redis = {"url": redis_url}
    first = await proxy(make_proxy, fake_comfy, redis)
    second = await proxy(make_proxy, fake_comfy, redis)
    token, jti = pasted_token()
    cookie = await session_of(first, token=token)
    assert (await get_queue(first, cookie)).status == 200
    assert (await get_queue(second, cookie)).status == 200  # one session for every replica
    ws_first = await open_socket(first, cookie, "tab1")
    ws_second = await open_socket(second, cookie, "tab2")

    settings = make_settings(fake_comfy.url, redis=redis)
    status, said = await asyncio.to_thread(cli, ["token", "revoke", jti], settings)
    assert status == 0, said
    assert "browser sessions" in said
    expire_cached_answers(first)
    expire_cached_answers(second)
    seen = len(fake_comfy.received)
    await assert_ended(first, cookie)
    await assert_ended(second, cookie)
    await assert_socket_closed(first, ws_first)
    await assert_socket_closed(second, ws_second)
    assert len(fake_comfy.received) == seen


async def test_another_pasted_token_is_unaffected(
    make_proxy: ProxyFactory, fake_comfy: FakeComfyUI
) -> None:
    """Revoking one token ends the sessions made from it, not the same user's others."""
    client = await proxy(make_proxy, fake_comfy, {})
    revoked, jti = pasted_token()
    kept, _ = pasted_token()
    doomed = await session_of(client, token=revoked)
    alive = await session_of(client, token=kept)
    await client.app[AUTH].revocations.revoke(jti, None)
    await assert_ended(client, doomed)
    assert (await get_queue(client, alive)).status == 200


async def test_the_session_never_outlives_the_pasted_token(
    make_proxy: ProxyFactory, fake_comfy: FakeComfyUI
) -> None:
    client = await proxy(make_proxy, fake_comfy, {})
    token, _ = pasted_token(ttl=120)
    exp = jwt.decode(token, options={"verify_signature": False})["exp"]
    resp = await login(client, token=token)
    assert resp.status == 303
    assert int(resp.cookies[COOKIE]["max-age"]) <= 120  # not the 7-day session default
    cookie = resp.cookies[COOKIE].value
    client.session.cookie_jar.clear()
    assert jwt.decode(cookie, options={"verify_signature": False})["aexp"] <= exp
    ws = await open_socket(client, cookie, "tab1")

    # The token's exp has passed (a codec whose clock is there; no sleeping in tests): the
    # session has ended with it, even though it was used (renewed) recently.
    settings = client.app[SETTINGS].auth.session
    client.app[AUTH].sessions = SessionCodec(
        settings, SESSION_SECRET.encode(), clock=lambda: exp + 1.0
    )
    seen = len(fake_comfy.received)
    await assert_ended(client, cookie, "session_expired")
    await assert_socket_closed(client, ws, now=exp + 1.0)
    assert len(fake_comfy.received) == seen


async def test_a_token_past_its_exp_gives_no_session(
    make_proxy: ProxyFactory, fake_comfy: FakeComfyUI
) -> None:
    """Within the verifier's leeway a bearer token still works, but a session from it would
    be born past the token's exp: refused."""
    client = await proxy(make_proxy, fake_comfy, {})
    token, _ = pasted_token(ttl=-5)
    resp = await login(client, token=token)
    assert resp.status == 401
    assert COOKIE not in resp.cookies
    assert fake_comfy.received == []


async def test_a_cookie_tied_to_no_credential_is_refused(
    make_proxy: ProxyFactory, fake_comfy: FakeComfyUI, tmp_path: Path
) -> None:
    """A session signed with the right key but without its origin (as releases before this
    check issued them), or a password session without a users-file generation: refused."""
    client = await proxy(make_proxy, fake_comfy, {}, make_users_file(tmp_path))
    now = int(time.time())
    base = {
        "typ": "comfygate-session",
        "sub": "alice",
        "roles": ["admin"],
        "sid": "legacy",
        "iat": now,
        "exp": now + 3600,
        "aexp": now + 3600,
    }
    for claims in (base, {**base, "src": "password"}, {**base, "src": "other"}):
        cookie = jwt.encode(claims, SESSION_SECRET, algorithm="HS256")
        await assert_ended(client, cookie, "session_invalid")
    assert fake_comfy.received == []


# ------------------------------------------------------------------ users-file passwords


async def test_user_remove_ends_live_sessions(
    make_proxy: ProxyFactory,
    fake_comfy: FakeComfyUI,
    redis_section: dict[str, Any],
    tmp_path: Path,
) -> None:
    users = make_users_file(tmp_path)
    client = await proxy(make_proxy, fake_comfy, redis_section, users)
    cookie = await session_of(client, username="alice", password=PASSWORD)
    assert (await get_queue(client, cookie)).status == 200
    ws = await open_socket(client, cookie, "tab1")

    settings = make_settings(fake_comfy.url, redis=redis_section)
    status, said = await asyncio.to_thread(
        cli, ["user", "remove", "--users-file", str(users), "alice"], settings
    )
    assert status == 0, said
    assert "sessions end" in said
    seen = len(fake_comfy.received)
    await assert_ended(client, cookie)
    await assert_socket_closed(client, ws)
    assert (await login(client, username="alice", password=PASSWORD)).status == 401
    assert len(fake_comfy.received) == seen


async def test_user_passwd_ends_live_sessions_and_a_copied_cookie(
    make_proxy: ProxyFactory,
    fake_comfy: FakeComfyUI,
    redis_section: dict[str, Any],
    tmp_path: Path,
) -> None:
    """A's cookie was copied by B. A changes the password: B's copy (and A's own sockets) end;
    A signs in again with the new password; B cannot with the old one."""
    users = make_users_file(tmp_path)
    client = await proxy(make_proxy, fake_comfy, redis_section, users)
    stolen = await session_of(client, username="alice", password=PASSWORD)
    assert (await get_queue(client, stolen)).status == 200
    ws = await open_socket(client, stolen, "b-tab")

    settings = make_settings(fake_comfy.url, redis=redis_section)
    argv = ["user", "passwd", "--users-file", str(users), "--password-stdin", "alice"]
    status, said = await asyncio.to_thread(cli, argv, settings, NEW_PASSWORD + "\n")
    assert status == 0, said
    seen = len(fake_comfy.received)
    await assert_ended(client, stolen)
    await assert_socket_closed(client, ws)
    assert (await login(client, username="alice", password=PASSWORD)).status == 401
    assert len(fake_comfy.received) == seen

    fresh = await session_of(client, username="alice", password=NEW_PASSWORD)
    assert (await get_queue(client, fresh)).status == 200
    await assert_ended(client, stolen)  # the new login does not revive the old session


async def test_setting_the_same_password_again_still_ends_sessions(
    make_proxy: ProxyFactory, fake_comfy: FakeComfyUI, tmp_path: Path
) -> None:
    """Each hash has a new salt: "change" it to the same password to sign everyone out."""
    users = make_users_file(tmp_path)
    client = await proxy(make_proxy, fake_comfy, {}, users)
    cookie = await session_of(client, username="alice", password=PASSWORD)
    UsersFile(users).set_password("alice", PASSWORD)
    seen = len(fake_comfy.received)
    await assert_ended(client, cookie)
    assert len(fake_comfy.received) == seen


async def test_removed_then_re_added_user_does_not_revive_old_sessions(
    make_proxy: ProxyFactory, fake_comfy: FakeComfyUI, tmp_path: Path
) -> None:
    users = make_users_file(tmp_path)
    client = await proxy(make_proxy, fake_comfy, {}, users)
    cookie = await session_of(client, username="alice", password=PASSWORD)
    editor = UsersFile(users)
    editor.remove("alice")
    editor.add("alice", PASSWORD, ["user"])
    await assert_ended(client, cookie)


async def test_a_role_change_in_the_users_file_ends_the_session(
    make_proxy: ProxyFactory, fake_comfy: FakeComfyUI, tmp_path: Path
) -> None:
    """The operator demotes alice by editing the file (an editor's atomic save): her admin
    session does not keep its roles; she signs in again and gets the new ones."""
    path = tmp_path / "users.toml"
    UsersFile(path).add("alice", PASSWORD, ["admin"])
    client = await proxy(make_proxy, fake_comfy, {}, path)
    cookie = await session_of(client, username="alice", password=PASSWORD)
    ws = await open_socket(client, cookie, "tab1")
    # Admin-only (not one of the frontend's own calls, which a regular user gets empty).
    logs = await client.get("/internal/files/output", headers={"Cookie": f"{COOKIE}={cookie}"})
    assert logs.status == 200

    edited = path.read_text().replace('roles = ["admin"]', 'roles = ["viewer"]')
    tmp = path.with_suffix(".new")
    tmp.write_text(edited)
    tmp.chmod(0o600)
    os.replace(tmp, path)
    seen = len(fake_comfy.received)
    await assert_ended(client, cookie)
    await assert_socket_closed(client, ws)
    assert len(fake_comfy.received) == seen

    viewer = await session_of(client, username="alice", password=PASSWORD)
    refused = await client.get("/internal/files/output", headers={"Cookie": f"{COOKIE}={viewer}"})
    assert refused.status == 403
    assert (await refused.json())["error"]["type"] == "forbidden_role"
    assert len(fake_comfy.received) == seen


async def test_other_users_sessions_survive_a_users_file_change(
    make_proxy: ProxyFactory, fake_comfy: FakeComfyUI, tmp_path: Path
) -> None:
    users = make_users_file(tmp_path)
    UsersFile(users).add("bob", PASSWORD, ["user"])
    client = await proxy(make_proxy, fake_comfy, {}, users)
    alice = await session_of(client, username="alice", password=PASSWORD)
    bob = await session_of(client, username="bob", password=PASSWORD)
    UsersFile(users).remove("alice")
    await assert_ended(client, alice)
    assert (await get_queue(client, bob)).status == 200


async def test_password_sessions_end_when_password_login_is_no_longer_configured(
    make_proxy: ProxyFactory, fake_comfy: FakeComfyUI, tmp_path: Path
) -> None:
    """Same session secret, the users file dropped from the config: no entry vouches for the
    session any more."""
    users = make_users_file(tmp_path)
    before = await proxy(make_proxy, fake_comfy, {}, users)
    cookie = await session_of(before, username="alice", password=PASSWORD)
    after = await proxy(make_proxy, fake_comfy, {})
    seen = len(fake_comfy.received)
    await assert_ended(after, cookie)
    assert len(fake_comfy.received) == seen
